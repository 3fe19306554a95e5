// The collective MoE backend's runtime: stateless, eager; every call is
// dispatchCollective / combineCollective (dispatch_combine.h beside this
// file) on the communicator's backend for the tensors' device.
#pragma once

#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/runtime.h>

namespace hostfuse {

class CollectiveMoeRuntime : public MoeRuntime {
 public:
  explicit CollectiveMoeRuntime(Communicator& communicator)
      : communicator_(communicator) {}

  MoeDispatchOutput dispatch(const MoeDispatchArgs& args) override;
  at::Tensor combine(const MoeCombineArgs& args) override;
  // Every error raises during its call: nothing to check later.
  void checkStatus() override {}
  // The peers' next call raises at its table exchange
  // (publishCollectiveFailure).
  void publishFailure(const at::Device& device) noexcept override;

 private:
  Communicator& communicator_;
};

const MoeBackendInfo& collectiveMoeBackendInfo();

}  // namespace hostfuse
