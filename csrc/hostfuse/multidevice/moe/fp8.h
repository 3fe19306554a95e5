// fp8 dispatch (MoeDispatchQuant::Fp8E4M3): the quantization both backends
// implement bit for bit, and how a quantized row travels. Plain C++, no
// torch: the cuda backend's kernels include it too.
//
// Per row, per block of kFp8Block consecutive channels, in fp32:
//   amax  = max(max over the block of |x|, kFp8MinAmax)
//   scale = amax / kFp8Max                   (one rounded division)
//   q     = e4m3(clamp(x / scale, -kFp8Max, kFp8Max))
//                                            (rounded division, then the
//                                             nearest e4m3, ties to even)
// so x is about float(q) * scale. x must be finite: a block holding an inf
// or a NaN gives NaN rows, whose bits may differ between the backends.
// A quantized row travels packed: H bytes of q, then H / kFp8Block fp32
// scales (fp8PackedRowBytes).
#pragma once

#include <cstdint>

namespace hostfuse::moe {

constexpr int64_t kFp8Block = 128;  // channels per scale
constexpr float kFp8Max = 448.0f;   // e4m3's largest finite value
constexpr float kFp8MinAmax = 1e-4f;

// Bytes of one packed row of H channels (H a multiple of kFp8Block).
constexpr int64_t fp8PackedRowBytes(int64_t hidden) {
  return hidden + hidden / kFp8Block * 4;
}

}  // namespace hostfuse::moe
