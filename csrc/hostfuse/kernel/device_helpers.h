// The device code every generated kernel starts with: element types,
// conversions, math and block reductions, written out so that NVRTC needs
// no header (see docs/kernels.md for why).
#pragma once

namespace hostfuse {

// The helpers' source text. It defines, all prefixed hf_:
//   hf_bf16, hf_f16                 16-bit storage types (raw bits)
//   hf_to_float(x)                  bf16/f16 -> float, exact
//   hf_to_bf16(x), hf_to_f16(x)     float -> storage, round to nearest even
//   hf_round_bf16(x), hf_round_f16  float -> float through that type (casts)
//   hf_vec<T, N>                    N elements of T, aligned for one access
//   hf_abs, hf_relu, hf_exp, ...    unary math for float and double
//   hf_max, hf_min                  NaN-propagating, as ATen's maximum
//   hf_lowest<T>()                  identity of max: -inf or the lowest int
//   hf_block_reduce(x, op)          every thread gets the block's result
const char* deviceHelpersSource();

}  // namespace hostfuse
