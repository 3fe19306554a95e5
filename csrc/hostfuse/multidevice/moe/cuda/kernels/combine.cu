// CUDA-backend MoE combine: one cooperative kernel per call.
//
//   push     the push blocks form one group per peer; once the peer has
//            reduced its previous combine (its free flag), a group's warps
//            walk the peer's tokens in order and copy every row this rank
//            holds of a token (the route entries of the last dispatch) into
//            the peer's slot (token, pick), then store arrivals[t][rank] =
//            epoch there with a release;
//   reduce   every warp (the other blocks from the start, the push blocks
//            when done) claims pieces of this rank's tokens in token order,
//            waits for the arrivals of the peers holding picks of the
//            token, and computes out[t] = sum over delivered picks k, in
//            order, of w[t, k] * row(t, k), in fp32 with separate multiply
//            and add (no FMA), rounded to the output dtype; rows of this
//            rank's own experts are read straight from expert_out;
//   release  the last block to finish raises free_flags = epoch everywhere.
// Every row comes back on its own, not pre-summed on the expert side: a
// partial sum there would change the order of the fp32 additions and break
// bit-identity with the collective backend (docs/moe_cuda.md).
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

// One claimed piece of the reduction: units [begin, end) of token t.
struct ReducePiece {
  int64_t token;
  int64_t begin;
  int64_t end;
};

// Sends back the rows of the group's peer (their source): its tokens in
// order, each token's rows here into its slots (token, pick) there, then
// arrivals[t][rank] = epoch there (release) once all of them are out.
template <typename U>
__device__ void pushBack(const CombineParams& p, uint64_t dispatch_epoch,
                         int64_t recv_rows, uint64_t epoch) {
  const CommonParams& c = p.common;
  const int lane = threadIdx.x & 31;
  const PushGroup group(c);
  const int K = c.topk;
  const int64_t units = c.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t tokens = c.source_tokens[group.peer];
  const RouteEntry* routes =
      c.routes + static_cast<int64_t>(group.peer) * c.max_tokens * K;
  char* const slots = static_cast<char*>(c.slots[group.peer]);
  uint64_t* const arrivals = reinterpret_cast<uint64_t*>(
      static_cast<char*>(c.control[group.peer]) + c.layout.arrivals);
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
    while (picks != 0) {
      const int k = __ffs(picks) - 1;
      picks &= picks - 1;
      char* destination = slots + (t * K + k) * c.row_bytes;
      const int64_t from = __shfl_sync(kFullMask, row, k);
      copyUnits<U, false>(
          &destination, 1,
          reinterpret_cast<const U*>(static_cast<const char*>(p.expert_out) +
                                     from * c.row_bytes),
          0, units, lane);
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
// peers that hold picks of its token, then every lane sums its units over
// the delivered picks in pick order, in fp32 with separate multiply and
// add (the collective backend's order and rounding), and writes them
// rounded to T. Returns when the claims run out or a wait fails.
template <typename T, typename U>
__device__ __forceinline__ void reduceTokens(const CombineParams& p,
                                             void* own_control, uint64_t epoch,
                                             const WaitContext& context) {
  using Bits = typename Element<T>::Bits;
  constexpr int kPerUnit = sizeof(U) / sizeof(Bits);
  static_assert(kPerUnit >= 1 && sizeof(U) % sizeof(Bits) == 0);
  // Per warp, per pick: where its row is read from (null: not delivered)
  // and its weight.
  __shared__ const U* sources[kWarpsPerBlock][kMaxTopK];
  __shared__ float weights[kWarpsPerBlock][kMaxTopK];

  const CommonParams& c = p.common;
  const int R = c.world_size;
  const int K = c.topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
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
  const U* own_slots = static_cast<const U*>(c.slots[c.rank]);
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
    const bool remote = row >= 0 && rank != c.rank;
    const unsigned waiting =
        __reduce_or_sync(kFullMask, remote ? 1u << rank : 0u);
    if (lane < K) {
      sources[warp][lane] =
          row < 0 ? nullptr
          : remote
              ? own_slots + (t * K + lane) * units
              : reinterpret_cast<const U*>(
                    static_cast<const char*>(p.expert_out) + row * c.row_bytes);
      weights[warp][lane] =
          p.topk_weights != nullptr ? p.topk_weights[t * K + lane] : 1.0f;
    }
    bool ok = true;
    if (lane < R && (waiting >> lane & 1u) != 0) {
      ok = waitForFlag(arrivals + t * R + lane, epoch, lane, context,
                       kWaitCombineData);
    }
    if (__all_sync(kFullMask, ok) == 0) {
      break;
    }
    __syncwarp();

    for (int64_t unit = piece.begin + lane; unit < piece.end; unit += 32) {
      float sum[kPerUnit];
#pragma unroll
      for (int e = 0; e < kPerUnit; ++e) {
        sum[e] = 0.0f;
      }
      // Batches of kReduceBatch picks: all loads first, then the sums in
      // pick order.
      for (int k0 = 0; k0 < K; k0 += kReduceBatch) {
        U packed[kReduceBatch] = {};
#pragma unroll
        for (int j = 0; j < kReduceBatch; ++j) {
          const U* source = k0 + j < K ? sources[warp][k0 + j] : nullptr;
          if (source != nullptr) {
            packed[j] = __ldcg(source + unit);
          }
        }
#pragma unroll
        for (int j = 0; j < kReduceBatch; ++j) {
          if (k0 + j >= K || sources[warp][k0 + j] == nullptr) {
            continue;  // masked (or dropped by an overflow)
          }
          const float weight = weights[warp][k0 + j];
          Bits bits[kPerUnit];
          memcpy(bits, &packed[j], sizeof(U));
#pragma unroll
          for (int e = 0; e < kPerUnit; ++e) {
            sum[e] = __fadd_rn(sum[e],
                               __fmul_rn(weight, Element<T>::toFloat(bits[e])));
          }
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
    __syncwarp();  // sources / weights are rewritten by the next claim
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
    }
    if (__syncthreads_and(ok) == 0) {
      return;
    }
    profileMark(prof, kCombineFreeIn);
    pushBack<U>(p, loadVolatile(&state->dispatch_epoch), recv_rows, epoch);
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
