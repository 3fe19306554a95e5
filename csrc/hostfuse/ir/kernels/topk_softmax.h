// The device path of TopKSoftmax (ir/topk_softmax.h): softmax over each row
// of fp32 logits, its K largest probabilities and their indices, optionally
// renormalized to sum to 1, in one kernel (one warp per row).
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Pointers are device memory; the launch is queued
// on `stream` and returns its error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// The most columns (experts) a row may have: each lane of the row's warp
// holds kTopKSoftmaxMaxColumns / 32 of them in registers.
constexpr int64_t kTopKSoftmaxMaxColumns = 256;

// logits [rows, columns] f32, row-major; writes weights [rows, k] f32 and
// indices [rows, k] i64, largest first; among equal probabilities the
// lower index comes first. 1 <= k <= columns <= kTopKSoftmaxMaxColumns.
cudaError_t launchTopKSoftmax(const float* logits, int64_t rows,
                              int64_t columns, int64_t k, bool renormalize,
                              float* weights, int64_t* indices,
                              cudaStream_t stream);

// The router in one kernel: logits = x [rows, hidden] times router_w
// [experts, hidden] transposed (bf16 or f16, row-major, both 16-byte
// aligned; the products exact in fp32 and summed in fp32, in a fixed order:
// the same bits on every run), then as launchTopKSoftmax. Whether it takes
// given operands: routerTopKSupports (hidden a multiple of 8, at most
// kRouterTopKMaxExperts experts).
enum class RouterDtype { kBFloat16, kHalf };
constexpr int64_t kRouterTopKMaxExperts = 32;
// Up to this many rows a block computes one token (more blocks); above it
// several (fewer reads of router_w).
constexpr int64_t kRouterOneTokenRows = 512;
bool routerTopKSupports(const void* x, const void* router_w, int64_t hidden,
                        int64_t experts);
cudaError_t launchRouterTopK(RouterDtype dtype, const void* x,
                             const void* router_w, int64_t rows, int64_t hidden,
                             int64_t experts, int64_t k, bool renormalize,
                             float* weights, int64_t* indices,
                             cudaStream_t stream);

}  // namespace hostfuse::kernels
