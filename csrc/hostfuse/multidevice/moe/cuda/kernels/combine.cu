// CUDA-backend MoE combine: one cooperative kernel per call.
//
//   push     the push blocks form one group per peer; once the peer has
//            reduced its previous combine (its free flag), a group's blocks
//            store this call's mode into the peer's combine_modes, and its
//            warps walk the peer's tokens in order. per_pick: every row this
//            rank holds of a token (the route entries of the last dispatch)
//            goes into the peer's slot (token, pick). per_rank: those rows,
//            weighted with their recv weights and summed in pick order in
//            fp32, rounded to the dtype, go as one row into the slot of the
//            token's first pick here. Then arrivals[t][rank] = epoch there
//            with a release;
//   reduce   every warp (the other blocks from the start, the push blocks
//            when done) claims pieces of this rank's tokens in token order,
//            waits for the arrivals of the peers holding picks of the
//            token (and checks that they combine in this call's mode), and
//            computes, in fp32 with separate multiply and add (no FMA),
//            rounded to the output dtype: per_pick, out[t] = sum over
//            delivered picks k, in order, of w[t, k] * row(t, k); per_rank,
//            out[t] = sum over ranks in rank order of their partial rows,
//            this rank's own partial computed here the way a peer computes
//            its. Rows of this rank's own experts are read straight from
//            expert_out;
//   release  the last block to finish raises free_flags = epoch everywhere.
// The collective backend computes both modes in the same order, so the two
// backends stay bit-identical (docs/moe_cuda.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstring>

#include <hostfuse/multidevice/moe/cuda/kernels/device_utils.cuh>

namespace hostfuse::moe {

namespace {

using device::arriveLast;
using device::beginCall;
using device::CallStart;
using device::copyUnits;
using device::fenceAcqRelSys;
using device::flagAt;
using device::globalTimerNs;
using device::kFullMask;
using device::loadAcquireSys;
using device::loadVolatile;
using device::profileMark;
using device::publishFailure;
using device::PushGroup;
using device::recordStatus;
using device::signalAllPeers;
using device::storeReleaseSys;
using device::WaitContext;
using device::waitForFlag;

constexpr int kOpCombine = 2;
constexpr int kReduceBatch = 8;  // picks loaded at once by a reducing lane
constexpr size_t kCombineSharedBytes = 0;  // static shared memory only

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

// Grid-stride: a quiet NaN in each of out's `count` elements.
template <typename T>
__device__ void fillNaN(T* out, int64_t count) {
  using Bits = typename Element<T>::Bits;
  const Bits nan = Element<T>::fromFloat(__int_as_float(0x7fc00000));
  Bits* bits = reinterpret_cast<Bits*>(out);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bits[i] = nan;
  }
}

// One unit of U per lane: sum[e] = the sum over j < n in order of
// weights[j] * rows[j][unit] element e, in fp32 with one rounding per
// product and per sum (the collective backend's order and rounding); a null
// row is skipped (a masked pick, one dropped by an overflow, or one of
// another rank). Loads kReduceBatch rows at once, then adds them in order.
template <typename T, typename U>
__device__ __forceinline__ void weightedSum(
    const U* const* rows, const float* weights, int n, int64_t unit,
    float (&sum)[sizeof(U) / sizeof(typename Element<T>::Bits)]) {
  using Bits = typename Element<T>::Bits;
  constexpr int kPerUnit = sizeof(U) / sizeof(Bits);
#pragma unroll
  for (int e = 0; e < kPerUnit; ++e) {
    sum[e] = 0.0f;
  }
  for (int k0 = 0; k0 < n; k0 += kReduceBatch) {
    U packed[kReduceBatch] = {};
#pragma unroll
    for (int j = 0; j < kReduceBatch; ++j) {
      const U* row = k0 + j < n ? rows[k0 + j] : nullptr;
      if (row != nullptr) {
        packed[j] = __ldcg(row + unit);
      }
    }
#pragma unroll
    for (int j = 0; j < kReduceBatch; ++j) {
      if (k0 + j >= n || rows[k0 + j] == nullptr) {
        continue;
      }
      const float weight = weights[k0 + j];
      Bits bits[kPerUnit];
      memcpy(bits, &packed[j], sizeof(U));
#pragma unroll
      for (int e = 0; e < kPerUnit; ++e) {
        sum[e] =
            __fadd_rn(sum[e], __fmul_rn(weight, Element<T>::toFloat(bits[e])));
      }
    }
  }
}

// The kPerUnit floats of `sum` rounded to T, packed into one U.
template <typename T, typename U>
__device__ __forceinline__ U
roundedUnit(const float (&sum)[sizeof(U) / sizeof(typename Element<T>::Bits)]) {
  using Bits = typename Element<T>::Bits;
  constexpr int kPerUnit = sizeof(U) / sizeof(Bits);
  Bits bits[kPerUnit];
#pragma unroll
  for (int e = 0; e < kPerUnit; ++e) {
    bits[e] = Element<T>::fromFloat(sum[e]);
  }
  U packed;
  memcpy(&packed, bits, sizeof(U));
  return packed;
}

// One claimed piece of the reduction: units [begin, end) of token t.
struct ReducePiece {
  int64_t token;
  int64_t begin;
  int64_t end;
};

// Sends back the rows of the group's peer (their source): its tokens in
// order; per_pick, each token's rows here into its slots (token, pick)
// there; per_rank, their weighted sum (weightedSum over the picks in pick
// order, rounded to T) into the slot of the token's first pick here. Then
// arrivals[t][rank] = epoch there (release) once the token's rows are out.
template <typename T, typename U>
__device__ void pushBack(const CombineParams& p, uint64_t dispatch_epoch,
                         int64_t recv_rows, uint64_t epoch) {
  // per_rank, per warp: the rows of the token's picks here and weights.
  __shared__ const U* partial_rows[kWarpsPerBlock][kMaxTopK];
  __shared__ float partial_weights[kWarpsPerBlock][kMaxTopK];
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const PushGroup group(c);
  const int K = c.topk;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t tokens = c.source_tokens[group.peer];
  const RouteEntry* routes =
      c.routes + static_cast<int64_t>(group.peer) * c.max_tokens * K;
  char* const slots = static_cast<char*>(c.slots[group.peer]);
  uint64_t* const arrivals = reinterpret_cast<uint64_t*>(
      static_cast<char*>(c.control[group.peer]) + c.layout.arrivals);
  const U* const expert_out = static_cast<const U*>(p.expert_out);
  for (int64_t t = group.first_warp; t < tokens; t += group.warps) {
    int64_t row = -1;
    if (lane < K) {
      const RouteEntry entry = routes[t * K + lane];
      if (entry.epoch == dispatch_epoch && entry.row < recv_rows) {
        row = entry.row;
      }
    }
    unsigned picks = __ballot_sync(kFullMask, row >= 0);
    if (picks == 0) {
      continue;
    }
    if (p.per_rank != 0) {
      if (lane < K) {
        partial_rows[warp][lane] =
            row >= 0 ? expert_out + row * units : nullptr;
        partial_weights[warp][lane] =
            row >= 0 && p.recv_weights != nullptr ? p.recv_weights[row] : 1.0f;
      }
      __syncwarp();
      U* destination = reinterpret_cast<U*>(slots + (t * K + __ffs(picks) - 1) *
                                                        c.row_bytes);
      for (int64_t unit = lane; unit < units; unit += 32) {
        float sum[sizeof(U) / sizeof(typename Element<T>::Bits)];
        weightedSum<T, U>(partial_rows[warp], partial_weights[warp], K, unit,
                          sum);
        destination[unit] = roundedUnit<T, U>(sum);
      }
      __syncwarp();  // partial_rows is rewritten for the next token
    } else {
      while (picks != 0) {
        const int k = __ffs(picks) - 1;
        picks &= picks - 1;
        char* destination = slots + (t * K + k) * c.row_bytes;
        const int64_t from = __shfl_sync(kFullMask, row, k);
        copyUnits<U, false>(&destination, 1, expert_out + from * units, 0,
                            units, lane);
      }
    }
    fenceAcqRelSys();
    __syncwarp();
    if (lane == 0) {
      storeReleaseSys(arrivals + t * c.world_size + c.rank, epoch);
    }
  }
}

// Every warp (the non-push blocks from the start, the push blocks once
// their pushes are out): claims pieces of this rank's tokens in token order
// (the order the peers send them in); a piece waits for the arrivals of the
// peers that hold picks of its token and checks that each pushed in this
// call's mode, then every lane computes its units (weightedSum, the
// collective backend's order and rounding) and writes them rounded to T:
// per_pick, the sum over the delivered picks in pick order; per_rank, the
// sum in rank order of each rank's partial row (this rank's own computed
// here from expert_out). Returns when the claims run out or a wait or
// check fails.
template <typename T, typename U>
__device__ __forceinline__ void reduceTokens(const CombineParams& p,
                                             void* own_control, uint64_t epoch,
                                             const WaitContext& context) {
  constexpr int kPerUnit = sizeof(U) / sizeof(typename Element<T>::Bits);
  // Per warp, per pick: where its row is read from (null: not delivered,
  // or per_rank a row of another rank) and its weight; per_rank, per rank
  // holding picks of the token, in rank order: its partial row (null: this
  // rank's own).
  __shared__ const U* sources[kWarpsPerBlock][kMaxTopK];
  __shared__ float weights[kWarpsPerBlock][kMaxTopK];
  __shared__ const U* partials[kWarpsPerBlock][kMaxRanks];

  const CommonParams& c = p.common;
  const int R = c.world_size;
  const int K = c.topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool per_rank = p.per_rank != 0;
  DeviceState* state = c.state;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t pieces_per_token =
      max(int64_t{1},
          min((units + 31) / 32, (2 * warps + max(p.tokens, int64_t{1}) - 1) /
                                     max(p.tokens, int64_t{1})));
  const int64_t piece_units = (units + pieces_per_token - 1) / pieces_per_token;
  const uint64_t* arrivals = reinterpret_cast<const uint64_t*>(
      static_cast<const char*>(own_control) + c.layout.arrivals);
  const uint64_t mode_word = epoch << 1 | (per_rank ? 1u : 0u);
  const U* own_slots = static_cast<const U*>(c.slots[c.rank]);
  const U* expert_out = static_cast<const U*>(p.expert_out);
  U* out = static_cast<U*>(p.out);
  while (true) {
    unsigned long long claim = 0;
    if (lane == 0) {
      claim = atomicAdd(reinterpret_cast<unsigned long long*>(
                            &state->reduce_claims[epoch & 1]),
                        1ULL);
    }
    claim = __shfl_sync(kFullMask, claim, 0);
    if (static_cast<int64_t>(claim) >= p.tokens * pieces_per_token) {
      break;
    }
    ReducePiece piece;
    piece.token = static_cast<int64_t>(claim) / pieces_per_token;
    piece.begin = static_cast<int64_t>(claim) % pieces_per_token * piece_units;
    piece.end = min(units, piece.begin + piece_units);
    const int64_t t = piece.token;

    // Lane k < K: pick k's row and rank; the peers to wait for.
    int32_t row = -1;
    int32_t rank = -1;
    if (lane < K) {
      row = c.pick_row[t * K + lane];
      rank = c.pick_rank[t * K + lane];
    }
    const bool delivered = row >= 0;
    const bool remote = delivered && rank != c.rank;
    const unsigned waiting =
        __reduce_or_sync(kFullMask, remote ? 1u << rank : 0u);
    int terms = 0;
    if (per_rank) {
      // The first delivered pick of each rank names its partial's slot;
      // the partials are added in rank order.
      const unsigned same =
          __match_any_sync(kFullMask, delivered ? rank : -1 - lane);
      const bool first = delivered && __ffs(same) - 1 == lane;
      const unsigned ranks =
          __reduce_or_sync(kFullMask, first ? 1u << rank : 0u);
      terms = __popc(ranks);
      if (first) {
        partials[warp][__popc(ranks & ((1u << rank) - 1u))] =
            rank == c.rank ? nullptr : own_slots + (t * K + lane) * units;
      }
      if (lane < K) {
        sources[warp][lane] =
            delivered && !remote ? expert_out + row * units : nullptr;
        weights[warp][lane] = delivered && !remote && p.recv_weights != nullptr
                                  ? p.recv_weights[row]
                                  : 1.0f;
      }
    } else if (lane < K) {
      sources[warp][lane] = !delivered ? nullptr
                            : remote   ? own_slots + (t * K + lane) * units
                                       : expert_out + row * units;
      weights[warp][lane] =
          p.topk_weights != nullptr ? p.topk_weights[t * K + lane] : 1.0f;
    }
    bool ok = true;
    if (lane < R && (waiting >> lane & 1u) != 0) {
      ok = waitForFlag(arrivals + t * R + lane, epoch, lane, context,
                       kWaitCombineData);
      if (ok) {
        const uint64_t theirs =
            loadAcquireSys(flagAt(own_control, c.layout.combine_modes, lane));
        if (theirs != mode_word) {
          recordStatus(context, kStatusCombineModes, c.rank, 0,
                       per_rank ? 1 : 0, static_cast<int64_t>(theirs & 1u),
                       lane);
          publishFailure(context, kFailedCombineModes);
          ok = false;
        }
      }
    }
    if (__all_sync(kFullMask, ok) == 0) {
      break;
    }
    __syncwarp();

    for (int64_t unit = piece.begin + lane; unit < piece.end; unit += 32) {
      float sum[kPerUnit];
      weightedSum<T, U>(sources[warp], weights[warp], K, unit, sum);
      if (per_rank) {
        // This rank's partial, rounded as a peer rounds its own; then
        // every rank's partial in rank order.
        const U own = roundedUnit<T, U>(sum);
        using Bits = typename Element<T>::Bits;
#pragma unroll
        for (int e = 0; e < kPerUnit; ++e) {
          sum[e] = 0.0f;
        }
        for (int j = 0; j < terms; ++j) {
          const U* partial = partials[warp][j];
          const U packed = partial == nullptr ? own : __ldcg(partial + unit);
          Bits bits[kPerUnit];
          memcpy(bits, &packed, sizeof(U));
#pragma unroll
          for (int e = 0; e < kPerUnit; ++e) {
            sum[e] = __fadd_rn(sum[e], Element<T>::toFloat(bits[e]));
          }
        }
      }
      out[t * units + unit] = roundedUnit<T, U>(sum);
    }
    __syncwarp();  // sources / weights / partials: the next claim's
  }
}

template <typename T, typename U>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    combineKernel(const CombineParams p) {
  const uint64_t entry_ns = p.common.profile != nullptr ? globalTimerNs() : 0;
  const CommonParams& c = p.common;
  const int R = c.world_size;
  DeviceState* state = c.state;
  const CallStart call =
      beginCall(c, &state->combine_epoch, kOpCombine, entry_ns);
  if (!call.usable) {
    // A call after a failure: NaN in every element of the output, never
    // the previous call's result.
    fillNaN<T>(static_cast<T*>(p.out), p.tokens * c.row_bytes / sizeof(T));
    return;
  }
  const WaitContext& context = call.context;
  const uint64_t epoch = context.epoch;
  uint64_t* const prof = call.prof;
  if (p.layout_id != nullptr) {
    // A layout kept from an earlier dispatch of this site: expert_out is in
    // its order, not in the order of the routes the last dispatch left.
    // Every block sees the same two words, so all take this branch or none.
    const auto given = static_cast<uint64_t>(loadVolatile(p.layout_id));
    const uint64_t last = loadVolatile(&state->dispatch_epoch);
    if (given != last) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        recordStatus(context, kStatusStaleLayout, c.rank, 0,
                     static_cast<int64_t>(given), static_cast<int64_t>(last),
                     0);
        // The peers wait for this rank's rows: they stop at once instead.
        publishFailure(context, kFailedStaleLayout);
      }
      fillNaN<T>(static_cast<T*>(p.out), p.tokens * c.row_bytes / sizeof(T));
      return;
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // The next call's claims start from zero; nobody uses that parity now.
    state->reduce_claims[(epoch + 1) & 1] = 0;
  }
  const int64_t recv_rows = loadVolatile(&state->recv_rows);
  void* const own_control = c.control[c.rank];

  // --- Push blocks: once their peer has reduced its previous combine, send
  // its rows back.
  if (static_cast<int>(blockIdx.x) < c.push_blocks) {
    const PushGroup group(c);
    bool ok = true;
    if (threadIdx.x == 0) {
      ok = waitForFlag(flagAt(own_control, c.layout.free_flags, group.peer),
                       epoch - 1, group.peer, context, kWaitCombineFree);
      if (ok) {
        // Before any arrival of this call (ordered by the barrier and the
        // arrivals' release).
        storeReleaseSys(
            flagAt(c.control[group.peer], c.layout.combine_modes, c.rank),
            epoch << 1 | (p.per_rank != 0 ? 1u : 0u));
      }
    }
    if (__syncthreads_and(ok) == 0) {
      return;
    }
    profileMark(prof, kCombineFreeIn);
    pushBack<T, U>(p, loadVolatile(&state->dispatch_epoch), recv_rows, epoch);
    if (prof != nullptr) {  // uniform in the block
      __syncthreads();
      profileMark(prof, kCombinePushed);
    }
  }

  // --- Reduce this rank's tokens.
  reduceTokens<T, U>(p, own_control, epoch, context);
  if (prof != nullptr) {  // uniform in the block
    __syncthreads();
    profileMark(prof, kCombineReduced);
  }

  // --- Our slots are free again for everyone's next combine.
  if (arriveLast(&state->combine_exits, gridDim.x)) {
    signalAllPeers(c.control, c.layout.free_flags, c.rank, R, epoch);
    if (threadIdx.x == 0) {
      state->combine_epoch = epoch;
    }
  }
  profileMark(prof, kCombineExit);
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

template <typename T>
cudaError_t occupancyOf(int* per_sm) {
  *per_sm = INT_MAX;
  for (const int64_t unit : {16, 8, 4, 2}) {
    int blocks = 0;
    const cudaError_t status = device::occupancy(combineKernelFor<T>(unit),
                                                 kCombineSharedBytes, &blocks);
    if (status != cudaSuccess) {
      return status;
    }
    *per_sm = blocks < *per_sm ? blocks : *per_sm;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t combineOccupancy(ElementType dtype, int* per_sm) {
  switch (dtype) {
    case ElementType::kFloat32:
      return occupancyOf<float>(per_sm);
    case ElementType::kBFloat16:
      return occupancyOf<__nv_bfloat16>(per_sm);
    case ElementType::kFloat16:
      return occupancyOf<__half>(per_sm);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launchCombine(const CombineParams& params, ElementType dtype,
                          int blocks, bool cooperative, cudaStream_t stream) {
  switch (dtype) {
    case ElementType::kFloat32:
      if (params.common.unit_bytes < 4) {
        return cudaErrorInvalidValue;
      }
      return device::launch(combineKernelFor<float>(params.common.unit_bytes),
                            params, blocks, kCombineSharedBytes, cooperative,
                            stream);
    case ElementType::kBFloat16:
      return device::launch(
          combineKernelFor<__nv_bfloat16>(params.common.unit_bytes), params,
          blocks, kCombineSharedBytes, cooperative, stream);
    case ElementType::kFloat16:
      return device::launch(combineKernelFor<__half>(params.common.unit_bytes),
                            params, blocks, kCombineSharedBytes, cooperative,
                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hostfuse::moe
