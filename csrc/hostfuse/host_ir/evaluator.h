// HostIrEvaluator: runs a host program.
//
//   HostIrEvaluator evaluator(std::move(program));
//   std::vector<at::Tensor> outputs = evaluator.run({x, w});
//
// run() binds the inputs by position and checks each against the program
// (count, tensor or scalar, dtype, rank, sizes, device), with an error that
// names the input; then runs each top-level expression through its handle()
// overload and returns the outputs.
#pragma once

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/ir/dispatch.h>
#include <hostfuse/ir/evaluation.h>

namespace hostfuse {

class Communicator;
class MoeEvaluator;

struct HostIrEvaluatorParams {
  // The device every tensor input must be on and allocations go to. When
  // unset, the device of the first tensor input is used.
  std::optional<at::Device> device;
  // What MoeDispatch/MoeCombine communicate through; when null,
  // Communicator::getInstance(). Not owned.
  Communicator* communicator = nullptr;
  // After Communicator::recover(): keep the first world's expert placement
  // and treat the experts of the ranks that did not survive as masked (a
  // pick of one acts as -1) instead of spreading the experts over the
  // survivors (docs/moe.md, "Rank masking"). Unset:
  // HOSTFUSE_MOE_MASK_FAILED_RANKS (default off).
  std::optional<bool> mask_failed_ranks;
};

class HostIrEvaluator : public ExprVisitor {
 public:
  explicit HostIrEvaluator(std::unique_ptr<HostIrContainer> program,
                           HostIrEvaluatorParams params = {});
  ~HostIrEvaluator() override;

  std::vector<at::Tensor> run(const std::vector<c10::IValue>& inputs);

  const HostIrContainer& program() const { return *program_; }
  // The device of the last run.
  const at::Device& device() const { return device_; }

  // Raises the errors that device-side runtimes recorded without
  // synchronizing with the host, e.g. those of the cuda MoE workspaces
  // during CUDA graph replays (in eager runs they raise at once): checks the
  // MoE runtime's workspaces, then calls every checker registered with
  // addStatusChecker(), in order. It may wait for the device; it must not
  // run during a capture.
  void checkStatus();
  // Registers a further checker for checkStatus(), for runtimes other than
  // the MoE one that keep device-side status; it must stay valid as long as
  // this evaluator.
  void addStatusChecker(std::function<void()> checker);

  // Runs later MoE nodes over `communicator` (null: the process-wide one,
  // Communicator::getInstance() at the next MoE node) and drops every MoE
  // runtime of the old one, with the cuda backend's workspaces, without
  // talking to any peer: after Communicator::recover() (docs/moe.md, "When
  // a rank fails"). Not owned, like HostIrEvaluatorParams::communicator.
  void resetCommunicator(Communicator* communicator);

  // The ranks of the first world (before any recover()) whose experts the
  // MoE nodes treat as masked: those that did not survive, when
  // mask_failed_ranks is on; else none. Ascending.
  std::vector<int64_t> maskedRanks();

  // Called on the host before each top-level expression of a run with that
  // expression, and once with nullptr after the last one; empty (no call)
  // by default. For timing a program's stages: CUDA events recorded here on
  // the current stream mark the stage boundaries, also inside a
  // GraphRunner's capture (as event nodes of the graph, with
  // cudaEventRecordExternal). It must not change the program's values.
  using ExprObserver = std::function<void(const Expr* next)>;
  void setExprObserver(ExprObserver observer) {
    observer_ = std::move(observer);
  }

 protected:
  void handle(RunFusion* run_fusion) override;
  void handle(Allocate* allocate) override;
  void handle(MoeDispatch* dispatch) override;
  void handle(MoeCombine* combine) override;
  // Every other expression runs with its ATen reference semantics.
  void handleDefault(Expr* expr) override;

  ValueMap& values() { return values_; }

 private:
  // Decides the device of this run and checks that every tensor input is on
  // it.
  void checkDevices(const std::vector<c10::IValue>& inputs);
  // The run failed inside top-level expression `failed_at` (`inside`), or
  // before it started. If that is not a MoE node and a MoE node follows,
  // the peers will wait for this rank in that node's call: its backend
  // tells them (MoeEvaluator::publishFailure). Never throws.
  void tellPeersOfFailure(size_t failed_at, bool inside) noexcept;
  Communicator& communicator() const;
  // Runs the MoE nodes; holds the cuda backend's per-node workspaces across
  // runs. Created on first use.
  MoeEvaluator& moe();

  std::unique_ptr<HostIrContainer> program_;
  HostIrEvaluatorParams params_;
  at::Device device_ = at::kCPU;
  ValueMap values_;
  std::unique_ptr<MoeEvaluator> moe_;
  std::vector<std::function<void()>> status_checkers_;
  ExprObserver observer_;
};

}  // namespace hostfuse
