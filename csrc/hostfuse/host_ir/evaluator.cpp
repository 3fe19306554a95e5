#include <hostfuse/host_ir/evaluator.h>

#include <ATen/ATen.h>

#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/kernel/executor.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/evaluator.h>
#include <hostfuse/multidevice/moe/masking.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

namespace {

// "cuda" means the current CUDA device; make it explicit so devices compare.
at::Device withIndex(at::Device device) {
  if (device.is_cuda() && !device.has_index()) {
    HF_CHECK(cuda::isAvailable(),
             "the program is set to run on CUDA, but no CUDA device is "
             "available");
    return at::Device(at::kCUDA, cuda::currentDevice());
  }
  return device;
}

}  // namespace

HostIrEvaluator::HostIrEvaluator(std::unique_ptr<HostIrContainer> program,
                                 HostIrEvaluatorParams params)
    : program_(std::move(program)), params_(params) {
  HF_CHECK(program_ != nullptr, "HostIrEvaluator: the program is null");
}

HostIrEvaluator::~HostIrEvaluator() = default;

std::vector<at::Tensor> HostIrEvaluator::run(
    const std::vector<c10::IValue>& inputs) {
  values_.clear();
  std::vector<at::Tensor> outputs;
  const std::vector<Expr*>& exprs = program_->topLevelExprs();
  size_t next = 0;       // the expression running or next to run
  bool running = false;  // whether exprs[next] started
  try {
    bindInputs(*program_, inputs, values_);
    checkDevices(inputs);
    for (; next < exprs.size(); ++next) {
      running = true;
      if (observer_) {
        observer_(exprs[next]);
      }
      dispatch(exprs[next]);
      running = false;
    }
    if (observer_) {
      observer_(nullptr);
    }
    outputs = collectOutputs(*program_, values_);
  } catch (...) {
    // A failed run keeps no intermediates alive (they may belong to an
    // aborted CUDA graph capture's memory pool).
    values_.clear();
    tellPeersOfFailure(next, running);
    throw;
  }
  // Intermediate values are dropped so that their memory goes back to the
  // allocator between runs.
  values_.clear();
  return outputs;
}

void HostIrEvaluator::tellPeersOfFailure(size_t failed_at,
                                         bool inside) noexcept {
  const std::vector<Expr*>& exprs = program_->topLevelExprs();
  auto backendOf = [](const Expr* expr) -> std::optional<MoeBackend> {
    if (const auto* d = dynamic_cast<const MoeDispatch*>(expr)) {
      return d->backend();
    }
    if (const auto* c = dynamic_cast<const MoeCombine*>(expr)) {
      return c->backend();
    }
    return std::nullopt;
  };
  // A MoE node that failed has told its peers, or they failed with it.
  if (inside && backendOf(exprs[failed_at]).has_value()) {
    return;
  }
  for (size_t i = inside ? failed_at + 1 : failed_at; i < exprs.size(); ++i) {
    if (const std::optional<MoeBackend> backend = backendOf(exprs[i])) {
      try {
        if (communicator().size() > 1) {
          moe().publishFailure(*backend, device_);
        }
      } catch (...) {
        // No communicator: no peers to tell.
      }
      return;
    }
  }
}

void HostIrEvaluator::checkStatus() {
  if (moe_ != nullptr) {
    moe_->checkStatus();
  }
  for (const std::function<void()>& checker : status_checkers_) {
    checker();
  }
}

void HostIrEvaluator::resetCommunicator(Communicator* communicator) {
  // The runtimes hold the old communicator's state (the cuda backend's
  // workspaces); destroying them talks to no peer.
  moe_.reset();
  params_.communicator = communicator;
}

std::vector<int64_t> HostIrEvaluator::maskedRanks() {
  return moe().maskedRanks();
}

void HostIrEvaluator::addStatusChecker(std::function<void()> checker) {
  HF_CHECK(checker != nullptr, "addStatusChecker: the checker is empty");
  status_checkers_.push_back(std::move(checker));
}

void HostIrEvaluator::checkDevices(const std::vector<c10::IValue>& inputs) {
  std::optional<size_t> first_tensor;
  if (params_.device.has_value()) {
    device_ = withIndex(*params_.device);
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor()) {
      continue;
    }
    const at::Device device = inputs[i].toTensor().device();
    if (!params_.device.has_value() && !first_tensor.has_value()) {
      first_tensor = i;
      device_ = device;
      continue;
    }
    HF_CHECK(
        device == device_, program_->describeInput(i), " is on ", device.str(),
        " but the program runs on ", device_.str(),
        first_tensor.has_value()
            ? " (the device of " + program_->describeInput(*first_tensor) + ")"
            : std::string(" (set in HostIrEvaluatorParams)"));
  }
}

void HostIrEvaluator::handle(RunFusion* run_fusion) {
  std::vector<at::Tensor> outputs;
  try {
    // The generated kernel for CUDA inputs, the ATen reference otherwise.
    const TensorView* counts = run_fusion->rowCounts();
    outputs = executeFusion(
        run_fusion->fusion(), values_.get(run_fusion->fusionInputs()),
        counts != nullptr ? values_.get(counts).toTensor() : at::Tensor());
  } catch (const Error& e) {
    HF_THROW("while running ", run_fusion->toInlineString(), ": ", e.what());
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    values_.bind(run_fusion->output(i), outputs[i]);
  }
}

void HostIrEvaluator::handle(Allocate* allocate) {
  std::vector<int64_t> sizes;
  for (const Val* extent : allocate->inputs()) {
    sizes.push_back(values_.get(extent).toInt());
  }
  values_.bind(
      allocate->out(),
      at::empty(sizes, at::TensorOptions()
                           .dtype(toScalarType(allocate->out()->dtype()))
                           .device(device_)));
}

void HostIrEvaluator::handle(MoeDispatch* dispatch) {
  moe().run(*dispatch, values_);
}

void HostIrEvaluator::handle(MoeCombine* combine) {
  moe().run(*combine, values_);
}

MoeEvaluator& HostIrEvaluator::moe() {
  if (moe_ == nullptr) {
    moe_ = std::make_unique<MoeEvaluator>(
        communicator(), maskFailedRanks(params_.mask_failed_ranks));
  }
  return *moe_;
}

Communicator& HostIrEvaluator::communicator() const {
  return params_.communicator != nullptr ? *params_.communicator
                                         : Communicator::getInstance();
}

void HostIrEvaluator::handleDefault(Expr* expr) { evaluateExpr(expr, values_); }

}  // namespace hostfuse
