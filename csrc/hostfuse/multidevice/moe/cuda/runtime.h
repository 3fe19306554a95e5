// The cuda MoE backend's runtime: one CudaMoeWorkspace (workspace.h) per
// dispatch site (MoeDispatch node), created at the site's first call and
// kept for the runtime's lifetime, so two MoE layers never share buffers
// and later calls need no rendezvous.
//
//   first call  every rank all-gathers (through the communicator's backend)
//               its input checks and T, K, H and dtypes; every rank raises
//               the same error if one rank's inputs are bad or the ranks
//               disagree. The workspace is then created with T_max = the
//               largest T of any rank at this call (a later call with more
//               tokens is an error), the site's capacity (0: the worst case
//               R x T_max x min(K, L)), E, H, K and x's dtype, and a tag
//               unique to the site (the same on every rank, since every rank
//               creates its workspaces in the same order).
//   every call  the inputs are checked on the host with the checks both
//               backends share (input_checks.h), then dispatch launches one
//               kernel (no host synchronization besides the eager status
//               check after it); outputs have C rows, recv_x is a view of
//               the workspace's receive buffer valid until the site's next
//               dispatch. A combine uses the workspace and the latest
//               dispatch of its dispatch site.
// Errors the kernels find (bad expert ids, a pick twice, capacity overflow)
// reach every rank, and the next call works. An error found on one rank's
// host after the first call (a wrong shape, T above T_max), a timeout, or an
// error of the program around the MoE nodes (publishFailure) is published
// to the peers through their symmetric `failure` word: their kernels stop
// at once and raise naming that rank (a rank whose call did not wait for
// it, at its next call), and the site's workspace is unusable on every
// rank: the caller recreates it on every rank (a new runtime: a new
// evaluator, or hostfuse.moe.release() in Python).
#pragma once

#include <map>
#include <memory>

#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/cuda/workspace.h>
#include <hostfuse/multidevice/moe/runtime.h>

namespace hostfuse {

class CudaMoeRuntime : public MoeRuntime {
 public:
  explicit CudaMoeRuntime(Communicator& communicator);
  ~CudaMoeRuntime() override;

  MoeDispatchOutput dispatch(const MoeDispatchArgs& args) override;
  at::Tensor combine(const MoeCombineArgs& args) override;
  void checkStatus() override;
  void publishFailure(const at::Device& device) noexcept override;

 private:
  struct Site;

  // The site's workspace, created (a collective) at its first call.
  Site& siteFor(const MoeDispatchArgs& args);

  Communicator& communicator_;
  std::map<const void*, std::unique_ptr<Site>> sites_;
};

const MoeBackendInfo& cudaMoeBackendInfo();

}  // namespace hostfuse
