// The device path of a linear with few outputs and an f32 result (a
// router's logits, ir/exprs.h LinearOp::accumulatesToFloat): out = x w^T
// with the products of bf16 or f16 operands summed in fp32, in one kernel.
// cuBLAS runs this shape as a split-K GEMM and a reduction, two launches
// that take several times the time of reading x (docs/performance.md).
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// The most outputs (columns of out, rows of w) the kernel takes.
constexpr int64_t kSkinnyLinearMaxOutputs = 32;

enum class SkinnyLinearDtype { BFloat16, Half };

// Whether launchSkinnyLinear takes these operands: 1 <= outputs <=
// kSkinnyLinearMaxOutputs, hidden a positive multiple of 8, x and w
// 16-byte aligned (both row-major and contiguous).
bool skinnyLinearFits(int64_t outputs, int64_t hidden, const void* x,
                      const void* w);

// x [rows, hidden], w [outputs, hidden] of `dtype`; out [rows, outputs] f32
// with out[r][n] = sum over h of x[r][h] * w[n][h]. Each sum runs in a fixed
// order (per thread over its chunks of 8 channels, then a fixed tree over
// the threads), so that a call gives the same bits every time.
cudaError_t launchSkinnyLinear(SkinnyLinearDtype dtype, const void* x,
                               const void* w, int64_t rows, int64_t hidden,
                               int64_t outputs, float* out,
                               cudaStream_t stream);

}  // namespace hostfuse::kernels
