#include <hostfuse/multidevice/moe/collective/runtime.h>

#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>

namespace hostfuse {

MoeDispatchOutput CollectiveMoeRuntime::dispatch(const MoeDispatchArgs& args) {
  return dispatchCollective(args.x, args.topk_idx, args.topk_weights,
                            args.num_experts, communicator_, args.quantize);
}

at::Tensor CollectiveMoeRuntime::combine(const MoeCombineArgs& args) {
  return combineCollective(args, communicator_);
}

void CollectiveMoeRuntime::publishFailure(const at::Device& device) noexcept {
  publishCollectiveFailure(communicator_, device);
}

namespace {

std::unique_ptr<MoeRuntime> createRuntime(Communicator& communicator) {
  return std::make_unique<CollectiveMoeRuntime>(communicator);
}

}  // namespace

const MoeBackendInfo& collectiveMoeBackendInfo() {
  static const MoeBackendInfo info{
      MoeBackend::Collective,
      "collective",
      "backend=collective copies the row counts to the host for the "
      "alltoall's split sizes (a device synchronization); build it with "
      "MoeBackend::Cuda to capture it",
      /*fixed_capacity=*/false,
      /*combine_needs_its_dispatch=*/false,
      createRuntime};
  return info;
}

}  // namespace hostfuse
