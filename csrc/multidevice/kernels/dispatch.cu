// CUDA-backend MoE dispatch: one cooperative kernel per call.
//
//   route    every block validates and counts the picks of its own range
//            of tokens (per expert, in shared memory, then block_counts);
//            after a grid barrier block 0 sums them into the count row
//            (with the smallest validation error of all blocks), publishes
//            it into every peer's control buffer and raises count_flags =
//            epoch, while every block adds the earlier blocks' counts to
//            its picks' positions (pick_pos: among this rank's rows of the
//            expert, in token order); the push blocks wait for all blocks
//            to have done so (a second grid barrier) before pushing;
//   offsets  every block waits for all R count rows, then derives where
//            this rank's rows start in every receiver's expert-major buffer
//            (sender view) and where each source's rows start here
//            (receiver view);
//   push     the push blocks copy each token once per remote destination,
//            into the row of its pick with the smallest local expert there,
//            with 16-byte stores, and every pick's 16-byte metadata; rows
//            for this rank are written for every pick. Either all
//            destinations at once, or (many tokens) one destination per
//            round, so that the GPUs exchange in a permutation and receivers
//            can start expanding early. The last block of a round raises
//            data_flags = epoch at its destinations;
//   expand   every warp claims groups of rows, source by source in arrival
//            order, waits for that source's data flag, writes provenance
//            and copies the token row into its other picks' rows.
// docs/moe_cuda.md has the picture, the flags and the epochs.
#include <climits>
#include <cstdio>

#include "multidevice/kernels/device_utils.cuh"

namespace hostfuse::moe {

namespace {

using device::arriveLast;
using device::blockWaitForPeers;
using device::copyUnits;
using device::flagAt;
using device::globalTimerNs;
using device::gridArrive;
using device::gridWait;
using device::kFullMask;
using device::loadVolatile;
using device::profileBegin;
using device::profileMark;
using device::profileSlots;
using device::recordStatus;
using device::roundUp;
using device::rowOfSource;
using device::signalAllPeers;
using device::signalPeer;
using device::WaitContext;
using device::warpWaitForPeer;

constexpr int kOpDispatch = 1;
constexpr int kExpandRows = 4;  // rows per expansion claim

__host__ __device__ inline size_t countRowBytes(int num_experts) {
  return roundUp(sizeof(CountRowHeader) + sizeof(int32_t) * num_experts, 16);
}

__host__ __device__ inline size_t tablesBytes(int num_experts) {
  // offset, recv_start (int64), colsum, recv_count (int32), route (int32 per
  // routing warp); R * L = E.
  return roundUp((8 + 8 + 4 + 4 + 4 * kWarpsPerBlock) * size_t(num_experts),
                 16);
}

struct DispatchShared {
  int64_t* offset;      // [E]: this rank's first row of expert x on its rank
  int64_t* recv_start;  // [R * L]: first row here of source s, expert l
  int32_t* colsum;      // [E]: rows of expert x from all sources
  int32_t* recv_count;  // [R * L]: rows here of source s, expert l
  int32_t* route;       // [kWarpsPerBlock, E]: per-warp counts, then bases
  char* row;            // count row being published (block 0)
};

__device__ DispatchShared carveShared(unsigned char* raw, int num_experts) {
  DispatchShared shared;
  shared.offset = reinterpret_cast<int64_t*>(raw);
  shared.recv_start = shared.offset + num_experts;
  shared.colsum = reinterpret_cast<int32_t*>(shared.recv_start + num_experts);
  shared.recv_count = shared.colsum + num_experts;
  shared.route = shared.recv_count + num_experts;
  shared.row = reinterpret_cast<char*>(raw + tablesBytes(num_experts));
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

// Error key: the smallest (token, pick) with a bad id wins.
__device__ __forceinline__ unsigned long long errorKey(int64_t token, int pick,
                                                       int code) {
  return (static_cast<unsigned long long>(token) << 16) |
         (static_cast<unsigned long long>(code) << 8) |
         static_cast<unsigned long long>(pick);
}

// The picks' positions among this rank's rows of their expert, spread over
// the grid: block b owns tokens [b * tokens_per_block, ...), its warp w the
// sub-range [w * tokens_per_warp, ...) of those (BlockTokens). A pick's
// position is the number of picks of its expert in earlier tokens (ids are
// distinct within a token), so it is the sum of: the earlier blocks' counts
// of the expert, the earlier warps' counts in the block, and its position
// among its warp's picks of the expert.
struct BlockTokens {
  int64_t first;  // the block's tokens: [first, last)
  int64_t last;
  int64_t tokens_per_warp;  // warp w: [first + w * tokens_per_warp, ...)
};

__device__ BlockTokens blockTokens(int64_t tokens) {
  const int64_t per_block =
      max(int64_t{1}, (tokens + gridDim.x - 1) / gridDim.x);
  BlockTokens range;
  range.first = min(tokens, static_cast<int64_t>(blockIdx.x) * per_block);
  range.last = min(tokens, range.first + per_block);
  range.tokens_per_warp =
      max(int64_t{1}, (per_block + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return range;
}

// Warp w's picks, 32 at a time in (token, pick) order: calls
// visit(q, expert) in every lane, expert -1 for no (or an invalid) pick and
// past the end. Warp-uniform trip count.
template <typename IdxT, typename Visit>
__device__ __forceinline__ void forWarpPicks(const DispatchParams& p,
                                             const BlockTokens& range,
                                             Visit&& visit) {
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t first =
      min(range.last, range.first + warp * range.tokens_per_warp);
  const int64_t last = min(range.last, first + range.tokens_per_warp);
  for (int64_t base = first * p.topk; base < last * p.topk; base += 32) {
    const int64_t q = base + lane;
    int expert = -1;
    if (q < last * p.topk) {
      const int64_t id = static_cast<int64_t>(idx[q]);
      if (id >= 0 && id < p.num_experts) {
        expert = static_cast<int>(id);
      }
    }
    visit(q, expert);
  }
}

// Every block, its own tokens: validation (smallest error key into
// block_errors[b]), counts per expert (into block_counts[e][b]), each
// pick's position among its warp's picks of its expert (pick_pos), and in
// shared.route[w][e] the exclusive base of warp w within the block.
template <typename IdxT>
__device__ void countBlock(const DispatchParams& p,
                           const DispatchShared& shared,
                           const BlockTokens& range, uint64_t* prof) {
  __shared__ unsigned long long error_key;
  const int E = p.num_experts;
  const int K = p.topk;
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  if (threadIdx.x == 0) {
    error_key = ULLONG_MAX;
  }
  for (int i = threadIdx.x; i < kWarpsPerBlock * E; i += blockDim.x) {
    shared.route[i] = 0;
  }
  __syncthreads();

  // Validation: ids in [-1, E), no expert twice in a token.
  for (int64_t t = range.first + threadIdx.x; t < range.last; t += blockDim.x) {
    for (int k = 0; k < K; ++k) {
      const int64_t id = static_cast<int64_t>(idx[t * K + k]);
      unsigned long long key = ULLONG_MAX;
      if (id < -1 || id >= E) {
        key = errorKey(t, k, kStatusBadExpertId);
      } else if (id >= 0) {
        for (int j = 0; j < k; ++j) {
          if (static_cast<int64_t>(idx[t * K + j]) == id) {
            key = errorKey(t, k, kStatusDuplicateExpert);
            break;
          }
        }
      }
      if (key != ULLONG_MAX) {
        atomicMin(&error_key, key);
        break;
      }
    }
  }
  if (prof != nullptr) {  // uniform in the block
    __syncthreads();
    profileMark(prof, kDispatchValidated);
  }

  // Counting: lanes naming the same expert find each other with match_any
  // and take consecutive positions.
  {
    int32_t* counts = shared.route + warp * E;
    const unsigned lower_lanes = (1u << lane) - 1;
    forWarpPicks<IdxT>(p, range, [&](int64_t q, int expert) {
      const unsigned group = __match_any_sync(kFullMask, expert);
      const unsigned before = group & lower_lanes;
      if (expert >= 0) {
        p.pick_pos[q] = counts[expert] + __popc(before);
      }
      __syncwarp();
      if (expert >= 0 && before == 0) {
        counts[expert] += __popc(group);
      }
      __syncwarp();
    });
  }
  __syncthreads();

  // Per expert: the warps' exclusive bases in place, the block's total out.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t running = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const int32_t count = shared.route[w * E + e];
      shared.route[w * E + e] = running;
      running += count;
    }
    p.block_counts[static_cast<size_t>(e) * gridDim.x + blockIdx.x] = running;
  }
  if (threadIdx.x == 0) {
    p.block_errors[blockIdx.x] = error_key;
  }
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

// Block 0, after the grid barrier: the totals and the smallest error key
// over all blocks into the count row, published into slot [parity][rank]
// of every peer; then the count flags.
template <typename IdxT>
__device__ void publishCounts(const DispatchParams& p,
                              const DispatchShared& shared, uint64_t epoch,
                              uint64_t* prof) {
  __shared__ unsigned long long error_key;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);
  auto* header = reinterpret_cast<CountRowHeader*>(shared.row);
  auto* totals =
      reinterpret_cast<int32_t*>(shared.row + sizeof(CountRowHeader));
  for (int e = warp; e < p.num_experts; e += kWarpsPerBlock) {
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
      error_key = key;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    header->code = kStatusOk;
    header->pick = -1;
    header->token = -1;
    header->value = 0;
    header->reserved = 0;
    if (error_key != ULLONG_MAX) {
      const int64_t token = static_cast<int64_t>(error_key >> 16);
      const int pick = static_cast<int>(error_key & 0xff);
      header->code = static_cast<int32_t>((error_key >> 8) & 0xff);
      header->pick = pick;
      header->token = token;
      header->value = static_cast<int64_t>(idx[token * p.topk + pick]);
    }
  }
  __syncthreads();

  const int parity = static_cast<int>(epoch & 1);
  const int vectors = static_cast<int>(p.layout.count_row_bytes / 16);
  for (int i = threadIdx.x; i < p.world_size * vectors; i += blockDim.x) {
    const int peer = i / vectors;
    const int vector = i % vectors;
    auto* destination = reinterpret_cast<int4*>(
        countRowAt(p.control[peer], p.layout, parity, p.rank, p.world_size));
    destination[vector] = reinterpret_cast<const int4*>(shared.row)[vector];
  }
  __threadfence_system();
  __syncthreads();
  signalAllPeers(p.control, p.layout.count_flags, p.rank, p.world_size, epoch);
  profileMark(prof, kDispatchPublished);
}

// Every block, after the grid barrier: adds the earlier blocks' counts to
// its warps' bases and makes its picks' pick_pos final (each lane rewrites
// the entries it wrote in countBlock).
template <typename IdxT>
__device__ void rankBlock(const DispatchParams& p, const DispatchShared& shared,
                          const BlockTokens& range) {
  const int E = p.num_experts;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int e = warp; e < E; e += kWarpsPerBlock) {
    const int32_t before = sumBlockCounts(p, e, static_cast<int>(blockIdx.x));
    if (lane < kWarpsPerBlock) {
      shared.route[lane * E + e] += before;
    }
  }
  __syncthreads();
  const int32_t* bases = shared.route + warp * E;
  forWarpPicks<IdxT>(p, range, [&](int64_t q, int expert) {
    if (expert >= 0) {
      p.pick_pos[q] += bases[expert];
    }
  });
}

template <typename IdxT, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dispatchKernel(const DispatchParams p) {
  const uint64_t entry_ns = p.profile != nullptr ? globalTimerNs() : 0;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ char* destinations[kWarpsPerBlock][kMaxTopK];
  __shared__ int bad_rank;
  __shared__ int64_t rank_rows[kMaxRanks];
  __shared__ int64_t source_groups[kMaxRanks + 1];
  __shared__ unsigned long long data_in_ns;  // profiling only

  const DispatchShared shared = carveShared(shared_raw, p.num_experts);
  const int E = p.num_experts;
  const int L = p.local_experts;
  const int R = p.world_size;
  const int K = p.topk;
  const int64_t T = p.tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  DeviceState* state = p.state;

  // Every block reads the epoch before its exit arrival; the last block to
  // exit advances it, so all blocks agree on it.
  const uint64_t epoch = loadVolatile(&state->dispatch_epoch) + 1;
  const WaitContext context{state, p.status, p.timeout_ns, kOpDispatch, epoch};
  uint64_t* const prof = profileSlots(p.profile);
  profileBegin(prof, epoch, entry_ns);
  if (loadVolatile(&state->poisoned) != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      recordStatus(context, kStatusPoisoned, -1, 0, -1, -1, 0);
    }
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // The next call's claims start from zero; nobody uses that parity now.
    state->expand_claims[(epoch + 1) & 1] = 0;
  }
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);

  // --- Route: every block counts its tokens; after a grid barrier block 0
  // publishes the totals while every block makes its positions final.
  const BlockTokens range = blockTokens(T);
  countBlock<IdxT>(p, shared, range, prof);
  const uint64_t counted =
      gridArrive(&state->dispatch_counted, static_cast<int>(gridDim.x));
  if (!gridWait(&state->dispatch_counted, counted, p.rank, context)) {
    return;
  }
  profileMark(prof, kDispatchCounted);
  if (blockIdx.x == 0) {
    publishCounts<IdxT>(p, shared, epoch, prof);
  }
  rankBlock<IdxT>(p, shared, range);
  // The push blocks wait for this after the offsets.
  const uint64_t ranked =
      gridArrive(&state->dispatch_ranked, static_cast<int>(gridDim.x));

  // --- Offsets from all R count rows of this epoch.
  void* const own_control = p.control[p.rank];
  if (!blockWaitForPeers(flagAt(own_control, p.layout.count_flags, 0), R, epoch,
                         context, kWaitCounts)) {
    return;
  }
  profileMark(prof, kDispatchCountsIn);
  const int parity = static_cast<int>(epoch & 1);
  auto row_of = [&](int source) {
    return countRowAt(own_control, p.layout, parity, source, R);
  };
  auto counts_of = [&](int source) {
    return reinterpret_cast<const int32_t*>(row_of(source) +
                                            sizeof(CountRowHeader));
  };
  if (threadIdx.x == 0) {
    bad_rank = INT_MAX;
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const auto* header =
        reinterpret_cast<const CountRowHeader*>(row_of(threadIdx.x));
    if (__ldcg(&header->code) != kStatusOk) {
      atomicMin(&bad_rank, static_cast<int>(threadIdx.x));
    }
  }
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    int32_t all = 0;
    int32_t before_us = 0;
    for (int source = 0; source < R; ++source) {
      const int32_t count = __ldcg(counts_of(source) + x);
      all += count;
      before_us += source < p.rank ? count : 0;
    }
    shared.colsum[x] = all;
    shared.offset[x] = before_us;
  }
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    shared.recv_count[i] = __ldcg(counts_of(i / L) + p.rank * L + i % L);
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
      start += shared.colsum[p.rank * L + y];
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
    rank_rows[threadIdx.x] = rows;
  }
  __syncthreads();
  profileMark(prof, kDispatchOffsets);
  const bool bad = bad_rank != INT_MAX;
  const int64_t recv_rows = bad ? 0 : min(rank_rows[p.rank], p.capacity);

  if (blockIdx.x == 0) {
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      p.recv_expert_counts[l] = bad ? 0 : shared.colsum[p.rank * L + l];
    }
    for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
      p.recv_start[i] = shared.recv_start[i];
      p.recv_count[i] = bad ? 0 : shared.recv_count[i];
    }
    if (threadIdx.x < R) {
      const int peer = threadIdx.x;
      int64_t to = 0;
      int64_t from = 0;
      for (int l = 0; l < L; ++l) {
        to += __ldcg(counts_of(p.rank) + peer * L + l);
        from += __ldcg(counts_of(peer) + p.rank * L + l);
      }
      p.rows_to_rank[peer] = bad ? 0 : to;
      p.rows_from_rank[peer] = bad ? 0 : from;
    }
    if (threadIdx.x == 0) {
      state->recv_rows = recv_rows;
      int most = 0;
      for (int d = 1; d < R; ++d) {
        most = rank_rows[d] > rank_rows[most] ? d : most;
      }
      if (bad) {
        const auto* header =
            reinterpret_cast<const CountRowHeader*>(row_of(bad_rank));
        recordStatus(context, __ldcg(&header->code), bad_rank, 0,
                     __ldcg(&header->token), __ldcg(&header->pick),
                     __ldcg(&header->value));
      } else if (rank_rows[most] > p.capacity) {
        recordStatus(context, kStatusCapacityOverflow, most, 0, -1, -1,
                     rank_rows[most]);
      }
      if (p.debug != 0) {
        printf(
            "[hostfuse moe rank %d] dispatch epoch %llu: %lld tokens, "
            "%lld rows here (capacity %lld)%s\n",
            p.rank, static_cast<unsigned long long>(epoch),
            static_cast<long long>(T),
            static_cast<long long>(rank_rows[p.rank]),
            static_cast<long long>(p.capacity), bad ? ", bad input" : "");
        for (int source = 0; source < R; ++source) {
          for (int x = 0; x < E; ++x) {
            printf(
                "[hostfuse moe rank %d]   count[source %d][expert %d] = "
                "%d, our offset there %lld\n",
                p.rank, source, x, counts_of(source)[x],
                static_cast<long long>(shared.offset[x]));
          }
        }
      }
    }
  }

  // --- Push: items (token, chunk of its row) over the push blocks' warps.
  if (bad) {
    for (int64_t q = blockIdx.x * blockDim.x + threadIdx.x; q < T * K;
         q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      p.pick_row[q] = -1;
    }
  }
  const int64_t units = p.row_bytes / static_cast<int64_t>(sizeof(U));
  if (blockIdx.x < p.push_blocks) {
    // Every block's pick_pos final (uniform in the block).
    if (!gridWait(&state->dispatch_ranked, ranked, p.rank, context)) {
      return;
    }
    const int64_t chunk_units =
        (units + p.chunks_per_row - 1) / p.chunks_per_row;
    const int64_t items = bad ? 0 : T * p.chunks_per_row;
    const int64_t push_warps = int64_t{p.push_blocks} * kWarpsPerBlock;
    const int64_t first_item =
        static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    const unsigned lower_lanes = (1u << lane) - 1;
    const int rounds = p.rounds != 0 ? max(1, R - 1) : 1;
    for (int round = 0; round < rounds; ++round) {
      // -1: every destination. Else rank + 1 + round; our own rows travel
      // with the first round.
      const int dest = p.rounds != 0 ? (p.rank + 1 + round) % R : -1;
      for (int64_t item = first_item; item < items; item += push_warps) {
        const int64_t t = item / p.chunks_per_row;
        const int64_t chunk = item % p.chunks_per_row;
        int expert = -1;
        int rank_d = -1;
        int local = INT_MAX;
        int64_t row = -1;
        if (lane < K) {
          const int64_t id = static_cast<int64_t>(idx[t * K + lane]);
          if (id >= 0 && id < E) {
            expert = static_cast<int>(id);
            rank_d = expert / L;
            local = expert % L;
            // Written by other blocks during this kernel: read past L1.
            row = shared.offset[expert] + __ldcg(p.pick_pos + t * K + lane);
          }
        }
        const bool targeted = expert >= 0 && (dest < 0 || rank_d == dest ||
                                              (round == 0 && rank_d == p.rank));
        // A token travels once per remote destination, in its pick with the
        // smallest local expert there (the smallest row: if it does not fit,
        // no other pick of the token there fits); the receiver copies it
        // into the other picks' rows. Rows for this rank are written for
        // every pick (local memory is cheap).
        int best_local = local;
        int64_t primary_row = row;
        for (int j = 0; j < K; ++j) {
          const int rank_j = __shfl_sync(kFullMask, rank_d, j);
          const int local_j = __shfl_sync(kFullMask, local, j);
          const int64_t row_j = __shfl_sync(kFullMask, row, j);
          if (expert >= 0 && rank_j == rank_d && local_j < best_local) {
            best_local = local_j;
            primary_row = row_j;
          }
        }
        const bool fits = expert >= 0 && row < p.capacity;
        const bool mine = targeted && fits;
        const bool carries = mine && (rank_d == p.rank || best_local == local);
        if (chunk == 0) {
          if (lane < K && (targeted || (round == 0 && expert < 0))) {
            p.pick_row[t * K + lane] = fits ? static_cast<int32_t>(row) : -1;
          }
          if (mine) {
            int4 meta;
            meta.x = static_cast<int>(t);
            meta.y = (p.rank << 8) | lane;
            meta.z = carries ? -1 : static_cast<int>(primary_row);
            meta.w = __float_as_int(p.topk_weights != nullptr
                                        ? p.topk_weights[t * K + lane]
                                        : 0.0f);
            *reinterpret_cast<int4*>(static_cast<char*>(p.recv[rank_d]) +
                                     p.meta_offset + row * kMetaBytes) = meta;
          }
        }
        const unsigned carriers = __ballot_sync(kFullMask, carries);
        if (carriers == 0) {
          continue;
        }
        if (carries) {
          destinations[warp][__popc(carriers & lower_lanes)] =
              static_cast<char*>(p.recv[rank_d]) + row * p.row_bytes;
        }
        __syncwarp();
        const int64_t begin = chunk * chunk_units;
        const int64_t end = min(units, begin + chunk_units);
        copyUnits<U, false>(
            destinations[warp], __popc(carriers),
            reinterpret_cast<const U*>(static_cast<const char*>(p.x) +
                                       t * p.row_bytes),
            begin, end, lane);
        __syncwarp();
      }
      const bool last_in_round =
          arriveLast(&state->dispatch_rounds[round], p.push_blocks);
      if (round == rounds - 1) {
        profileMark(prof, kDispatchPushed);
      }
      if (last_in_round) {
        if (dest < 0) {
          signalAllPeers(p.control, p.layout.data_flags, p.rank, R, epoch);
        } else if (threadIdx.x == 0) {
          signalPeer(p.control, p.layout.data_flags, p.rank, dest, epoch);
          if (round == 0 && dest != p.rank) {
            signalPeer(p.control, p.layout.data_flags, p.rank, p.rank, epoch);
          }
        }
        if (round == rounds - 1) {
          profileMark(prof, kDispatchDataSignalled);
        }
      }
    }
  }

  // --- Expand: groups of kExpandRows rows, source by source in the order
  // they arrive (ours, then rank - 1, rank - 2, ...), claimed dynamically
  // so that idle warps start while the push blocks still push.
  if (threadIdx.x == 0) {
    int64_t groups = 0;
    for (int i = 0; i < R; ++i) {
      const int source = (p.rank - i + R) % R;
      source_groups[i] = groups;
      int64_t rows = 0;
      for (int l = 0; l < L; ++l) {
        rows += shared.recv_count[source * L + l];
      }
      groups += bad ? 0 : (rows + kExpandRows - 1) / kExpandRows;
    }
    source_groups[R] = groups;
    data_in_ns = 0;
  }
  __syncthreads();
  char* const recv_base = static_cast<char*>(p.recv[p.rank]);
  const auto* metas = reinterpret_cast<const int4*>(recv_base + p.meta_offset);
  const uint64_t* data_flags = flagAt(own_control, p.layout.data_flags, 0);
  uint32_t ready = 0;
  while (true) {
    unsigned long long group = 0;
    if (lane == 0) {
      group = atomicAdd(reinterpret_cast<unsigned long long*>(
                            &state->expand_claims[epoch & 1]),
                        1ULL);
    }
    group = __shfl_sync(kFullMask, group, 0);
    if (static_cast<int64_t>(group) >= source_groups[R]) {
      break;
    }
    int i = 0;
    while (source_groups[i + 1] <= static_cast<int64_t>(group)) {
      ++i;
    }
    const int source = (p.rank - i + R) % R;
    if ((ready & (1u << source)) == 0) {
      if (!warpWaitForPeer(data_flags + source, epoch, source, context,
                           kWaitDispatchData)) {
        break;
      }
      if (prof != nullptr && lane == 0) {
        atomicMax(&data_in_ns,
                  static_cast<unsigned long long>(globalTimerNs()));
      }
      ready |= 1u << source;
    }
    const int64_t first =
        (static_cast<int64_t>(group) - source_groups[i]) * kExpandRows;
    for (int n = 0; n < kExpandRows; ++n) {
      const int64_t r = rowOfSource(shared.recv_start, shared.recv_count, L,
                                    source, first + n);
      if (r < 0 || r >= recv_rows) {
        continue;
      }
      const int4 meta = __ldcg(metas + r);
      if (lane == 0) {
        p.recv_src_token[r] = meta.x;
        p.recv_src_rank[r] = meta.y >> 8;
        p.recv_src_k[r] = meta.y & 0xff;
        if (p.recv_weights != nullptr) {
          p.recv_weights[r] = __int_as_float(meta.w);
        }
        if ((meta.y >> 8) != source || meta.z >= r) {
          recordStatus(context, kStatusInternal, p.rank, kWaitDispatchData,
                       meta.x, meta.y, r);
        }
      }
      if (meta.z >= 0 && meta.z < r) {
        char* destination = recv_base + r * p.row_bytes;
        copyUnits<U, true>(
            &destination, 1,
            reinterpret_cast<const U*>(recv_base + meta.z * p.row_bytes), 0,
            units, lane);
      }
    }
  }

  if (prof != nullptr) {  // uniform in the block
    __syncthreads();
    if (threadIdx.x == 0) {
      prof[kDispatchDataIn] = data_in_ns;
    }
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

ControlLayout controlLayout(int world_size, int num_experts) {
  ControlLayout layout = {};
  const size_t flags = sizeof(uint64_t) * world_size;
  layout.count_flags = 0;
  layout.data_flags = roundUp(layout.count_flags + flags, 16);
  layout.combine_flags = roundUp(layout.data_flags + flags, 16);
  layout.free_flags = roundUp(layout.combine_flags + flags, 16);
  layout.count_rows = roundUp(layout.free_flags + flags, 128);
  layout.count_row_bytes = countRowBytes(num_experts);
  layout.total_bytes =
      layout.count_rows + 2 * world_size * layout.count_row_bytes;
  return layout;
}

size_t dispatchSharedBytes(int num_experts) {
  return tablesBytes(num_experts) + countRowBytes(num_experts);
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
  const auto kernel = idx_is_int64
                          ? dispatchKernelFor<int64_t>(params.unit_bytes)
                          : dispatchKernelFor<int32_t>(params.unit_bytes);
  return device::launch(kernel, params, blocks,
                        dispatchSharedBytes(params.num_experts), cooperative,
                        stream);
}

}  // namespace hostfuse::moe
