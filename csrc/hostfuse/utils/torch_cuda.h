// The one place where hostfuse touches libtorch's CUDA part (device queries,
// the current stream, CUDA graphs and their memory pools). Everything else asks
// through these functions, so the rest of the code base and every .cu file
// depends on the CUDA toolkit only.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <utility>

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

// (major, minor) compute capability of `device`; cached per device.
std::pair<int, int> computeCapability(int device);

// Number of SMs of `device`; cached per device.
int multiprocessorCount(int device);

// True while the current stream of `device` is being captured into a CUDA
// graph: work queued now is recorded, not run, so nothing may wait for it.
bool isCapturing(int device);

// Blocks the host until all work queued on `device` is done.
void synchronize(int device);

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
  // Which CUDA calls capture forbids (cudaStreamCaptureMode): Global forbids
  // unsafe calls (synchronizing ones) on every thread while this capture
  // runs; ThreadLocal only on the capturing thread, so that other threads
  // (NCCL's watchdog, a data loader) may go on; Relaxed forbids none.
  enum class CaptureMode { Global, ThreadLocal, Relaxed };

  CudaGraph();
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  // Starts capturing the current stream (not the default stream) of the
  // current device, with a private memory pool for the allocations made
  // during the capture.
  void captureBegin(CaptureMode mode = CaptureMode::Global);
  void captureEnd();
  // Ends a capture that failed midway and discards what was captured, so
  // that the stream and the caching allocator work as before it began. Best
  // effort and never throws; the graph cannot be used afterwards (make a
  // new one). Memory allocated during the capture is released once no
  // tensor holds it.
  void abortCapture() noexcept;
  // Launches the graph on the current stream.
  void replay();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hostfuse::cuda
