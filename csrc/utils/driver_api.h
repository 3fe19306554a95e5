// CUDA driver API entry points, loaded at run time.
//
// hostfuse never links libcuda: machines without a GPU (CI) have no
// libcuda.so.1, and the library must still load there and run the CPU tests.
// Instead every driver function hostfuse calls is listed once below and
// looked up on first use through cudart's cudaGetDriverEntryPointByVersion,
// which reaches the driver that cudart itself loaded.
//
// Use:
//   HF_CU_CHECK(driver::cuMemCreate(&handle, bytes, &prop, 0));
//
// Adding a function: one line in HF_FOR_EACH_DRIVER_ENTRY_POINT, with the
// CUDA version whose ABI the declaration in cuda.h matches (the version the
// entry point is requested at; see cudaGetDriverEntryPointByVersion).
#pragma once

#include <cuda.h>

#include "utils/exceptions.h"

// X(name, cuda_version): `name` as declared in cuda.h.
#define HF_FOR_EACH_DRIVER_ENTRY_POINT(X)  \
  X(cuGetErrorName, 12000)                 \
  X(cuGetErrorString, 12000)               \
  X(cuDeviceGet, 12000)                    \
  X(cuDeviceGetAttribute, 12000)           \
  X(cuMemGetAllocationGranularity, 12000)  \
  X(cuMemCreate, 12000)                    \
  X(cuMemRelease, 12000)                   \
  X(cuMemExportToShareableHandle, 12000)   \
  X(cuMemImportFromShareableHandle, 12000) \
  X(cuMemAddressReserve, 12000)            \
  X(cuMemAddressFree, 12000)               \
  X(cuMemMap, 12000)                       \
  X(cuMemUnmap, 12000)                     \
  X(cuMemSetAccess, 12000)

namespace hostfuse::driver {

// One function pointer per entry point, typed from its cuda.h declaration.
struct EntryPoints {
#define HF_DECLARE_ENTRY_POINT(name, version) decltype(&::name) name = nullptr;
  HF_FOR_EACH_DRIVER_ENTRY_POINT(HF_DECLARE_ENTRY_POINT)
#undef HF_DECLARE_ENTRY_POINT
};

// Loads every entry point on first use (thread safe). Throws hostfuse::Error
// naming the entry point and the reason when the driver or one of its
// functions is missing, e.g. on a machine without a GPU.
const EntryPoints& entryPoints();

// "CUDA_ERROR_X (description)" for a driver status, or the number when the
// driver cannot describe it.
std::string errorString(CUresult status);

// driver::name(args...) calls the loaded entry point.
#define HF_DEFINE_ENTRY_POINT_CALL(name, version) \
  template <typename... Args>                     \
  CUresult name(Args... args) {                   \
    return entryPoints().name(args...);           \
  }
HF_FOR_EACH_DRIVER_ENTRY_POINT(HF_DEFINE_ENTRY_POINT_CALL)
#undef HF_DEFINE_ENTRY_POINT_CALL

}  // namespace hostfuse::driver

// Checks a driver call; throws hostfuse::Error naming the call and the error.
#define HF_CU_CHECK(call)                                       \
  do {                                                          \
    const CUresult hf_cu_status_ = (call);                      \
    if (hf_cu_status_ != CUDA_SUCCESS) {                        \
      HF_THROW("CUDA driver call failed: ", #call, ": ",        \
               ::hostfuse::driver::errorString(hf_cu_status_)); \
    }                                                           \
  } while (false)
