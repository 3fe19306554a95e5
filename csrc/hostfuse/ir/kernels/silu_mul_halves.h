// GroupedMatmul's silu-mul epilogue where hostfuse's grouped GEMM does not
// run (at::_grouped_mm computed the product): one pass over the counted
// rows of the [rows, 2I] product instead of ATen ops in fp32 on every row,
// with the same bits as the GEMM's epilogue (silu_mul.cuh).
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// out[r, c] = bf16(silu(product[r, c]) * product[r, half + c]) in fp32
// (kernels::siluMul) for r < min(rows, ends[groups - 1]), c < half; the
// other rows of out are left as they are. product [rows, 2 * half] bf16
// row-major, out [rows, half] bf16 row-major, both 8-byte aligned; half %
// 4 == 0. ends: i32 [groups] on the device (launchGroupEnds's), groups >=
// 1; null: every row.
cudaError_t launchSiluMulHalves(const void* product, int64_t rows, int64_t half,
                                const int32_t* ends, int64_t groups, void* out,
                                cudaStream_t stream);

}  // namespace hostfuse::kernels
