#include <hostfuse/kernel/executor.h>

#include <iostream>
#include <map>
#include <mutex>

#include <hostfuse/ir/evaluation.h>
#include <hostfuse/kernel/kernel_cache.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

namespace {

struct DeviceInfo {
  int64_t sm_count = 0;
  CompileTarget target;
};

const DeviceInfo& deviceInfo(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = infos.find(device);
  if (it != infos.end()) {
    return it->second;
  }
  int major = 0;
  int minor = 0;
  int sm_count = 0;
  HF_CUDA_CHECK(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, device));
  HF_CUDA_CHECK(cudaDeviceGetAttribute(
      &minor, cudaDevAttrComputeCapabilityMinor, device));
  HF_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count,
                                       cudaDevAttrMultiProcessorCount, device));
  return infos
      .emplace(device, DeviceInfo{sm_count, compileTargetFor(major, minor)})
      .first->second;
}

// The one CUDA device of the tensor inputs.
int inputDevice(const Fusion& fusion, const std::vector<c10::IValue>& inputs) {
  int device = -1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor()) {
      continue;
    }
    const at::Tensor& tensor = inputs[i].toTensor();
    HF_CHECK(tensor.is_cuda(), "runFusionOnCuda: ", fusion.describeInput(i),
             " is on ", tensor.device().str(),
             "; every tensor input must be on one CUDA device");
    const int index = tensor.device().index();
    HF_CHECK(device < 0 || index == device,
             "runFusionOnCuda: ", fusion.describeInput(i),
             " is on cuda:", index,
             " but an earlier input is on cuda:", device);
    device = index;
  }
  HF_CHECK(device >= 0,
           "runFusionOnCuda: the fusion has no tensor input to take the "
           "device from");
  return device;
}

std::vector<at::Tensor> runWithEntry(const Fusion& fusion,
                                     const FusionEntry& entry,
                                     const std::vector<c10::IValue>& inputs,
                                     const KernelOptions& options,
                                     const at::Tensor& row_counts) {
  HF_CHECK(entry.unsupported.empty(), entry.unsupported);
  HF_CHECK(inputs.size() == fusion.inputs().size(), "the fusion takes ",
           fusion.inputs().size(), " inputs, but ", inputs.size(),
           " were given");
  const int device = inputDevice(fusion, inputs);
  LaunchSetup setup =
      setUpLaunch(fusion, entry.plan, inputs,
                  at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)),
                  options, row_counts);
  if (setup.nothing_to_launch) {
    return setup.outputs;
  }
  const DeviceInfo& info = deviceInfo(device);
  const std::shared_ptr<const FusionKernel> kernel =
      KernelCache::global().kernel(fusion, entry, setup.signature, info.target);
  KernelArgs args(fusion, entry.plan, kernel->generated(), setup);
  const LaunchConfig config = launchConfig(
      kernel->generated(), setup, info.sm_count, [&](int64_t block) {
        return kernel->residentBlocksPerSm(device, block);
      });
  kernel->launch(device, cuda::currentStream(device), config.grid, config.block,
                 args.pointers());
  return setup.outputs;
}

bool onCuda(const std::vector<c10::IValue>& inputs) {
  for (const c10::IValue& input : inputs) {
    if (input.isTensor()) {
      return input.toTensor().is_cuda();
    }
  }
  return false;
}

}  // namespace

std::vector<at::Tensor> runFusionOnCuda(const Fusion& fusion,
                                        const std::vector<c10::IValue>& inputs,
                                        const KernelOptions& options,
                                        const at::Tensor& row_counts) {
  return runWithEntry(fusion, *KernelCache::global().entry(fusion), inputs,
                      options, row_counts);
}

std::optional<std::string> kernelUnsupportedReason(const Fusion& fusion) {
  const std::shared_ptr<const FusionEntry> entry =
      KernelCache::global().entry(fusion);
  if (entry->unsupported.empty()) {
    return std::nullopt;
  }
  return entry->unsupported;
}

std::vector<at::Tensor> executeFusion(const Fusion& fusion,
                                      const std::vector<c10::IValue>& inputs,
                                      const at::Tensor& row_counts) {
  if (!onCuda(inputs)) {
    return evaluateFusion(fusion, inputs);
  }
  const std::shared_ptr<const FusionEntry> entry =
      KernelCache::global().entry(fusion);
  if (!entry->unsupported.empty()) {
    if (dumpKernelsEnabled() && !entry->fallback_reported.exchange(true)) {
      std::cerr << "hostfuse: this fusion runs with the ATen reference on "
                   "CUDA: "
                << entry->unsupported << "\n"
                << fusion.toString() << std::flush;
    }
    return evaluateFusion(fusion, inputs);
  }
  return runWithEntry(fusion, *entry, inputs, KernelOptions{}, row_counts);
}

}  // namespace hostfuse
