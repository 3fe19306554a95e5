// CUDA-backend MoE dispatch and combine over NVLink: the runtime behind
// MoeDispatch / MoeCombine with backend = cuda (single node).
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
// Semantics match the collective backend (DESIGN.md, "MoE semantics"):
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

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace hostfuse {

class SymmetricMemory;
namespace moe {
struct CommonParams;
}

struct CudaMoeConfig {
  int rank = 0;
  int world_size = 1;
  int device = 0;  // CUDA device index of this rank
  int64_t num_experts = 0;
  // T_max: the largest T of any call on any rank; the same on every rank
  // (the buffers are symmetric).
  int64_t max_tokens = 0;
  int64_t hidden = 0;
  int64_t topk = 0;
  at::ScalarType dtype = at::kBFloat16;  // x, expert outputs, combined
  // Rows per receiving rank; 0 means the worst case R * T_max * min(K, L).
  int64_t capacity = 0;
  // Unique per MoE node, e.g. "moe/<node id>"; names the store keys.
  std::string tag;
  // Eager mode: wait for each call's kernel and raise device-side errors at
  // once. Off: errors surface at the next checkStatus().
  bool check_each_call = true;
  // Blocks per kernel; 0: $HOSTFUSE_MOE_BLOCKS, else as many as fit on the
  // GPU at once (one per SM); at least R.
  int blocks = 0;
  // Of those, the blocks that push rows to peers, the same number for each
  // of the R - 1 peers (more contend for NVLink); the others do this rank's
  // own rows, the expansion and the reduction from the start, and the push
  // blocks join them when done. 0: $HOSTFUSE_MOE_PUSH_BLOCKS, else
  // 32 * (R - 1); rounded down to a multiple of R - 1 and kept below
  // `blocks` (at least one block per peer and one local block).
  int push_blocks = 0;
  // From this many tokens on (this rank's T), the dispatch counts the picks
  // over the whole grid (two grid barriers) instead of in every block for
  // all tokens; the latter needs T * K <= 4096, so larger calls always use
  // the grid. 0: $HOSTFUSE_MOE_GRID_ROUTE_MIN_TOKENS, else no limit.
  int64_t grid_route_min_tokens = 0;
  // Seconds a kernel waits for a peer; 0: $HOSTFUSE_MOE_TIMEOUT_S, else 30.
  double timeout_s = 0;
  // Per-phase timing of every call (%globaltimer at each phase boundary, per
  // block), read back with profileReport(). Also on with
  // $HOSTFUSE_MOE_PROFILE=1. Off: the kernels get a null pointer and only
  // test it once per phase.
  bool profile = false;
};

// Per-phase timing of a workspace's latest dispatch and combine (see
// CudaMoeConfig::profile). Times in microseconds from the kernel's first
// block entry (the smallest entry time over its blocks), on this rank's
// GPU clock; -1 where no block recorded the phase.
struct CudaMoePhase {
  std::string name;
  double block0_us = -1;  // block 0's time
  double first_us = -1;   // earliest over the blocks that recorded it
  double last_us = -1;    // latest over them
  int blocks = 0;         // blocks that recorded it
};

struct CudaMoeOpProfile {
  uint64_t epoch = 0;  // 0: the op never ran with profiling on
  std::vector<CudaMoePhase> phases;
  // Absolute %globaltimer ns of this GPU: first block entry, last block
  // exit; span_us = (exit - entry) / 1000.
  uint64_t entry_ns = 0;
  uint64_t exit_ns = 0;
  double span_us = -1;
};

struct CudaMoeProfile {
  int rank = 0;
  CudaMoeOpProfile dispatch;
  CudaMoeOpProfile combine;
  // Compact table, one line per phase of each op.
  std::string format() const;
};

// What dispatch returns; also the handle combine needs.
struct CudaDispatchResult {
  at::Tensor recv_x;              // [C, H], view of the receive buffer
  at::Tensor recv_src_rank;       // [C] int64
  at::Tensor recv_src_token;      // [C] int64
  at::Tensor recv_src_k;          // [C] int64
  at::Tensor recv_weights;        // [C] fp32; undefined without topk_weights
  at::Tensor recv_expert_counts;  // [L] int64: valid rows per local expert
  at::Tensor n_rows_to_rank;      // [R] int64
  at::Tensor n_rows_from_rank;    // [R] int64
  // Handle.
  int64_t num_tokens = 0;
  uint64_t call = 0;  // 1 for the workspace's first dispatch, 2, ...
  const void* workspace = nullptr;
};

class CudaMoeWorkspace {
 public:
  // Collective over the config's ranks: allocates and maps the symmetric
  // buffers through `store`.
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
  // dispatch's T.
  at::Tensor combine(
      const at::Tensor& expert_out, const CudaDispatchResult& handle,
      const std::optional<at::Tensor>& topk_weights = std::nullopt,
      int64_t num_tokens = -1);

  // Waits for the device and raises the first error recorded since the last
  // check (use after graph replays). Must not run during a capture.
  void checkStatus();

  // Needs config.profile (or $HOSTFUSE_MOE_PROFILE=1). Waits for the device
  // and reduces the profile buffer over blocks: the phases of the latest
  // dispatch and the latest combine of this workspace on this rank. Must not
  // run during a capture.
  CudaMoeProfile profileReport() const;
  bool profiling() const { return profile_; }

  const CudaMoeConfig& config() const { return config_; }
  int64_t capacity() const { return capacity_; }
  int64_t localExperts() const { return local_experts_; }
  int blocks() const { return blocks_; }
  int pushBlocks() const { return push_blocks_; }
  // Test hook: bytes of the guard regions behind the receive rows, the
  // metadata and the slots that lost their fill pattern (0 when nothing was
  // written out of bounds). Synchronizes.
  int64_t damagedGuardBytes() const;

 private:
  struct Buffers;

  // The kernel parameters both ops share.
  moe::CommonParams commonParams(int64_t unit_bytes, uint64_t* profile) const;
  void checkUsable(const char* op) const;
  void afterCall(const char* op);
  void raiseStatus();

  CudaMoeConfig config_;
  int64_t local_experts_ = 0;
  int64_t capacity_ = 0;
  int64_t row_bytes_ = 0;
  int blocks_ = 0;
  int push_blocks_ = 0;
  int64_t grid_route_min_tokens_ = 0;
  bool cooperative_ = true;
  bool debug_ = false;
  bool profile_ = false;
  uint64_t timeout_ns_ = 0;
  uint64_t dispatch_calls_ = 0;
  bool broken_ = false;
  std::string broken_reason_;
  std::unique_ptr<Buffers> buffers_;
};

}  // namespace hostfuse
