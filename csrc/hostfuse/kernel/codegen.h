// Code generation: one CUDA C kernel for one Fusion.
//
//   FusionAnalysis analysis(fusion);
//   GeneratedKernel kernel = generateKernel(analysis, signature);
//   // kernel.source: readable CUDA C; kernel.params: what to pass.
//
// Two shapes of kernel (docs/kernels.md shows both):
// - pointwise: a grid-stride loop over the elements of the iteration
//   space. Inputs are read through their strides (stride 0 where they
//   broadcast); when every tensor is dense and of the full shape, by one
//   linear index with vector loads; when every tensor is of the full shape
//   with rows of unit stride (a slice of the last dim, for example), by
//   row and column, with vector loads.
// - reduction: one thread block per row (grid-stride over rows). Each pass
//   loops over the row, evaluating what its reductions need, and reduces
//   across the block in the accumulation type; the last loop writes the
//   outputs.
// Arithmetic is in float for fp32, fp16 and bf16 values (double for f64,
// the integer type for integers); 16-bit inputs convert on load and
// outputs on store. Only an explicit cast rounds an intermediate value.
//
// The source is a function of the fusion's printed form and the signature
// alone, so it is the same in every run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <hostfuse/kernel/analysis.h>

namespace hostfuse {

// Threads per block of pointwise kernels.
constexpr int64_t kPointwiseBlockSize = 256;
// Most threads per block of reduction kernels (a multiple of 32).
constexpr int64_t kMaxReductionBlockSize = 512;
// The name of the generated __global__ function.
constexpr const char* kKernelName = "hostfuse_fusion";

// What a kernel is specialized for, beyond the fusion itself (whose dtypes
// and ranks every input must have anyway).
struct InputSignature {
  // Every used tensor input and every output is dense, row-major and of the
  // full loop shape, so one linear index addresses them all. Pointwise
  // fusions only.
  bool contiguous = false;
  // Elements per vector access in a contiguous or pitched-rows kernel: 1,
  // 2, 4, 8 or 16, such that every access is at most 16 bytes and aligned.
  int64_t vector_width = 1;
  // Every index and offset fits in 31 bits, so index_t is int.
  bool index32 = false;
  // Not contiguous, but every used tensor input and every output has the
  // full loop shape (two or more dims), stride 1 in the last dim, and its
  // other dims collapse into one dim of rows `pitch` elements apart: a
  // view of [rows, row_length] elements inside wider rows. vector_width
  // divides the row length and every pitch. Pointwise fusions only.
  bool pitched_rows = false;
  // Only the first rows of loop dim 0 are computed: as many as a device
  // list of row counts adds up to (each count taken as 0 when negative and
  // as the dim's size when larger), at most that size. The rest of every
  // output is not written. Pointwise fusions whose outputs all span loop
  // dim 0 only. (A MoE layer's activation over the capacity rows of a
  // dispatch: only the rows the experts' counts cover hold tokens.)
  bool row_limited = false;

  // "contiguous, vector 8, 32-bit indices" or "pitched rows, vector 8,
  // ...", with ", row-limited" after; part of the cache key.
  std::string toString() const;
};

// One parameter of a generated kernel, in order.
struct KernelParam {
  enum class Kind {
    kInputData,     // pointer to fusion input `index`
    kInputStride,   // stride of dim `dim` of fusion input `index`
    kOutputData,    // pointer to fusion output `index`
    kOutputStride,  // stride of dim `dim` of fusion output `index`
    kInputPitch,    // elements between rows of fusion input `index`
    kOutputPitch,   // elements between rows of fusion output `index`
    kRowCounts,     // pointer to the row counts (i64) of a row-limited kernel
    kRowGroups,     // how many row counts there are (always 64-bit)
    kLoopSize,      // size of loop dim `index`
    kNumel,         // elements in the iteration space (pointwise)
    kNumRows,       // rows: product of the loop sizes before R (reduction)
    kScalar,        // value of KernelPlan::scalars[index]
  };
  Kind kind;
  int64_t index = 0;
  int64_t dim = 0;
};

struct GeneratedKernel {
  std::string source;
  std::vector<KernelParam> params;
  InputSignature signature;
  bool is_reduction = false;
  // The kernel's __launch_bounds__: launches use at most this many threads.
  int64_t max_block_size = kPointwiseBlockSize;
};

// Generates the kernel of an analyzed fusion for the given signature.
GeneratedKernel generateKernel(const FusionAnalysis& analysis,
                               const InputSignature& signature);

// The CUDA source for `fusion`; throws hostfuse::Error naming the
// expression when codegen cannot handle the fusion.
std::string generateCudaSource(const Fusion& fusion,
                               const InputSignature& signature);

}  // namespace hostfuse
