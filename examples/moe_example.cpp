// A Mixture-of-Experts layer with expert parallelism: a host program built
// with the IR API and run by the HostIrEvaluator on every rank. MoeDispatch
// sends each token to the ranks of its top-k experts, a grouped matmul
// applies each local expert's weights to its rows, and MoeCombine brings the
// results back and sums them with the router's weights. Every rank checks
// its output against a reference computed from all ranks' expert weights
// (all-gathered). One rank per GPU with CUDA tensors and NCCL where there
// are GPUs, else CPU tensors and Gloo.
//
//   tools/launch.sh N build/moe_example [--tokens T] [--topk K]
//                                        [--experts-per-rank L] [--cpu]
//
// Run directly, it is a world of one rank. --help lists the flags.

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include "cli_flags.h"

namespace {

using namespace hostfuse;

constexpr int64_t kHidden = 64;
constexpr double kTolerance = 1e-3;

std::unique_ptr<HostIrContainer> makeProgram(int64_t topk,
                                             int64_t local_experts,
                                             int64_t num_experts) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, kHidden}, DataType::Float, "x");
  TensorView* topk_idx =
      makeTensor({tokens, topk}, DataType::Int64, "topk_idx");
  TensorView* topk_weights =
      makeTensor({tokens, topk}, DataType::Float, "topk_weights");
  TensorView* expert_w = makeTensor({local_experts, kHidden, kHidden},
                                    DataType::Float, "expert_w");
  for (TensorView* input : {x, topk_idx, topk_weights, expert_w}) {
    program->addInput(input);
  }
  const MoeDispatchResult d =
      moeDispatch(x, topk_idx, topk_weights, num_experts);
  TensorView* y = relu(groupedMatmul(d.recv_x, expert_w, d.recv_expert_counts));
  program->addOutput(moeCombine(y, d, topk_weights, tokens));
  program->addOutput(d.recv_expert_counts);
  program->addOutput(d.n_tokens_to_rank);
  return program;
}

// Every rank's `tensor` (all of one shape), in rank order.
std::vector<at::Tensor> allGather(Communicator& comm,
                                  const at::Tensor& tensor) {
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < comm.size(); ++r) {
    outputs[0].push_back(at::empty_like(tensor));
  }
  std::vector<at::Tensor> inputs = {tensor};
  comm.backend(tensor.device().type()).allgather(outputs, inputs)->wait();
  return outputs[0];
}

std::string toList(const at::Tensor& values) {
  std::ostringstream ss;
  const at::Tensor cpu = values.cpu();
  ss << "[";
  for (int64_t i = 0; i < cpu.numel(); ++i) {
    ss << (i == 0 ? "" : ", ") << cpu[i].item<int64_t>();
  }
  ss << "]";
  return ss.str();
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 48;
  int64_t topk = 2;
  int64_t local_experts = 2;
  bool force_cpu = false;
  cli::Flags flags(
      "moe_example",
      "A Mixture-of-Experts layer with expert parallelism, a host program "
      "run by the HostIrEvaluator on every rank: MoeDispatch, a grouped "
      "matmul per local expert (hidden size 64), MoeCombine. Every rank checks "
      "its output against a reference from all ranks' expert weights. One rank "
      "per GPU over NCCL where there are GPUs, else CPU ranks over Gloo; run "
      "directly, a world of one rank.\n"
      "\n"
      "  tools/launch.sh N build/moe_example [flags]");
  flags.integer("--tokens", "T", &tokens, 1, cli::kMaxCount,
                "tokens on rank 0; rank r has T + 8r");
  flags.integer("--topk", "K", &topk, 1, cli::kMaxCount,
                "experts each token goes to; at most the number of experts, "
                "L x ranks");
  flags.integer("--experts-per-rank", "L", &local_experts, 1, cli::kMaxCount,
                "experts on each rank");
  flags.option("--cpu", &force_cpu, "CPU tensors and Gloo even with GPUs");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }

  Communicator& comm = Communicator::getInstance();
  const int64_t rank = comm.rank();
  const int64_t num_experts = local_experts * comm.size();
  const at::Device device = force_cpu ? at::Device(at::kCPU) : comm.device();
  if (topk > num_experts) {
    comm.shutdown();
    return flags.fail(
        cli::topkExceedsExperts(topk, local_experts, comm.size()));
  }
  bool ok = false;
  try {
    std::unique_ptr<HostIrContainer> program =
        makeProgram(topk, local_experts, num_experts);
    if (rank == 0) {
      std::cout << "program (on each of " << comm.size() << " ranks):\n"
                << program->toString() << "\n";
    }

    // This rank's tokens, router and local experts; a token count that
    // differs between ranks shows that nothing assumes equal shares.
    at::manual_seed(2026 + static_cast<uint64_t>(rank));
    const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
    const int64_t my_tokens = tokens + 8 * rank;
    const at::Tensor x = at::randn({my_tokens, kHidden}, options);
    const at::Tensor router = at::randn({kHidden, num_experts}, options);
    const auto [top_scores, topk_idx] =
        at::topk(at::softmax(at::matmul(x, router), 1), topk, 1);
    const at::Tensor topk_weights =
        top_scores / top_scores.sum(1, /*keepdim=*/true);
    const at::Tensor expert_w =
        at::randn({local_experts, kHidden, kHidden}, options) /
        std::sqrt(double(kHidden));

    HostIrEvaluator evaluator(std::move(program));
    const std::vector<at::Tensor> outputs =
        evaluator.run({x, topk_idx, topk_weights, expert_w});

    // Reference: every expert's weights from every rank, then plain ATen.
    const at::Tensor all_w = at::cat(allGather(comm, expert_w));
    at::Tensor expected = at::zeros({my_tokens, kHidden}, options);
    for (int64_t k = 0; k < topk; ++k) {
      const at::Tensor w_of_pick = all_w.index_select(0, topk_idx.select(1, k));
      const at::Tensor y =
          at::relu(at::bmm(x.unsqueeze(1), w_of_pick).squeeze(1));
      expected += topk_weights.select(1, k).unsqueeze(1) * y;
    }
    const double error = (outputs[0] - expected).abs().max().item<double>();
    std::cout << "rank " << rank << " on " << device.str() << ": " << my_tokens
              << " tokens, rows sent to each rank " << toList(outputs[2])
              << ", rows per local expert " << toList(outputs[1])
              << ", max |combined - reference| = " << error << "\n";

    const std::vector<at::Tensor> errors =
        allGather(comm, at::full({1}, error, options.dtype(at::kDouble)));
    double worst = 0;
    for (const at::Tensor& e : errors) {
      worst = std::max(worst, e.item<double>());
    }
    ok = worst <= kTolerance;
    if (rank == 0) {
      std::cout << "check: " << (ok ? "OK" : "FAILED") << " (max error "
                << worst << " over " << comm.size() << " ranks, tolerance "
                << kTolerance << ")\n";
    }
    comm.shutdown();
  } catch (const std::exception& e) {
    std::cerr << "moe_example failed on rank " << rank << ": " << e.what()
              << "\n";
    return 1;
  }
  return ok ? 0 : 1;
}
