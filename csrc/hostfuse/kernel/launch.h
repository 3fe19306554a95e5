// The host side of a kernel launch, apart from the launch itself: sizes
// from the inputs, outputs, the signature, parameter values and the grid.
// Pure ATen and arithmetic, so it can be checked without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <vector>

#include <hostfuse/ir/evaluation.h>
#include <hostfuse/kernel/codegen.h>

namespace hostfuse {

struct KernelOptions {
  // Use the contiguous kernel (one linear index, vector loads) or the
  // pitched-rows one (row and column, vector loads) when every tensor
  // allows it.
  bool contiguous_fast_path = true;
  // Use 64-bit indices even where 32 bits suffice (to test that path).
  bool force_64bit_index = false;
};

struct LaunchSetup {
  ValueMap values;                  // the bound inputs and their extents
  std::vector<at::Tensor> inputs;   // per fusion input; undefined: scalar
  std::vector<at::Tensor> outputs;  // allocated, uninitialized
  std::vector<int64_t> loop_sizes;
  int64_t numel = 0;  // elements of the iteration space
  int64_t rows = 0;   // with a reduction: rows of the iteration space
  bool nothing_to_launch = false;
  InputSignature signature;
  // A row-limited launch's row counts: i64 [groups], contiguous, on the
  // device; undefined otherwise.
  at::Tensor row_counts;
};

// Binds `inputs` to `fusion` (checking them), derives the loop sizes,
// allocates the outputs on `device` and chooses the signature. With
// `row_counts` (i64, rank 1, on `device`), the kernel is row-limited
// (InputSignature::row_limited) where the plan allows it
// (KernelPlan::rowsCanBeLimited): only the first rows of loop dim 0 that
// the counts add up to are computed; elsewhere every row is.
LaunchSetup setUpLaunch(const Fusion& fusion, const KernelPlan& plan,
                        const std::vector<c10::IValue>& inputs,
                        const at::Device& device, const KernelOptions& options,
                        const at::Tensor& row_counts = at::Tensor());

// Parameter values of one launch, each in an 8-byte slot, and the array of
// pointers to them that cuLaunchKernel takes.
class KernelArgs {
 public:
  KernelArgs(const Fusion& fusion, const KernelPlan& plan,
             const GeneratedKernel& kernel, const LaunchSetup& setup);
  KernelArgs(const KernelArgs&) = delete;
  KernelArgs& operator=(const KernelArgs&) = delete;

  // One pointer per KernelParam, valid while this object lives.
  void** pointers() { return pointers_.data(); }

 private:
  struct Slot {
    alignas(8) unsigned char bytes[8];
  };
  void add(const void* value, size_t bytes);
  void addIndex(int64_t value);

  bool index32_;
  std::vector<Slot> slots_;
  std::vector<void*> pointers_;
};

struct LaunchConfig {
  int64_t grid = 1;   // blocks
  int64_t block = 1;  // threads per block
};

// How many blocks of `block` threads of the kernel one SM holds at once.
using ResidentBlocks = std::function<int64_t(int64_t block)>;

// Pointwise: blocks of kPointwiseBlockSize threads, as many as the device
// holds at once (one wave, so that every block gets the same share of the
// grid-stride loop), fewer for small problems. Reduction: one block per
// row (grid-stride over rows), threads enough for a few elements each.
LaunchConfig launchConfig(const GeneratedKernel& kernel,
                          const LaunchSetup& setup, int64_t sm_count,
                          const ResidentBlocks& resident_blocks);

}  // namespace hostfuse
