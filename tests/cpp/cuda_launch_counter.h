// Counts, from the host, the CUDA work this thread starts between start()
// and stop(), with CUPTI's callback API (runtime and driver API entries):
// kernel launches of any kind (cudaLaunchKernel*, cuLaunchKernel* as used
// for NVRTC kernels, cooperative launches, host functions), graph launches
// and memory copies/sets. A test asserts that a graph replay starts no work
// outside the graph. Only tests link CUPTI; the library never does.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hostfuse::test {

class CudaLaunchCounter {
 public:
  CudaLaunchCounter();
  ~CudaLaunchCounter();
  CudaLaunchCounter(const CudaLaunchCounter&) = delete;
  CudaLaunchCounter& operator=(const CudaLaunchCounter&) = delete;

  // Whether CUPTI can count here (built with it, and it subscribes); when
  // not, `why` says why.
  static bool available(std::string* why);

  // Subscribes and starts counting the calling thread's API calls (calls of
  // other threads, e.g. NCCL's watchdog, are ignored).
  void start();
  // Stops counting and unsubscribes.
  void stop();

  // Calls that start a kernel or host function outside a graph.
  int64_t kernelLaunches() const;
  int64_t graphLaunches() const;
  int64_t memoryCopies() const;  // memcpy
  int64_t memorySets() const;    // memset
  // Every counted API call, in order: "runtime:cudaGraphLaunch", ...
  std::vector<std::string> calls() const;
  std::string callList() const;

  struct State;  // what the CUPTI callback records into

 private:
  std::unique_ptr<State> state_;
};

}  // namespace hostfuse::test
