// CUDA-backend MoE dispatch: one cooperative kernel per call.
//
//   route    count the picks per expert and give every pick its position
//            among this rank's rows of its expert (token order). Few picks
//            (T K <= kLocalRoutePicks): every block does it for all tokens
//            on its own, keeps the positions in shared memory, and blocks
//            0 .. R-1 each publish the count row to one peer at once. Many
//            picks: every block counts its own range of tokens, and after
//            a grid barrier block 0 publishes the totals while every block
//            makes its positions final (a second barrier before pushing);
//   offsets  every block waits for all R count rows, then derives where
//            this rank's rows start in every receiver's expert-major buffer
//            (sender view) and where each source's rows start here
//            (receiver view);
//   push     the push blocks form one group per peer; a group's warps walk
//            the tokens in order and send each token that has picks on the
//            peer once (into the row of its pick with the smallest local
//            expert there), then every such pick's metadata, whose epoch,
//            stored last with a release, says the row is there. The other
//            (local) blocks write this rank's own rows, one per pick;
//   expand   every warp then claims received rows, segment by segment
//            (source, local expert), in arrival order; waits for the row's
//            epoch; writes its provenance and its route entry (for the
//            combine), and copies the token into it when another row
//            carried it.
// docs/moe_cuda.md has the picture, the flags and the epochs.
#include <climits>
#include <cstdio>

#include <hostfuse/multidevice/moe/cuda/kernels/device_utils.cuh>

namespace hostfuse::moe {

namespace {

using device::arriveLast;
using device::beginCall;
using device::blockWaitForPeers;
using device::CallStart;
using device::copyUnits;
using device::fenceAcqRelSys;
using device::flagAt;
using device::globalTimerNs;
using device::gridArrive;
using device::gridWait;
using device::kFullMask;
using device::loadVolatile;
using device::profileMark;
using device::PushGroup;
using device::recordStatus;
using device::storeReleaseSys;
using device::WaitContext;
using device::warpWaitForPeer;

constexpr int kOpDispatch = 1;

__host__ __device__ inline size_t countRowBytes(int num_experts,
                                                int world_size) {
  return roundUp(
      sizeof(CountRowHeader) + sizeof(int32_t) * (num_experts + world_size),
      16);
}

// The route counts in E + R columns: picks per expert, then tokens per rank
// (a token counts once on each rank that holds one of its picks).
__host__ __device__ inline size_t tablesBytes(int num_experts) {
  // offset, recv_start (int64), recv_count (int32): E each; colsum and route
  // (int32 per warp): E + R columns each, room for R = kMaxRanks.
  const size_t columns = static_cast<size_t>(num_experts) + kMaxRanks;
  return roundUp(
      (8 + 8 + 4) * size_t(num_experts) + (4 + 4 * kWarpsPerBlock) * columns,
      16);
}

// Local route: pick positions, then staging slots.
constexpr size_t kPositionsBytes = 2 * sizeof(int32_t) * kLocalRoutePicks;

struct DispatchShared {
  int64_t* offset;      // [E]: this rank's first row of expert x on its rank
  int64_t* recv_start;  // [R * L]: first row here of source s, expert l
  int32_t* colsum;      // [E + R]: the block's counts, then all sources' rows
  int32_t* recv_count;  // [R * L]: rows here of source s, expert l
  int32_t* route;       // [kWarpsPerBlock, E + R]: per-warp counts, bases
  int32_t* positions;   // [kLocalRoutePicks]: pick positions (local route)
  // [kLocalRoutePicks]: staging slot of a token's first pick on a rank, -1
  // for its other picks (local route, staged push)
  int32_t* slots;
  char* row;  // the count row this block publishes
};

__device__ DispatchShared carveShared(unsigned char* raw, int num_experts) {
  DispatchShared shared;
  shared.offset = reinterpret_cast<int64_t*>(raw);
  shared.recv_start = shared.offset + num_experts;
  shared.recv_count =
      reinterpret_cast<int32_t*>(shared.recv_start + num_experts);
  shared.colsum = shared.recv_count + num_experts;
  shared.route = shared.colsum + num_experts + kMaxRanks;
  shared.positions = reinterpret_cast<int32_t*>(raw + tablesBytes(num_experts));
  shared.slots = shared.positions + kLocalRoutePicks;
  shared.row =
      reinterpret_cast<char*>(raw + tablesBytes(num_experts) + kPositionsBytes);
  return shared;
}

__device__ __forceinline__ char* countRowAt(void* control,
                                            const ControlLayout& layout,
                                            int parity, int source,
                                            int world_size) {
  return static_cast<char*>(control) + layout.count_rows +
         (static_cast<size_t>(parity) * world_size + source) *
             layout.count_row_bytes;
}

// The count rows of one epoch parity in this rank's control buffer: peer
// s's header, and its E counts right after it.
struct CountRows {
  void* control;
  ControlLayout layout;
  int parity;
  int world_size;
  __device__ __forceinline__ char* row(int source) const {
    return countRowAt(control, layout, parity, source, world_size);
  }
  __device__ __forceinline__ const int32_t* counts(int source) const {
    return reinterpret_cast<const int32_t*>(row(source) +
                                            sizeof(CountRowHeader));
  }
};

__device__ __forceinline__ RowMeta* metaAt(void* recv, size_t meta_offset,
                                           int64_t row) {
  return reinterpret_cast<RowMeta*>(static_cast<char*>(recv) + meta_offset) +
         row;
}

// Error key: the smallest (token, pick) with a bad id wins, as if every
// token were checked pick by pick in order.
__device__ __forceinline__ unsigned long long errorKey(int64_t token, int pick,
                                                       int code) {
  return (static_cast<unsigned long long>(token) << 16) |
         (static_cast<unsigned long long>(pick) << 8) |
         static_cast<unsigned long long>(code);
}

// A range of tokens counted by one block: [first, last), its warp w the
// sub-range [first + w * tokens_per_warp, ...). A pick's position is the
// number of picks of its expert in earlier tokens (ids are distinct within
// a token), so it is the sum of: the earlier blocks' counts of the expert
// (grid route only), the earlier warps' counts in the block, and its
// position among its warp's picks of the expert.
struct TokenRange {
  int64_t first;
  int64_t last;
  int64_t tokens_per_warp;
};

__device__ TokenRange warpSplit(int64_t first, int64_t last) {
  const int64_t tokens = last - first;
  TokenRange range;
  range.first = first;
  range.last = last;
  range.tokens_per_warp =
      max(int64_t{1}, (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return range;
}

// Grid route: block b's share of the tokens.
__device__ TokenRange blockTokens(int64_t tokens) {
  const int64_t per_block =
      max(int64_t{1}, (tokens + gridDim.x - 1) / gridDim.x);
  const int64_t first =
      min(tokens, static_cast<int64_t>(blockIdx.x) * per_block);
  return warpSplit(first, min(tokens, first + per_block));
}

// Warp w's picks in (token, pick) order, whole tokens at a time: 32 / K
// tokens per step, lane = token slot * K + pick. Calls visit(q, t, k, id)
// in every lane (t = -1 in lanes without a pick: past the tokens, or past
// 32 / K * K). Warp-uniform trip count. The ids of kIdBatch steps are
// loaded at once, so that their latencies overlap.
constexpr int kIdBatch = 8;

template <typename IdxT, typename Visit>
__device__ __forceinline__ void forWarpPicks(const DispatchParams& p,
                                             const TokenRange& range,
                                             Visit&& visit) {
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);
  const int K = p.common.topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int per_step = 32 / K;
  const int k = lane % K;
  const bool slot = lane < per_step * K;
  const int64_t first =
      min(range.last, range.first + warp * range.tokens_per_warp);
  const int64_t last = min(range.last, first + range.tokens_per_warp);
  for (int64_t batch = first; batch < last; batch += kIdBatch * per_step) {
    int64_t ids[kIdBatch];
#pragma unroll
    for (int i = 0; i < kIdBatch; ++i) {
      const int64_t t = batch + i * per_step + lane / K;
      ids[i] = slot && t < last ? static_cast<int64_t>(idx[t * K + k]) : -1;
    }
#pragma unroll
    for (int i = 0; i < kIdBatch; ++i) {
      const int64_t base = batch + i * per_step;
      if (base >= last) {
        break;  // warp-uniform
      }
      const int64_t t = base + lane / K;
      const bool has = slot && t < last;
      visit(t * K + k, has ? t : int64_t{-1}, k, ids[i]);
    }
  }
}

// The route's columns: E experts, then R ranks.
__device__ __forceinline__ int routeColumns(const DispatchParams& p) {
  return p.num_experts + p.common.world_size;
}

// Block-wide, over `range`: validation (ids in [-1, E), no expert twice in
// a token; the smallest error key into *error_key), each pick's position
// among its warp's picks of its expert into positions[q], in
// shared.route[w][column] the exclusive base of warp w within the block and
// in shared.colsum[column] the block's count. Columns: E experts, then R
// ranks, where a token counts once on each rank that holds one of its picks,
// at its first pick there (staged push only: that pick's position among the
// warp's such picks into slots[q], -1 into its other picks'). One pass over
// the ids: lanes naming the same expert (rank) find each other with
// match_any.
template <typename IdxT>
__device__ void countRange(const DispatchParams& p,
                           const DispatchShared& shared,
                           const TokenRange& range, int32_t* positions,
                           int32_t* slots, unsigned long long* error_key,
                           uint64_t* prof) {
  const int E = p.num_experts;
  const int K = p.common.topk;
  const int L = p.common.local_experts;
  const int R = p.common.world_size;
  const int columns = routeColumns(p);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lower_lanes = (1u << lane) - 1;

  if (threadIdx.x == 0) {
    *error_key = ULLONG_MAX;
  }
  for (int i = threadIdx.x; i < kWarpsPerBlock * columns; i += blockDim.x) {
    shared.route[i] = 0;
  }
  __syncthreads();

  int32_t* counts = shared.route + warp * columns;
  unsigned long long warp_error = ULLONG_MAX;
  forWarpPicks<IdxT>(p, range, [&](int64_t q, int64_t t, int k, int64_t id) {
    const bool valid = t >= 0 && id >= 0 && id < E;
    const int expert = valid ? static_cast<int>(id) : -1;
    // The same expert twice in one token: same (token slot, expert).
    const int key = valid ? (lane / K) * E + expert : -1 - lane;
    const unsigned same = __match_any_sync(kFullMask, key);
    const bool repeat = valid && (same & lower_lanes) != 0;
    if (t >= 0 && (id < -1 || id >= E)) {
      warp_error = min(warp_error, errorKey(t, k, kStatusBadExpertId));
    } else if (repeat) {
      warp_error = min(warp_error, errorKey(t, k, kStatusDuplicateExpert));
    }
    const unsigned group = __match_any_sync(kFullMask, expert);
    const unsigned before = group & lower_lanes;
    if (valid) {
      positions[q] = counts[expert] + __popc(before);
    }
    __syncwarp();
    if (valid && before == 0) {
      counts[expert] += __popc(group);
    }
    __syncwarp();
    if (p.staged != 0) {
      // The token's first pick on each rank: no lower lane of the same
      // token slot on the same rank.
      const int rank = valid ? expert / L : -1;
      const unsigned same_rank = __match_any_sync(
          kFullMask, valid ? (lane / K) * R + rank : -1 - lane);
      const bool first = valid && (same_rank & lower_lanes) == 0;
      const int column = first ? E + rank : -1;
      const unsigned firsts = __match_any_sync(kFullMask, column);
      const unsigned earlier = firsts & lower_lanes;
      if (t >= 0) {
        slots[q] = first ? counts[column] + __popc(earlier) : -1;
      }
      __syncwarp();
      if (first && earlier == 0) {
        counts[column] += __popc(firsts);
      }
      __syncwarp();
    }
  });
  for (int offset = 16; offset > 0; offset >>= 1) {
    warp_error =
        min(warp_error, __shfl_xor_sync(kFullMask, warp_error, offset));
  }
  if (lane == 0 && warp_error != ULLONG_MAX) {
    atomicMin(error_key, warp_error);
  }
  __syncthreads();
  profileMark(prof, kDispatchValidated);

  // Per column: the warps' exclusive bases in place, the block's total.
  for (int e = threadIdx.x; e < columns; e += blockDim.x) {
    int32_t running = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const int32_t count = shared.route[w * columns + e];
      shared.route[w * columns + e] = running;
      running += count;
    }
    shared.colsum[e] = running;
  }
  __syncthreads();
}

// Thread 0: the count row's header from the smallest error key.
template <typename IdxT>
__device__ void fillHeader(const DispatchParams& p, CountRowHeader* header,
                           unsigned long long error_key) {
  header->code = kStatusOk;
  header->pick = -1;
  header->token = -1;
  header->value = 0;
  header->tokens = p.tokens;
  if (error_key != ULLONG_MAX) {
    const int64_t token = static_cast<int64_t>(error_key >> 16);
    const int pick = static_cast<int>((error_key >> 8) & 0xff);
    header->code = static_cast<int32_t>(error_key & 0xff);
    header->pick = pick;
    header->token = token;
    header->value = static_cast<int64_t>(
        static_cast<const IdxT*>(p.topk_idx)[token * p.common.topk + pick]);
  }
}

// Warp 0: stores shared.row (complete: after a block barrier) into slot
// [parity][rank] of peers first_peer, first_peer + step, ... and raises
// their count flags.
__device__ void publishCountRow(const DispatchParams& p,
                                const DispatchShared& shared, uint64_t epoch,
                                int first_peer, int step, uint64_t* prof) {
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  if (threadIdx.x >= 32 || first_peer >= c.world_size) {
    return;
  }
  const int parity = static_cast<int>(epoch & 1);
  const int vectors = static_cast<int>(c.layout.count_row_bytes / 16);
  for (int peer = first_peer; peer < c.world_size; peer += step) {
    auto* destination = reinterpret_cast<int4*>(
        countRowAt(c.control[peer], c.layout, parity, c.rank, c.world_size));
    for (int i = lane; i < vectors; i += 32) {
      destination[i] = reinterpret_cast<const int4*>(shared.row)[i];
    }
  }
  fenceAcqRelSys();
  __syncwarp();
  for (int peer = first_peer + lane * step; peer < c.world_size;
       peer += 32 * step) {
    storeReleaseSys(flagAt(c.control[peer], c.layout.count_flags, c.rank),
                    epoch);
  }
  profileMark(prof, kDispatchPublished);
}

// Warp-wide: the sum of block_counts[e][b] over b in [0, blocks), in every
// lane. Written by other blocks during this kernel: read past L1.
__device__ __forceinline__ int32_t sumBlockCounts(const DispatchParams& p,
                                                  int e, int blocks) {
  const int lane = threadIdx.x & 31;
  const int32_t* counts = p.block_counts + static_cast<size_t>(e) * gridDim.x;
  int32_t sum = 0;
  for (int b = lane; b < blocks; b += 32) {
    sum += __ldcg(counts + b);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(kFullMask, sum, offset);
  }
  return sum;
}

// A pick's position (and its staging slot, for a token's first pick on a
// rank) made final: the warp's bases added.
__device__ __forceinline__ void addBases(const DispatchParams& p,
                                         const int32_t* bases, int64_t q,
                                         int64_t t, int64_t id,
                                         int32_t* positions, int32_t* slots) {
  if (t >= 0 && id >= 0 && id < p.num_experts) {
    positions[q] += bases[id];
    if (p.staged != 0 && slots[q] >= 0) {
      slots[q] += bases[p.num_experts + id / p.common.local_experts];
    }
  }
}

// Local route: every block counts all tokens; its positions are final in
// shared memory at once, and block b publishes to peers b, b + grid, ...
template <typename IdxT>
__device__ void routeLocal(const DispatchParams& p,
                           const DispatchShared& shared, uint64_t epoch,
                           uint64_t* prof) {
  __shared__ unsigned long long error_key;
  const TokenRange all = warpSplit(0, p.tokens);
  countRange<IdxT>(p, shared, all, shared.positions, shared.slots, &error_key,
                   prof);
  const int32_t* bases = shared.route + (threadIdx.x >> 5) * routeColumns(p);
  forWarpPicks<IdxT>(p, all, [&](int64_t q, int64_t t, int, int64_t id) {
    addBases(p, bases, q, t, id, shared.positions, shared.slots);
  });
  auto* totals =
      reinterpret_cast<int32_t*>(shared.row + sizeof(CountRowHeader));
  for (int e = threadIdx.x; e < routeColumns(p); e += blockDim.x) {
    totals[e] = shared.colsum[e];
  }
  if (threadIdx.x == 0) {
    fillHeader<IdxT>(p, reinterpret_cast<CountRowHeader*>(shared.row),
                     error_key);
  }
  __syncthreads();
  profileMark(prof, kDispatchCounted);
  publishCountRow(p, shared, epoch, static_cast<int>(blockIdx.x),
                  static_cast<int>(gridDim.x), prof);
}

// Grid route: every block counts its own tokens; after a grid barrier block
// 0 sums the blocks' counts and errors into the count row and publishes it
// to every peer, while every block adds the earlier blocks' counts to its
// picks' positions (pick_pos). Returns the target of the second barrier
// (every block's pick_pos final), which the push blocks wait for; 0 when
// the call must stop.
template <typename IdxT>
__device__ uint64_t routeGrid(const DispatchParams& p,
                              const DispatchShared& shared, uint64_t epoch,
                              const WaitContext& context, uint64_t* prof) {
  __shared__ unsigned long long error_key;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int columns = routeColumns(p);
  const TokenRange range = blockTokens(p.tokens);
  countRange<IdxT>(p, shared, range, p.pick_pos, p.slot_pos, &error_key, prof);
  for (int e = threadIdx.x; e < columns; e += blockDim.x) {
    p.block_counts[static_cast<size_t>(e) * gridDim.x + blockIdx.x] =
        shared.colsum[e];
  }
  if (threadIdx.x == 0) {
    p.block_errors[blockIdx.x] = error_key;
  }
  const uint64_t counted = gridArrive(&p.common.state->dispatch_counted,
                                      static_cast<int>(gridDim.x));
  if (!gridWait(&p.common.state->dispatch_counted, counted, p.common.rank,
                context)) {
    return 0;
  }
  profileMark(prof, kDispatchCounted);

  if (blockIdx.x == 0) {
    auto* totals =
        reinterpret_cast<int32_t*>(shared.row + sizeof(CountRowHeader));
    for (int e = warp; e < columns; e += kWarpsPerBlock) {
      const int32_t total = sumBlockCounts(p, e, static_cast<int>(gridDim.x));
      if (lane == 0) {
        totals[e] = total;
      }
    }
    if (warp == 0) {
      unsigned long long key = ULLONG_MAX;
      for (int b = lane; b < static_cast<int>(gridDim.x); b += 32) {
        key = min(key, __ldcg(p.block_errors + b));
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        key = min(key, __shfl_xor_sync(kFullMask, key, offset));
      }
      if (lane == 0) {
        fillHeader<IdxT>(p, reinterpret_cast<CountRowHeader*>(shared.row), key);
      }
    }
    __syncthreads();
    publishCountRow(p, shared, epoch, 0, 1, prof);
  }

  for (int e = warp; e < columns; e += kWarpsPerBlock) {
    const int32_t before = sumBlockCounts(p, e, static_cast<int>(blockIdx.x));
    if (lane < kWarpsPerBlock) {
      shared.route[lane * columns + e] += before;
    }
  }
  __syncthreads();
  const int32_t* bases = shared.route + warp * columns;
  forWarpPicks<IdxT>(p, range, [&](int64_t q, int64_t t, int, int64_t id) {
    addBases(p, bases, q, t, id, p.pick_pos, p.slot_pos);
  });
  return gridArrive(&p.common.state->dispatch_ranked,
                    static_cast<int>(gridDim.x));
}

// What the offsets phase finds in the R count rows besides the tables in
// DispatchShared: which sources reported bad input, and how many rows every
// rank's experts receive. In shared memory, written by every block.
struct CountSummary {
  // The smallest source whose count row is bad; INT_MAX if none.
  int bad_rank;
  unsigned bad_ranks;            // bit s: source s's count row is bad
  int64_t rank_rows[kMaxRanks];  // rows of rank d's experts, from all sources
  // Staged push: source s's tokens with a pick here (its slots here).
  int32_t tokens_from[kMaxRanks];
  // The first bad number of a count row, as source * (E + 2 R + 1) + column
  // + 1: column -1 the source's token count, then the E experts, then the R
  // ranks' token counts, all outside [0, T_max]; then (staged push) the R
  // ranks' token counts that disagree with the source's expert counts for
  // that rank (fewer than its largest, more than their sum). kNoBadCount
  // if none. A peer's kernel never writes one: its workspace does not match
  // ours, or the row was overwritten. The sums below take such a number as
  // 0, so that nothing is read or written past T_max (the per-expert totals
  // are int32: R * T_max fits, validateConfig checks it).
  unsigned long long bad_count;
};

constexpr unsigned long long kNoBadCount = ULLONG_MAX;

// Records a bad number of source's count row in `summary` (column as
// there), keeping the first.
__device__ __forceinline__ void noteBadCount(CountSummary& summary, int source,
                                             int column, int stride) {
  atomicMin(&summary.bad_count,
            static_cast<unsigned long long>(source) * stride +
                static_cast<unsigned long long>(column + 1));
}

// A peer's count: itself when in [0, max_tokens], else 0, noted as bad.
__device__ __forceinline__ int32_t boundedCount(int64_t count,
                                                int64_t max_tokens, int source,
                                                int column, int stride,
                                                CountSummary& summary) {
  if (count >= 0 && count <= max_tokens) {
    return static_cast<int32_t>(count);
  }
  noteBadCount(summary, source, column, stride);
  return 0;
}

// The stride of CountSummary::bad_count's columns.
__device__ __forceinline__ int badCountStride(const DispatchParams& p) {
  return p.num_experts + 2 * p.common.world_size + 1;
}

// What the rest of the call needs from the offsets; the same in every
// block (every block derives it from the same count rows).
struct Offsets {
  bool bad;           // some source's input was bad: nothing is sent
  int64_t recv_rows;  // rows of our experts kept here: at most C, 0 if bad
};

// Every block, once all R count rows of this epoch are in: the tables in
// shared (colsum, recv_count; offset[x] = this rank's first row of expert x
// on its rank, the sender view; recv_start[s * L + l] = the first row here
// of source s, local expert l, the receiver view) and the summary. Every
// block derives the same from the same rows, so no grid barrier is needed.
__device__ __forceinline__ Offsets computeOffsets(
    const DispatchParams& p, const DispatchShared& shared,
    CountSummary& summary, void* own_control, uint64_t epoch, uint64_t* prof) {
  const CommonParams& c = p.common;
  const int E = p.num_experts;
  const int L = c.local_experts;
  const int R = c.world_size;
  const int parity = static_cast<int>(epoch & 1);
  const int stride = badCountStride(p);
  const CountRows rows{own_control, c.layout, parity, R};
  auto row_of = [&](int source) { return rows.row(source); };
  auto counts_of = [&](int source) { return rows.counts(source); };
  // One pass over all R count rows (their loads all in flight at once):
  // colsum[x] = rows of expert x from every source, offset[x] = those from
  // sources before us, recv_count = our experts' rows per source.
  if (threadIdx.x == 0) {
    summary.bad_rank = INT_MAX;
    summary.bad_ranks = 0;
    summary.bad_count = kNoBadCount;
  }
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    shared.colsum[x] = 0;
    shared.offset[x] = 0;
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const auto* header =
        reinterpret_cast<const CountRowHeader*>(row_of(threadIdx.x));
    if (__ldcg(&header->code) != kStatusOk) {
      atomicMin(&summary.bad_rank, static_cast<int>(threadIdx.x));
      atomicOr(&summary.bad_ranks, 1u << threadIdx.x);
    }
    boundedCount(__ldcg(&header->tokens), c.max_tokens,
                 static_cast<int>(threadIdx.x), -1, stride, summary);
  }
  if (p.staged != 0) {
    // Every source's token count for every rank, checked by every rank
    // against the expert counts of the same row, so that all agree on a
    // bad row (a count between the largest and the sum of the source's
    // counts of that rank's experts; a wrong one would leave slots unread,
    // or wait for slots nobody writes).
    for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
      const int source = i / R;
      const int d = i % R;
      const int32_t tokens =
          boundedCount(__ldcg(counts_of(source) + E + d), c.max_tokens, source,
                       E + d, stride, summary);
      int64_t sum = 0;
      int32_t most = 0;
      for (int l = 0; l < L; ++l) {
        const int32_t count = __ldcg(counts_of(source) + d * L + l);
        sum += count;
        most = max(most, count);
      }
      if (tokens < most || tokens > sum) {
        noteBadCount(summary, source, E + R + d, stride);
      }
      if (d == c.rank) {
        summary.tokens_from[source] = tokens;  // read after a barrier below
      }
    }
  }
  for (int i = threadIdx.x; i < R * E; i += blockDim.x) {
    const int source = i / E;
    const int x = i % E;
    const int32_t count =
        boundedCount(__ldcg(counts_of(source) + x), c.max_tokens, source, x,
                     stride, summary);
    atomicAdd(&shared.colsum[x], count);
    if (source < c.rank) {
      atomicAdd(reinterpret_cast<unsigned long long*>(&shared.offset[x]),
                static_cast<unsigned long long>(count));
    }
    if (x / L == c.rank) {
      shared.recv_count[source * L + x % L] = count;
    }
  }
  __syncthreads();
  // Expert-major: expert x = d * L + l starts after experts d * L .. x - 1;
  // inside an expert, sources in rank order.
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    int64_t before_expert = 0;
    for (int y = x / L * L; y < x; ++y) {
      before_expert += shared.colsum[y];
    }
    shared.offset[x] += before_expert;
  }
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int source = i / L;
    const int l = i % L;
    int64_t start = 0;
    for (int y = 0; y < l; ++y) {
      start += shared.colsum[c.rank * L + y];
    }
    for (int s = 0; s < source; ++s) {
      start += shared.recv_count[s * L + l];
    }
    shared.recv_start[i] = start;
  }
  if (threadIdx.x < R) {
    int64_t rows = 0;
    for (int l = 0; l < L; ++l) {
      rows += shared.colsum[threadIdx.x * L + l];
    }
    summary.rank_rows[threadIdx.x] = rows;
  }
  __syncthreads();
  profileMark(prof, kDispatchOffsets);
  Offsets offsets;
  offsets.bad = summary.bad_rank != INT_MAX || summary.bad_count != kNoBadCount;
  offsets.recv_rows =
      offsets.bad ? 0 : min(summary.rank_rows[c.rank], p.capacity);
  return offsets;
}

// Block 0, after computeOffsets: what the host and the combine read of
// this call (rows per local expert, per segment (source, local expert) and
// per peer, every source's token count, recv_rows) and its status: the
// error of the smallest bad source, else the rank with the most rows if
// they exceed the capacity. With c.debug, prints the count rows.
__device__ __forceinline__ void recordOffsets(const DispatchParams& p,
                                              const DispatchShared& shared,
                                              const CountSummary& summary,
                                              const Offsets& offsets,
                                              void* own_control, uint64_t epoch,
                                              const WaitContext& context) {
  const CommonParams& c = p.common;
  const int E = p.num_experts;
  const int L = c.local_experts;
  const int R = c.world_size;
  const int parity = static_cast<int>(epoch & 1);
  const CountRows rows{own_control, c.layout, parity, R};
  auto row_of = [&](int source) { return rows.row(source); };
  auto counts_of = [&](int source) { return rows.counts(source); };
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    p.recv_expert_counts[l] = offsets.bad ? 0 : shared.colsum[c.rank * L + l];
  }
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    c.recv_start[i] = shared.recv_start[i];
    c.recv_count[i] = offsets.bad ? 0 : shared.recv_count[i];
  }
  if (threadIdx.x < R) {
    const int peer = threadIdx.x;
    int64_t to = 0;
    int64_t from = 0;
    for (int l = 0; l < L; ++l) {
      to += __ldcg(counts_of(c.rank) + peer * L + l);
      from += __ldcg(counts_of(peer) + c.rank * L + l);
    }
    p.rows_to_rank[peer] = offsets.bad ? 0 : to;
    p.rows_from_rank[peer] = offsets.bad ? 0 : from;
    // Bounded: combine reads the routes of tokens [0, source_tokens) of a
    // [T_max, K] table (a number past it is reported below).
    const int64_t tokens =
        __ldcg(&reinterpret_cast<const CountRowHeader*>(row_of(peer))->tokens);
    c.source_tokens[peer] = tokens < 0 || tokens > c.max_tokens ? 0 : tokens;
  }
  if (threadIdx.x == 0) {
    c.state->recv_rows = offsets.recv_rows;
    int most = 0;
    for (int d = 1; d < R; ++d) {
      most = summary.rank_rows[d] > summary.rank_rows[most] ? d : most;
    }
    if (summary.bad_rank != INT_MAX) {
      const auto* header =
          reinterpret_cast<const CountRowHeader*>(row_of(summary.bad_rank));
      recordStatus(context, __ldcg(&header->code), summary.bad_rank, 0,
                   __ldcg(&header->token), __ldcg(&header->pick),
                   __ldcg(&header->value), summary.bad_ranks);
    } else if (summary.bad_count != kNoBadCount) {
      const int stride = badCountStride(p);
      const auto source = static_cast<int>(summary.bad_count / stride);
      const int column = static_cast<int>(summary.bad_count % stride) - 1;
      // Past E + R: a token count for rank d that disagrees with the
      // expert counts (the status says so with a bound of -1).
      const bool disagrees = column >= E + R;
      const int read = disagrees ? column - R : column;
      const int64_t value =
          read < 0
              ? __ldcg(&reinterpret_cast<const CountRowHeader*>(row_of(source))
                            ->tokens)
              : __ldcg(counts_of(source) + read);
      // What the status names: -1 the token count, an expert, or -2 - d
      // the tokens for rank d.
      const int what = read < E ? read : -2 - (read - E);
      recordStatus(context, kStatusBadCountRow, source, 0, what, value,
                   disagrees ? -1 : c.max_tokens);
    } else if (summary.rank_rows[most] > p.capacity) {
      recordStatus(context, kStatusCapacityOverflow, most, 0, -1, -1,
                   summary.rank_rows[most]);
    }
    if (c.debug != 0) {
      printf(
          "[hostfuse moe rank %d] dispatch epoch %llu: %lld tokens, "
          "%lld rows here (capacity %lld)%s, %s route\n",
          c.rank, static_cast<unsigned long long>(epoch),
          static_cast<long long>(p.tokens),
          static_cast<long long>(summary.rank_rows[c.rank]),
          static_cast<long long>(p.capacity), offsets.bad ? ", bad input" : "",
          p.local_route != 0 ? "local" : "grid");
      for (int source = 0; source < R; ++source) {
        for (int x = 0; x < E; ++x) {
          printf(
              "[hostfuse moe rank %d]   count[source %d][expert %d] = "
              "%d, our offset there %lld\n",
              c.rank, source, x, counts_of(source)[x],
              static_cast<long long>(shared.offset[x]));
        }
      }
    }
  }
}

// One token's picks as seen by lane k < K of a warp (other lanes: none).
struct Pick {
  int expert = -1;       // -1: masked (or past K)
  int rank = -1;         // the expert's rank
  int32_t position = 0;  // among this rank's rows of the expert
  // Staged push, before the offsets: the staging slot on that rank, if
  // this is the token's first pick there, else -1.
  int32_t slot = -1;
  int64_t row = -1;  // its row there; -1 before the offsets are known
};

// `offsets`: whether computeOffsets has run; false (the staged push, before
// it) gives the position and the slot instead of the row.
template <typename IdxT>
__device__ __forceinline__ Pick pickOf(const DispatchParams& p,
                                       const DispatchShared& shared, int64_t t,
                                       int lane, bool offsets = true) {
  const CommonParams& c = p.common;
  Pick pick;
  if (lane < c.topk) {
    const int64_t q = t * c.topk + lane;
    const int64_t id =
        static_cast<int64_t>(static_cast<const IdxT*>(p.topk_idx)[q]);
    if (id >= 0 && id < p.num_experts) {
      pick.expert = static_cast<int>(id);
      pick.rank = pick.expert / c.local_experts;
      // Grid route: written by other blocks during this kernel.
      const bool local = p.local_route != 0;
      pick.position = local ? shared.positions[q] : __ldcg(p.pick_pos + q);
      if (offsets) {
        pick.row = shared.offset[pick.expert] + pick.position;
      } else if (p.staged != 0) {
        pick.slot = local ? shared.slots[q] : __ldcg(p.slot_pos + q);
      }
    }
  }
  return pick;
}

// Lane k < K: the metadata of pick k's row on a peer, then its epoch
// (system-scope release). `primary` is the row holding the token's data on
// that rank, -1 if this row does.
__device__ __forceinline__ void writeMeta(const DispatchParams& p, void* recv,
                                          int64_t row, int64_t t, int pick,
                                          int64_t primary, uint64_t epoch) {
  const CommonParams& c = p.common;
  RowMeta* meta = metaAt(recv, c.meta_offset, row);
  int4 body;
  body.x = static_cast<int>(t);
  body.y = (c.rank << 8) | pick;
  body.z = primary == row ? -1 : static_cast<int>(primary);
  body.w = __float_as_int(
      p.topk_weights != nullptr ? p.topk_weights[t * c.topk + pick] : 0.0f);
  *reinterpret_cast<int4*>(meta) = body;
  storeReleaseSys(&meta->epoch, epoch);
}

// Push blocks: every token with picks on the group's peer goes there once,
// into the row of its smallest local expert there (the smallest of its
// rows there: if that one does not fit in C, none does), followed by the
// metadata of all its rows there.
template <typename IdxT, typename U>
__device__ void pushToPeer(const DispatchParams& p,
                           const DispatchShared& shared, uint64_t epoch) {
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const PushGroup group(c);
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  void* const recv = c.recv[group.peer];
  for (int64_t t = group.first_warp; t < p.tokens; t += group.warps) {
    const Pick pick = pickOf<IdxT>(p, shared, t, lane);
    const bool here = pick.expert >= 0 && pick.rank == group.peer;
    const bool fits = here && pick.row < p.capacity;
    const unsigned primary = __reduce_min_sync(
        kFullMask, fits ? static_cast<unsigned>(pick.row) : UINT_MAX);
    if (primary == UINT_MAX) {
      continue;
    }
    char* destination = static_cast<char*>(recv) + primary * c.row_bytes;
    copyUnits<U, false>(&destination, 1,
                        reinterpret_cast<const U*>(
                            static_cast<const char*>(p.x) + t * c.row_bytes),
                        0, units, lane);
    fenceAcqRelSys();
    __syncwarp();
    if (fits) {
      writeMeta(p, recv, pick.row, t, lane, primary, epoch);
    }
  }
}

__device__ __forceinline__ int64_t stageIndex(const CommonParams& c,
                                              uint64_t epoch, int source,
                                              int64_t slot) {
  return (static_cast<int64_t>(epoch & 1) * c.world_size + source) *
             c.max_tokens +
         slot;
}

__device__ __forceinline__ StageHeader* stageHeaderAt(const DispatchParams& p,
                                                      void* stage,
                                                      int64_t index) {
  return reinterpret_cast<StageHeader*>(
      static_cast<char*>(stage) + p.stage_meta_offset +
      static_cast<size_t>(index) * stageMetaBytes(p.stage_picks));
}

// Push blocks, staged push (before any count row is in): every token with
// picks on the group's peer goes there once, into its staging slot, with
// one entry per pick there (pick, local expert, position, weight), then the
// slot's epoch. A pick's position is final from the route alone; where its
// row goes on the peer depends on the other ranks' counts, which the peer
// adds when it copies the row out of the slot (expandStaged).
template <typename IdxT, typename U>
__device__ void pushStaged(const DispatchParams& p,
                           const DispatchShared& shared, uint64_t epoch) {
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const unsigned lower_lanes = (1u << lane) - 1;
  const PushGroup group(c);
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  void* const stage = p.stage[group.peer];
  for (int64_t t = group.first_warp; t < p.tokens; t += group.warps) {
    const Pick pick = pickOf<IdxT>(p, shared, t, lane, /*offsets=*/false);
    const bool here = pick.expert >= 0 && pick.rank == group.peer;
    const unsigned on_peer = __ballot_sync(kFullMask, here);
    if (on_peer == 0) {
      continue;
    }
    // The lowest lane holds the token's first pick there, and its slot.
    const int leader = __ffs(on_peer) - 1;
    const int64_t index =
        stageIndex(c, epoch, c.rank, __shfl_sync(kFullMask, pick.slot, leader));
    char* destination = static_cast<char*>(stage) + index * c.row_bytes;
    copyUnits<U, false>(&destination, 1,
                        reinterpret_cast<const U*>(
                            static_cast<const char*>(p.x) + t * c.row_bytes),
                        0, units, lane);
    StageHeader* header = stageHeaderAt(p, stage, index);
    // At most min(K, L) entries fit; more picks on one rank mean an expert
    // twice in the token, which the count rows report (nobody reads the
    // slot then).
    const int entry_index = __popc(on_peer & lower_lanes);
    if (here && entry_index < p.stage_picks) {
      int4 entry;
      entry.x = lane | ((pick.expert % c.local_experts) << 8);
      entry.y = pick.position;
      entry.z = __float_as_int(
          p.topk_weights != nullptr ? p.topk_weights[t * c.topk + lane] : 0.0f);
      entry.w = 0;
      reinterpret_cast<int4*>(header + 1)[entry_index] = entry;
    }
    if (lane == leader) {
      header->token = static_cast<int32_t>(t);
      header->picks = __popc(on_peer);
    }
    fenceAcqRelSys();
    __syncwarp();
    if (lane == leader) {
      storeReleaseSys(&header->epoch, epoch);
    }
  }
}

// The most warps that share one token's local rows, and the fewest units a
// warp copies of it.
constexpr int64_t kMaxLocalPieces = 16;
constexpr int64_t kMinPieceUnits = 64;

// Local blocks: this rank's rows, one per pick (local copies are cheap),
// with their provenance, and pick_row / pick_rank of every pick. With
// fewer tokens than local warps, a token's row is cut into pieces, each
// copied by its own warp to all the token's rows here (one token per warp
// left most warps idle: 9.7 of the 22-us dispatch at T = 128 on one rank,
// 1 x H200, docs/perf_log.md); the first piece's warp writes the
// provenance and pick_row.
template <typename IdxT, typename U>
__device__ void writeLocalRows(const DispatchParams& p,
                               const DispatchShared& shared) {
  __shared__ char* destinations[kWarpsPerBlock][kMaxTopK];
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lower_lanes = (1u << lane) - 1;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  void* const recv = c.recv[c.rank];
  // Consecutive work items on different blocks, as in the push groups.
  const int64_t blocks = gridDim.x - c.push_blocks;
  const int64_t warps = blocks * kWarpsPerBlock;
  const int64_t pieces =
      max(int64_t{1}, min(min(kMaxLocalPieces, units / kMinPieceUnits),
                          warps / max(p.tokens, int64_t{1})));
  const int64_t piece_units = (units + pieces - 1) / pieces;
  for (int64_t item = warp * blocks + (blockIdx.x - c.push_blocks);
       item < p.tokens * pieces; item += warps) {
    const int64_t t = item / pieces;
    const int64_t piece = item % pieces;
    const Pick pick = pickOf<IdxT>(p, shared, t, lane);
    const bool here = pick.expert >= 0 && pick.rank == c.rank;
    const bool fits = here && pick.row < p.capacity;
    if (piece == 0 && lane < c.topk) {
      c.pick_row[t * c.topk + lane] = pick.expert >= 0 && pick.row < p.capacity
                                          ? static_cast<int32_t>(pick.row)
                                          : -1;
      c.pick_rank[t * c.topk + lane] = pick.rank;
    }
    if (piece == 0 && fits) {
      p.recv_src_token[pick.row] = t;
      p.recv_src_rank[pick.row] = c.rank;
      p.recv_src_k[pick.row] = lane;
      if (p.recv_weights != nullptr) {
        p.recv_weights[pick.row] = p.topk_weights[t * c.topk + lane];
      }
    }
    const unsigned carriers = __ballot_sync(kFullMask, fits);
    if (carriers == 0) {
      continue;
    }
    if (fits) {
      destinations[warp][__popc(carriers & lower_lanes)] =
          static_cast<char*>(recv) + pick.row * c.row_bytes;
    }
    __syncwarp();
    copyUnits<U, false>(destinations[warp], __popc(carriers),
                        reinterpret_cast<const U*>(
                            static_cast<const char*>(p.x) + t * c.row_bytes),
                        piece * piece_units,
                        min(units, (piece + 1) * piece_units), lane);
    __syncwarp();  // destinations[warp] is rewritten for the next item
  }
}

// Warp-wide: the first of `count` claim groups, from `from` on and
// wrapping around, for which open(i) holds (32 at a time, one ballot
// each), or -1 if none does.
template <typename Open>
__device__ __forceinline__ int firstOpenGroup(int from, int count, int lane,
                                              Open&& open) {
  for (int base = 0; base < count; base += 32) {
    const int candidate = (from + base + lane) % count;
    const unsigned found =
        __ballot_sync(kFullMask, base + lane < count && open(candidate));
    if (found != 0) {
      return (from + base + __ffs(found) - 1) % count;
    }
  }
  return -1;
}

// Warp-wide: the next claim of `counter` (one atomic, in lane 0).
__device__ __forceinline__ int64_t claimNext(int32_t* counter, int lane) {
  int64_t claim = 0;
  if (lane == 0) {
    claim = atomicAdd(counter, 1);
  }
  return __shfl_sync(kFullMask, claim, 0);
}

// Every warp: claims received rows segment by segment (segment i = source
// i / L, local expert i % L; this rank's own rows are complete already),
// starting at a segment of its own so that warps spread; within a segment
// rows arrive in token order, so claims follow the arrivals. For each row:
// wait for its epoch, write provenance and the route entry, copy the token
// from the row that carried it.
template <typename U>
__device__ void expandRows(const DispatchParams& p,
                           const DispatchShared& shared, int64_t recv_rows,
                           uint64_t epoch, const WaitContext& context) {
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const int segments = c.world_size * c.local_experts;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  int32_t* claims = p.segment_claims + (epoch & 1) * p.num_experts;
  char* const recv_base = static_cast<char*>(c.recv[c.rank]);
  // A segment has rows left when its claims are below its valid rows.
  auto left = [&](int segment) {
    if (segment / c.local_experts == c.rank) {
      return false;
    }
    const int64_t valid =
        min(static_cast<int64_t>(shared.recv_count[segment]),
            max(int64_t{0}, recv_rows - shared.recv_start[segment]));
    return loadVolatile(claims + segment) < valid;
  };
  int segment = static_cast<int>(
      (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5)) %
      segments);
  while (true) {
    // The first segment with rows left, from `segment` on.
    segment = firstOpenGroup(segment, segments, lane, left);
    if (segment < 0) {
      return;
    }
    const int source = segment / c.local_experts;
    const int64_t start = shared.recv_start[segment];
    const int64_t rows = min(static_cast<int64_t>(shared.recv_count[segment]),
                             recv_rows - start);
    while (true) {
      const int64_t position = claimNext(claims + segment, lane);
      if (position >= rows) {
        break;
      }
      const int64_t r = start + position;
      RowMeta* meta = metaAt(recv_base, c.meta_offset, r);
      if (!warpWaitForPeer(&meta->epoch, epoch, source, context,
                           kWaitDispatchData)) {
        return;
      }
      const int4 body = __ldcg(reinterpret_cast<const int4*>(meta));
      const int from = body.y >> 8;
      const int pick = body.y & 0xff;
      if (lane == 0) {
        p.recv_src_token[r] = body.x;
        p.recv_src_rank[r] = from;
        p.recv_src_k[r] = pick;
        if (p.recv_weights != nullptr) {
          p.recv_weights[r] = __int_as_float(body.w);
        }
        if (from != source || body.z >= r || pick >= c.topk || body.x < 0 ||
            body.x >= c.max_tokens) {
          recordStatus(context, kStatusInternal, c.rank, kWaitDispatchData,
                       body.x, body.y, r);
        } else {
          RouteEntry entry;
          entry.epoch = epoch;
          entry.row = r;
          c.routes[(static_cast<int64_t>(source) * c.max_tokens + body.x) *
                       c.topk +
                   pick] = entry;
        }
      }
      if (body.z >= 0 && body.z < r) {
        char* destination = recv_base + r * c.row_bytes;
        copyUnits<U, true>(
            &destination, 1,
            reinterpret_cast<const U*>(recv_base + body.z * c.row_bytes), 0,
            units, lane);
      }
    }
  }
}

// Every warp, staged push: claims the staging slots that other ranks filled
// here, source by source in slot order (a source's slots fill in its token
// order), starting at a source of its own. For each slot: wait for its
// epoch, then for each of its entries the row here (the segment's start from
// the count rows plus the position), its provenance and route entry, and
// one copy of the token into all those rows.
template <typename U>
__device__ void expandStaged(const DispatchParams& p,
                             const DispatchShared& shared,
                             const CountSummary& summary, int64_t recv_rows,
                             uint64_t epoch, const WaitContext& context) {
  __shared__ char* destinations[kWarpsPerBlock][kMaxTopK];
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lower_lanes = (1u << lane) - 1;
  const int R = c.world_size;
  const int L = c.local_experts;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  int32_t* claims = p.segment_claims + (epoch & 1) * p.num_experts;
  void* const stage = p.stage[c.rank];
  char* const recv_base = static_cast<char*>(c.recv[c.rank]);
  auto left = [&](int source) {
    return source != c.rank &&
           loadVolatile(claims + source) < summary.tokens_from[source];
  };
  int source = static_cast<int>(
      (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) % R);
  while (true) {
    source = firstOpenGroup(source, R, lane, left);
    if (source < 0) {
      return;
    }
    while (true) {
      const int64_t slot = claimNext(claims + source, lane);
      if (slot >= summary.tokens_from[source]) {
        break;
      }
      const int64_t index = stageIndex(c, epoch, source, slot);
      StageHeader* header = stageHeaderAt(p, stage, index);
      if (!warpWaitForPeer(&header->epoch, epoch, source, context,
                           kWaitDispatchData)) {
        return;
      }
      const int2 head = __ldcg(reinterpret_cast<const int2*>(header));
      const int token = head.x;
      const int picks = head.y;
      if (token < 0 || token >= c.max_tokens || picks < 1 ||
          picks > p.stage_picks) {
        if (lane == 0) {
          recordStatus(context, kStatusInternal, c.rank, kWaitDispatchData,
                       token, picks, index);
        }
        continue;
      }
      bool keep = false;
      int64_t r = -1;
      int k = 0;
      if (lane < picks) {
        const int4 entry =
            __ldcg(reinterpret_cast<const int4*>(header + 1) + lane);
        k = entry.x & 0xff;
        const int l = entry.x >> 8;
        const int32_t position = entry.y;
        const int segment = source * L + l;
        if (k >= c.topk || l < 0 || l >= L || position < 0) {
          recordStatus(context, kStatusInternal, c.rank, kWaitDispatchData,
                       token, entry.x, index);
        } else if (position < shared.recv_count[segment]) {
          r = shared.recv_start[segment] + position;
          keep = r < recv_rows;  // rows past the capacity are dropped
        }
        if (keep) {
          p.recv_src_token[r] = token;
          p.recv_src_rank[r] = source;
          p.recv_src_k[r] = k;
          if (p.recv_weights != nullptr) {
            p.recv_weights[r] = __int_as_float(entry.z);
          }
          RouteEntry route;
          route.epoch = epoch;
          route.row = r;
          c.routes[(static_cast<int64_t>(source) * c.max_tokens + token) *
                       c.topk +
                   k] = route;
        }
      }
      const unsigned kept = __ballot_sync(kFullMask, keep);
      if (kept == 0) {
        continue;
      }
      if (keep) {
        destinations[warp][__popc(kept & lower_lanes)] =
            recv_base + r * c.row_bytes;
      }
      __syncwarp();
      copyUnits<U, true>(
          destinations[warp], __popc(kept),
          reinterpret_cast<const U*>(static_cast<const char*>(stage) +
                                     index * c.row_bytes),
          0, units, lane);
      __syncwarp();  // destinations[warp] is rewritten for the next slot
    }
  }
}

template <typename IdxT, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dispatchKernel(const DispatchParams p) {
  const uint64_t entry_ns = p.common.profile != nullptr ? globalTimerNs() : 0;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ CountSummary summary;

  const DispatchShared shared = carveShared(shared_raw, p.num_experts);
  const CommonParams& c = p.common;
  const int E = p.num_experts;
  const int64_t T = p.tokens;
  DeviceState* state = c.state;

  const CallStart call =
      beginCall(c, &state->dispatch_epoch, kOpDispatch, entry_ns);
  if (blockIdx.x == 0) {
    // The layout's identity, which the combine compares with the epoch of
    // the site's last dispatch (a layout kept from an earlier call is
    // refused there).
    for (int i = threadIdx.x; i <= c.world_size; i += blockDim.x) {
      p.layout_id[i] = i == 0 ? static_cast<int64_t>(call.context.epoch) : 0;
    }
  }
  if (!call.usable) {
    // A call after a failure (e.g. a graph replayed before checkStatus):
    // zero counts, so that nothing downstream reads a row.
    if (blockIdx.x == 0) {
      for (int i = threadIdx.x; i < c.local_experts; i += blockDim.x) {
        p.recv_expert_counts[i] = 0;
      }
      for (int i = threadIdx.x; i < c.world_size; i += blockDim.x) {
        p.rows_to_rank[i] = 0;
        p.rows_from_rank[i] = 0;
      }
    }
    return;
  }
  const WaitContext& context = call.context;
  const uint64_t epoch = context.epoch;
  uint64_t* const prof = call.prof;
  if (blockIdx.x == 0) {
    // The next call's claims start from zero; nobody uses that parity now.
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
      p.segment_claims[((epoch + 1) & 1) * E + i] = 0;
    }
  }

  // --- Route.
  uint64_t ranked = 0;
  if (p.local_route != 0) {
    routeLocal<IdxT>(p, shared, epoch, prof);
  } else {
    ranked = routeGrid<IdxT>(p, shared, epoch, context, prof);
    if (ranked == 0) {
      return;
    }
  }

  // Block-wide: `write` once every block's positions are final (grid
  // route: the second barrier; uniform in the block), then the profile mark
  // of `phase`. False when the wait failed.
  auto whenRanked = [&](int phase, auto&& write) {
    if (p.local_route == 0 &&
        !gridWait(&state->dispatch_ranked, ranked, c.rank, context)) {
      return false;
    }
    write();
    if (prof != nullptr) {  // uniform in the block
      __syncthreads();
      profileMark(prof, phase);
    }
    return true;
  };

  // --- Staged push: the rows go before any count row is in.
  const bool push_block = static_cast<int>(blockIdx.x) < c.push_blocks;
  if (p.staged != 0 && push_block && !whenRanked(kDispatchPushed, [&] {
        pushStaged<IdxT, U>(p, shared, epoch);
      })) {
    return;
  }

  // --- Offsets from all R count rows of this epoch.
  void* const own_control = c.control[c.rank];
  if (!blockWaitForPeers(flagAt(own_control, c.layout.count_flags, 0),
                         c.world_size, epoch, context, kWaitCounts)) {
    return;
  }
  profileMark(prof, kDispatchCountsIn);
  const Offsets offsets =
      computeOffsets(p, shared, summary, own_control, epoch, prof);
  if (blockIdx.x == 0) {
    recordOffsets(p, shared, summary, offsets, own_control, epoch, context);
  }

  // --- Push to the group's peer, or write this rank's own rows.
  if (offsets.bad) {
    for (int64_t q = blockIdx.x * blockDim.x + threadIdx.x; q < T * c.topk;
         q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      c.pick_row[q] = -1;
      c.pick_rank[q] = -1;
    }
  } else if (push_block) {
    if (p.staged == 0 && !whenRanked(kDispatchPushed, [&] {
          pushToPeer<IdxT, U>(p, shared, epoch);
        })) {
      return;
    }
  } else if (!whenRanked(kDispatchLocalRows,
                         [&] { writeLocalRows<IdxT, U>(p, shared); })) {
    return;
  }

  // --- Expand the received rows.
  if (p.staged != 0) {
    if (!offsets.bad) {
      expandStaged<U>(p, shared, summary, offsets.recv_rows, epoch, context);
    }
  } else {
    expandRows<U>(p, shared, offsets.recv_rows, epoch, context);
  }
  if (prof != nullptr) {  // uniform in the block
    __syncthreads();
    profileMark(prof, kDispatchExpanded);
  }
  if (arriveLast(&state->dispatch_exits, gridDim.x) && threadIdx.x == 0) {
    state->dispatch_epoch = epoch;
  }
  profileMark(prof, kDispatchExit);
}

// Every instantiation has the same pointer type, so one function can
// return any of them.
template <typename IdxT>
auto dispatchKernelFor(int64_t unit_bytes) {
  switch (unit_bytes) {
    case 16:
      return &dispatchKernel<IdxT, uint4>;
    case 8:
      return &dispatchKernel<IdxT, uint2>;
    case 4:
      return &dispatchKernel<IdxT, uint32_t>;
    default:
      return &dispatchKernel<IdxT, uint16_t>;
  }
}

}  // namespace

ControlLayout controlLayout(int world_size, int num_experts,
                            int64_t max_tokens) {
  ControlLayout layout = {};
  const size_t flags = sizeof(uint64_t) * world_size;
  layout.count_flags = 0;
  layout.free_flags = roundUp(layout.count_flags + flags, 16);
  layout.failure = roundUp(layout.free_flags + flags, 16);
  layout.combine_modes = roundUp(layout.failure + sizeof(uint64_t), 16);
  layout.arrivals = roundUp(layout.combine_modes + flags, 128);
  layout.count_rows = roundUp(
      layout.arrivals + sizeof(uint64_t) * world_size * max_tokens, 128);
  layout.count_row_bytes = countRowBytes(num_experts, world_size);
  layout.total_bytes =
      layout.count_rows + 2 * world_size * layout.count_row_bytes;
  return layout;
}

size_t dispatchSharedBytes(int num_experts) {
  return tablesBytes(num_experts) + kPositionsBytes +
         countRowBytes(num_experts, kMaxRanks);
}

cudaError_t dispatchOccupancy(size_t shared_bytes, int* per_sm) {
  *per_sm = INT_MAX;
  for (const int64_t unit : {16, 8, 4, 2}) {
    for (const bool wide : {true, false}) {
      const auto kernel = wide ? dispatchKernelFor<int64_t>(unit)
                               : dispatchKernelFor<int32_t>(unit);
      int blocks = 0;
      const cudaError_t status =
          device::occupancy(kernel, shared_bytes, &blocks);
      if (status != cudaSuccess) {
        return status;
      }
      *per_sm = blocks < *per_sm ? blocks : *per_sm;
    }
  }
  return cudaSuccess;
}

cudaError_t launchDispatch(const DispatchParams& params, bool idx_is_int64,
                           int blocks, bool cooperative, cudaStream_t stream) {
  const auto kernel =
      idx_is_int64 ? dispatchKernelFor<int64_t>(params.common.unit_bytes)
                   : dispatchKernelFor<int32_t>(params.common.unit_bytes);
  return device::launch(kernel, params, blocks,
                        dispatchSharedBytes(params.num_experts), cooperative,
                        stream);
}

}  // namespace hostfuse::moe
