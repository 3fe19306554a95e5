// Narrow: a slice of a tensor along one dim, as a view (ATen's narrow).
// A host-level op: a program runs it between fusions, which read its
// result in place. Kernel codegen refuses it inside a fusion (as it does
// matmuls): such a fusion runs op by op on ATen, also on CUDA tensors.
// The MoE layer uses it to split one grouped matmul's [rows, 2I] result
// into its gate and up halves.
#pragma once

#include <cstdint>
#include <string>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// out = x.narrow(dim, start, length): out has x's rank and dtype, x's
// extents but `length` in `dim`. A view: no copy, and capturable.
class Narrow : public Expr {
 public:
  Narrow(TensorView* out, TensorView* x, int64_t dim, int64_t start,
         int64_t length);
  HF_DECLARE_EXPR(Narrow)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* x() const { return input(0)->as<TensorView>(); }
  int64_t dim() const { return attribute<int64_t>(0); }
  int64_t start() const { return attribute<int64_t>(1); }
  int64_t length() const { return attribute<int64_t>(2); }

  // "T5 = narrow(T3, dim=1, start=0, length=64)"
  std::string toInlineString() const override;
  void validate() const override;
  // Checks the slice against x's actual size in `dim` (an error naming the
  // node when it does not fit).
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Builds a Narrow in the active container (see FusionGuard). `dim` may be
// negative (counted from the end); start >= 0, length >= 0, and when x's
// extent in `dim` is a constant, start + length at most that.
TensorView* narrow(TensorView* x, int64_t dim, int64_t start, int64_t length);

}  // namespace hostfuse
