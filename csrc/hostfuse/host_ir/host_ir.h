// Expressions that exist only in host programs.
#pragma once

#include <memory>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/container.h>

namespace hostfuse {

// Runs a Fusion on the values of its inputs. The evaluator launches its
// generated kernel (csrc/hostfuse/kernel) for CUDA tensors, and uses the ATen
// reference for CPU tensors and for fusions that codegen cannot handle.
// The Fusion is shared, not copied, when the program is cloned: once handed
// to a RunFusion it must not change.
//
// Optionally row-limited: with `row_counts` (i64 [groups], an extra input
// after the fusion's), the generated kernel computes only the first rows of
// the outputs' dim 0, as many as the counts add up to (a negative count as
// 0, at most the dim's size); the rest of the outputs is unspecified. For
// a MoE layer's fusions over the capacity rows of a cuda-backend dispatch,
// of which only sum(recv_expert_counts) hold tokens. The ATen path (CPU
// tensors, fusions codegen cannot handle) computes every row, and so does
// the kernel of a fusion whose outputs' dim 0 is not its first loop dim.
// Pointwise fusions only.
class RunFusion : public Expr {
 public:
  RunFusion(std::vector<Val*> outputs, std::shared_ptr<Fusion> fusion,
            std::vector<Val*> inputs, TensorView* row_counts = nullptr);
  HF_DECLARE_EXPR_CUSTOM_COPY(RunFusion)
  // The problems of the expressions its fusion computes.
  std::vector<std::string> captureProblems(
      const at::Device& device) const override;
  RunFusion(const RunFusion& other, std::vector<Val*> inputs,
            std::vector<Val*> outputs)
      : Expr(other, std::move(inputs), std::move(outputs)),
        fusion_(other.fusion_) {}

  const Fusion& fusion() const { return *fusion_; }
  const std::shared_ptr<Fusion>& fusionPtr() const { return fusion_; }
  // The inputs bound to the fusion's inputs (all but row_counts).
  std::vector<Val*> fusionInputs() const {
    return {inputs().begin(), inputs().begin() + fusion_->inputs().size()};
  }
  // The row counts of a row-limited run; null otherwise.
  TensorView* rowCounts() const {
    return inputs().size() > fusion_->inputs().size()
               ? input(inputs().size() - 1)->as<TensorView>()
               : nullptr;
  }

  std::string toInlineString() const override;
  void validate() const override;

 private:
  std::shared_ptr<Fusion> fusion_;
};

// Allocates an uninitialized tensor of the output's dtype and sizes on the
// program's device. Its inputs are the output's extents, so the evaluator
// knows their values when it runs.
class Allocate : public Expr {
 public:
  explicit Allocate(TensorView* out);
  HF_DECLARE_EXPR(Allocate)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }

  std::string toInlineString() const override;
  void validate() const override;
};

// Builds a RunFusion in the active host program. Its outputs are new
// tensors whose sizes follow the fusion's: a fusion output extent that is an
// extent of a fusion input becomes the matching extent of the host input
// bound to it. Returns the outputs. `row_counts`: see RunFusion.
std::vector<TensorView*> runFusion(std::shared_ptr<Fusion> fusion,
                                   const std::vector<Val*>& inputs,
                                   TensorView* row_counts = nullptr);

// Builds an Allocate of a tensor with the given sizes in the active program.
TensorView* allocate(const std::vector<Scalar*>& extents, DataType dtype);

}  // namespace hostfuse
