// Interface of the CUDA-backend MoE dispatch and combine kernels.
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md).
// The host side (multidevice/moe/cuda/workspace.cpp) owns the buffers and
// fills the parameter blocks; docs/moe_cuda.md describes the protocol.
//
// Notation: R ranks, T tokens on this rank (T <= T_max), H hidden size,
// K picks per token, E experts, L = E / R local experts, C capacity rows
// per receiving rank, B = H * element size bytes per row.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include <hostfuse/multidevice/moe/status.h>

namespace hostfuse::moe {

constexpr int kThreadsPerBlock = 512;
constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
constexpr int kMaxRanks = 32;
constexpr int kMaxTopK = 32;
constexpr int kMaxExperts = 1024;

// The host-mapped record of the first error of a call (or of a series of
// graph replays): codes and details from multidevice/moe/status.h. The
// kernels claim it through DeviceState::status_claim, so only one writer
// fills it; the code is written last.
struct StatusRecord {
  int32_t code;     // StatusCode
  int32_t op;       // 1 dispatch, 2 combine
  int32_t rank;     // the rank the error is about
  int32_t purpose;  // WaitPurpose of a timeout
  int64_t token;
  int64_t pick;
  int64_t value;
  uint64_t epoch;
  uint32_t bad_ranks;  // bad input: every rank whose count row is bad
  uint32_t reserved;
};

// Per-workspace device state in local (not symmetric) memory, zeroed at
// setup. Epochs and arrival counters only grow (a counter gets exactly its
// number of participants per call, so "last to arrive" is a modulo test);
// the per-call claim counters are double-buffered by epoch parity and the
// next call's copy is cleared one call ahead. So consecutive calls and graph
// replays never race on a reset.
struct DeviceState {
  uint64_t dispatch_epoch;    // epoch of the last finished dispatch
  uint64_t combine_epoch;     // epoch of the last finished combine
  uint64_t dispatch_exits;    // blocks that finished a dispatch
  uint64_t combine_exits;     // blocks that finished a combine
  uint64_t dispatch_counted;  // blocks whose counts are in block_counts
  uint64_t dispatch_ranked;   // blocks whose pick_pos are final
  uint64_t reduce_claims[2];  // combine: tokens claimed by reducing warps
  int64_t recv_rows;          // valid rows of the last dispatch here
  int32_t poisoned;           // set by a timeout: every later call bails
  int32_t status_claim;       // 0 until a kernel claims StatusRecord
};

// Layout of the symmetric control buffer (identical on every rank). Every
// entry is an epoch written by the peer named by its (last) index with a
// system-scope release store, and polled by the owner with acquire loads:
// count_flags[s] after s's count row, free_flags[s] after s's reduction of
// its previous combine, arrivals[t][s] after all of s's rows of the owner's
// token t are in the owner's slots (combine).
struct ControlLayout {
  size_t count_flags;  // uint64[R]: epoch of peer s's count row
  size_t free_flags;   // uint64[R]: epoch of peer s's last reduction
  size_t failure;      // uint64: failureWord() of a peer that failed
  // uint64[R]: epoch << 1 | per_rank of peer s's latest combine push here,
  // so that ranks combining in different modes find out
  size_t combine_modes;
  size_t arrivals;         // uint64[T_max][R]: peer s done with our token t
  size_t count_rows;       // CountRow[2][R], double-buffered by epoch parity
  size_t count_row_bytes;  // header + E int32 counts, 16-byte multiple
  size_t total_bytes;
};

// Opt-in per-phase timing (CudaMoeConfig::profile). The buffer holds, per
// op (dispatch, then combine) and block, kProfileSlots uint64: slot 0 is the
// epoch of the call the block last ran, the others %globaltimer (ns) at the
// end of each phase, 0 where the block did not reach or take part in the
// phase. Thread 0 of each block writes its own slots, so there is nothing to
// reset and no atomics on global memory; the host reduces over blocks.
constexpr int kProfileSlots = 16;

enum DispatchPhase : int32_t {
  kDispatchEpoch = 0,
  kDispatchEntry,      // all blocks: first instruction
  kDispatchValidated,  // all: ids checked (the block's tokens, or all)
  kDispatchCounted,    // all: counts known (grid route: barrier passed)
  kDispatchPublished,  // blocks that published: count rows stored, flagged
  kDispatchCountsIn,   // all: every peer's count flag seen
  kDispatchOffsets,    // all: offsets / segments computed
  kDispatchPushed,     // push blocks: their tokens sent to their peer
  kDispatchLocalRows,  // local blocks: rows for this rank written
  kDispatchExpanded,   // all: no received row left to claim
  kDispatchExit,       // all: exit arrival counted
  kDispatchPhases
};

enum CombinePhase : int32_t {
  kCombineEpoch = 0,
  kCombineEntry,    // all blocks: first instruction
  kCombineFreeIn,   // push blocks: their peer's previous combine done
  kCombinePushed,   // push blocks: their peer's rows sent back
  kCombineReduced,  // all: no token left to claim
  kCombineExit,     // all: exit counted (the last block: free flags up)
  kCombinePhases
};

static_assert(kDispatchPhases <= kProfileSlots &&
              kCombinePhases <= kProfileSlots);

// Header of a published count row: the sender's input validation result
// and its number of tokens. The row continues with E int32 counts (the
// sender's picks per expert) and R int32 token counts (the sender's tokens
// with a pick on rank d: the staging slots it fills there, staged push).
struct CountRowHeader {
  int32_t code;  // kStatusOk, kStatusBadExpertId or kStatusDuplicateExpert
  int32_t pick;
  int64_t token;
  int64_t value;
  int64_t tokens;  // the sender's T
};

ControlLayout controlLayout(int world_size, int num_experts,
                            int64_t max_tokens);

// Metadata of a received row, written by its sender after the row's data:
// `body` = {source token, source rank << 8 | pick, row to copy the data
// from (-1: this row carries it), weight bits}, then `epoch` with a release
// store, which tells the receiver that the row (and the row it copies from)
// is complete.
struct RowMeta {
  int32_t token;
  int32_t source_pick;
  int32_t primary;
  int32_t weight_bits;
  uint64_t epoch;
  uint64_t reserved;
};
constexpr size_t kMetaBytes = sizeof(RowMeta);
static_assert(kMetaBytes == 32);

// Staged push (CudaMoeConfig::staged_push): a sender puts token t's row,
// once per rank d that holds one of its picks, into d's staging slot
// [epoch parity][sender][n] (n: how many of the sender's earlier tokens have
// a pick on d), without waiting for any count row, and describes it: a
// StageHeader, then one StageEntry per pick on d (at most min(K, L)), the
// header's epoch stored last with a release. The receiver copies the row
// from the slot into the expert-major rows of those picks once the count
// rows give it the offsets.
struct StageHeader {
  int32_t token;  // the sender's token t
  int32_t picks;  // entries that follow
  uint64_t epoch;
};
struct StageEntry {
  int32_t pick;         // k | local expert << 8
  int32_t position;     // among the sender's rows of that expert
  int32_t weight_bits;  // topk_weights[t][k] (0 without weights)
  int32_t reserved;
};
static_assert(sizeof(StageHeader) == 16 && sizeof(StageEntry) == 16);

// Bytes of one staging slot's description for `picks` = min(K, L) entries.
__host__ __device__ inline size_t stageMetaBytes(int picks) {
  return sizeof(StageHeader) + sizeof(StageEntry) * static_cast<size_t>(picks);
}

// Where the rows of (source s, token t, pick k) are on this rank, for the
// combine: written by the dispatch's expansion, valid when `epoch` is that
// dispatch's epoch.
struct RouteEntry {
  uint64_t epoch;
  int64_t row;
};

// Counting mode of the dispatch: up to this many picks (T K) every block
// counts all tokens itself and keeps the positions in shared memory (no
// grid barrier); above, blocks count their own tokens and meet at two grid
// barriers.
constexpr int kLocalRoutePicks = 4096;

// Fields both kernels share, filled by one host function.
struct CommonParams {
  int rank;
  int world_size;
  int local_experts;
  int topk;
  int64_t max_tokens;  // T_max
  int64_t row_bytes;   // B
  int64_t unit_bytes;  // 16, 8, 4 or 2: copy granularity
  // Blocks [0, push_blocks) push rows to peers, push_blocks / (R - 1) for
  // each (block b serves peer rank + 1 + b % (R - 1)); the others do this
  // rank's share (local rows, expansion, reduction) from the start.
  int push_blocks;
  // Symmetric memory: device arrays of R peer pointers.
  void* const* control;  // ControlLayout buffers
  void* const* recv;     // [C, B] rows, then [C] RowMeta
  void* const* slots;    // [T_max, K, B] per rank (combine)
  ControlLayout layout;
  size_t meta_offset;  // bytes from a recv buffer to its metadata
  // Local state and scratch.
  DeviceState* state;
  StatusRecord* status;  // host-mapped
  // [T_max * K]: the row of a pick on its expert's rank, or -1 (masked, or
  // dropped by a capacity overflow), and that rank; written by dispatch.
  int32_t* pick_row;
  int32_t* pick_rank;
  // [R * L]: where source s's rows of local expert l start here, and how
  // many there are; [R]: source s's T; [R][T_max * K]: RouteEntry.
  int64_t* recv_start;
  int32_t* recv_count;
  int64_t* source_tokens;
  RouteEntry* routes;
  uint64_t timeout_ns;
  int debug;
  // [gridDim.x][kProfileSlots] timing slots of this op, or null (profiling
  // off: the only cost is one untaken branch per phase).
  uint64_t* profile;
};

struct DispatchParams {
  CommonParams common;
  const void* x;              // [T, H], B bytes per row
  const void* topk_idx;       // [T, K] int32 or int64
  const float* topk_weights;  // [T, K] or null
  int64_t tokens;             // T
  int num_experts;
  int64_t capacity;  // C
  // 1: every block counts all tokens (T K <= kLocalRoutePicks); 0: grid.
  int local_route;
  // [T_max * K]: a pick's position among this rank's rows of its expert
  // (grid route: first relative to its warp's tokens, final after the
  // second grid barrier).
  int32_t* pick_pos;
  // [E + R][gridDim.x]: rows per expert, then tokens per rank, per block
  int32_t* block_counts;
  unsigned long long* block_errors;  // [gridDim.x]: smallest error key
  // [2][E]: expansion claims per segment, double-buffered by epoch parity.
  int32_t* segment_claims;
  // Staged push (CommonParams::push_blocks pushing before the count rows
  // are in), else 0 and the fields below it unused. Per rank (peer
  // pointers), symmetric: rows [2][R][T_max] of B bytes from offset 0,
  // their descriptions (stageMetaBytes(stage_picks) each) from
  // stage_meta_offset.
  int staged;
  void* const* stage;
  size_t stage_meta_offset;
  int stage_picks;  // min(K, L)
  // Staged push, grid route: [T_max * K] the staging slot on the pick's rank
  // of a token's first pick there (-1 for its other picks), like pick_pos.
  int32_t* slot_pos;
  // Outputs (device).
  int64_t* recv_src_rank;       // [C]
  int64_t* recv_src_token;      // [C]
  int64_t* recv_src_k;          // [C]
  float* recv_weights;          // [C] or null
  int64_t* recv_expert_counts;  // [L]
  int64_t* rows_to_rank;        // [R]
  int64_t* rows_from_rank;      // [R]
  // [R + 1] (multidevice/moe/layout_id.h): this dispatch's epoch, then R
  // zeros.
  int64_t* layout_id;
};

struct CombineParams {
  CommonParams common;
  const void* expert_out;  // [C, H] in the dispatch layout
  // 0: per_pick, 1: per_rank (MoeCombineReduce, backend.h).
  int per_rank;
  const float* topk_weights;  // per_pick: [T, K] or null
  const float* recv_weights;  // per_rank: [C], the rows' weights, or null
  void* out;                  // [T, H]
  int64_t tokens;             // T of the matching dispatch
  // [R + 1], the caller's layout id, or null (not checked): its epoch must
  // be the last dispatch's, else kStatusStaleLayout.
  const int64_t* layout_id;
};

enum class ElementType : int32_t { kFloat32, kBFloat16, kFloat16 };

// Dynamic shared memory of the dispatch kernel for E experts and up to
// kMaxRanks ranks (the combine uses static shared memory only).
size_t dispatchSharedBytes(int num_experts);

// Sets kernel attributes and returns in *max_blocks the largest grid that
// can be co-resident on `device` for both kernels (they are launched
// cooperatively: blocks wait for each other).
cudaError_t prepareKernels(int device, int num_experts, ElementType dtype,
                           int* max_blocks);

// Launch on `stream` with `blocks` blocks (<= max_blocks of prepareKernels).
// `cooperative` asks the runtime to guarantee co-residency (the kernels'
// blocks wait for each other); turning it off is for diagnosis only.
// Marks this rank's workspace failed and tells every peer (their
// `failure` word), so that their waits stop at once and name this rank;
// `reason` is a FailureReason. One thread; kernels already running on this
// device stop at their next poll.
cudaError_t launchPublishFailure(const CommonParams& common, int32_t reason,
                                 cudaStream_t stream);

// fp8 dispatch: quantizes x [tokens, hidden] of `dtype` into packed rows
// of `packed_row_bytes` (multidevice/moe/fp8.h: the e4m3 values, then one
// fp32 scale per 128 channels). hidden must be a multiple of 128.
cudaError_t launchQuantizeFp8(const void* x, ElementType dtype, int64_t tokens,
                              int64_t hidden, void* packed,
                              int64_t packed_row_bytes, cudaStream_t stream);

cudaError_t launchDispatch(const DispatchParams& params, bool idx_is_int64,
                           int blocks, bool cooperative, cudaStream_t stream);
cudaError_t launchCombine(const CombineParams& params, ElementType dtype,
                          int blocks, bool cooperative, cudaStream_t stream);

}  // namespace hostfuse::moe
