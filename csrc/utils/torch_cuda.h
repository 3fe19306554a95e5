// The one place where hostfuse touches libtorch's CUDA part (device queries,
// the current stream). Everything else asks through these functions, so the
// rest of the code base and every .cu file depends on the CUDA toolkit only.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>

namespace hostfuse::cuda {

// True when libtorch was built with CUDA and at least one device is visible.
// False on machines without a GPU, where the CUDA libraries still load.
bool isAvailable();

// Number of visible CUDA devices; 0 when isAvailable() is false.
int deviceCount();

// The current CUDA device of this thread.
int currentDevice();

// libtorch's current stream on `device`, the stream every hostfuse launch
// and copy is ordered on.
cudaStream_t currentStream(int device);

// Makes a stream from libtorch's pool the current stream of `device` while
// alive, and restores the previous one. CUDA graphs are captured on such a
// stream (capture on the default stream is not allowed).
class StreamScope {
 public:
  explicit StreamScope(int device);
  ~StreamScope();
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;
  cudaStream_t stream() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A CUDA graph captured from the current stream, with libtorch's caching
// allocator in capture mode (allocations during the capture come from the
// graph's private pool and stay valid for its replays).
class CudaGraph {
 public:
  CudaGraph();
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  void captureBegin();
  void captureEnd();
  // Launches the graph on the current stream.
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hostfuse::cuda
