// The CUDA driver API without linking libcuda.
//
// hostfuse must build, link and run its CPU tests on machines that have the
// CUDA toolkit but no driver (CI). So nothing links libcuda; the driver's
// entry points are looked up once, at first use, through the CUDA runtime
// (cudaGetDriverEntryPointByVersion), each at the ABI version its typedef in
// cudaTypedefs.h names. Every call goes through HF_CU_CHECK:
//
//   const driver::Api& cu = driver::api();
//   HF_CU_CHECK(cu.cuModuleLoadData(&module, image));
//
// Adding an entry point is one line in HOSTFUSE_DRIVER_FUNCTIONS.
//
// This header depends on the CUDA toolkit only (no torch headers).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <hostfuse/utils/exceptions.h>

// (name, version): the member `name` has the type PFN_<name>_v<version>.
#define HOSTFUSE_DRIVER_FUNCTIONS(X)                   \
  X(cuGetErrorName, 6000)                              \
  X(cuGetErrorString, 6000)                            \
  X(cuInit, 2000)                                      \
  X(cuDeviceGet, 2000)                                 \
  X(cuDeviceGetAttribute, 2000)                        \
  X(cuDevicePrimaryCtxRetain, 7000)                    \
  X(cuCtxGetCurrent, 4000)                             \
  X(cuCtxPushCurrent, 4000)                            \
  X(cuCtxPopCurrent, 4000)                             \
  X(cuModuleLoadData, 2000)                            \
  X(cuModuleGetFunction, 2000)                         \
  X(cuModuleUnload, 2000)                              \
  X(cuFuncGetAttribute, 2020)                          \
  X(cuOccupancyMaxActiveBlocksPerMultiprocessor, 6050) \
  X(cuLaunchKernel, 4000)                              \
  X(cuMemGetAllocationGranularity, 10020)              \
  X(cuMemCreate, 10020)                                \
  X(cuMemRelease, 10020)                               \
  X(cuMemAddressReserve, 10020)                        \
  X(cuMemAddressFree, 10020)                           \
  X(cuMemMap, 10020)                                   \
  X(cuMemUnmap, 10020)                                 \
  X(cuMemSetAccess, 10020)                             \
  X(cuMemExportToShareableHandle, 10020)               \
  X(cuMemImportFromShareableHandle, 10020)             \
  X(cuTensorMapEncodeTiled, 12000)

namespace hostfuse::driver {

// The driver's entry points. A member is null only when the installed
// driver lacks that function; api() checks the ones hostfuse cannot do
// without.
struct Api {
#define HF_DRIVER_API_MEMBER_(name, version) \
  PFN_##name##_v##version name = nullptr;
  HOSTFUSE_DRIVER_FUNCTIONS(HF_DRIVER_API_MEMBER_)
#undef HF_DRIVER_API_MEMBER_
};

// The entry points, loaded and cuInit-ed on the first call. Throws
// hostfuse::Error naming the cause when no usable driver is installed (as on
// machines without a GPU); a later call tries again.
const Api& api();

// "CUDA_ERROR_INVALID_VALUE (invalid argument)" for a driver status.
std::string errorString(CUresult status);

// driver::name(args...) calls the entry point `name` of api(), and throws
// naming it when the installed driver lacks it:
//   HF_CU_CHECK(driver::cuMemCreate(&handle, bytes, &prop, 0));
#define HF_DRIVER_CALL_(name, version)                                     \
  template <typename... Args>                                              \
  CUresult name(Args... args) {                                            \
    const Api& cu = api();                                                 \
    HF_CHECK(cu.name != nullptr, "the installed CUDA driver has no " #name \
                                 "; hostfuse needs a newer driver");       \
    return cu.name(args...);                                               \
  }
HOSTFUSE_DRIVER_FUNCTIONS(HF_DRIVER_CALL_)
#undef HF_DRIVER_CALL_

// Makes the primary context of `device` current on this thread for the
// guard's lifetime. The CUDA runtime, and with it libtorch and its caching
// allocator, works in the primary context, so module loads and launches
// made under this guard see the same memory. Costs one thread-local query
// when that context is current already, the usual case.
class PrimaryContextGuard {
 public:
  explicit PrimaryContextGuard(int device);
  ~PrimaryContextGuard();
  PrimaryContextGuard(const PrimaryContextGuard&) = delete;
  PrimaryContextGuard& operator=(const PrimaryContextGuard&) = delete;

 private:
  bool pushed_ = false;
};

}  // namespace hostfuse::driver

#define HF_CU_CHECK(call)                                    \
  do {                                                       \
    const CUresult hf_status_ = (call);                      \
    if (hf_status_ != CUDA_SUCCESS) {                        \
      HF_THROW("CUDA driver call failed: ", #call, ": ",     \
               ::hostfuse::driver::errorString(hf_status_)); \
    }                                                        \
  } while (false)
