#include <hostfuse/kernel/kernel_cache.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include <hostfuse/utils/options.h>

namespace hostfuse {

FusionKernel::FusionKernel(GeneratedKernel generated, CompiledBinary binary)
    : generated_(std::move(generated)), binary_(std::move(binary)) {}

CUfunction FusionKernel::function(int device) const {
  HF_CHECK(device >= 0, "bad CUDA device ", device);
  if (static_cast<size_t>(device) >= functions_.size()) {
    functions_.resize(device + 1, nullptr);
  }
  if (functions_[device] == nullptr) {
    const driver::Api& cu = driver::api();
    CUmodule module = nullptr;
    HF_CU_CHECK(cu.cuModuleLoadData(&module, binary_.image.data()));
    CUfunction function = nullptr;
    HF_CU_CHECK(cu.cuModuleGetFunction(&function, module, kKernelName));
    functions_[device] = function;
  }
  return functions_[device];
}

void FusionKernel::launch(int device, cudaStream_t stream, int64_t grid,
                          int64_t block, void** args) const {
  HF_ERROR(grid >= 1 && grid <= 0x7fffffff, "grid of ", grid, " blocks");
  HF_ERROR(block >= 1 && block <= generated_.max_block_size, "block of ", block,
           " threads for a kernel bounded by ", generated_.max_block_size);
  driver::PrimaryContextGuard context(device);
  CUfunction f = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    f = function(device);
  }
  HF_CU_CHECK(driver::api().cuLaunchKernel(
      f, static_cast<unsigned int>(grid), 1, 1,
      static_cast<unsigned int>(block), 1, 1, /*sharedMemBytes=*/0,
      reinterpret_cast<CUstream>(stream), args, /*extra=*/nullptr));
}

int64_t FusionKernel::residentBlocksPerSm(int device, int64_t block) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = resident_blocks_.find({device, block});
  if (it != resident_blocks_.end()) {
    return it->second;
  }
  driver::PrimaryContextGuard context(device);
  const driver::Api& cu = driver::api();
  HF_CHECK(
      cu.cuOccupancyMaxActiveBlocksPerMultiprocessor != nullptr,
      "the CUDA driver has no cuOccupancyMaxActiveBlocksPerMultiprocessor");
  int blocks = 0;
  HF_CU_CHECK(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, function(device), static_cast<int>(block),
      /*dynamicSMemSize=*/0));
  const int64_t resident = std::max(blocks, 1);
  resident_blocks_.emplace(std::make_pair(device, block), resident);
  return resident;
}

KernelCache& KernelCache::global() {
  // Never destroyed: kernels may be launched from other static
  // destructors, and the driver may be gone by the time this one would run.
  static KernelCache* cache = new KernelCache();
  return *cache;
}

std::shared_ptr<const FusionEntry> KernelCache::entry(const Fusion& fusion) {
  std::string key = fusion.toString();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    return it->second;
  }
  auto entry = std::make_shared<FusionEntry>();
  entry->key = key;
  try {
    entry->plan = FusionAnalysis(fusion).plan();
  } catch (const Error& e) {
    entry->unsupported = e.what();
  }
  entries_.emplace(std::move(key), entry);
  return entry;
}

std::shared_ptr<const FusionKernel> KernelCache::kernel(
    const Fusion& fusion, const FusionEntry& entry,
    const InputSignature& signature, const CompileTarget& target) {
  HF_ERROR(entry.unsupported.empty(), "kernel() for an unsupported fusion");
  const std::string key =
      entry.key + "\n" + signature.toString() + "\n" + target.toString();
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = kernels_.find(key);
  if (it != kernels_.end()) {
    return it->second;
  }
  GeneratedKernel generated = generateKernel(FusionAnalysis(fusion), signature);
  if (dumpKernelsEnabled()) {
    std::cerr << "hostfuse: compiling a kernel for " << target.toString()
              << " (" << signature.toString() << "):\n"
              << generated.source << std::endl;
  }
  CompiledBinary binary = compileCudaSource(generated.source, target);
  auto kernel =
      std::make_shared<FusionKernel>(std::move(generated), std::move(binary));
  ++num_compiles_;
  kernels_.emplace(key, kernel);
  return kernel;
}

int64_t KernelCache::numCompiles() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_compiles_;
}

void KernelCache::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  entries_.clear();
  kernels_.clear();
}

bool dumpKernelsEnabled() { return options::boolOr(Option::DumpKernels); }

}  // namespace hostfuse
