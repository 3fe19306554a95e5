// GraphRunner: runs a host program as one CUDA graph.
//
//   GraphRunnerOptions options;
//   options.persistent_inputs = {1, 2};  // the weights: read in place
//   GraphRunner runner(std::move(program), {}, options);
//   for (...) {
//     // Valid until the next run(); copy_outputs returns clones instead.
//     std::vector<at::Tensor> out = runner.run({x, w1, w2});
//   }
//   runner.checkStatus();  // device-side errors recorded during replays
//
// Per input signature (dtype, sizes, strides and device of every tensor
// input, and the value of every scalar input, which a graph freezes):
//   call 1  checks that the program can be captured (findCaptureProblems and
//           the inputs' devices) and throws, listing every input and
//           expression in the way, before anything runs. Then runs eagerly:
//           this compiles kernels, creates MoE workspaces (a rendezvous of
//           all ranks), allocates and warms up cuBLAS, none of which may
//           happen during a capture.
//   call 2  copies the inputs into static buffers (persistent inputs are
//           used in place), captures HostIrEvaluator::run on them into a
//           CUDA graph on a side stream, with a private memory pool, and
//           replays it once for the result.
//   later   copies the new inputs into the static buffers and replays. On
//           the caller's current stream: one cudaMemcpyAsync per dense
//           input, then the graph launch, nothing else.
// docs/cuda_graphs.md explains capture, the buffers, and what can and
// cannot be captured.
//
// Not thread safe. Every rank of a multi-rank program must make the same
// sequence of calls (call 1 of a signature may be a rendezvous).
#pragma once

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/host_ir/evaluator.h>

namespace hostfuse {

namespace cuda {
class CudaGraph;
}  // namespace cuda

struct GraphRunnerOptions {
  // Return clones of the outputs (made on the caller's stream) instead of
  // the graph's static output tensors, which the next run() overwrites.
  bool copy_outputs = false;
  // Positions of tensor inputs that the graph reads in place instead of
  // copying them in on every call (weights): every later call must pass the
  // tensor passed when the graph was captured (same data pointer); change
  // its values in place. Another tensor is an error naming the input.
  std::vector<size_t> persistent_inputs;
};

// Why `program` cannot be captured in a CUDA graph when it runs on `device`:
// one entry per problem that a top-level expression declares
// (Expr::captureProblems: a host synchronization, its own or that of an
// expression of its fusion), naming the expression; empty when nothing is
// in the way. Input devices are checked by GraphRunner::run.
std::vector<std::string> findCaptureProblems(const HostIrContainer& program,
                                             const at::Device& device);

class GraphRunner {
 public:
  // How the latest run() ran.
  enum class Mode { Eager, Capture, Replay };

  explicit GraphRunner(std::unique_ptr<HostIrContainer> program,
                       HostIrEvaluatorParams params = {},
                       GraphRunnerOptions options = {});
  // Waits for the device before releasing the graphs' memory.
  ~GraphRunner();
  GraphRunner(const GraphRunner&) = delete;
  GraphRunner& operator=(const GraphRunner&) = delete;

  // Binds `inputs` by position, like HostIrEvaluator::run, and returns the
  // outputs; see the top of this file for what each call of a signature
  // does. After a capture or a replay the outputs are the graph's static
  // tensors, valid until the next run() (unless copy_outputs is set).
  std::vector<at::Tensor> run(const std::vector<c10::IValue>& inputs);

  // Waits for the device (raising an asynchronous CUDA error of the
  // replays, if any) and raises the first error that device-side runtimes
  // recorded since the last check (HostIrEvaluator::checkStatus), e.g. an
  // MoE capacity overflow during a replay. Call it after replays.
  void checkStatus();

  // The evaluator that runs the program: for eager runs of the same program
  // on the same runtimes (MoE workspaces) between replays, e.g. to compare.
  // They leave the graphs and their outputs alone, except outputs that are
  // views of runtime buffers (such as MoeDispatch's recv_x on the cuda
  // backend).
  HostIrEvaluator& evaluator() { return evaluator_; }
  const HostIrContainer& program() const { return evaluator_.program(); }
  const GraphRunnerOptions& options() const { return options_; }

  // Graphs captured so far: one per input signature seen twice.
  int64_t numGraphs() const { return num_graphs_; }
  int64_t numReplays() const { return num_replays_; }
  Mode lastMode() const { return last_mode_; }

 private:
  struct Entry;

  // Throws, listing every problem, unless the program can be captured with
  // these inputs; returns the device it runs on.
  at::Device checkCapturable(const std::vector<c10::IValue>& inputs) const;
  void capture(Entry& entry, const std::vector<c10::IValue>& inputs);
  void replay(Entry& entry, const std::vector<c10::IValue>& inputs);
  bool isPersistent(size_t input) const;
  std::vector<at::Tensor> results(const std::vector<at::Tensor>& outputs) const;

  HostIrEvaluatorParams params_;
  GraphRunnerOptions options_;
  HostIrEvaluator evaluator_;
  std::unordered_map<std::string, std::unique_ptr<Entry>> entries_;
  int64_t num_graphs_ = 0;
  int64_t num_replays_ = 0;
  Mode last_mode_ = Mode::Eager;
};

const char* toString(GraphRunner::Mode mode);

}  // namespace hostfuse
