// Runs the MoeDispatch/MoeCombine nodes of a host program on the values of
// a run: what HostIrEvaluator::handle does for them. Picks the runtime of
// the node's backend:
//   collective  dispatchCollective / combineCollective (dispatch_combine.h),
//               stateless;
//   cuda        one CudaMoeWorkspace per MoeDispatch node
//               (cuda_dispatch_combine.h), created at the node's first run
//               and kept for the evaluator's lifetime, so two MoE layers
//               never share buffers and later runs need no rendezvous.
//
// The cuda backend, per node:
//   first run   every rank all-gathers (through the communicator's backend)
//               its input checks and T, K, H and dtypes; every rank raises
//               the same error if one rank's inputs are bad or the ranks
//               disagree. The workspace is then created with T_max = the
//               largest T of any rank at this run (a later run with more
//               tokens is an error), the node's capacity attribute (0: the
//               worst case R * T_max * min(K, L)), E, H, K and x's dtype,
//               and a tag unique to the node (the same on every rank, since
//               every rank creates its workspaces in the same order).
//   every run   dispatch launches one kernel (no host synchronization
//               besides the eager status check after it); outputs have C
//               rows, recv_x is a view of the workspace's receive buffer
//               valid until the node's next dispatch. The combine of the
//               node (found through its layout inputs, MoeCombine::dispatch)
//               uses the same workspace and its latest dispatch.
// Errors the kernels find (bad expert ids, a pick twice, capacity overflow)
// reach every rank, and the next run works. Errors found on the host after
// the first run (a wrong shape, T above T_max) are raised on that rank only;
// its peers' kernels then time out (HOSTFUSE_MOE_TIMEOUT_S) and the
// workspace becomes unusable.
#pragma once

#include <map>
#include <memory>

#include "ir/evaluation.h"
#include "multidevice/communicator.h"
#include "multidevice/moe.h"

namespace hostfuse {

class MoeEvaluator {
 public:
  explicit MoeEvaluator(Communicator& communicator);
  ~MoeEvaluator();
  MoeEvaluator(const MoeEvaluator&) = delete;
  MoeEvaluator& operator=(const MoeEvaluator&) = delete;

  // Reads the inputs of `dispatch` from `values`, runs it on every rank, and
  // binds its outputs and the symbolic extents they introduce (rows, L, R).
  void run(const MoeDispatch& dispatch, ValueMap& values);

  // Same for `combine`: binds `combined`.
  void run(const MoeCombine& combine, ValueMap& values);

  // Raises the first device-side error that a cuda-backend workspace
  // recorded without a host synchronization (during graph replays); waits
  // for the device. Must not run during a capture.
  void checkStatus();

 private:
  struct CudaNode;

  void runCuda(const MoeDispatch& dispatch, ValueMap& values);
  void runCuda(const MoeCombine& combine, ValueMap& values);

  Communicator& communicator_;
  // The cuda backend's state of each MoeDispatch node that has run.
  std::map<const MoeDispatch*, std::unique_ptr<CudaNode>> cuda_nodes_;
};

}  // namespace hostfuse
