// CUDA-backend MoE dispatch and combine over NVLink: the workspace of one
// MoE node (CudaMoeRuntime, runtime.h beside this file, keeps one per
// MoeDispatch node). Its pieces: config.h (what it is made of), buffers.h
// (its memory), params.h (the kernels' parameters), profile.h (per-phase
// timing), kernels/ (the kernels, CUDA toolkit only).
//
// Notation: R ranks, T tokens on this rank (T <= T_max), H hidden size,
// K picks per token, E experts, L = E / R local experts (expert e lives on
// rank e / L), C capacity rows per receiving rank.
//
// One CudaMoeWorkspace per MoE node (layer): it owns the node's symmetric
// receive buffers, so two MoE layers never share them. Creating it is the
// collective rendezvous (every rank of the node, same config); after that a
// dispatch or a combine is one kernel on the current stream with no host
// synchronization, so both can be captured in a CUDA graph.
//
// Semantics match the collective backend (docs/moe.md, "Semantics"):
// dispatch delivers every unmasked (token, pick) to its expert's rank in
// expert-major order (by local expert, then source rank, then source token);
// combine returns, per token, the sum over its unmasked picks k = 0..K-1 of
// w[t, k] * out(t, k) accumulated in fp32 in that order, without fused
// multiply-adds, rounded to x's dtype.
//
// Lifetimes: recv_x is a view of the workspace's symmetric receive buffer:
// peers write into it again only once this rank's next dispatch of the
// workspace has started on its stream, so work queued before that on the
// same stream (the experts) may read it; clone it to keep it longer. The
// other outputs are ordinary tensors. combine() takes the handle of the
// workspace's latest dispatch. Every rank makes the same sequence of calls
// on a workspace (they are collectives); a workspace is not thread safe.
//
// Errors found on the device (bad expert ids, duplicate picks, capacity
// overflow, a peer that does not answer within the timeout) are recorded in
// a status word. In eager mode each call waits for its kernel and raises at
// once (unless check_each_call is off); under graph capture nothing waits,
// and checkStatus() raises after the replays. Every rank reports a bad input
// of any rank and a capacity overflow of any rank, so all ranks fail
// together; the next call works. A timeout makes the workspace unusable.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/cuda/config.h>
#include <hostfuse/multidevice/moe/cuda/profile.h>

namespace hostfuse {

struct CudaMoeBuffers;

// What dispatch returns; also the handle combine needs.
struct CudaDispatchResult {
  // [C, H], view of the receive buffer: the workspace's dtype, or with
  // fp8_dispatch Float8_e4m3fn with a row stride of the packed row, and
  // recv_scales [C, H / 128] fp32 the view of the scales beside it.
  at::Tensor recv_x;
  at::Tensor recv_scales;
  at::Tensor recv_src_rank;       // [C] int64
  at::Tensor recv_src_token;      // [C] int64
  at::Tensor recv_src_k;          // [C] int64
  at::Tensor recv_weights;        // [C] fp32; undefined without topk_weights
  at::Tensor recv_expert_counts;  // [L] int64: valid rows per local expert
  at::Tensor n_rows_to_rank;      // [R] int64
  at::Tensor n_rows_from_rank;    // [R] int64
  // [R + 1] int64 (multidevice/moe/layout_id.h): word 0 the dispatch's
  // epoch, written by the kernel; the fingerprints 0 (the combine routes
  // rows by the workspace's metadata, not by the layout's values).
  at::Tensor recv_layout_id;
  // Handle.
  int64_t num_tokens = 0;
  uint64_t call = 0;  // 1 for the workspace's first dispatch, 2, ...
  const void* workspace = nullptr;
};

class CudaMoeWorkspace {
 public:
  // Collective over the config's ranks: checks that every rank describes
  // the same workspace, then allocates and maps the symmetric buffers
  // through `store`.
  CudaMoeWorkspace(c10::intrusive_ptr<c10d::Store> store, CudaMoeConfig config);
  ~CudaMoeWorkspace();
  CudaMoeWorkspace(const CudaMoeWorkspace&) = delete;
  CudaMoeWorkspace& operator=(const CudaMoeWorkspace&) = delete;

  // x [T, H] of the workspace's dtype, topk_idx [T, K] int64 or int32 (-1
  // masks a pick), topk_weights [T, K] floating. All on the device.
  CudaDispatchResult dispatch(
      const at::Tensor& x, const at::Tensor& topk_idx,
      const std::optional<at::Tensor>& topk_weights = std::nullopt);

  // expert_out [C, H] in the layout of `handle` (the latest dispatch);
  // returns combined [T, H]. num_tokens, when given, must be the
  // dispatch's T. `layout_id`, when given, is the recv_layout_id of the
  // layout the caller holds: the kernel compares its epoch with the
  // latest dispatch's, on the device, and refuses a stale one
  // (kStatusStaleLayout: NaN output, the failure published to the peers).
  // With reduce=per_rank, `weights` are the rows' weights [C] (what
  // dispatch returned as recv_weights), else topk_weights [T, K].
  at::Tensor combine(const at::Tensor& expert_out,
                     const CudaDispatchResult& handle,
                     const std::optional<at::Tensor>& weights = std::nullopt,
                     int64_t num_tokens = -1,
                     const at::Tensor& layout_id = at::Tensor(),
                     MoeCombineReduce reduce = MoeCombineReduce::PerPick);

  // Waits for the device and raises the first error recorded since the last
  // check (use after graph replays). Must not run during a capture.
  void checkStatus();

  // Tells every peer that this rank failed (their kernels stop at once and
  // raise naming it) and marks this workspace unusable, as every peer's
  // becomes. dispatch and combine do it themselves when they refuse their
  // arguments; a caller does it for an error of its own in a program that
  // uses the workspace. Never throws; does nothing during a capture or
  // when the workspace is unusable already.
  void publishFailure() noexcept;

  // Needs config.profile (or HOSTFUSE_MOE_PROFILE=1). Waits for the device
  // and reduces the profile buffer over blocks: the phases of the latest
  // dispatch and the latest combine of this workspace on this rank. Must not
  // run during a capture.
  CudaMoeProfile profileReport() const;
  bool profiling() const { return launch_.profile; }

  const CudaMoeConfig& config() const { return config_; }
  const CudaMoeLaunch& launch() const { return launch_; }
  int64_t capacity() const { return launch_.capacity; }
  int64_t localExperts() const { return launch_.local_experts; }
  int blocks() const { return launch_.blocks; }
  int pushBlocks() const { return launch_.push_blocks; }
  // Test hook: see CudaMoeBuffers::damagedGuardBytes.
  int64_t damagedGuardBytes() const;

 private:
  class TagLease;

  void checkAgreement(c10d::Store& store) const;
  void checkUsable(const char* op) const;
  // Runs `checks`; if they throw, publishes the failure, then rethrows.
  template <typename Checks>
  auto publishingFailure(Checks&& checks) -> decltype(checks());
  void afterCall(const char* op);
  void raiseStatus();

  CudaMoeConfig config_;
  CudaMoeLaunch launch_;
  uint64_t dispatch_calls_ = 0;
  bool broken_ = false;
  std::string broken_reason_;
  // fp8_dispatch: [T_max, dispatch_row_bytes] u8, the quantized rows of
  // this rank's tokens before they leave.
  at::Tensor fp8_rows_;
  std::unique_ptr<TagLease> tag_;
  std::unique_ptr<CudaMoeBuffers> buffers_;
};

}  // namespace hostfuse
