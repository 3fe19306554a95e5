#include <hostfuse/utils/driver_api.h>

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <memory>
#include <mutex>

namespace hostfuse::driver {

namespace {

std::atomic<const Api*> loaded_api{nullptr};

// One entry point, or nullptr when the driver lacks it. Throws when the
// runtime cannot reach a driver at all.
void* lookUp(const char* name, unsigned int version) {
  void* function = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t status = cudaGetDriverEntryPointByVersion(
      name, &function, version, cudaEnableDefault, &found);
  if (status != cudaSuccess) {
    // Clear the runtime's last error so that later, unrelated checks (in
    // libtorch too) do not report it.
    (void)cudaGetLastError();
    HF_THROW("cannot load the CUDA driver API: looking up ", name,
             " through cudaGetDriverEntryPointByVersion failed with ",
             cudaGetErrorName(status), " (", cudaGetErrorString(status),
             "); is an NVIDIA driver installed and a GPU visible?");
  }
  return found == cudaDriverEntryPointSuccess ? function : nullptr;
}

std::unique_ptr<Api> load() {
  auto api = std::make_unique<Api>();
#define HF_DRIVER_API_LOAD_(name, version) \
  api->name = reinterpret_cast<PFN_##name##_v##version>(lookUp(#name, version));
  HOSTFUSE_DRIVER_FUNCTIONS(HF_DRIVER_API_LOAD_)
#undef HF_DRIVER_API_LOAD_
  // The functions every launch needs; the others are checked by their
  // callers.
  const std::pair<const char*, bool> required[] = {
      {"cuGetErrorName", api->cuGetErrorName != nullptr},
      {"cuInit", api->cuInit != nullptr},
      {"cuDeviceGet", api->cuDeviceGet != nullptr},
      {"cuDevicePrimaryCtxRetain", api->cuDevicePrimaryCtxRetain != nullptr},
      {"cuCtxGetCurrent", api->cuCtxGetCurrent != nullptr},
      {"cuCtxPushCurrent", api->cuCtxPushCurrent != nullptr},
      {"cuCtxPopCurrent", api->cuCtxPopCurrent != nullptr},
      {"cuModuleLoadData", api->cuModuleLoadData != nullptr},
      {"cuModuleGetFunction", api->cuModuleGetFunction != nullptr},
      {"cuLaunchKernel", api->cuLaunchKernel != nullptr},
  };
  for (const auto& [name, present] : required) {
    HF_CHECK(present, "the installed CUDA driver has no ", name,
             "; hostfuse needs a driver for CUDA 12 or newer");
  }
  const CUresult status = api->cuInit(0);
  if (status != CUDA_SUCCESS) {
    const char* name = nullptr;
    api->cuGetErrorName(status, &name);
    HF_THROW("cuInit(0) failed: ", name != nullptr ? name : "unknown error");
  }
  return api;
}

// Primary contexts retained so far, by device ordinal.
constexpr int kMaxDevices = 64;
std::array<std::atomic<CUcontext>, kMaxDevices> primary_contexts{};

CUcontext primaryContext(int device) {
  HF_CHECK(device >= 0 && device < kMaxDevices, "CUDA device ", device,
           " is out of range [0, ", kMaxDevices, ")");
  CUcontext context = primary_contexts[device].load(std::memory_order_acquire);
  if (context != nullptr) {
    return context;
  }
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  context = primary_contexts[device].load(std::memory_order_relaxed);
  if (context == nullptr) {
    const Api& cu = api();
    CUdevice handle = 0;
    HF_CU_CHECK(cu.cuDeviceGet(&handle, device));
    // Retained for the life of the process, like the runtime's own
    // reference: kernels loaded into it stay valid until exit.
    HF_CU_CHECK(cu.cuDevicePrimaryCtxRetain(&context, handle));
    primary_contexts[device].store(context, std::memory_order_release);
  }
  return context;
}

}  // namespace

const Api& api() {
  const Api* current = loaded_api.load(std::memory_order_acquire);
  if (current != nullptr) {
    return *current;
  }
  static std::mutex mutex;
  static std::unique_ptr<Api> instance;
  std::lock_guard<std::mutex> lock(mutex);
  if (instance == nullptr) {
    instance = load();  // throws, leaving instance empty, to retry later
    loaded_api.store(instance.get(), std::memory_order_release);
  }
  return *instance;
}

std::string errorString(CUresult status) {
  const Api* cu = loaded_api.load(std::memory_order_acquire);
  const char* name = nullptr;
  const char* text = nullptr;
  if (cu != nullptr) {
    cu->cuGetErrorName(status, &name);
    if (cu->cuGetErrorString != nullptr) {
      cu->cuGetErrorString(status, &text);
    }
  }
  std::string result =
      name != nullptr ? name : "CUresult " + std::to_string(status);
  if (text != nullptr) {
    result += std::string(" (") + text + ")";
  }
  return result;
}

PrimaryContextGuard::PrimaryContextGuard(int device) {
  const Api& cu = api();
  const CUcontext wanted = primaryContext(device);
  CUcontext current = nullptr;
  HF_CU_CHECK(cu.cuCtxGetCurrent(&current));
  if (current != wanted) {
    HF_CU_CHECK(cu.cuCtxPushCurrent(wanted));
    pushed_ = true;
  }
}

PrimaryContextGuard::~PrimaryContextGuard() {
  if (pushed_) {
    CUcontext popped = nullptr;
    // A destructor must not throw. The pop can only fail if code under the
    // guard left the context stack unbalanced, which nothing here does.
    (void)api().cuCtxPopCurrent(&popped);
  }
}

}  // namespace hostfuse::driver
