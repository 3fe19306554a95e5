// Compiling generated CUDA C with NVRTC.
//
// On a GPU the target is the device's own architecture (sm_90 on H100 and
// H200) and NVRTC emits machine code (CUBIN). Without a GPU, as in CI, the
// same source compiles to PTX for compute_90, which checks it fully.
#pragma once

#include <string>

namespace hostfuse {

struct CompileTarget {
  // Compute capability, major * 10 + minor: 90 for sm_90.
  int arch = 90;
  // Machine code for sm_<arch>; false: PTX for compute_<arch>, which the
  // driver compiles when it loads it.
  bool cubin = true;

  // "sm_90" or "compute_90".
  std::string toString() const;
};

// The target for a device of compute capability major.minor: its own
// architecture as machine code when NVRTC knows it, otherwise PTX for the
// newest architecture NVRTC knows below it.
CompileTarget compileTargetFor(int major, int minor);

struct CompiledBinary {
  CompileTarget target;
  // CUBIN or PTX; a std::string keeps it NUL-terminated, as the driver
  // wants PTX.
  std::string image;
  // NVRTC's log of a successful compile (warnings); usually empty.
  std::string log;
};

// Compiles `source` with NVRTC. When it does not compile, throws
// hostfuse::Error with NVRTC's log and the source with line numbers.
CompiledBinary compileCudaSource(const std::string& source,
                                 const CompileTarget& target);

// `source` with a line number in front of every line.
std::string numberedSource(const std::string& source);

}  // namespace hostfuse
