#include <hostfuse/kernel/compile.h>

#include <algorithm>
#include <iomanip>
#include <sstream>
#include <vector>

#include <hostfuse/utils/cuda_utils.h>

namespace hostfuse {

namespace {

// Destroys an NVRTC program however compileCudaSource leaves.
class ProgramGuard {
 public:
  explicit ProgramGuard(nvrtcProgram program) : program_(program) {}
  ~ProgramGuard() { (void)nvrtcDestroyProgram(&program_); }
  ProgramGuard(const ProgramGuard&) = delete;
  ProgramGuard& operator=(const ProgramGuard&) = delete;

 private:
  nvrtcProgram program_;
};

std::string programLog(nvrtcProgram program) {
  size_t size = 0;
  HF_NVRTC_CHECK(nvrtcGetProgramLogSize(program, &size));
  std::string log(size, '\0');
  if (size > 0) {
    HF_NVRTC_CHECK(nvrtcGetProgramLog(program, log.data()));
  }
  // NVRTC counts the terminating NUL.
  while (!log.empty() && (log.back() == '\0' || log.back() == '\n')) {
    log.pop_back();
  }
  return log;
}

std::vector<int> supportedArchs() {
  int count = 0;
  HF_NVRTC_CHECK(nvrtcGetNumSupportedArchs(&count));
  std::vector<int> archs(count);
  if (count > 0) {
    HF_NVRTC_CHECK(nvrtcGetSupportedArchs(archs.data()));
  }
  std::sort(archs.begin(), archs.end());
  return archs;
}

}  // namespace

std::string CompileTarget::toString() const {
  return (cubin ? "sm_" : "compute_") + std::to_string(arch);
}

CompileTarget compileTargetFor(int major, int minor) {
  const int arch = major * 10 + minor;
  const std::vector<int> archs = supportedArchs();
  if (std::find(archs.begin(), archs.end(), arch) != archs.end()) {
    return CompileTarget{arch, /*cubin=*/true};
  }
  auto below = std::upper_bound(archs.begin(), archs.end(), arch);
  HF_CHECK(below != archs.begin(), "NVRTC cannot compile for sm_", arch,
           ": the oldest architecture it supports is sm_",
           archs.empty() ? 0 : archs.front());
  return CompileTarget{*(below - 1), /*cubin=*/false};
}

std::string numberedSource(const std::string& source) {
  std::istringstream lines(source);
  std::ostringstream numbered;
  int number = 0;
  for (std::string text; std::getline(lines, text);) {
    numbered << std::setw(4) << ++number << "  " << text << "\n";
  }
  return numbered.str();
}

CompiledBinary compileCudaSource(const std::string& source,
                                 const CompileTarget& target) {
  nvrtcProgram program = nullptr;
  HF_NVRTC_CHECK(nvrtcCreateProgram(&program, source.c_str(),
                                    "hostfuse_fusion.cu", 0, nullptr, nullptr));
  ProgramGuard guard(program);
  const std::string arch = "--gpu-architecture=" + target.toString();
  // -lineinfo lets compute-sanitizer and ncu point at generated lines.
  const char* options[] = {"--std=c++17", arch.c_str(), "-lineinfo"};
  const nvrtcResult status = nvrtcCompileProgram(
      program, static_cast<int>(std::size(options)), options);
  CompiledBinary binary;
  binary.target = target;
  binary.log = programLog(program);
  if (status != NVRTC_SUCCESS) {
    HF_THROW("NVRTC could not compile the generated kernel for ",
             target.toString(), " (", nvrtcGetErrorString(status),
             ").\nNVRTC log:\n", binary.log, "\nGenerated source:\n",
             numberedSource(source));
  }
  size_t size = 0;
  if (target.cubin) {
    HF_NVRTC_CHECK(nvrtcGetCUBINSize(program, &size));
    binary.image.resize(size);
    HF_NVRTC_CHECK(nvrtcGetCUBIN(program, binary.image.data()));
  } else {
    HF_NVRTC_CHECK(nvrtcGetPTXSize(program, &size));
    binary.image.resize(size);
    HF_NVRTC_CHECK(nvrtcGetPTX(program, binary.image.data()));
  }
  return binary;
}

}  // namespace hostfuse
