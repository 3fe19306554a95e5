// Runs the MoeDispatch / MoeCombine nodes of a host program on the values
// of a run: what HostIrEvaluator::handle does for them. It reads a node's
// inputs, calls the runtime of the node's backend (runtime.h; one per
// backend, created on first use through moeBackendInfo) and binds the
// outputs and the symbolic extents they introduce (rows, L, R). Errors come
// out as "while running <node>: <message>", the same way for every backend.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include <hostfuse/ir/evaluation.h>
#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/multidevice/moe/runtime.h>

namespace hostfuse {

class MoeEvaluator {
 public:
  // With `mask_failed_ranks`, the runtimes mask the ranks that `communicator`
  // lost (masking.h; docs/moe.md, "Rank masking").
  MoeEvaluator(Communicator& communicator, bool mask_failed_ranks);
  ~MoeEvaluator();
  MoeEvaluator(const MoeEvaluator&) = delete;
  MoeEvaluator& operator=(const MoeEvaluator&) = delete;

  // Reads the inputs of `dispatch` from `values`, runs it on every rank, and
  // binds its outputs.
  void run(const MoeDispatch& dispatch, ValueMap& values);

  // Same for `combine`: binds `combined`.
  void run(const MoeCombine& combine, ValueMap& values);

  // Raises the first device-side error that a runtime recorded without a
  // host synchronization (during graph replays); waits for the device. Must
  // not run during a capture.
  void checkStatus();

  // This rank's run failed outside a MoE call, and the next MoE node its
  // peers reach runs on `backend`: its runtime tells them
  // (MoeRuntime::publishFailure). Never throws.
  void publishFailure(MoeBackend backend, const at::Device& device) noexcept;

  // The first-world ranks whose experts the MoE nodes treat as masked:
  // those the communicator lost, when masking is on; else none.
  std::vector<int64_t> maskedRanks() const;

 private:
  MoeRuntime& runtime(MoeBackend backend);

  Communicator& communicator_;
  bool mask_failed_ranks_;
  std::map<MoeBackend, std::unique_ptr<MoeRuntime>> runtimes_;
};

}  // namespace hostfuse
