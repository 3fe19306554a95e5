// TopKSoftmax: the router of an MoE layer after its logits, as one op:
// probabilities = softmax(logits) over the last dim (the experts), the K
// largest of them per row with their expert indices, and, with
// `renormalize`, those K divided by their sum. A single-device op.
#pragma once

#include <c10/core/Device.h>

#include <string>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// logits [T, E] f32; outputs weights [T, K] f32 and indices [T, K] i64,
// largest probability first. Computed in fp32 like the ATen composition
//   p = at::softmax(logits, -1); (w, i) = at::topk(p, K);
//   w = renormalize ? w / w.sum(-1, keepdim) : w
// which is its host path; the device path (CUDA, contiguous logits,
// E <= 256) is one kernel (one warp per row) whose results agree with it to
// a few ulps (expf and the order of the sums differ), and whose ties go to
// the lower index. Capturable on both paths (no host synchronization).
class TopKSoftmax : public Expr {
 public:
  TopKSoftmax(TensorView* weights, TensorView* indices, TensorView* logits,
              int64_t k, bool renormalize);
  HF_DECLARE_EXPR(TopKSoftmax)
  HF_ALWAYS_CAPTURABLE

  int64_t k() const { return attribute<int64_t>(0); }
  bool renormalize() const { return attribute<bool>(1); }
  TensorView* weights() const { return output(0)->as<TensorView>(); }
  TensorView* indices() const { return output(1)->as<TensorView>(); }
  TensorView* logits() const { return input(0)->as<TensorView>(); }

  // "(T3, T4) = topk_softmax(T2, k=8, renormalize=true)"
  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

struct TopKSoftmaxResult {
  TensorView* weights = nullptr;  // [T, K] f32
  TensorView* indices = nullptr;  // [T, K] i64
};

// Builds a TopKSoftmax in the active container (see FusionGuard).
TopKSoftmaxResult topkSoftmax(TensorView* logits, int64_t k, bool renormalize);

}  // namespace hostfuse
