#include <hostfuse/kernel/device_helpers.h>

namespace hostfuse {

namespace {

// CUDA C that NVRTC compiles in front of every generated kernel.
constexpr const char kDeviceHelpers[] =
    R"(// ---- hostfuse device helpers --------------------------------------------

// 16-bit floating point storage: raw bits. Arithmetic happens in float.
struct alignas(2) hf_bf16 {
  unsigned short bits;
};
struct alignas(2) hf_f16 {
  unsigned short bits;
};

__device__ __forceinline__ float hf_to_float(hf_bf16 x) {
  return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
}
__device__ __forceinline__ float hf_to_float(hf_f16 x) {
  float result;
  asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(x.bits));
  return result;
}
// Round to nearest even, as c10::BFloat16 does; every NaN becomes 0x7fc0.
__device__ __forceinline__ hf_bf16 hf_to_bf16(float x) {
  const unsigned int bits = __float_as_uint(x);
  hf_bf16 result;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    result.bits = 0x7fc0u;
  } else {
    result.bits = static_cast<unsigned short>(
        (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
  return result;
}
__device__ __forceinline__ hf_f16 hf_to_f16(float x) {
  hf_f16 result;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result.bits) : "f"(x));
  return result;
}
__device__ __forceinline__ float hf_round_bf16(float x) {
  return hf_to_float(hf_to_bf16(x));
}
__device__ __forceinline__ float hf_round_f16(float x) {
  return hf_to_float(hf_to_f16(x));
}

// N elements loaded or stored with one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) hf_vec {
  T v[N];
};

// Unary math. float and double overloads keep the generated code free of
// type-specific names.
__device__ __forceinline__ float hf_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double hf_abs(double x) { return fabs(x); }
__device__ __forceinline__ int hf_abs(int x) { return x < 0 ? -x : x; }
__device__ __forceinline__ long long hf_abs(long long x) {
  return x < 0 ? -x : x;
}
template <typename T>
__device__ __forceinline__ T hf_relu(T x) {
  return (x != x || x > T(0)) ? x : T(0);  // NaN stays NaN, as in ATen
}
__device__ __forceinline__ float hf_exp(float x) { return expf(x); }
__device__ __forceinline__ double hf_exp(double x) { return exp(x); }
__device__ __forceinline__ float hf_log(float x) { return logf(x); }
__device__ __forceinline__ double hf_log(double x) { return log(x); }
__device__ __forceinline__ float hf_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double hf_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float hf_rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ double hf_rsqrt(double x) { return rsqrt(x); }
__device__ __forceinline__ float hf_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double hf_tanh(double x) { return tanh(x); }
template <typename T>
__device__ __forceinline__ T hf_reciprocal(T x) {
  return T(1) / x;
}
template <typename T>
__device__ __forceinline__ T hf_sigmoid(T x) {
  return T(1) / (T(1) + hf_exp(-x));
}
template <typename T>
__device__ __forceinline__ T hf_silu(T x) {
  return x / (T(1) + hf_exp(-x));
}

// maximum/minimum: a NaN operand wins, as in ATen.
template <typename T>
__device__ __forceinline__ T hf_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}
template <typename T>
__device__ __forceinline__ T hf_min(T a, T b) {
  return (a != a || a < b) ? a : b;
}

// The identity of max.
template <typename T>
__device__ __forceinline__ T hf_lowest();
template <>
__device__ __forceinline__ float hf_lowest<float>() {
  return __uint_as_float(0xff800000u);
}
template <>
__device__ __forceinline__ double hf_lowest<double>() {
  return -__longlong_as_double(0x7ff0000000000000ll);
}
template <>
__device__ __forceinline__ int hf_lowest<int>() {
  return -2147483647 - 1;
}
template <>
__device__ __forceinline__ long long hf_lowest<long long>() {
  return -9223372036854775807ll - 1;
}

struct hf_sum_op {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct hf_max_op {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return hf_max(a, b);
  }
};

// Reduces `x` over the thread block and returns the result to every
// thread. Every thread of the block must call it (it synchronizes), and
// blockDim.x must be a multiple of 32, at most 1024. Lanes combine in a
// fixed order, so all threads get the same bits.
template <typename T, typename Op>
__device__ __forceinline__ T hf_block_reduce(T x, Op op) {
  __shared__ T partial[32];
  for (int offset = 16; offset > 0; offset /= 2) {
    x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // the previous call's readers are done with `partial`
  if (lane == 0) {
    partial[warp] = x;
  }
  __syncthreads();
  T result = partial[0];
  const int num_warps = blockDim.x / 32;
  for (int w = 1; w < num_warps; ++w) {
    result = op(result, partial[w]);
  }
  return result;
}

// ---- end of hostfuse device helpers ---------------------------------------
)";

}  // namespace

const char* deviceHelpersSource() { return kDeviceHelpers; }

}  // namespace hostfuse
