// The configuration of a cuda-backend MoE workspace, and what it resolves
// to on a GPU: block counts, capacity and timeouts after the HOSTFUSE_MOE_*
// options (utils/options.h) and the device's limits are applied.
//
// Notation: R ranks, T_max the largest T of any call, H hidden size, K
// picks per token, E experts, L = E / R, C capacity rows per receiving
// rank.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace hostfuse {

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
  // fp8 dispatch (MoeDispatchQuant::Fp8E4M3): rows travel quantized and
  // packed with their scales (moe/fp8.h); hidden must be a multiple of 128.
  // The combine still moves rows of `dtype`.
  bool fp8_dispatch = false;
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
  // Seconds a kernel waits for a peer, in [0.001, 86400] like the variable
  // (options::kMaxTimeoutSeconds); 0: $HOSTFUSE_MOE_TIMEOUT_S, else 30.
  double timeout_s = 0;
  // The dispatch's push: false, rows go to their expert-major rows on the
  // peer once every rank's count row is in (the offsets need them); true
  // (staged), rows go at once into a staging slot per (source, token) on
  // the peer, which copies them into place when the counts are in
  // (docs/moe_cuda.md, "Staged push"). Same results, bit for bit. Also on
  // with $HOSTFUSE_MOE_STAGED_PUSH=1; every rank must choose the same.
  bool staged_push = false;
  // Per-phase timing of every call (%globaltimer at each phase boundary, per
  // block), read back with profileReport(). Also on with
  // $HOSTFUSE_MOE_PROFILE=1. Off: the kernels get a null pointer and only
  // test it once per phase.
  bool profile = false;
};

// What a workspace runs with, decided once at its creation.
struct CudaMoeLaunch {
  int64_t local_experts = 0;  // L
  int64_t capacity = 0;       // C
  int64_t row_bytes = 0;      // H * element size (combine rows)
  // Bytes of a dispatched row: row_bytes, or fp8PackedRowBytes(H) with
  // fp8_dispatch.
  int64_t dispatch_row_bytes = 0;
  int blocks = 0;       // per kernel, co-resident
  int push_blocks = 0;  // of those, pushing to peers
  // Calls with this many tokens or more count picks over the whole grid.
  int64_t grid_route_min_tokens = 0;
  bool cooperative = true;
  bool staged_push = false;
  bool debug = false;
  bool profile = false;
  double timeout_s = 0;
  uint64_t timeout_ns = 0;
};

// Throws hostfuse::Error naming the field of `config` that is out of range
// (world size, rank, device, E, K, T_max, H, dtype, capacity, tag).
void validateConfig(const CudaMoeConfig& config);

// Resolves `config` (validated) for a GPU that fits `max_blocks` blocks of
// both kernels at once. Throws when the timeout it resolves to, from
// `timeout_s` or the variable, is out of range.
CudaMoeLaunch resolveLaunch(const CudaMoeConfig& config, int max_blocks);

// What every rank of a workspace must agree on, as one line of text:
// "R=2 E=8 T_max=128 H=7168 K=8 dtype=BFloat16 C=2048".
std::string describeShape(const CudaMoeConfig& config,
                          const CudaMoeLaunch& launch);

}  // namespace hostfuse
