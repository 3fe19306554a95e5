// What codegen needs to know about a Fusion beyond its expressions: how the
// dims of its tensors line up into the loops of one kernel, and in which
// order its reductions can run.
//
// Notation (also used by codegen.cpp and docs/kernels.md):
//   loop dims  the kernel's iteration space, L dims, in the order of the
//              tensor that spans all of them (the reference tensor).
//              Tensor dims that a pointwise op combines, or that a
//              broadcast or reduction carries over, share a loop dim.
//   R          with reductions: the reduced loop dim, always the last one.
//   row        one index of the loop dims before R.
//   row-level  a value that does not depend on R (reduction results and
//              what is computed from them and from inputs without R).
//   pass       one sweep over a row that accumulates reductions; a
//              reduction whose operand needs another reduction's result
//              runs in a later pass.
//   broadcast dim  a tensor dim of size 1 by construction (a dim added by
//              broadcast(), or kept by a keep_dim reduction); it has no
//              loop dim (-1).
//
// A dim of an input whose size is 1 at run time is not a broadcast dim: it
// has a loop dim, and the launch gives it stride 0.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/exprs.h>

namespace hostfuse {

// One dim of one fusion input.
struct InputDim {
  int64_t input = 0;
  int64_t dim = 0;
};

// The size of a tensor dim at run time: the sizes of these input dims,
// broadcast together (size 1 gives way to any other size); no dims at all
// means size 1. This is ATen's shape rule, followed through the fusion.
using SizeSource = std::vector<InputDim>;

// Where a symbolic scalar operand gets its value at launch: fusion input
// `input` itself (dim == -1), or the size of dim `dim` of that input.
struct ScalarSource {
  int64_t input = 0;
  int64_t dim = -1;
};

// The facts about a fusion that launches need, by index rather than by IR
// node, so that one plan serves every fusion that prints the same.
struct KernelPlan {
  int64_t num_loop_dims = 0;
  bool has_reduction = false;
  // Per fusion input: the loop dim of each of its dims; empty for scalars
  // and for tensors the fusion does not use (they get no parameters).
  std::vector<std::vector<int64_t>> input_loop_dims;
  std::vector<bool> input_used;
  // Per fusion output: the loop dim of each dim, -1 for broadcast dims.
  std::vector<std::vector<int64_t>> output_loop_dims;
  // Per fusion output: the run-time size of each dim.
  std::vector<std::vector<SizeSource>> output_sizes;
  // Per reduction: the run-time size of the dim it reduces, which must be
  // the size of R; and the reduction, for error messages.
  std::vector<SizeSource> reduced_sizes;
  std::vector<std::string> reduction_names;
  bool has_max_reduction = false;
  // Whether the contiguous kernel can serve this fusion at all: no
  // reduction, and every used input and every output spans the loop dims
  // in order. (A launch also needs its tensors dense and of the full
  // shape.)
  bool contiguous_possible = false;
  // The contiguous kernel's widest vector: 16 bytes of the widest element
  // among the used inputs and the outputs.
  int64_t max_vector_width = 1;

  // Whether a kernel can be row-limited (InputSignature::row_limited): no
  // reduction, and dim 0 of every output is loop dim 0, so that the first
  // rows of the loop are the first rows of every output.
  bool rowsCanBeLimited() const {
    if (has_reduction || num_loop_dims < 1) {
      return false;
    }
    for (const std::vector<int64_t>& dims : output_loop_dims) {
      if (dims.empty() || dims[0] != 0) {
        return false;
      }
    }
    return true;
  }
  // The symbolic scalar operands, in the order of their kernel parameters.
  std::vector<ScalarSource> scalars;
};

class FusionAnalysis {
 public:
  // Throws hostfuse::Error naming the expression or value when codegen
  // cannot handle the fusion (see docs/kernels.md for what it handles).
  explicit FusionAnalysis(const Fusion& fusion);

  const Fusion& fusion() const { return fusion_; }
  // The fusion's expressions, each after those it depends on.
  const std::vector<Expr*>& exprs() const { return exprs_; }
  const KernelPlan& plan() const { return plan_; }
  int64_t numLoopDims() const { return plan_.num_loop_dims; }
  bool hasReduction() const { return plan_.has_reduction; }
  // The tensor whose dims define the loop dims, for comments.
  const TensorView* reference() const { return reference_; }

  // The loop dim of each dim of `tv`; -1 for a broadcast dim.
  const std::vector<int64_t>& loopDims(const TensorView* tv) const;
  // True when `tv` depends on R (always false without reductions).
  bool dependsOnReducedDim(const TensorView* tv) const;

  // Reductions grouped by pass, each pass in expression order.
  const std::vector<std::vector<const ReductionOp*>>& passes() const {
    return passes_;
  }

  // The symbolic scalars that are kernel parameters, in parameter order
  // (matching plan().scalars).
  const std::vector<const Scalar*>& scalarParams() const {
    return scalar_params_;
  }

  // Position of a fusion input or computed tensor in a fixed topological
  // order (inputs first), for deterministic emission.
  int64_t order(const TensorView* tv) const;

 private:
  void checkSupported(const Expr* expr) const;
  void assignLoopDims();
  void assignPasses();
  void assignScalars();
  void buildPlan();

  const Fusion& fusion_;
  std::vector<Expr*> exprs_;
  KernelPlan plan_;
  const TensorView* reference_ = nullptr;
  std::unordered_map<const TensorView*, std::vector<int64_t>> loop_dims_;
  std::unordered_map<const TensorView*, std::vector<SizeSource>> sizes_;
  std::unordered_map<const TensorView*, int64_t> order_;
  std::vector<std::vector<const ReductionOp*>> passes_;
  std::vector<const Scalar*> scalar_params_;
};

}  // namespace hostfuse
