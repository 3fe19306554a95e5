#include "cuda_launch_counter.h"

#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#ifdef HOSTFUSE_HAS_CUPTI
#include <cupti.h>
#endif

namespace hostfuse::test {

struct CudaLaunchCounter::State {
  std::mutex mutex;
  std::thread::id thread;
  std::vector<std::string> calls;
  bool running = false;
#ifdef HOSTFUSE_HAS_CUPTI
  CUpti_SubscriberHandle subscriber = nullptr;
#endif
};

namespace {

bool contains(const std::string& text, const char* part) {
  return text.find(part) != std::string::npos;
}

bool isGraphLaunch(const std::string& call) {
  return contains(call, "GraphLaunch");
}

// cudaLaunchKernel, cudaLaunchKernelExC, cudaLaunchCooperativeKernel,
// cudaLaunchHostFunc, cuLaunchKernel(Ex), cuLaunchCooperativeKernel,
// cuLaunchHostFunc, cuLaunch, cuLaunchGrid(Async), and _ptsz variants.
bool isKernelLaunch(const std::string& call) {
  return contains(call, "Launch") && !isGraphLaunch(call);
}

#ifdef HOSTFUSE_HAS_CUPTI
std::string resultString(CUptiResult result) {
  const char* text = nullptr;
  cuptiGetResultString(result, &text);
  return text != nullptr ? text : "unknown CUPTI error";
}

void CUPTIAPI onApiCall(void* userdata, CUpti_CallbackDomain domain,
                        CUpti_CallbackId /*id*/, const void* data) {
  auto* state = static_cast<CudaLaunchCounter::State*>(userdata);
  const auto* info = static_cast<const CUpti_CallbackData*>(data);
  if (info->callbackSite != CUPTI_API_ENTER ||
      std::this_thread::get_id() != state->thread) {
    return;
  }
  const char* prefix =
      domain == CUPTI_CB_DOMAIN_DRIVER_API ? "driver:" : "runtime:";
  std::lock_guard<std::mutex> lock(state->mutex);
  state->calls.push_back(std::string(prefix) + info->functionName);
}
#endif

}  // namespace

CudaLaunchCounter::CudaLaunchCounter() : state_(std::make_unique<State>()) {}

CudaLaunchCounter::~CudaLaunchCounter() {
  if (state_->running) {
    stop();
  }
}

bool CudaLaunchCounter::available(std::string* why) {
#ifdef HOSTFUSE_HAS_CUPTI
  CUpti_SubscriberHandle subscriber = nullptr;
  const CUptiResult result = cuptiSubscribe(
      &subscriber,
      [](void*, CUpti_CallbackDomain, CUpti_CallbackId, const void*) {},
      nullptr);
  if (result != CUPTI_SUCCESS) {
    if (why != nullptr) {
      *why = "cuptiSubscribe failed: " + resultString(result);
    }
    return false;
  }
  cuptiUnsubscribe(subscriber);
  return true;
#else
  if (why != nullptr) {
    *why = "built without CUPTI (CUDA::cupti was not found)";
  }
  return false;
#endif
}

void CudaLaunchCounter::start() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->calls.clear();
    state_->thread = std::this_thread::get_id();
  }
#ifdef HOSTFUSE_HAS_CUPTI
  CUptiResult result =
      cuptiSubscribe(&state_->subscriber, onApiCall, state_.get());
  if (result == CUPTI_SUCCESS) {
    result =
        cuptiEnableDomain(1, state_->subscriber, CUPTI_CB_DOMAIN_RUNTIME_API);
  }
  if (result == CUPTI_SUCCESS) {
    result =
        cuptiEnableDomain(1, state_->subscriber, CUPTI_CB_DOMAIN_DRIVER_API);
  }
  if (result != CUPTI_SUCCESS) {
    throw std::runtime_error("CudaLaunchCounter: CUPTI failed: " +
                             resultString(result));
  }
  state_->running = true;
#else
  throw std::runtime_error(
      "CudaLaunchCounter: built without CUPTI (CUDA::cupti was not found)");
#endif
}

void CudaLaunchCounter::stop() {
#ifdef HOSTFUSE_HAS_CUPTI
  if (state_->running) {
    cuptiUnsubscribe(state_->subscriber);
    state_->subscriber = nullptr;
    state_->running = false;
  }
#endif
}

std::vector<std::string> CudaLaunchCounter::calls() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->calls;
}

int64_t CudaLaunchCounter::kernelLaunches() const {
  int64_t count = 0;
  for (const std::string& call : calls()) {
    count += isKernelLaunch(call) ? 1 : 0;
  }
  return count;
}

int64_t CudaLaunchCounter::graphLaunches() const {
  int64_t count = 0;
  for (const std::string& call : calls()) {
    count += isGraphLaunch(call) ? 1 : 0;
  }
  return count;
}

int64_t CudaLaunchCounter::memoryCopies() const {
  int64_t count = 0;
  for (const std::string& call : calls()) {
    count += contains(call, "Memcpy") ? 1 : 0;
  }
  return count;
}

int64_t CudaLaunchCounter::memorySets() const {
  int64_t count = 0;
  for (const std::string& call : calls()) {
    count += contains(call, "Memset") ? 1 : 0;
  }
  return count;
}

std::string CudaLaunchCounter::callList() const {
  std::ostringstream ss;
  for (const std::string& call : calls()) {
    ss << "  " << call << "\n";
  }
  return ss.str();
}

}  // namespace hostfuse::test
