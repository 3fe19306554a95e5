#include "utils/torch_cuda.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace hostfuse::cuda {

bool isAvailable() {
  return at::hasCUDA() && c10::cuda::device_count() > 0;
}

int deviceCount() {
  return isAvailable() ? c10::cuda::device_count() : 0;
}

int currentDevice() {
  return c10::cuda::current_device();
}

cudaStream_t currentStream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device))
      .stream();
}

struct StreamScope::Impl {
  c10::cuda::CUDAStream previous;
  c10::cuda::CUDAStream stream;
};

StreamScope::StreamScope(int device) {
  const auto index = static_cast<c10::DeviceIndex>(device);
  impl_ = std::make_unique<Impl>(
      Impl{c10::cuda::getCurrentCUDAStream(index),
           c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index)});
  c10::cuda::setCurrentCUDAStream(impl_->stream);
}

StreamScope::~StreamScope() {
  c10::cuda::setCurrentCUDAStream(impl_->previous);
}

cudaStream_t StreamScope::stream() const { return impl_->stream.stream(); }

struct CudaGraph::Impl {
  at::cuda::CUDAGraph graph;
};

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}

CudaGraph::~CudaGraph() = default;

void CudaGraph::captureBegin() { impl_->graph.capture_begin(); }

void CudaGraph::captureEnd() { impl_->graph.capture_end(); }

void CudaGraph::replay() { impl_->graph.replay(); }

}  // namespace hostfuse::cuda
