// The collective backend's device steps (collective_kernels.h). The checks
// and the table rows are single-block kernels: their inputs are small
// (T x K ids, one layout), and one block can find "the first bad index"
// and finish the row without a second launch. The search for a repeated
// row, the metadata, the source order, the slots and the sum are
// grid-wide.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include <hostfuse/multidevice/moe/collective/kernels/collective_kernels.h>
#include <hostfuse/multidevice/moe/layout_id.h>
#include <hostfuse/multidevice/moe/status.h>

namespace hostfuse::moe::collective {

namespace {

constexpr int kCheckThreads = 1024;
constexpr int kThreads = 256;
constexpr int kStatus = kStatusWords;
constexpr unsigned long long kNone = ULLONG_MAX;

int gridFor(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 4096 ? (blocks < 1 ? 1 : blocks) : 4096);
}

constexpr unsigned kFullMask = 0xffffffffu;

// The lanes of this warp whose `key` equals this lane's, and whether this
// lane is the lowest of them (the one that updates shared counters for
// all: without this, every lane of the block would update the same few
// counters one after another).
struct WarpGroup {
  unsigned lanes;
  bool leader;
};
__device__ WarpGroup groupBy(int64_t key) {
  const unsigned lanes =
      __match_any_sync(kFullMask, static_cast<unsigned long long>(key));
  const int lane = static_cast<int>(threadIdx.x & 31);
  return {lanes, __ffs(lanes) - 1 == lane};
}

// The largest `value` over the lanes of `lanes` (every lane of the warp
// calls it).
__device__ long long groupMax(unsigned lanes, long long value) {
  long long best = value;
  for (int lane = 0; lane < 32; ++lane) {
    const long long theirs = __shfl_sync(kFullMask, value, lane);
    if ((lanes >> lane & 1u) != 0 && theirs > best) {
      best = theirs;
    }
  }
  return best;
}

// The sum of `value` over the lanes of `lanes` (every lane of the warp
// calls it).
__device__ unsigned long long groupSum(unsigned lanes,
                                       unsigned long long value) {
  unsigned long long sum = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const unsigned long long theirs = __shfl_sync(kFullMask, value, lane);
    if ((lanes >> lane & 1u) != 0) {
      sum += theirs;
    }
  }
  return sum;
}

__device__ int64_t idAt(const void* idx, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(idx)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(idx)[i]);
}

// --- Dispatch ---------------------------------------------------------------

__global__ void __launch_bounds__(kCheckThreads)
    dispatchCheckKernel(const DispatchCheckArgs a) {
  extern __shared__ unsigned long long rows_to_rank[];  // [R]
  __shared__ unsigned long long first_bad;
  const int64_t R = a.world_size;
  const int64_t K = a.picks;
  const int64_t E = a.num_experts;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    rows_to_rank[r] = 0;
  }
  if (threadIdx.x == 0) {
    first_bad = kNone;
  }
  __syncthreads();
  const bool scan = a.valid && a.header[0] == kStatusOk;
  const int64_t n = scan ? a.tokens * K : 0;
  // Whole warps go round the loop together (groupBy needs every lane).
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    int64_t destination = -1;
    if (i < n) {
      const int64_t id = idAt(a.topk_idx, a.idx_is_int64, i);
      bool bad = id < -1 || id >= E;
      if (id >= 0 && id < E) {
        // An earlier pick of the same token naming the same expert.
        for (int64_t j = i - i % K; j < i && !bad; ++j) {
          bad = idAt(a.topk_idx, a.idx_is_int64, j) == id;
        }
        destination = id / a.local_experts;
      }
      if (bad) {
        atomicMin(&first_bad, static_cast<unsigned long long>(i));
      }
      a.sort_key[i] = id >= 0 ? id : E;
    }
    const WarpGroup group = groupBy(destination);
    if (group.leader && destination >= 0) {
      atomicAdd(&rows_to_rank[destination],
                static_cast<unsigned long long>(__popc(group.lanes)));
    }
  }
  __syncthreads();
  int64_t status[kStatus];
  for (int w = 0; w < kStatus; ++w) {
    status[w] = a.header[w];
  }
  if (scan && first_bad != kNone) {
    const auto i = static_cast<int64_t>(first_bad);
    const int64_t id = idAt(a.topk_idx, a.idx_is_int64, i);
    status[0] =
        id < -1 || id >= E ? kStatusBadExpertId : kStatusDuplicateExpert;
    status[1] = i / K;
    status[2] = i % K;
    status[3] = id;
    status[4] = 0;
  }
  const int64_t width = tableWidth(R);
  for (int64_t e = threadIdx.x; e < R * width; e += blockDim.x) {
    const int64_t w = e % width;
    int64_t value = 0;  // the padding after the counts
    if (w < kStatus) {
      value = status[w];
    } else if (w < kTableHeaderWords) {
      value = a.header[w];
    } else if (w < kTableHeaderWords + R) {
      value = static_cast<int64_t>(rows_to_rank[w - kTableHeaderWords]);
    }
    a.table_row[e] = value;
  }
}

__global__ void dispatchMetaKernel(const DispatchMetaArgs a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < a.count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t flat = a.order[i];
    int64_t* meta = a.meta + i * 4;
    meta[0] = flat / a.picks;
    meta[1] = flat % a.picks;
    meta[2] = idAt(a.topk_idx, a.idx_is_int64, flat);
    // The pairs are sorted by expert, so a warp's lanes mostly share a
    // destination: one atomic per destination and warp. The lanes that run
    // this iteration together (the last one may have fewer) aggregate.
    const int64_t destination = meta[2] / a.local_experts;
    const unsigned active = __activemask();
    const unsigned lanes =
        __match_any_sync(active, static_cast<unsigned long long>(destination));
    const auto hash = static_cast<unsigned long long>(
        layoutRowHash(meta[2], meta[0], meta[1]));
    unsigned long long sum = 0;
    for (int lane = 0; lane < 32; ++lane) {
      if ((active >> lane & 1u) != 0) {
        const unsigned long long theirs = __shfl_sync(active, hash, lane);
        sum += (lanes >> lane & 1u) != 0 ? theirs : 0;
      }
    }
    if (__ffs(lanes) - 1 == static_cast<int>(threadIdx.x & 31)) {
      atomicAdd(
          reinterpret_cast<unsigned long long*>(a.fingerprints + destination),
          sum);
    }
    int64_t bits = 0;
    if (a.topk_weights != nullptr) {
      memcpy(&bits,
             static_cast<const char*>(a.topk_weights) + flat * a.weight_bytes,
             a.weight_bytes);
    }
    meta[3] = bits;
  }
}

__global__ void dispatchLayoutKernel(const DispatchLayoutArgs a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < a.count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = a.perm != nullptr ? a.perm[i] : i;
    // Received rows are grouped by source rank, in rank order.
    int64_t rank = 0;
    int64_t end = 0;
    for (; rank < a.world_size - 1; ++rank) {
      end += a.from_rank[rank * a.from_rank_stride];
      if (p < end) {
        break;
      }
    }
    const int64_t* meta = a.meta + p * 4;
    a.src_rank[i] = rank;
    a.src_token[i] = meta[0];
    a.src_k[i] = meta[1];
    const int64_t local = meta[2] - a.first_expert;
    if (local >= 0 && local < a.local_experts) {
      atomicAdd(reinterpret_cast<unsigned long long*>(a.expert_counts + local),
                1ull);
    }
    if (a.weight_bytes > 0) {
      memcpy(static_cast<char*>(a.weights) + i * a.weight_bytes, meta + 3,
             a.weight_bytes);
    }
  }
}

// --- Combine ----------------------------------------------------------------

// A 64-bit mix of one word into a running hash (the finalizer of
// MurmurHash3): spreads (rank, token, pick) over the table's slots.
__device__ unsigned long long mixIn(unsigned long long hash,
                                    unsigned long long word) {
  hash ^= word;
  hash ^= hash >> 33;
  hash *= 0xff51afd7ed558ccdULL;
  hash ^= hash >> 33;
  hash *= 0xc4ceb9fe1a85ec53ULL;
  hash ^= hash >> 33;
  return hash;
}

// Inserts row i, which names (rank, token, pick), into the open-addressing
// table `seen` of mask + 1 slots (linear probing; at most half full, so a
// probe ends). Returns the row that this insertion finds repeating an
// earlier row of the same (rank, token, pick), kNone if it finds none.
//
// A slot holds the smallest row of its (rank, token, pick) seen so far: a
// row that finds its own key there lowers it with atomicMin and reports
// the larger of the two rows. Every row but the smallest of its key is
// then reported by someone (it is either never the slot's value, and
// reports itself, or replaced by a smaller row, which reports it), and no
// smallest row is ever reported; so the least reported row over the whole
// layout is moe::firstRepeatedRow's answer, in whatever order the threads
// run.
__device__ unsigned long long insertSeen(unsigned long long* seen,
                                         unsigned long long mask,
                                         const int64_t* src_rank,
                                         const int64_t* src_token,
                                         const int64_t* src_k, int64_t i) {
  const int64_t rank = src_rank[i];
  const int64_t token = src_token[i];
  const int64_t pick = src_k[i];
  const auto me = static_cast<unsigned long long>(i);
  unsigned long long slot =
      mixIn(mixIn(mixIn(0x9e3779b97f4a7c15ULL, rank), token), pick) & mask;
  for (;; slot = (slot + 1) & mask) {
    const unsigned long long held = atomicCAS(seen + slot, kNone, me);
    if (held == kNone) {
      return kNone;
    }
    if (src_rank[held] == rank && src_token[held] == token &&
        src_k[held] == pick) {
      const unsigned long long before = atomicMin(seen + slot, me);
      return before < me ? me : before;
    }
  }
}

__global__ void firstRepeatedKernel(const int64_t* src_rank,
                                    const int64_t* src_token,
                                    const int64_t* src_k, int64_t rows,
                                    int64_t slots, int64_t* seen) {
  auto* table = reinterpret_cast<unsigned long long*>(seen);
  const auto mask = static_cast<unsigned long long>(slots - 1);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < rows; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned long long repeated =
        insertSeen(table, mask, src_rank, src_token, src_k, i);
    if (repeated != kNone) {
      atomicMin(table + slots, repeated);
    }
  }
}

__global__ void __launch_bounds__(kCheckThreads)
    combineCheckKernel(const CombineCheckArgs a) {
  extern __shared__ long long per_rank[];  // [3 R]: rows, largest token, pick
  __shared__ unsigned long long first_out_of_range;
  __shared__ unsigned long long first_negative;
  __shared__ unsigned long long first_unordered;
  __shared__ int64_t status[kStatus];
  const int64_t R = a.world_size;
  long long* const max_token = per_rank + R;
  long long* const max_pick = per_rank + 2 * R;
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    per_rank[r] = 0;
    max_token[r] = -1;
    max_pick[r] = -1;
  }
  if (threadIdx.x == 0) {
    first_out_of_range = kNone;
    first_negative = kNone;
    first_unordered = kNone;
  }
  __syncthreads();
  // Not the pointers: an empty layout (a rank that received no rows) has
  // null data pointers and must still be checked and reported.
  const bool check = a.valid && a.header[0] == kStatusOk;
  const int64_t n = check ? a.rows : 0;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    int64_t r = -1;
    long long token = -1;
    long long pick = -1;
    unsigned long long hash = 0;  // the row's share of its rank's fingerprint
    if (i < n) {
      const int64_t rank = a.src_rank[i];
      token = a.src_token[i];
      pick = a.src_k[i];
      if (rank < 0 || rank >= R) {
        atomicMin(&first_out_of_range, static_cast<unsigned long long>(i));
      }
      if (token < 0 || pick < 0) {
        atomicMin(&first_negative, static_cast<unsigned long long>(i));
      }
      r = rank < 0 ? 0 : rank >= R ? R - 1 : rank;
      // moe::firstUnorderedRow: in its expert's segment, a row follows the
      // one before it in (rank, token) order.
      const int64_t expert = a.row_expert[i];
      if (i > 0 && a.row_expert[i - 1] == expert &&
          !(rank > a.src_rank[i - 1] ||
            (rank == a.src_rank[i - 1] && token > a.src_token[i - 1]))) {
        atomicMin(&first_unordered, static_cast<unsigned long long>(i));
      }
      if (rank == r) {
        hash = static_cast<unsigned long long>(
            layoutRowHash(a.first_expert + expert, token, pick));
      }
    }
    const WarpGroup group = groupBy(r);
    token = groupMax(group.lanes, token);
    pick = groupMax(group.lanes, pick);
    hash = groupSum(group.lanes, hash);
    if (group.leader && r >= 0) {
      atomicAdd(reinterpret_cast<unsigned long long*>(a.fingerprints + r),
                hash);
      atomicAdd(reinterpret_cast<unsigned long long*>(per_rank + r),
                static_cast<unsigned long long>(__popc(group.lanes)));
      atomicMax(max_token + r, token);
      atomicMax(max_pick + r, pick);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // The checks in the order of the ATen path; the first that fails.
    int64_t w[kStatus] = {};
    for (int i = 0; i < kStatus; ++i) {
      w[i] = a.header[i];
    }
    if (check) {
      // A count outside [0, rows] first: the sum of such counts can wrap,
      // and the source-order kernels search each expert's rows by them.
      int64_t bad_count = -1;
      int64_t counts_sum = 0;
      for (int64_t e = 0; e < a.local_experts; ++e) {
        const int64_t count = a.expert_counts[e];
        if (bad_count < 0 && (count < 0 || count > a.rows)) {
          bad_count = e;
        }
        counts_sum += bad_count < 0 ? count : 0;
      }
      int64_t from_sum = 0;
      int64_t mismatch = -1;
      for (int64_t r = 0; r < R; ++r) {
        from_sum += a.from_rank[r];
        if (mismatch < 0 && per_rank[r] != a.from_rank[r]) {
          mismatch = r;
        }
      }
      const auto bad = [&](int64_t code, int64_t d0, int64_t d1, int64_t d2,
                           int64_t d3 = 0) {
        w[0] = code;
        w[1] = d0;
        w[2] = d1;
        w[3] = d2;
        w[4] = d3;
      };
      if (bad_count >= 0) {
        bad(kStatusCountRange, bad_count, a.expert_counts[bad_count], a.rows);
      } else if (counts_sum != a.rows) {
        bad(kStatusCountsSum, counts_sum, a.rows, 0);
      } else if (from_sum != a.rows) {
        bad(kStatusFromSum, from_sum, a.rows, 0);
      } else if (first_out_of_range != kNone) {
        const auto row = static_cast<int64_t>(first_out_of_range);
        bad(kStatusSrcRankRange, row, a.src_rank[row], 0);
      } else if (mismatch >= 0) {
        bad(kStatusSrcRankCounts, mismatch, per_rank[mismatch],
            a.from_rank[mismatch]);
      } else if (first_negative != kNone) {
        const auto row = static_cast<int64_t>(first_negative);
        bad(kStatusProvenanceNegative, row, a.src_token[row], a.src_k[row]);
      } else if (*a.first_repeated_row >= 0) {
        const int64_t row = *a.first_repeated_row;
        bad(kStatusProvenanceRepeated, row, a.src_rank[row], a.src_token[row],
            a.src_k[row]);
      } else if (first_unordered != kNone) {
        const auto row = static_cast<int64_t>(first_unordered);
        bad(kStatusLayoutOutOfOrder, row, a.row_expert[row], a.src_rank[row],
            a.src_token[row]);
      }
    }
    for (int i = 0; i < kStatus; ++i) {
      status[i] = w[i];
    }
  }
  __syncthreads();
  const int64_t width = tableWidth(R);
  const int64_t id_start = kTableHeaderWords + kTableVectors * R;
  for (int64_t e = threadIdx.x; e < R * width; e += blockDim.x) {
    const int64_t w = e % width;
    int64_t value = 0;
    if (w < kStatus) {
      value = status[w];
    } else if (w < kTableHeaderWords) {
      value = a.header[w];
    } else if (w >= id_start) {
      value = check ? a.layout_id[w - id_start] : 0;
    } else {
      const int64_t vector = (w - kTableHeaderWords) / R;
      const int64_t r = (w - kTableHeaderWords) % R;
      switch (vector) {
        case 0:
          value = check ? a.to_rank[r] : 0;
          break;
        case 1:
          value = check ? a.from_rank[r] : 0;
          break;
        case 2:
          value = max_token[r];
          break;
        case 3:
          value = max_pick[r];
          break;
        default:
          value = check ? a.fingerprints[r] : 0;
          break;
      }
    }
    a.table_row[e] = value;
  }
}

// Where each (expert, rank) run of the layout starts (runs[0]) and where it
// goes in source-rank order (runs[1]); one block.
__global__ void __launch_bounds__(kCheckThreads)
    sourceRunsKernel(const SourceOrderArgs a) {
  const int64_t L = a.local_experts;
  const int64_t R = a.world_size;
  int64_t* const start = a.runs;
  int64_t* const target = a.runs + L * R;
  for (int64_t p = threadIdx.x; p < L * R; p += blockDim.x) {
    const int64_t e = p / R;
    const int64_t r = p % R;
    int64_t lo = 0;
    for (int64_t f = 0; f < e; ++f) {
      lo += a.expert_counts[f];
    }
    // The first row of expert e whose rank is >= r.
    int64_t hi = lo + a.expert_counts[e];
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (a.src_rank[mid] < r) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    start[p] = lo;
  }
  __syncthreads();
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    int64_t next = 0;  // where rank r's next run goes
    for (int64_t q = 0; q < r; ++q) {
      next += a.from_rank[q];
    }
    int64_t expert_end = 0;
    for (int64_t e = 0; e < L; ++e) {
      expert_end += a.expert_counts[e];
      const int64_t end = r + 1 < R ? start[e * R + r + 1] : expert_end;
      target[e * R + r] = next;
      next += end - start[e * R + r];
    }
  }
}

__global__ void sourceOrderKernel(const SourceOrderArgs a) {
  const int64_t R = a.world_size;
  const int64_t* const start = a.runs;
  const int64_t* const target = a.runs + a.local_experts * R;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < a.rows; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t run = a.row_expert[i] * R + a.src_rank[i];
    a.order[target[run] + i - start[run]] = i;
  }
}

// Element conversions and the rounded operations of the accumulation type.
template <typename T>
struct Value;

template <>
struct Value<float> {
  __device__ static float toFloat(float v) { return v; }
  __device__ static float fromFloat(float v) { return v; }
};
template <>
struct Value<double> {
  __device__ static double toFloat(double v) { return v; }
  __device__ static double fromFloat(double v) { return v; }
};
template <>
struct Value<__nv_bfloat16> {
  __device__ static float toFloat(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  __device__ static __nv_bfloat16 fromFloat(float v) {
    return __float2bfloat16_rn(v);
  }
};
template <>
struct Value<__half> {
  __device__ static float toFloat(__half v) { return __half2float(v); }
  __device__ static __half fromFloat(float v) { return __float2half_rn(v); }
};

__device__ float addRn(float a, float b) { return __fadd_rn(a, b); }
__device__ float mulRn(float a, float b) { return __fmul_rn(a, b); }
__device__ double addRn(double a, double b) { return __dadd_rn(a, b); }
__device__ double mulRn(double a, double b) { return __dmul_rn(a, b); }

// The weight of row `row`, token t's pick k (k known with slots only):
// from topk_weights by its pick, or its own; nothing (1) without either.
template <typename Acc>
__device__ __forceinline__ bool weightOf(const CombineSumArgs& a, int64_t t,
                                         int64_t row, int64_t k, Acc* weight) {
  if (a.row_weights != nullptr) {
    *weight = static_cast<const Acc*>(a.row_weights)[row];
    return true;
  }
  if (a.topk_weights != nullptr) {
    *weight = static_cast<const Acc*>(a.topk_weights)[t * a.picks + k];
    return true;
  }
  return false;
}

__device__ float quietNan(float) { return CUDART_NAN_F; }
__device__ double quietNan(double) { return CUDART_NAN; }

// Calls add(row, k) for token t's rows in ascending pick order, k the
// row's pick with slots, -1 without (masked picks have no row: they would
// add +0, which leaves a sum's bits as they are). False when two rows
// named one of its picks (slots only).
template <typename Add>
__device__ __forceinline__ bool forEachRow(const CombineSumArgs& a, int64_t t,
                                           Add add) {
  if (a.slots != nullptr) {
    bool clean = true;
    for (int64_t k = 0; k < a.picks; ++k) {
      const int64_t row = a.slots[t * a.picks + k];
      if (row >= 0) {
        add(row, k);
      } else if (row != -1) {
        clean = false;
      }
    }
    return clean;
  }
  const int64_t end = a.token_start[t + 1];
  for (int64_t i = a.token_start[t]; i < end; ++i) {
    add(a.order[i], int64_t{-1});
  }
  return true;
}

template <typename T, typename Acc>
__global__ void sumKernel(const CombineSumArgs a) {
  const T* rows = static_cast<const T*>(a.rows);
  T* out = static_cast<T*>(a.out);
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    for (int64_t h = threadIdx.x; h < a.hidden; h += blockDim.x) {
      Acc acc = 0;
      const bool clean = forEachRow(a, t, [&](int64_t row, int64_t k) {
        const Acc value = Value<T>::toFloat(rows[row * a.hidden + h]);
        Acc weight;
        acc = weightOf(a, t, row, k, &weight) ? addRn(acc, mulRn(weight, value))
                                              : addRn(acc, value);
      });
      out[t * a.hidden + h] = Value<T>::fromFloat(clean ? acc : quietNan(acc));
    }
  }
}

// The same sum, 16 bytes of a row per thread and load (hidden a multiple of
// 16 / sizeof(T), rows and out 16-byte aligned): each element still gets
// its own sum in pick order.
template <typename T, typename Acc>
__global__ void sumPackedKernel(const CombineSumArgs a) {
  constexpr int kPer = 16 / sizeof(T);
  const uint4* rows = static_cast<const uint4*>(a.rows);
  uint4* out = static_cast<uint4*>(a.out);
  const int64_t packs = a.hidden / kPer;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Acc acc[kPer];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        acc[e] = 0;
      }
      const bool clean = forEachRow(a, t, [&](int64_t row, int64_t k) {
        const uint4 packed = rows[row * packs + p];
        T values[kPer];
        memcpy(values, &packed, sizeof(packed));
        Acc weight;
        const bool weighted = weightOf(a, t, row, k, &weight);
#pragma unroll
        for (int e = 0; e < kPer; ++e) {
          const Acc value = Value<T>::toFloat(values[e]);
          acc[e] = weighted ? addRn(acc[e], mulRn(weight, value))
                            : addRn(acc[e], value);
        }
      });
      T values[kPer];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        values[e] = Value<T>::fromFloat(clean ? acc[e] : quietNan(acc[e]));
      }
      uint4 packed;
      memcpy(&packed, values, sizeof(packed));
      out[t * packs + p] = packed;
    }
  }
}

__global__ void slotsKernel(const int64_t* token, int64_t token_stride,
                            const int64_t* pick, int64_t pick_stride,
                            int64_t count, int64_t picks, int64_t* slots) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    auto* slot = reinterpret_cast<unsigned long long*>(
        slots + token[i * token_stride] * picks + pick[i * pick_stride]);
    if (atomicCAS(slot, kNone, static_cast<unsigned long long>(i)) != kNone) {
      atomicExch(slot, static_cast<unsigned long long>(-2LL));
    }
  }
}

template <typename T, typename Acc>
void launchSum(const CombineSumArgs& a, cudaStream_t stream) {
  const int blocks = static_cast<int>(a.tokens < 8192 ? a.tokens : 8192);
  const bool aligned = reinterpret_cast<uintptr_t>(a.rows) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  if (aligned && a.hidden % (16 / sizeof(T)) == 0) {
    sumPackedKernel<T, Acc><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    sumKernel<T, Acc><<<blocks, kThreads, 0, stream>>>(a);
  }
}

}  // namespace

cudaError_t launchDispatchCheck(const DispatchCheckArgs& args,
                                cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(args.world_size) * 8;
  dispatchCheckKernel<<<1, kCheckThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchDispatchMeta(const DispatchMetaArgs& args,
                               cudaStream_t stream) {
  if (args.count == 0) {
    return cudaSuccess;
  }
  dispatchMetaKernel<<<gridFor(args.count), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchDispatchLayout(const DispatchLayoutArgs& args,
                                 cudaStream_t stream) {
  if (args.count == 0) {
    return cudaSuccess;
  }
  dispatchLayoutKernel<<<gridFor(args.count), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchCombineCheck(const CombineCheckArgs& args,
                               cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(args.world_size) * 3 * 8;
  combineCheckKernel<<<1, kCheckThreads, shared, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launchSourceOrder(const SourceOrderArgs& args,
                              cudaStream_t stream) {
  if (args.rows == 0) {
    return cudaSuccess;
  }
  sourceRunsKernel<<<1, kCheckThreads, 0, stream>>>(args);
  sourceOrderKernel<<<gridFor(args.rows), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

int64_t repeatSlots(int64_t rows) {
  int64_t slots = 2;
  while (slots < 2 * rows) {
    slots *= 2;
  }
  return slots;
}

cudaError_t launchFirstRepeatedRow(const int64_t* src_rank,
                                   const int64_t* src_token,
                                   const int64_t* src_k, int64_t rows,
                                   int64_t* seen, cudaStream_t stream) {
  if (rows == 0) {
    return cudaSuccess;
  }
  firstRepeatedKernel<<<gridFor(rows), kThreads, 0, stream>>>(
      src_rank, src_token, src_k, rows, repeatSlots(rows), seen);
  return cudaGetLastError();
}

cudaError_t launchCombineSlots(const int64_t* token, int64_t token_stride,
                               const int64_t* pick, int64_t pick_stride,
                               int64_t count, int64_t picks, int64_t* slots,
                               cudaStream_t stream) {
  if (count == 0) {
    return cudaSuccess;
  }
  slotsKernel<<<gridFor(count), kThreads, 0, stream>>>(
      token, token_stride, pick, pick_stride, count, picks, slots);
  return cudaGetLastError();
}

cudaError_t launchCombineSum(const CombineSumArgs& args, cudaStream_t stream) {
  if (args.tokens == 0 || args.hidden == 0) {
    return cudaSuccess;
  }
  switch (args.type) {
    case RowType::kFloat64:
      launchSum<double, double>(args, stream);
      break;
    case RowType::kBFloat16:
      launchSum<__nv_bfloat16, float>(args, stream);
      break;
    case RowType::kFloat16:
      launchSum<__half, float>(args, stream);
      break;
    case RowType::kFloat32:
      launchSum<float, float>(args, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace hostfuse::moe::collective
