#include <hostfuse/utils/torch_cuda.h>

#include <ATen/Context.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>

#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse::cuda {

bool isAvailable() { return at::hasCUDA() && c10::cuda::device_count() > 0; }

int deviceCount() { return isAvailable() ? c10::cuda::device_count() : 0; }

int currentDevice() { return c10::cuda::current_device(); }

cudaStream_t currentStream(int device) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device))
      .stream();
}

namespace {

// cudaDeviceGetAttribute, cached per device and attribute (they do not
// change while the process runs).
int deviceAttribute(int device, cudaDeviceAttr attribute) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaDeviceAttr>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({device, attribute});
  if (it == cache.end()) {
    int value = 0;
    HF_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
    it = cache.emplace(std::make_pair(device, attribute), value).first;
  }
  return it->second;
}

}  // namespace

std::pair<int, int> computeCapability(int device) {
  return {deviceAttribute(device, cudaDevAttrComputeCapabilityMajor),
          deviceAttribute(device, cudaDevAttrComputeCapabilityMinor)};
}

int multiprocessorCount(int device) {
  return deviceAttribute(device, cudaDevAttrMultiProcessorCount);
}

bool isCapturing(int device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  HF_CUDA_CHECK(cudaStreamIsCapturing(currentStream(device), &status));
  return status != cudaStreamCaptureStatusNone;
}

void synchronize(int device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  c10::cuda::device_synchronize();
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

// at::cuda::CUDAGraph, plus an abort of a failed capture, which needs the
// capture's stream, device and pool (protected members).
struct CudaGraph::Impl : at::cuda::CUDAGraph {
  bool capturing = false;

  void abort() noexcept {
    if (capture_ended_) {
      // capture_end() got past cudaStreamEndCapture; reset() (run by the
      // destructor) releases the pool as after any capture.
      return;
    }
    // Each step on its own: a failed one must not skip the others.
    cudaGraph_t partial = nullptr;
    if (cudaStreamEndCapture(capture_stream_.stream(), &partial) ==
            cudaSuccess &&
        partial != nullptr) {
      cudaGraphDestroy(partial);
    }
    // An invalidated capture leaves its error as the thread's last error.
    (void)cudaGetLastError();
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(capture_dev_,
                                                         mempool_id_);
    } catch (...) {
    }
    try {
      c10::cuda::CUDACachingAllocator::releasePool(capture_dev_, mempool_id_);
    } catch (...) {
    }
    try {
      at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(mempool_id_);
    } catch (...) {
    }
    try {
      at::getHostAllocator(at::kCUDA)->release_pool(mempool_id_);
    } catch (...) {
    }
  }
};

CudaGraph::CudaGraph() : impl_(std::make_unique<Impl>()) {}

CudaGraph::~CudaGraph() {
  if (impl_ != nullptr && impl_->capturing) {
    impl_->abort();
  }
}

void CudaGraph::captureBegin(CaptureMode mode) {
  cudaStreamCaptureMode cuda_mode = cudaStreamCaptureModeGlobal;
  if (mode == CaptureMode::ThreadLocal) {
    cuda_mode = cudaStreamCaptureModeThreadLocal;
  } else if (mode == CaptureMode::Relaxed) {
    cuda_mode = cudaStreamCaptureModeRelaxed;
  }
  impl_->capture_begin(/*pool=*/{0, 0}, cuda_mode);
  impl_->capturing = true;
}

void CudaGraph::captureEnd() {
  impl_->capture_end();
  impl_->capturing = false;
}

void CudaGraph::abortCapture() noexcept {
  if (impl_->capturing) {
    impl_->capturing = false;
    impl_->abort();
  }
}

void CudaGraph::replay() { impl_->replay(); }

}  // namespace hostfuse::cuda
