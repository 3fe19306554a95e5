// fp8_e4m3 dispatch rows on ATen (the quantization of moe/fp8.h): the
// collective backend's quantizer, and the tests' reference for the cuda
// backend's kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace hostfuse::moe {

// x [T, H] floating -> [T, fp8PackedRowBytes(H)] uint8 packed rows on x's
// device: H bytes of e4m3 values, then the H / kFp8Block fp32 scales.
at::Tensor quantizeFp8Packed(const at::Tensor& x);

// Packed rows [N, fp8PackedRowBytes(H)] uint8 -> (q [N, H] Float8_e4m3fn,
// scales [N, H / kFp8Block] fp32): strided views of `packed`, as the cuda
// backend returns its receive buffer, no copies.
std::pair<at::Tensor, at::Tensor> unpackFp8(const at::Tensor& packed,
                                            int64_t hidden);

}  // namespace hostfuse::moe
