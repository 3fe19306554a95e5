// The device path of dequantizeFp8Rows (ir/fp8_rows.h): fp8 e4m3 rows with
// one fp32 scale per block of channels back to a floating dtype in one
// pass, reading the rows where they are (a strided view, as MoeDispatch's
// recv_x and recv_scales are) instead of five ATen operations with fp32
// temporaries.
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

enum class DequantOut : int32_t { kFloat32, kBFloat16, kFloat16 };

// out[r, c] = dtype(float(q[r, c]) * scales[r, c / (hidden / blocks)]):
// the product rounded to fp32, then to `dtype` (the conversions ATen's CUDA
// kernels use). q [rows, hidden] e4m3 with a row stride of `q_stride`
// bytes, scales [rows, blocks] fp32 with a row stride of `scale_stride`
// floats (strides >= 0; 0 repeats one row), out [rows, hidden] row-major.
// hidden % blocks == 0. With row_groups >= 0, `row_counts` (i64
// [row_groups], device memory; may be null when row_groups is 0) limits
// the rows: only the first min(rows, sum of the counts, each clamped to
// [0, rows]) are written (the valid rows of a MoE dispatch's capacity
// rows, read on the device; none for no counts). row_groups < 0: every
// row.
cudaError_t launchDequantizeFp8Rows(const void* q, int64_t q_stride,
                                    const float* scales, int64_t scale_stride,
                                    int64_t rows, int64_t hidden,
                                    int64_t blocks, DequantOut dtype, void* out,
                                    cudaStream_t stream,
                                    const int64_t* row_counts = nullptr,
                                    int64_t row_groups = -1);

}  // namespace hostfuse::kernels
