// The interface every MoE backend implements: one runtime per backend and
// evaluator, called with tensors, keeping whatever state its backend needs
// across calls (the cuda backend's workspaces). The IR side
// (multidevice/moe/evaluator.h) reads a node's values, calls its backend's
// runtime and binds the results; nothing else branches on the backend.
//
// Notation: R ranks, T tokens on this rank, H hidden size, K picks per
// token, E experts (E % R == 0), L = E / R local experts; expert e lives on
// rank e / L. docs/moe.md states the semantics both backends implement bit
// for bit.
#pragma once

#include <ATen/core/Tensor.h>

#include <hostfuse/multidevice/moe/backend.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace hostfuse {

// Where dispatch put each received row; what combine needs to send it back.
// With a fixed-capacity backend, every [rows] tensor has C entries and only
// the first sum(expert_counts) are valid.
struct MoeLayout {
  at::Tensor src_rank;            // [rows] i64
  at::Tensor src_token;           // [rows] i64, token index on src_rank
  at::Tensor src_k;               // [rows] i64, pick slot
  at::Tensor expert_counts;       // [L] i64, rows per local expert
  at::Tensor n_tokens_to_rank;    // [R] i64, rows this rank sent to each
  at::Tensor n_tokens_from_rank;  // [R] i64, rows received from each
  // [R + 1] i64: the dispatch that made this layout and fingerprints of
  // what it sent (layout_id.h). Combine refuses a layout whose id does not
  // match its peers' layouts or the rows they hold.
  at::Tensor id;
};

struct MoeDispatchArgs {
  // Identifies the call site (the MoeDispatch node) across calls; a backend
  // with per-site state keys it by this. Every rank makes the same calls
  // with the same sites in the same order.
  const void* site = nullptr;
  // Names the site in errors raised away from its calls (checkStatus after
  // graph replays); called at most once per site. May be empty.
  std::function<std::string()> describe_site;
  at::Tensor x;                            // [T, H] floating
  at::Tensor topk_idx;                     // [T, K] i64 or i32, -1 masks
  std::optional<at::Tensor> topk_weights;  // [T, K] floating
  int64_t num_experts = 0;                 // E
  int64_t capacity = 0;                    // C; 0: the worst case
  MoeDispatchQuant quantize = MoeDispatchQuant::None;
};

struct MoeDispatchOutput {
  // [rows, H], expert-major: x's dtype, or Float8_e4m3fn with fp8_e4m3
  // (then recv_x[i] is about float(recv_x[i]) * its block's recv_scales).
  at::Tensor recv_x;
  at::Tensor recv_scales;   // fp8_e4m3: [rows, H / 128] fp32; else undefined
  at::Tensor recv_weights;  // [rows], topk_weights' dtype; undefined
                            // without topk_weights
  MoeLayout layout;
};

struct MoeCombineArgs {
  // The site of the dispatch whose layout this is.
  const void* dispatch_site = nullptr;
  at::Tensor expert_out;  // [rows, H'] in the dispatch's layout
  MoeLayout layout;
  MoeCombineReduce reduce = MoeCombineReduce::PerPick;
  // per_pick: the weights of this rank's tokens, [T, K] floating.
  std::optional<at::Tensor> topk_weights;
  // per_rank: the weight of each row of expert_out, [rows] floating (what
  // dispatch returned as recv_weights); topk_weights is then unset.
  std::optional<at::Tensor> recv_weights;
  int64_t num_tokens = 0;   // T
  int64_t num_experts = 0;  // E
};

class MoeRuntime {
 public:
  virtual ~MoeRuntime() = default;

  // Sends every unmasked (token, pick) of this rank to the rank of its
  // expert; collective over the ranks. Errors in any rank's inputs raise
  // the message of describeStatus (multidevice/moe/status.h).
  virtual MoeDispatchOutput dispatch(const MoeDispatchArgs& args) = 0;

  // combined [T, H']: per token, the weighted sum of its picks' rows in pick
  // order, accumulated in fp32 (fp64 for fp64 rows); with
  // MoeCombineReduce::PerRank, per rank first (backend.h).
  virtual at::Tensor combine(const MoeCombineArgs& args) = 0;

  // Raises the first error recorded on the device without a host
  // synchronization (graph replays). May wait for the device; must not run
  // during a capture. Does nothing for a backend that raises at once.
  virtual void checkStatus() = 0;
  // This rank failed outside a MoE call (an error of its own in the host
  // program) and will not make the call that its peers make next with this
  // backend, on tensors of `device`'s type: tell them, so that they raise
  // at once naming this rank. Never throws. A backend that cannot does
  // nothing, and the peers raise at their timeout.
  virtual void publishFailure(const at::Device& device) noexcept {
    (void)device;
  }
};

}  // namespace hostfuse
