// CUDA-backend MoE combine: one cooperative kernel per call.
//
//   push     once the destination's slots are free (its previous combine
//            has reduced them), the push blocks copy every valid row back
//            into its source's [T_max, K] slot buffer at (token, pick); all
//            sources at once, or one per round as in the dispatch. The last
//            block of a round raises combine_flags = epoch there;
//   reduce   every block waits for all R combine flags, then each source
//            reduces its tokens: out[t] = sum over delivered picks k, in
//            order, of w[t, k] * slot[t, k], in fp32 with separate multiply
//            and add (no FMA), rounded to the output dtype;
//   release  the last block to finish raises free_flags = epoch everywhere.
// Every row comes back on its own, not pre-summed on the expert side: a
// partial sum there would change the order of the fp32 additions and break
// bit-identity with the collective backend (docs/moe_cuda.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstring>

#include "multidevice/kernels/device_utils.cuh"

namespace hostfuse::moe {

namespace {

using device::arriveLast;
using device::blockWaitForPeers;
using device::copyUnits;
using device::flagAt;
using device::globalTimerNs;
using device::loadVolatile;
using device::profileBegin;
using device::profileMark;
using device::profileSlots;
using device::recordStatus;
using device::rowOfSource;
using device::signalAllPeers;
using device::signalPeer;
using device::WaitContext;

constexpr int kOpCombine = 2;

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
  const uint64_t entry_ns = p.profile != nullptr ? globalTimerNs() : 0;
  using Bits = typename Element<T>::Bits;
  constexpr int kPerUnit = sizeof(U) / sizeof(Bits);
  static_assert(kPerUnit >= 1 && sizeof(U) % sizeof(Bits) == 0);
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ int64_t round_rows[2];

  const int R = p.world_size;
  const int L = p.local_experts;
  const int K = p.topk;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  DeviceState* state = p.state;
  const uint64_t epoch = loadVolatile(&state->combine_epoch) + 1;
  const WaitContext context{state, p.status, p.timeout_ns, kOpCombine, epoch};
  uint64_t* const prof = profileSlots(p.profile);
  profileBegin(prof, epoch, entry_ns);
  if (loadVolatile(&state->poisoned) != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      recordStatus(context, kStatusPoisoned, -1, 0, -1, -1, 0);
    }
    return;
  }
  // The last dispatch's segments: source s's rows of local expert l.
  auto* recv_start = reinterpret_cast<int64_t*>(shared_raw);
  auto* recv_count = reinterpret_cast<int32_t*>(recv_start + R * L);
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    recv_start[i] = p.recv_start[i];
    recv_count[i] = p.recv_count[i];
  }
  void* const own_control = p.control[p.rank];

  // --- Push, once every destination has reduced its previous combine.
  if (!blockWaitForPeers(flagAt(own_control, p.layout.free_flags, 0), R,
                         epoch - 1, context, kWaitCombineFree)) {
    return;
  }
  profileMark(prof, kCombineFreeIn);
  const int64_t recv_rows = loadVolatile(&state->recv_rows);
  const int64_t units = p.row_bytes / static_cast<int64_t>(sizeof(U));
  const auto* metas = reinterpret_cast<const int4*>(
      static_cast<const char*>(p.recv[p.rank]) + p.meta_offset);
  if (blockIdx.x < p.push_blocks) {
    const int64_t chunk_units =
        (units + p.chunks_per_row - 1) / p.chunks_per_row;
    const int64_t push_warps = int64_t{p.push_blocks} * kWarpsPerBlock;
    const int64_t first_item =
        static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    const int rounds = p.rounds != 0 ? max(1, R - 1) : 1;
    for (int round = 0; round < rounds; ++round) {
      // -1: rows of every source, in row order. Else the rows of source
      // rank + 1 + round, then (first round) our own.
      const int dest = p.rounds != 0 ? (p.rank + 1 + round) % R : -1;
      const bool with_self = round == 0 && dest >= 0 && dest != p.rank;
      if (threadIdx.x < 2) {
        const int source = threadIdx.x == 0 ? dest : p.rank;
        int64_t rows = 0;
        if (dest >= 0 && (threadIdx.x == 0 || with_self)) {
          for (int l = 0; l < L; ++l) {
            rows += recv_count[source * L + l];
          }
        }
        round_rows[threadIdx.x] = rows;
      }
      __syncthreads();
      const int64_t rows = dest < 0 ? recv_rows : round_rows[0] + round_rows[1];
      const int64_t items = rows * p.chunks_per_row;
      for (int64_t item = first_item; item < items; item += push_warps) {
        const int64_t k = item / p.chunks_per_row;
        const int64_t chunk = item % p.chunks_per_row;
        int64_t r = k;
        int expected = -1;
        if (dest >= 0) {
          expected = k < round_rows[0] ? dest : p.rank;
          r = k < round_rows[0]
                  ? rowOfSource(recv_start, recv_count, L, dest, k)
                  : rowOfSource(recv_start, recv_count, L, p.rank,
                                k - round_rows[0]);
        }
        if (r < 0 || r >= recv_rows) {
          continue;  // dropped by a capacity overflow
        }
        const int4 meta = __ldcg(metas + r);
        const int64_t token = meta.x;
        const int source = meta.y >> 8;
        const int pick = meta.y & 0xff;
        if (source < 0 || source >= R || pick >= K || token < 0 ||
            token >= p.max_tokens || (expected >= 0 && source != expected)) {
          if (lane == 0 && chunk == 0) {
            recordStatus(context, kStatusInternal, p.rank, kWaitCombineData,
                         token, meta.y, r);
          }
          continue;
        }
        char* destination = static_cast<char*>(p.slots[source]) +
                            (token * K + pick) * p.row_bytes;
        const int64_t begin = chunk * chunk_units;
        const int64_t end = min(units, begin + chunk_units);
        copyUnits<U, false>(
            &destination, 1,
            reinterpret_cast<const U*>(static_cast<const char*>(p.expert_out) +
                                       r * p.row_bytes),
            begin, end, lane);
      }
      const bool last_in_round =
          arriveLast(&state->combine_rounds[round], p.push_blocks);
      if (round == rounds - 1) {
        profileMark(prof, kCombinePushed);
      }
      if (last_in_round) {
        if (dest < 0) {
          signalAllPeers(p.control, p.layout.combine_flags, p.rank, R, epoch);
        } else if (threadIdx.x == 0) {
          signalPeer(p.control, p.layout.combine_flags, p.rank, dest, epoch);
          if (with_self) {
            signalPeer(p.control, p.layout.combine_flags, p.rank, p.rank,
                       epoch);
          }
        }
        if (round == rounds - 1) {
          profileMark(prof, kCombineDataSignalled);
        }
      }
    }
  }

  // --- Reduce once every rank has sent our rows back.
  if (!blockWaitForPeers(flagAt(own_control, p.layout.combine_flags, 0), R,
                         epoch, context, kWaitCombineData)) {
    return;
  }
  profileMark(prof, kCombineDataIn);
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
        continue;  // masked (or dropped by an overflow)
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
  if (prof != nullptr) {  // uniform in the block
    __syncthreads();
    profileMark(prof, kCombineReduced);
  }

  // --- Our slots are free again for everyone's next combine.
  if (arriveLast(&state->combine_exits, gridDim.x)) {
    signalAllPeers(p.control, p.layout.free_flags, p.rank, R, epoch);
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
cudaError_t occupancyOf(size_t shared_bytes, int* per_sm) {
  *per_sm = INT_MAX;
  for (const int64_t unit : {16, 8, 4, 2}) {
    int blocks = 0;
    const cudaError_t status =
        device::occupancy(combineKernelFor<T>(unit), shared_bytes, &blocks);
    if (status != cudaSuccess) {
      return status;
    }
    *per_sm = blocks < *per_sm ? blocks : *per_sm;
  }
  return cudaSuccess;
}

}  // namespace

size_t combineSharedBytes(int num_experts) {
  return (sizeof(int64_t) + sizeof(int32_t)) * static_cast<size_t>(num_experts);
}

cudaError_t combineOccupancy(ElementType dtype, size_t shared_bytes,
                             int* per_sm) {
  switch (dtype) {
    case ElementType::kFloat32:
      return occupancyOf<float>(shared_bytes, per_sm);
    case ElementType::kBFloat16:
      return occupancyOf<__nv_bfloat16>(shared_bytes, per_sm);
    case ElementType::kFloat16:
      return occupancyOf<__half>(shared_bytes, per_sm);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launchCombine(const CombineParams& params, ElementType dtype,
                          int blocks, bool cooperative, cudaStream_t stream) {
  const size_t shared_bytes =
      combineSharedBytes(params.world_size * params.local_experts);
  switch (dtype) {
    case ElementType::kFloat32:
      if (params.unit_bytes < 4) {
        return cudaErrorInvalidValue;
      }
      return device::launch(combineKernelFor<float>(params.unit_bytes), params,
                            blocks, shared_bytes, cooperative, stream);
    case ElementType::kBFloat16:
      return device::launch(combineKernelFor<__nv_bfloat16>(params.unit_bytes),
                            params, blocks, shared_bytes, cooperative, stream);
    case ElementType::kFloat16:
      return device::launch(combineKernelFor<__half>(params.unit_bytes), params,
                            blocks, shared_bytes, cooperative, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hostfuse::moe
