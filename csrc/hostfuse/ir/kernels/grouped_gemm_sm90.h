// A grouped GEMM for Hopper (sm_90a): the device path of GroupedMatmul
// (ir/grouped_matmul.h) when the weights are stored K-major. It streams
// each group's weights through shared memory with TMA loads and multiplies
// them on the tensor cores with wgmma, the group boundaries read from the
// counts on the device (so it can be captured in a CUDA graph).
//
// Why our own: at the MoE layer's shapes (8 groups of ~128 rows, H = 7168)
// the layer is bound by reading the experts' weights; at::_grouped_mm read
// them at 3.3 TB/s on an H200 (1.36x the copy-rate floor), and a kernel of
// our own can also take the activation into its epilogue. On an H100 both
// read at about 2.7 TB/s (docs/performance.md, "The grouped GEMM of our
// own").
//
// Plain C++ and CUDA types only: no torch here (the layering of
// docs/architecture.md). The driver's cuTensorMapEncodeTiled is passed in,
// so that this code links no libcuda.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::kernels {

// out[r, :] = x[r, :] @ w[g]^T for the rows r of group g, where group g's
// rows are [min(rows, s_g), min(rows, s_g + max(counts[g], 0))) and s_g is
// the sum of the earlier groups' clamped counts (negative counts read as
// 0, groups are cut at x's rows: no count can make it read or write out of
// bounds). Rows past the last group are not written.
//
//   x       [rows, k]       bf16, row stride k, 16-byte aligned
//   w       [groups, n, k]  bf16, contiguous (K-major: each output
//                           column's weights consecutive), 16-byte aligned
//   counts  [groups]        i64, device memory
//   out     [rows, n]       bf16, row stride out_stride
//
// With epilogue kSiluMul the product's two halves are gate (columns
// [0, n/2)) and up ([n/2, n)), each rounded to bf16, and the kernel writes
// out[r, j] = silu(gate[r, j]) * up[r, j] for j < n/2, computed in fp32
// (silu(g) = g / (1 + e^-g)) and rounded to bf16: the values of the
// product followed by that activation as a separate step. out is then
// [rows, n/2], and n must be a multiple of 16.
enum class GroupedGemmEpilogue { kNone, kSiluMul };

struct GroupedGemmProblem {
  const void* x = nullptr;
  const void* w = nullptr;
  const int64_t* counts = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t k = 0;
  int64_t groups = 0;
  int64_t out_stride = 0;
  GroupedGemmEpilogue epilogue = GroupedGemmEpilogue::kNone;
};

// Why `problem` cannot run on this kernel ("" when it can): k and n must be
// multiples of 8 (n of 16 with kSiluMul), out_stride >= the output's
// columns (n, or n/2 with kSiluMul) and a multiple of 8, the pointers
// 16-byte aligned, 1 <= groups <= kGroupedGemmMaxGroups, rows <= 2^31 -
// 256 (row indices of a tile stay in int), groups * n < 2^31. Checks no
// device.
const char* groupedGemmUnsupported(const GroupedGemmProblem& problem);

inline constexpr int64_t kGroupedGemmMaxGroups = 256;

// Queues the GEMM on `stream` for the GPU of the current device, which
// must have compute capability 9.0 (sm_90a code runs there only). `sms`:
// the GPU's SM count (the kernel is persistent: one block per SM at most).
// `encode` is the driver's cuTensorMapEncodeTiled. Returns
// cudaErrorInvalidValue for a problem groupedGemmUnsupported refuses or a
// tensor map the driver cannot encode, else the launch's error.
cudaError_t launchGroupedGemm(const GroupedGemmProblem& problem, int sms,
                              PFN_cuTensorMapEncodeTiled_v12000 encode,
                              cudaStream_t stream);

}  // namespace hostfuse::kernels
