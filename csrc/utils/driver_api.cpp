#include "utils/driver_api.h"

#include <cuda_runtime_api.h>

namespace hostfuse::driver {

namespace {

template <typename Fn>
void load(Fn& fn, const char* name, unsigned int version) {
  void* address = nullptr;
  cudaDriverEntryPointQueryResult query = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t status = cudaGetDriverEntryPointByVersion(
      name, &address, version, cudaEnableDefault, &query);
  HF_CHECK(status == cudaSuccess, "cannot reach the CUDA driver to load ", name,
           ": ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
           "); this needs an NVIDIA driver and a visible GPU");
  HF_CHECK(query == cudaDriverEntryPointSuccess && address != nullptr,
           "the CUDA driver has no entry point ", name, " for CUDA version ",
           version, " (query result ", static_cast<int>(query),
           "); the driver is too old");
  fn = reinterpret_cast<Fn>(address);
}

EntryPoints loadAll() {
  EntryPoints points;
#define HF_LOAD_ENTRY_POINT(name, version) load(points.name, #name, version);
  HF_FOR_EACH_DRIVER_ENTRY_POINT(HF_LOAD_ENTRY_POINT)
#undef HF_LOAD_ENTRY_POINT
  return points;
}

}  // namespace

const EntryPoints& entryPoints() {
  // A failed load throws out of the initializer, so the next call retries.
  static const EntryPoints points = loadAll();
  return points;
}

std::string errorString(CUresult status) {
  const char* name = nullptr;
  const char* description = nullptr;
  try {
    const EntryPoints& points = entryPoints();
    points.cuGetErrorName(status, &name);
    points.cuGetErrorString(status, &description);
  } catch (const Error&) {
    // The driver is unreachable: fall back to the number.
  }
  return toString(name != nullptr ? name : "CUresult", " ",
                  static_cast<int>(status), " (",
                  description != nullptr ? description : "no description", ")");
}

}  // namespace hostfuse::driver
