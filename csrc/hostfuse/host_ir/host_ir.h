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
class RunFusion : public Expr {
 public:
  RunFusion(std::vector<Val*> outputs, std::shared_ptr<Fusion> fusion,
            std::vector<Val*> inputs);
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
// bound to it. Returns the outputs.
std::vector<TensorView*> runFusion(std::shared_ptr<Fusion> fusion,
                                   const std::vector<Val*>& inputs);

// Builds an Allocate of a tensor with the given sizes in the active program.
TensorView* allocate(const std::vector<Scalar*>& extents, DataType dtype);

}  // namespace hostfuse
