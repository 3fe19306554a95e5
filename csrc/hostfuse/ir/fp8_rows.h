// fp8 rows with one scale per block of channels, as MoeDispatch with
// quantize=fp8_e4m3 returns them, back to a floating dtype (GroupedMatmul
// does this before its matmuls).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace hostfuse {

// The rows of fp8 x [rows, H] dequantized with `scales` [rows, H / B]
// (one per block of B channels), in `dtype`: each product rounded to fp32,
// then to `dtype`.
at::Tensor dequantizeFp8Rows(const at::Tensor& x, const at::Tensor& scales,
                             at::ScalarType dtype);

}  // namespace hostfuse
