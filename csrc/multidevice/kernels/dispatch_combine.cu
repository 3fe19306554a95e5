// CUDA-backend MoE dispatch and combine: one cooperative kernel each.
//
// Dispatch, on every rank (docs/moe_cuda.md has the picture):
//   route    block 0 validates the picks, counts rows per expert and gives
//            every pick its position among this rank's rows of its expert;
//            then it publishes the count row (with the validation result)
//            into every peer's control buffer and raises count_flags = epoch;
//   offsets  every block waits for all R count rows and derives where this
//            rank's rows start in every receiver's expert-major buffer;
//   push     warps copy each token once per destination rank, into the row
//            of its pick with the smallest local expert there, with 16-byte
//            stores; every pick also pushes 16 bytes of metadata;
//            the last block to finish raises data_flags = epoch at every peer;
//   expand   every block waits for all R data flags, then copies each token
//            row into the rows of its other picks on this rank and writes
//            the provenance outputs.
// Combine: every row goes back into its source's [T_max, K] slot buffer,
// then each source reduces its K slots per token in pick order in fp32.
//
// Nothing is reset between calls: epochs live in device memory and are
// advanced by the kernels themselves, so graph replays (whose arguments are
// frozen) see a fresh epoch each time, and flags are compared with >=.
#include "multidevice/kernels/dispatch_combine.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdio>
#include <cstring>

namespace hostfuse::moe {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kOpDispatch = 1;
constexpr int kOpCombine = 2;
constexpr int kCopyUnroll = 4;

// ---------------------------------------------------------------------------
// Memory-model helpers. Flags cross GPUs, so they use system scope.

__device__ __forceinline__ uint64_t loadAcquireSys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.u64 %0, [%1];"
               : "=l"(value)
               : "l"(address)
               : "memory");
  return value;
}

__device__ __forceinline__ void storeReleaseSys(uint64_t* address,
                                                uint64_t value) {
  asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(address), "l"(value)
               : "memory");
}

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

template <typename T>
__device__ __forceinline__ T loadVolatile(const T* address) {
  return *reinterpret_cast<const volatile T*>(address);
}

__device__ __forceinline__ uint64_t* flagAt(void* control, size_t offset,
                                            int index) {
  return reinterpret_cast<uint64_t*>(static_cast<char*>(control) + offset) +
         index;
}

__device__ __forceinline__ char* countRowAt(void* control,
                                            const ControlLayout& layout,
                                            int parity, int source,
                                            int world_size) {
  return static_cast<char*>(control) + layout.count_rows +
         (static_cast<size_t>(parity) * world_size + source) *
             layout.count_row_bytes;
}

// ---------------------------------------------------------------------------
// Status and waits.

struct WaitContext {
  DeviceState* state;
  Status* status;
  uint64_t timeout_ns;
  int op;
  uint64_t epoch;
};

// Records the first error of a call (or of a series of replays).
__device__ void recordStatus(const WaitContext& context, int32_t code, int rank,
                             int purpose, int64_t token, int64_t pick,
                             int64_t value) {
  if (atomicCAS(&context.state->status_claim, 0, 1) != 0) {
    return;
  }
  volatile Status* status = context.status;
  status->op = context.op;
  status->rank = rank;
  status->purpose = purpose;
  status->token = token;
  status->pick = pick;
  status->value = value;
  status->epoch = context.epoch;
  __threadfence_system();
  status->code = code;
  __threadfence_system();
}

// Block-wide: thread s < world_size waits until flags[s] >= target. On
// timeout, records which peer did not answer and poisons the workspace so
// that every other waiting block, and every later call, bails out at once.
// Returns false (in every thread) when the block must stop.
__device__ bool waitForPeers(const uint64_t* flags, int world_size,
                             uint64_t target, const WaitContext& context,
                             int purpose) {
  bool ok = true;
  if (threadIdx.x < world_size) {
    const uint64_t* flag = flags + threadIdx.x;
    if (loadAcquireSys(flag) < target) {
      const uint64_t start = globalTimerNs();
      while (loadAcquireSys(flag) < target) {
        if (loadVolatile(&context.state->poisoned) != 0) {
          ok = false;
          break;
        }
        if (globalTimerNs() - start > context.timeout_ns) {
          recordStatus(context, kStatusTimeout, threadIdx.x, purpose, -1, -1,
                       static_cast<int64_t>(target));
          atomicExch(&context.state->poisoned, 1);
          ok = false;
          break;
        }
      }
    }
  }
  return __syncthreads_and(ok) != 0;
}

// Block-wide: after this block's stores, counts it in `counter` (which only
// grows, by gridDim.x per call). True in every thread of the block that
// arrived last in this call; by then all blocks' stores are visible.
__device__ bool arriveLast(uint64_t* counter) {
  __shared__ int last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long before =
        atomicAdd(reinterpret_cast<unsigned long long*>(counter), 1ULL);
    last = (before + 1) % gridDim.x == 0;
    __threadfence_system();
  }
  __syncthreads();
  return last != 0;
}

// Called by the last block: raises flag `offset`[rank] to `epoch` on every
// peer.
__device__ void signalPeers(void* const* control, size_t offset, int rank,
                            int world_size, uint64_t epoch) {
  if (threadIdx.x < world_size) {
    __threadfence_system();
    storeReleaseSys(flagAt(control[threadIdx.x], offset, rank), epoch);
  }
}

// ---------------------------------------------------------------------------
// Row copies: a warp moves [begin, end) units of U (16, 8, 4 or 2 bytes)
// from `source` to each of `count` destinations, loading each unit once.
// `kBypassL1` reads data that peers wrote during this kernel.

template <typename U, bool kBypassL1>
__device__ __forceinline__ U loadUnit(const U* address) {
  if constexpr (kBypassL1) {
    return __ldcg(address);
  } else {
    return *address;
  }
}

template <typename U, bool kBypassL1>
__device__ __forceinline__ void copyUnits(char* const* destinations, int count,
                                          const U* source, int64_t begin,
                                          int64_t end, int lane) {
  for (int64_t base = begin + lane; base < end; base += 32 * kCopyUnroll) {
    U values[kCopyUnroll];
#pragma unroll
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t unit = base + 32 * i;
      if (unit < end) {
        values[i] = loadUnit<U, kBypassL1>(source + unit);
      }
    }
    for (int j = 0; j < count; ++j) {
      U* destination = reinterpret_cast<U*>(destinations[j]);
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t unit = base + 32 * i;
        if (unit < end) {
          destination[unit] = values[i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Dispatch.

struct DispatchShared {
  int64_t* offset;  // [E]: this rank's first row of expert x on its rank
  int32_t* colsum;  // [E]: rows of expert x from all sources
  int32_t* route;   // [kWarpsPerBlock, E]: block 0's per-warp counts
  char* row;        // count row being published (block 0)
};

__host__ __device__ inline size_t roundUp(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

__host__ __device__ inline size_t countRowBytes(int num_experts) {
  return roundUp(sizeof(CountRowHeader) + sizeof(int32_t) * num_experts, 16);
}

__device__ DispatchShared carveShared(unsigned char* raw, int num_experts) {
  DispatchShared shared;
  shared.offset = reinterpret_cast<int64_t*>(raw);
  shared.colsum = reinterpret_cast<int32_t*>(shared.offset + num_experts);
  shared.route = shared.colsum + num_experts;
  shared.row = reinterpret_cast<char*>(roundUp(
      reinterpret_cast<size_t>(shared.route + kWarpsPerBlock * num_experts),
      16));
  return shared;
}

// Error key: the smallest (token, pick) with a bad id wins.
__device__ __forceinline__ unsigned long long errorKey(int64_t token, int pick,
                                                       int code) {
  return (static_cast<unsigned long long>(token) << 16) |
         (static_cast<unsigned long long>(code) << 8) |
         static_cast<unsigned long long>(pick);
}

// Block 0: validation, per-expert counts and positions, publication.
template <typename IdxT>
__device__ void routeAndPublish(const DispatchParams& p,
                                const DispatchShared& shared, uint64_t epoch,
                                int64_t tokens_per_warp) {
  __shared__ unsigned long long error_key;
  const int E = p.num_experts;
  const int K = p.topk;
  const int64_t T = p.tokens;
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
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
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

  // Counting: warp w owns tokens [w * tokens_per_warp, ...) and walks their
  // picks in (token, pick) order, 32 at a time; lanes naming the same expert
  // find each other with match_any and take consecutive positions.
  {
    int32_t* counts = shared.route + warp * E;
    const int64_t first = min(T, warp * tokens_per_warp);
    const int64_t last = min(T, first + tokens_per_warp);
    const unsigned lower_lanes = (1u << lane) - 1;
    for (int64_t base = first * K; base < last * K; base += 32) {
      const int64_t q = base + lane;
      int expert = -1;
      if (q < last * K) {
        const int64_t id = static_cast<int64_t>(idx[q]);
        if (id >= 0 && id < E) {
          expert = static_cast<int>(id);
        }
      }
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
    }
  }
  __syncthreads();

  // Per expert: warps' exclusive bases (global, read by every block) and the
  // totals, straight into the count row.
  auto* header = reinterpret_cast<CountRowHeader*>(shared.row);
  auto* totals =
      reinterpret_cast<int32_t*>(shared.row + sizeof(CountRowHeader));
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t running = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const int32_t count = shared.route[w * E + e];
      p.warp_base[w * E + e] = running;
      running += count;
    }
    totals[e] = running;
  }
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
      header->value = static_cast<int64_t>(idx[token * K + pick]);
    }
  }
  __syncthreads();

  // Publish into slot [parity][rank] of every peer, then raise the flags.
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
  signalPeers(p.control, p.layout.count_flags, p.rank, p.world_size, epoch);
}

template <typename IdxT, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dispatchKernel(const DispatchParams p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ char* destinations[kWarpsPerBlock][kMaxRanks];
  __shared__ int bad_rank;
  __shared__ int64_t rank_rows[kMaxRanks];

  const DispatchShared shared = carveShared(shared_raw, p.num_experts);
  const int E = p.num_experts;
  const int L = p.local_experts;
  const int R = p.world_size;
  const int K = p.topk;
  const int64_t T = p.tokens;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t global_warp =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  DeviceState* state = p.state;

  // Every block reads the epoch before the arrival in the push phase; the
  // last block to arrive advances it, so all blocks agree on it.
  const uint64_t epoch = loadVolatile(&state->dispatch_epoch) + 1;
  const WaitContext context{state, p.status, p.timeout_ns, kOpDispatch, epoch};
  if (loadVolatile(&state->poisoned) != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      recordStatus(context, kStatusPoisoned, -1, 0, -1, -1, 0);
    }
    return;
  }
  const int64_t tokens_per_warp =
      max(int64_t{1}, (T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const IdxT* idx = static_cast<const IdxT*>(p.topk_idx);

  if (blockIdx.x == 0) {
    routeAndPublish<IdxT>(p, shared, epoch, tokens_per_warp);
  }

  // --- Offsets: all R count rows of this epoch.
  void* const own_control = p.control[p.rank];
  if (!waitForPeers(flagAt(own_control, p.layout.count_flags, 0), R, epoch,
                    context, kWaitCounts)) {
    return;
  }
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
  __syncthreads();
  // Expert-major: expert x = d * L + l starts after experts d*L .. x-1.
  for (int x = threadIdx.x; x < E; x += blockDim.x) {
    const int first = x / L * L;
    int64_t before_expert = 0;
    for (int y = first; y < x; ++y) {
      before_expert += shared.colsum[y];
    }
    shared.offset[x] += before_expert;
  }
  if (threadIdx.x < R) {
    int64_t rows = 0;
    for (int l = 0; l < L; ++l) {
      rows += shared.colsum[threadIdx.x * L + l];
    }
    rank_rows[threadIdx.x] = rows;
  }
  __syncthreads();
  const bool bad = bad_rank != INT_MAX;
  const int64_t recv_rows = bad ? 0 : min(rank_rows[p.rank], p.capacity);

  if (blockIdx.x == 0) {
    for (int l = threadIdx.x; l < L; l += blockDim.x) {
      p.recv_expert_counts[l] = bad ? 0 : shared.colsum[p.rank * L + l];
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
      int most_rank = 0;
      for (int d = 1; d < R; ++d) {
        most_rank = rank_rows[d] > rank_rows[most_rank] ? d : most_rank;
      }
      if (bad) {
        const auto* header =
            reinterpret_cast<const CountRowHeader*>(row_of(bad_rank));
        recordStatus(context, __ldcg(&header->code), bad_rank, 0,
                     __ldcg(&header->token), __ldcg(&header->pick),
                     __ldcg(&header->value));
      } else if (rank_rows[most_rank] > p.capacity) {
        recordStatus(context, kStatusCapacityOverflow, most_rank, 0, -1, -1,
                     rank_rows[most_rank]);
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
                "%d, my offset %lld\n",
                p.rank, source, x, counts_of(source)[x],
                static_cast<long long>(shared.offset[x]));
          }
        }
      }
    }
  }

  // --- Push: items (token, chunk of its row), grid-wide over warps.
  const int64_t units = p.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t chunk_units = (units + p.chunks_per_row - 1) / p.chunks_per_row;
  if (bad) {
    const int64_t picks = T * K;
    for (int64_t q = blockIdx.x * blockDim.x + threadIdx.x; q < picks;
         q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      p.pick_row[q] = -1;
    }
  } else {
    // Only the first push_blocks blocks push: more blocks than that contend
    // for NVLink; the others go on to wait and expand.
    const int64_t items = blockIdx.x < p.push_blocks ? T * p.chunks_per_row : 0;
    const int64_t push_warps = int64_t{p.push_blocks} * kWarpsPerBlock;
    const unsigned lower_lanes = (1u << lane) - 1;
    for (int64_t item = global_warp; item < items; item += push_warps) {
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
          // Written by block 0 in this kernel: read past L1.
          row = shared.offset[expert] +
                __ldcg(p.warp_base + (t / tokens_per_warp) * E + expert) +
                __ldcg(p.pick_pos + t * K + lane);
        }
      }
      // The token travels once per remote destination, in its pick with the
      // smallest local expert there (the smallest row, so if that row does
      // not fit, no other pick of the token on that rank fits either); the
      // receiver copies it into its other picks' rows. Rows for this rank
      // are written directly, every pick (local memory is cheap).
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
      const bool carries = fits && (best_local == local || rank_d == p.rank);
      if (chunk == 0) {
        if (lane < K) {
          p.pick_row[t * K + lane] = fits ? static_cast<int32_t>(row) : -1;
        }
        if (fits) {
          int4 meta;
          meta.x = static_cast<int>(t);
          meta.y = (p.rank << 8) | lane;
          meta.z = carries ? -1 : static_cast<int>(primary_row);
          meta.w = __float_as_int(
              p.topk_weights != nullptr ? p.topk_weights[t * K + lane] : 0.0f);
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
      copyUnits<U, false>(destinations[warp], __popc(carriers),
                          reinterpret_cast<const U*>(
                              static_cast<const char*>(p.x) + t * p.row_bytes),
                          begin, end, lane);
      __syncwarp();
    }
  }

  if (arriveLast(&state->dispatch_arrivals)) {
    signalPeers(p.control, p.layout.data_flags, p.rank, R, epoch);
    if (threadIdx.x == 0) {
      state->dispatch_epoch = epoch;
    }
  }

  // --- Expand: wait for every peer's rows, then fill the other picks.
  if (!waitForPeers(flagAt(own_control, p.layout.data_flags, 0), R, epoch,
                    context, kWaitDispatchData)) {
    return;
  }
  char* const recv_base = static_cast<char*>(p.recv[p.rank]);
  const auto* metas = reinterpret_cast<const int4*>(recv_base + p.meta_offset);
  for (int64_t r = global_warp; r < recv_rows; r += total_warps) {
    const int4 meta = __ldcg(metas + r);
    if (lane == 0) {
      p.recv_src_token[r] = meta.x;
      p.recv_src_rank[r] = meta.y >> 8;
      p.recv_src_k[r] = meta.y & 0xff;
      if (p.recv_weights != nullptr) {
        p.recv_weights[r] = __int_as_float(meta.w);
      }
    }
    if (meta.z >= 0) {
      if (meta.z >= r) {
        if (lane == 0) {
          recordStatus(context, kStatusInternal, p.rank, 0, -1, -1, r);
        }
        continue;
      }
      char* destination = recv_base + r * p.row_bytes;
      copyUnits<U, true>(
          &destination, 1,
          reinterpret_cast<const U*>(recv_base + meta.z * p.row_bytes), 0,
          units, lane);
    }
  }
}

// ---------------------------------------------------------------------------
// Combine.

template <typename T>
struct Element;

template <>
struct Element<float> {
  using Bits = uint32_t;
  __device__ static float toFloat(Bits bits) { return __uint_as_float(bits); }
  __device__ static Bits fromFloat(float value) {
    return __float_as_uint(value);
  }
};

template <>
struct Element<__nv_bfloat16> {
  using Bits = uint16_t;
  __device__ static float toFloat(Bits bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ static Bits fromFloat(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
};

template <>
struct Element<__half> {
  using Bits = uint16_t;
  __device__ static float toFloat(Bits bits) {
    return __half2float(__ushort_as_half(bits));
  }
  __device__ static Bits fromFloat(float value) {
    return __half_as_ushort(__float2half_rn(value));
  }
};

template <typename T, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    combineKernel(const CombineParams p) {
  using Bits = typename Element<T>::Bits;
  constexpr int kPerUnit = sizeof(U) / sizeof(Bits);
  static_assert(kPerUnit >= 1 && sizeof(U) % sizeof(Bits) == 0);

  const int R = p.world_size;
  const int K = p.topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t global_warp =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  DeviceState* state = p.state;
  const uint64_t epoch = loadVolatile(&state->combine_epoch) + 1;
  const WaitContext context{state, p.status, p.timeout_ns, kOpCombine, epoch};
  if (loadVolatile(&state->poisoned) != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      recordStatus(context, kStatusPoisoned, -1, 0, -1, -1, 0);
    }
    return;
  }
  void* const own_control = p.control[p.rank];

  // --- Push every valid row back to its source's slot (token, pick), once
  // that source has finished reducing its previous combine.
  if (!waitForPeers(flagAt(own_control, p.layout.free_flags, 0), R, epoch - 1,
                    context, kWaitCombineFree)) {
    return;
  }
  const int64_t recv_rows = loadVolatile(&state->recv_rows);
  const int64_t units = p.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t chunk_units = (units + p.chunks_per_row - 1) / p.chunks_per_row;
  const auto* metas = reinterpret_cast<const int4*>(
      static_cast<const char*>(p.recv[p.rank]) + p.meta_offset);
  const int64_t items =
      blockIdx.x < p.push_blocks ? recv_rows * p.chunks_per_row : 0;
  const int64_t push_warps = int64_t{p.push_blocks} * kWarpsPerBlock;
  for (int64_t item = global_warp; item < items; item += push_warps) {
    const int64_t r = item / p.chunks_per_row;
    const int64_t chunk = item % p.chunks_per_row;
    const int4 meta = __ldcg(metas + r);
    const int64_t token = meta.x;
    const int source = meta.y >> 8;
    const int pick = meta.y & 0xff;
    if (source < 0 || source >= R || pick >= K || token < 0 ||
        token >= p.max_tokens) {
      if (lane == 0) {
        recordStatus(context, kStatusInternal, p.rank, 0, token, pick, r);
      }
      continue;
    }
    char* destination =
        static_cast<char*>(p.slots[source]) + (token * K + pick) * p.row_bytes;
    const int64_t begin = chunk * chunk_units;
    const int64_t end = min(units, begin + chunk_units);
    copyUnits<U, false>(
        &destination, 1,
        reinterpret_cast<const U*>(static_cast<const char*>(p.expert_out) +
                                   r * p.row_bytes),
        begin, end, lane);
  }
  if (arriveLast(&state->combine_arrivals)) {
    signalPeers(p.control, p.layout.combine_flags, p.rank, R, epoch);
  }

  // --- Reduce: out[t] = sum over delivered picks k, in order, of
  // w[t, k] * slot[t, k], in fp32 without fused multiply-adds.
  if (!waitForPeers(flagAt(own_control, p.layout.combine_flags, 0), R, epoch,
                    context, kWaitCombineData)) {
    return;
  }
  const U* slots = static_cast<const U*>(p.slots[p.rank]);
  U* out = static_cast<U*>(p.out);
  const int64_t total = p.tokens * units;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / units;
    const int64_t unit = i % units;
    float sum[kPerUnit];
#pragma unroll
    for (int e = 0; e < kPerUnit; ++e) {
      sum[e] = 0.0f;
    }
    for (int k = 0; k < K; ++k) {
      if (p.pick_row[t * K + k] < 0) {
        continue;
      }
      const float weight =
          p.topk_weights != nullptr ? p.topk_weights[t * K + k] : 1.0f;
      const U packed = __ldcg(slots + (t * K + k) * units + unit);
      Bits bits[kPerUnit];
      memcpy(bits, &packed, sizeof(U));
#pragma unroll
      for (int e = 0; e < kPerUnit; ++e) {
        sum[e] =
            __fadd_rn(sum[e], __fmul_rn(weight, Element<T>::toFloat(bits[e])));
      }
    }
    Bits bits[kPerUnit];
#pragma unroll
    for (int e = 0; e < kPerUnit; ++e) {
      bits[e] = Element<T>::fromFloat(sum[e]);
    }
    U packed;
    memcpy(&packed, bits, sizeof(U));
    out[t * units + unit] = packed;
  }
  if (arriveLast(&state->combine_departures)) {
    signalPeers(p.control, p.layout.free_flags, p.rank, R, epoch);
    if (threadIdx.x == 0) {
      state->combine_epoch = epoch;
    }
  }
}

// ---------------------------------------------------------------------------
// Launch plumbing.

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, const Params& params, int blocks,
                   size_t shared_bytes, bool cooperative, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreadsPerBlock);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params);
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

template <typename T>
auto combineKernelFor(int64_t unit_bytes) {
  switch (unit_bytes) {
    case 16:
      return &combineKernel<T, uint4>;
    case 8:
      return &combineKernel<T, uint2>;
    case 4:
      return &combineKernel<T, uint32_t>;
    default:
      if constexpr (sizeof(T) >= 4) {
        return &combineKernel<T, uint32_t>;
      } else {
        return &combineKernel<T, uint16_t>;
      }
  }
}

template <typename Kernel>
cudaError_t occupancy(Kernel kernel, size_t shared_bytes, int* blocks) {
  if (shared_bytes > 48 * 1024) {
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(shared_bytes));
    if (status != cudaSuccess) {
      return status;
    }
  }
  int per_sm = 0;
  const cudaError_t status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, kThreadsPerBlock, shared_bytes);
  *blocks = per_sm;
  return status;
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
  const size_t e = static_cast<size_t>(num_experts);
  return sizeof(int64_t) * e + sizeof(int32_t) * e +
         roundUp(sizeof(int32_t) * kWarpsPerBlock * e, 16) + 16 +
         countRowBytes(num_experts);
}

cudaError_t prepareKernels(int device, int num_experts, ElementType dtype,
                           int* max_blocks) {
  int sms = 0;
  cudaError_t status =
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) {
    return status;
  }
  const size_t shared_bytes = dispatchSharedBytes(num_experts);
  int per_sm = INT_MAX;
  auto take = [&](auto kernel, size_t bytes) {
    int blocks = 0;
    if (status == cudaSuccess) {
      status = occupancy(kernel, bytes, &blocks);
      per_sm = blocks < per_sm ? blocks : per_sm;
    }
  };
  for (const int64_t unit : {16, 8, 4, 2}) {
    take(dispatchKernelFor<int64_t>(unit), shared_bytes);
    take(dispatchKernelFor<int32_t>(unit), shared_bytes);
    switch (dtype) {
      case ElementType::kFloat32:
        if (unit >= 4) {
          take(combineKernelFor<float>(unit), 0);
        }
        break;
      case ElementType::kBFloat16:
        take(combineKernelFor<__nv_bfloat16>(unit), 0);
        break;
      case ElementType::kFloat16:
        take(combineKernelFor<__half>(unit), 0);
        break;
    }
  }
  *max_blocks = status == cudaSuccess ? per_sm * sms : 0;
  return status;
}

cudaError_t launchDispatch(const DispatchParams& params, bool idx_is_int64,
                           int blocks, bool cooperative, cudaStream_t stream) {
  const size_t shared_bytes = dispatchSharedBytes(params.num_experts);
  if (idx_is_int64) {
    return launch(dispatchKernelFor<int64_t>(params.unit_bytes), params, blocks,
                  shared_bytes, cooperative, stream);
  }
  return launch(dispatchKernelFor<int32_t>(params.unit_bytes), params, blocks,
                shared_bytes, cooperative, stream);
}

cudaError_t launchCombine(const CombineParams& params, ElementType dtype,
                          int blocks, bool cooperative, cudaStream_t stream) {
  switch (dtype) {
    case ElementType::kFloat32:
      if (params.unit_bytes < 4) {
        return cudaErrorInvalidValue;
      }
      return launch(combineKernelFor<float>(params.unit_bytes), params, blocks,
                    0, cooperative, stream);
    case ElementType::kBFloat16:
      return launch(combineKernelFor<__nv_bfloat16>(params.unit_bytes), params,
                    blocks, 0, cooperative, stream);
    case ElementType::kFloat16:
      return launch(combineKernelFor<__half>(params.unit_bytes), params, blocks,
                    0, cooperative, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hostfuse::moe
