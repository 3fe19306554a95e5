// Mixture-of-Experts expert parallelism in the IR: MoeDispatch sends every
// token to the ranks of the experts it picked, MoeCombine brings the expert
// outputs back and sums them per token. docs/moe.md states the semantics.
//
// Notation (also in runtime.h):
//   R  ranks (the communicator's world size, known only at run time)
//   T  tokens on this rank       H  hidden size       K  picks per token
//   E  experts in all (E % R == 0)     L = E / R local experts per rank;
//   expert e lives on rank e / L as local expert e % L.
//   rows  rows this rank receives (one per unmasked pick sent to it).
//
// The nodes validate dtypes and ranks when they are built. What depends on
// values or on R (expert ids, T and K of the actual tensors, E % R) is
// checked when they run, on every rank at once (see input_checks.h).
//
//   MoeDispatchResult d = moeDispatch(x, topk_idx, topk_weights, E);
//   TensorView* y = groupedMatmul(d.recv_x, expert_w, d.recv_expert_counts);
//   TensorView* out = moeCombine(y, d, topk_weights, x->extent(0));
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>
#include <hostfuse/multidevice/moe/backend.h>

namespace hostfuse {

// Inputs: x [T, H] floating, topk_idx [T, K] i64 or i32 (-1 masks a pick),
// optional topk_weights [T, K] floating.
// Outputs, in order (recv_weights only with topk_weights, recv_scales only
// with quantize=fp8_e4m3):
//   recv_x [rows, H] (x's dtype; f8e4m3 when quantized), expert-major:
//     rows of local expert 0, then
//     1, ...; inside an expert by source rank, then source token index;
//     with a fixed-capacity backend (cuda), rows = C (the capacity) and only
//     the first sum(recv_expert_counts) rows are valid;
//   recv_src_rank, recv_src_token, recv_src_k [rows] i64: where each row
//     came from (rank, token index there, pick slot);
//   recv_weights [rows] (topk_weights' dtype): the pick's weight;
//   recv_expert_counts [L] i64: rows per local expert;
//   n_tokens_to_rank [R] i64: rows this rank sent to each rank;
//   n_tokens_from_rank [R] i64: rows this rank received from each rank;
//   recv_layout_id [R + 1] i64: which dispatch made this layout, and
//     fingerprints of the rows it sent (layout_id.h); combine checks it;
//   recv_scales [rows, H / 128] f32: with quantize=fp8_e4m3, the scale of
//     each block of 128 channels of each row (moe/fp8.h).
// Attributes: num_experts, backend, quantize (none or fp8_e4m3: x of f32,
// bf16 or f16 with H a multiple of 128), and capacity (fixed-capacity backends
// only): C, the rows a rank can receive; 0 means the worst case
// R x max(T_max, 1) x min(K, L).
class MoeDispatch : public Expr {
 public:
  // `recv_weights` and `topk_weights` are both null or both given.
  MoeDispatch(TensorView* recv_x, TensorView* recv_src_rank,
              TensorView* recv_src_token, TensorView* recv_src_k,
              TensorView* recv_weights, TensorView* recv_expert_counts,
              TensorView* n_tokens_to_rank, TensorView* n_tokens_from_rank,
              TensorView* recv_layout_id, TensorView* x, TensorView* topk_idx,
              TensorView* topk_weights, int64_t num_experts, MoeBackend backend,
              int64_t capacity = 0,
              MoeDispatchQuant quantize = MoeDispatchQuant::None,
              TensorView* recv_scales = nullptr);
  HF_DECLARE_EXPR(MoeDispatch)
  // What its backend says (MoeBackendInfo::capture_problem).
  std::vector<std::string> captureProblems(
      const at::Device& device) const override;

  TensorView* x() const { return input(0)->as<TensorView>(); }
  TensorView* topkIdx() const { return input(1)->as<TensorView>(); }
  // nullptr without weights.
  TensorView* topkWeights() const {
    return hasWeights() ? input(2)->as<TensorView>() : nullptr;
  }
  int64_t numExperts() const { return attribute<int64_t>(0); }
  MoeBackend backend() const {
    return static_cast<MoeBackend>(attribute<int64_t>(1));
  }
  bool hasWeights() const { return attribute<bool>(2); }
  // Receive rows per rank for backend=cuda; 0: the worst case.
  int64_t capacity() const { return attribute<int64_t>(3); }
  MoeDispatchQuant quantize() const {
    return static_cast<MoeDispatchQuant>(attribute<int64_t>(4));
  }

  TensorView* recvX() const { return output(0)->as<TensorView>(); }
  TensorView* recvSrcRank() const { return output(1)->as<TensorView>(); }
  TensorView* recvSrcToken() const { return output(2)->as<TensorView>(); }
  TensorView* recvSrcK() const { return output(3)->as<TensorView>(); }
  // nullptr without weights.
  TensorView* recvWeights() const {
    return hasWeights() ? output(4)->as<TensorView>() : nullptr;
  }
  TensorView* recvExpertCounts() const {
    return output(layoutOutput(0))->as<TensorView>();
  }
  TensorView* nTokensToRank() const {
    return output(layoutOutput(1))->as<TensorView>();
  }
  TensorView* nTokensFromRank() const {
    return output(layoutOutput(2))->as<TensorView>();
  }
  TensorView* recvLayoutId() const {
    return output(layoutOutput(3))->as<TensorView>();
  }
  // [rows, H / 128] f32 with quantize=fp8_e4m3; nullptr otherwise.
  TensorView* recvScales() const {
    return quantize() != MoeDispatchQuant::None
               ? output(layoutOutput(4))->as<TensorView>()
               : nullptr;
  }

  // MoeDispatch(x=T0, topk_idx=T1, topk_weights=T2, num_experts=8,
  //   backend=collective) -> (recv_x=T3, recv_src_rank=T4, ...); ",
  //   capacity=C" after the backend when set.
  std::string toInlineString() const override;
  void validate() const override;

 private:
  size_t layoutOutput(size_t i) const { return (hasWeights() ? 5 : 4) + i; }
};

// Inputs: expert_out [rows, H'] floating, in MoeDispatch's layout; the
// layout as dispatch returned it (recv_src_rank, recv_src_token, recv_src_k,
// recv_expert_counts, n_tokens_to_rank, n_tokens_from_rank,
// recv_layout_id); optional weights; T, the number of tokens of this rank.
// Output: combined [T, H'] in expert_out's dtype, in the original token
// order. Attribute `reduce` (backend.h, MoeCombineReduce):
//   per_pick (the default): the weights are topk_weights [T, K] floating;
//     combined[t] = sum over unmasked picks k of w[t, k] * out(t, k)
//     (w = 1 without weights), accumulated in fp32 in pick order;
//   per_rank: the weights are recv_weights [rows] floating (dispatch's
//     output, on the expert's rank); per rank r in rank order, the weighted
//     sum of t's picks on r in pick order in fp32, rounded to the dtype,
//     then those summed in fp32 and rounded again.
// Tokens without unmasked picks are 0. With backend=cuda the layout must come
// straight from a MoeDispatch with backend=cuda (whose workspace holds the
// rows' metadata), and expert_out must have its C rows, H and dtype.
class MoeCombine : public Expr {
 public:
  MoeCombine(TensorView* combined, TensorView* expert_out,
             TensorView* recv_src_rank, TensorView* recv_src_token,
             TensorView* recv_src_k, TensorView* recv_expert_counts,
             TensorView* n_tokens_to_rank, TensorView* n_tokens_from_rank,
             TensorView* recv_layout_id, TensorView* weights,
             Scalar* num_tokens, int64_t num_experts, MoeBackend backend,
             MoeCombineReduce reduce = MoeCombineReduce::PerPick);
  HF_DECLARE_EXPR(MoeCombine)
  std::vector<std::string> captureProblems(
      const at::Device& device) const override;

  TensorView* expertOut() const { return input(0)->as<TensorView>(); }
  TensorView* recvSrcRank() const { return input(1)->as<TensorView>(); }
  TensorView* recvSrcToken() const { return input(2)->as<TensorView>(); }
  TensorView* recvSrcK() const { return input(3)->as<TensorView>(); }
  TensorView* recvExpertCounts() const { return input(4)->as<TensorView>(); }
  TensorView* nTokensToRank() const { return input(5)->as<TensorView>(); }
  TensorView* nTokensFromRank() const { return input(6)->as<TensorView>(); }
  TensorView* recvLayoutId() const { return input(7)->as<TensorView>(); }
  // topk_weights or recv_weights, by the mode; nullptr without weights.
  TensorView* weights() const {
    return hasWeights() ? input(8)->as<TensorView>() : nullptr;
  }
  // The weights of per_pick; nullptr without weights or with per_rank.
  TensorView* topkWeights() const {
    return reduce() == MoeCombineReduce::PerPick ? weights() : nullptr;
  }
  // The weights of per_rank; nullptr without weights or with per_pick.
  TensorView* recvWeights() const {
    return reduce() == MoeCombineReduce::PerRank ? weights() : nullptr;
  }
  Scalar* numTokens() const {
    return input(hasWeights() ? 9 : 8)->as<Scalar>();
  }
  int64_t numExperts() const { return attribute<int64_t>(0); }
  MoeBackend backend() const {
    return static_cast<MoeBackend>(attribute<int64_t>(1));
  }
  bool hasWeights() const { return attribute<bool>(2); }
  MoeCombineReduce reduce() const {
    return static_cast<MoeCombineReduce>(attribute<int64_t>(3));
  }
  TensorView* combined() const { return output(0)->as<TensorView>(); }
  // The MoeDispatch that computed the layout inputs; nullptr when they
  // come from elsewhere (allowed for backend=collective only).
  const MoeDispatch* dispatch() const;

  // MoeCombine(expert_out=T9, ..., num_tokens=i0, num_experts=8,
  //   backend=collective) -> (T10); ", reduce=per_rank" after the backend
  //   in that mode.
  std::string toInlineString() const override;
  void validate() const override;

 private:
  void validateLayoutFromDispatch() const;
};

// ---------------------------------------------------------------------------
// Builders (in the active container, see FusionGuard).

struct MoeDispatchResult {
  TensorView* recv_x = nullptr;
  TensorView* recv_src_rank = nullptr;
  TensorView* recv_src_token = nullptr;
  TensorView* recv_src_k = nullptr;
  TensorView* recv_weights = nullptr;  // null without topk_weights
  TensorView* recv_expert_counts = nullptr;
  TensorView* n_tokens_to_rank = nullptr;
  TensorView* n_tokens_from_rank = nullptr;
  TensorView* recv_layout_id = nullptr;
  TensorView* recv_scales = nullptr;  // null unless quantized
};

// Builds a MoeDispatch; `topk_weights` may be null. `capacity` (rows per
// receiving rank, 0 = the worst case) applies to backend=cuda only. With
// quantize=fp8_e4m3, recv_x is f8e4m3 and recv_scales is set: pass both to
// groupedMatmul.
MoeDispatchResult moeDispatch(
    TensorView* x, TensorView* topk_idx, TensorView* topk_weights,
    int64_t num_experts, MoeBackend backend = MoeBackend::Collective,
    int64_t capacity = 0, MoeDispatchQuant quantize = MoeDispatchQuant::None);

// Builds the MoeCombine of `layout`, which a moeDispatch returned; takes
// num_experts and the backend from that dispatch. `num_tokens` is T (e.g.
// x->extent(0)); `topk_weights` may be null (an unweighted sum). With
// per_rank, the experts' ranks weight the rows with the weights dispatch
// carried (layout.recv_weights), so `topk_weights` must then be the
// dispatch's own topk_weights, or null.
TensorView* moeCombine(TensorView* expert_out, const MoeDispatchResult& layout,
                       TensorView* topk_weights, Scalar* num_tokens,
                       MoeCombineReduce reduce = MoeCombineReduce::PerPick);

}  // namespace hostfuse
