// Compiled fusion kernels and the cache that owns them.
//
// The cache has two levels, both keyed by text, so that fusions built
// separately but printing the same share their work:
//   fusion text                      -> FusionEntry: the analysis' verdict
//                                       and launch plan, made once
//   fusion text, signature, target   -> FusionKernel: compiled once
// One mutex guards both maps; a compile happens under it.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <hostfuse/kernel/codegen.h>
#include <hostfuse/kernel/compile.h>
#include <hostfuse/utils/driver_api.h>

namespace hostfuse {

// A generated kernel, its binary, and the functions loaded from it.
class FusionKernel {
 public:
  FusionKernel(GeneratedKernel generated, CompiledBinary binary);
  FusionKernel(const FusionKernel&) = delete;
  FusionKernel& operator=(const FusionKernel&) = delete;

  const GeneratedKernel& generated() const { return generated_; }
  const CompiledBinary& binary() const { return binary_; }

  // Launches `grid` blocks of `block` threads on `stream`, a stream of
  // `device`; `args` holds one pointer per KernelParam, to its value. The
  // first launch on a device loads the binary into the device's primary
  // context (not capturable: run once before capturing a CUDA graph).
  // Modules stay loaded until the process exits.
  void launch(int device, cudaStream_t stream, int64_t grid, int64_t block,
              void** args) const;

  // How many blocks of `block` threads of this kernel one SM of `device`
  // holds at once (registers and shared memory permitting); at least 1.
  int64_t residentBlocksPerSm(int device, int64_t block) const;

 private:
  // The kernel loaded on `device`; call with mutex_ held.
  CUfunction function(int device) const;

  GeneratedKernel generated_;
  CompiledBinary binary_;
  mutable std::mutex mutex_;
  mutable std::vector<CUfunction> functions_;  // by device; null: not loaded
  // By (device, block size).
  mutable std::map<std::pair<int, int64_t>, int64_t> resident_blocks_;
};

// What the cache knows about one fusion text.
struct FusionEntry {
  std::string key;          // the fusion's printed form
  std::string unsupported;  // why codegen cannot handle it; empty if it can
  KernelPlan plan;          // valid when supported
  // Set once the fallback to ATen has been reported.
  mutable std::atomic<bool> fallback_reported{false};
};

class KernelCache {
 public:
  // The process-wide cache that runFusionOnCuda uses.
  static KernelCache& global();

  // The entry for `fusion`, analyzing it on first request. Never throws
  // for a fusion codegen cannot handle: the entry says why.
  std::shared_ptr<const FusionEntry> entry(const Fusion& fusion);

  // The kernel for `fusion` (whose entry is `entry`, and supported) and
  // `signature`, generated and compiled for `target` on first request.
  std::shared_ptr<const FusionKernel> kernel(const Fusion& fusion,
                                             const FusionEntry& entry,
                                             const InputSignature& signature,
                                             const CompileTarget& target);

  // Kernels this cache compiled so far (a second request for one key
  // compiles nothing).
  int64_t numCompiles() const;

  // Forgets every entry and kernel (tests; kernels in use stay alive).
  void clear();

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const FusionEntry>> entries_;
  std::map<std::string, std::shared_ptr<const FusionKernel>> kernels_;
  int64_t num_compiles_ = 0;
};

// True when HOSTFUSE_DUMP_KERNELS is set to a value other than 0: compiled
// kernels and fallbacks to ATen are printed to stderr.
bool dumpKernelsEnabled();

}  // namespace hostfuse
