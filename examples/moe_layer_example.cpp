// A Mixture-of-Experts layer with expert parallelism, built with the IR API
// (host_ir/moe_layer.h): router (linear, softmax, top-k) -> MoeDispatch ->
// grouped GEMMs for gate and up -> a fusion for silu(gate) * up -> grouped
// GEMM down -> MoeCombine with the router's weights.
//
//   CPU   2 ranks over Gloo, fp32, the collective MoE backend, run by the
//         HostIrEvaluator.
//   GPU   one rank per GPU, bf16, the cuda MoE backend, run by the
//         GraphRunner: the first call eagerly, then the whole layer as one
//         CUDA graph; prints the step time of eager runs and of replays.
//
// Every rank checks its routing against the router recomputed with ATen and
// its output against plain ATen token by token, with every rank's experts
// (all-gathered), and rank 0 prints "check: OK" when all ranks pass.
//
//   tools/run_example.sh moe_layer [--tokens T] [--hidden H]
//       [--intermediate I] [--experts-per-rank L] [--topk K] [--steps N]
//       [--cpu] [--fp8] [--reduce auto|per_pick|per_rank]
//       [--gate-up fused|separate] [--activation auto|fusion|epilogue]
// which runs tools/launch.sh N build/moe_layer_example (N = 2 on CPUs, the
// number of GPUs otherwise). --help lists the flags and their defaults.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <iostream>
#include <optional>
#include <string>

#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/utils/torch_cuda.h>
#include "cli_flags.h"

namespace {

using namespace hostfuse;

// Every rank's `tensor` (a CPU tensor of one shape on all ranks), in rank
// order, over Gloo. Also a barrier.
std::vector<at::Tensor> allGather(Communicator& comm,
                                  const at::Tensor& tensor) {
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < comm.size(); ++r) {
    outputs[0].push_back(at::empty_like(tensor));
  }
  std::vector<at::Tensor> inputs = {tensor.contiguous()};
  comm.backend(c10::DeviceType::CPU).allgather(outputs, inputs)->wait();
  return outputs[0];
}

double maxOverRanks(Communicator& comm, double value) {
  double most = value;
  for (const at::Tensor& v :
       allGather(comm, at::full({1}, value, at::dtype(at::kDouble)))) {
    most = std::max(most, v.item<double>());
  }
  return most;
}

// Mean microseconds per step over `steps` steps after a few warm-up steps,
// the slowest rank's.
double timeSteps(Communicator& comm, int device, int steps,
                 const std::function<void()>& step) {
  for (int i = 0; i < 3; ++i) {
    step();
  }
  cuda::synchronize(device);
  allGather(comm, at::zeros({1}));  // start together
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    step();
  }
  cuda::synchronize(device);
  const double us = std::chrono::duration<double, std::micro>(
                        std::chrono::steady_clock::now() - start)
                        .count();
  return maxOverRanks(comm, us / steps);
}

// 0: the default, which depends on the device (see main()).
struct Args {
  int64_t tokens = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t local_experts = 0;
  int64_t topk = 0;
  int steps = 50;
  bool force_cpu = false;
  bool fp8 = false;
  MoeLayerModeWords modes;
};

cli::Flags makeFlags(Args& args) {
  cli::Flags flags(
      "moe_layer_example",
      "A Mixture-of-Experts layer with expert parallelism, built with the IR "
      "API: router (linear, softmax, top-k), MoeDispatch, grouped GEMMs for "
      "gate and up, silu(gate) * up, grouped GEMM down, MoeCombine. On CPUs: "
      "fp32, the collective backend over Gloo, run by the HostIrEvaluator. "
      "On GPUs (one rank each): bf16, the cuda backend, run by the "
      "GraphRunner as one CUDA graph, with the step time of eager runs and "
      "of replays. Every rank checks its routing and output against ATen.\n"
      "\n"
      "  tools/run_example.sh moe_layer [flags]\n"
      "  tools/launch.sh N build/moe_layer_example [flags]");
  flags.integer("--tokens", "T", &args.tokens, 1, cli::kMaxCount,
                "tokens per rank", "256 on GPUs, 32 on CPUs");
  flags.integer("--hidden", "H", &args.hidden, 1, cli::kMaxCount, "hidden size",
                "1024 on GPUs, 128 on CPUs");
  flags.integer("--intermediate", "I", &args.intermediate, 1, cli::kMaxCount,
                "intermediate size of an expert", "512 on GPUs, 64 on CPUs");
  flags.integer("--experts-per-rank", "L", &args.local_experts, 1,
                cli::kMaxCount, "experts on each rank", "4 on GPUs, 2 on CPUs");
  flags.integer("--topk", "K", &args.topk, 1, cli::kMaxCount,
                "experts each token goes to; at most the number of experts, "
                "L x ranks",
                "4 on GPUs, 2 on CPUs, at most L x ranks");
  flags.integer("--steps", "N", &args.steps, 1, cli::kMaxCount,
                "timed steps, each of eager runs and of replays (GPUs)");
  flags.option("--cpu", &args.force_cpu,
               "CPU tensors, Gloo and the collective backend even with GPUs");
  flags.option("--fp8", &args.fp8,
               "dispatch the rows in fp8 e4m3 with a scale per 128 channels "
               "(needs bf16/fp32 H a multiple of 128; the check allows 6% of "
               "the largest output)");
  flags.choice("--reduce", "MODE", &args.modes.reduce,
               MoeLayerModeWords::kReduceWords,
               "the combine's mode; auto: per_rank on GPUs with more than one "
               "rank (each expert rank sums a token's picks before sending), "
               "per_pick otherwise");
  flags.choice("--gate-up", "MODE", &args.modes.gate_up,
               MoeLayerModeWords::kGateUpWords,
               "gate and up projections as one grouped matmul of [L, H, 2I] "
               "weights, given as one input (as fused MoE kernels take "
               "them), or as two");
  flags.choice("--activation", "MODE", &args.modes.activation,
               MoeLayerModeWords::kActivationWords,
               "silu(gate) * up as a fusion after the gate-and-up grouped "
               "matmul, or as its epilogue (needs --gate-up fused); auto: "
               "the epilogue on GPUs with --gate-up fused, else the fusion");
  return flags;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  cli::Flags flags = makeFlags(args);
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (const std::string problem = moeLayerModeWordsProblem(args.modes);
      !problem.empty()) {
    return flags.fail(problem);
  }
  Communicator& comm = Communicator::getInstance();
  const int64_t rank = comm.rank();
  const bool gpu = !args.force_cpu && comm.device().is_cuda();
  const at::Device device = gpu ? comm.device() : at::Device(at::kCPU);
  // Defaults: small on CPUs, a few MB of weights per expert on GPUs.
  auto pick = [](int64_t given, int64_t on_gpu, int64_t on_cpu, bool gpu) {
    return given > 0 ? given : (gpu ? on_gpu : on_cpu);
  };
  MoeLayerConfig config;
  config.hidden = pick(args.hidden, 1024, 128, gpu);
  config.intermediate = pick(args.intermediate, 512, 64, gpu);
  config.local_experts = pick(args.local_experts, 4, 2, gpu);
  config.num_experts = config.local_experts * comm.size();
  if (args.topk > config.num_experts) {
    comm.shutdown();
    return flags.fail(
        cli::topkExceedsExperts(args.topk, config.local_experts, comm.size()));
  }
  config.topk = std::min(pick(args.topk, 4, 2, gpu), config.num_experts);
  config.dtype = gpu ? DataType::BFloat16 : DataType::Float;
  config.backend = gpu ? MoeBackend::Cuda : MoeBackend::Collective;
  config.quantize =
      args.fp8 ? MoeDispatchQuant::Fp8E4M3 : MoeDispatchQuant::None;
  // The fastest modes unless the flags say otherwise.
  useMoeLayerModes(config, gpu, comm.size(), args.modes);
  const int64_t tokens = pick(args.tokens, 256, 32, gpu);
  // Of the largest |output|: bf16 rounding on GPUs, and fp8's 3 mantissa
  // bits with --fp8 (docs/moe.md, "fp8 dispatch"): up to 1/16 of a value,
  // which the sums of a few tokens do not average down (6.1% measured at
  // 1 to 3 tokens of H = 256, 4.3% from 4 tokens).
  const double tolerance = args.fp8 ? 8e-2 : gpu ? 3e-2 : 1e-4;

  bool ok = false;
  try {
    std::unique_ptr<HostIrContainer> program = makeMoeLayerProgram(config);
    if (rank == 0) {
      std::cout << "MoE layer on " << comm.size() << " ranks ("
                << (gpu ? "GPUs, cuda backend, CUDA graph"
                        : "CPUs, collective backend over Gloo")
                << "): T = " << tokens << " per rank, H = " << config.hidden
                << ", I = " << config.intermediate
                << ", E = " << config.num_experts << " ("
                << config.local_experts << " per rank), K = " << config.topk
                << ", " << config.dtype
                << "; modes: quantize=" << toString(config.quantize)
                << ", reduce=" << toString(config.reduce) << ", gate and up as "
                << (config.fused_gate_up ? "one grouped matmul" : "two")
                << ", silu(gate) * up "
                << (config.fused_activation ? "in its epilogue" : "as a fusion")
                << "\n"
                << program->toString() << "\n";
    }

    // The router is the same on every rank; the experts are this rank's.
    const at::ScalarType dtype = toScalarType(config.dtype);
    auto random = [&](at::IntArrayRef sizes, uint64_t seed, double scale) {
      at::Generator gen = at::detail::createCPUGenerator(seed);
      return (at::randn(sizes, gen, at::dtype(at::kFloat)) * scale)
          .to(dtype)
          .to(device);
    };
    const int64_t H = config.hidden;
    const int64_t I = config.intermediate;
    const int64_t L = config.local_experts;
    const uint64_t me = static_cast<uint64_t>(rank);
    const at::Tensor x = random({tokens, H}, 100 + me, 1.0);
    const at::Tensor router_w = random({config.num_experts, H}, 7, 1.0);
    const at::Tensor w_gate = random({L, H, I}, 200 + me, 1 / std::sqrt(H));
    const at::Tensor w_up = random({L, H, I}, 300 + me, 1 / std::sqrt(H));
    const at::Tensor w_down = random({L, I, H}, 400 + me, 1 / std::sqrt(I));
    std::vector<c10::IValue> inputs = {x, router_w};
    for (const at::Tensor& w :
         moeLayerExpertWeights(config, w_gate, w_up, w_down)) {
      inputs.emplace_back(w);
    }

    std::vector<at::Tensor> outputs;
    if (gpu) {
      GraphRunnerOptions options;
      options.persistent_inputs = moeLayerPersistentInputs(config);
      GraphRunner runner(std::move(program), {}, options);
      const int index = device.index();
      runner.run(inputs);  // eager: workspaces, kernels, cuBLAS
      runner.run(inputs);  // capture, and the first replay
      const double eager_us = timeSteps(
          comm, index, args.steps, [&] { runner.evaluator().run(inputs); });
      const double replay_us =
          timeSteps(comm, index, args.steps, [&] { runner.run(inputs); });
      runner.checkStatus();
      const std::vector<at::Tensor> last = runner.run(inputs);
      for (const at::Tensor& output : last) {
        outputs.push_back(output.clone());
      }
      if (rank == 0) {
        std::cout << std::fixed << std::setprecision(1)
                  << "step time (slowest rank, mean of " << args.steps
                  << " steps): eager " << eager_us << " us, CUDA graph replay "
                  << replay_us << " us (" << std::setprecision(2)
                  << eager_us / replay_us << "x)\n";
      }
    } else {
      HostIrEvaluator evaluator(std::move(program));
      outputs = evaluator.run(inputs);
    }

    // Routing against ATen's router; the layer against ATen token by token.
    const double routing_error =
        moeRoutingError(x, router_w, outputs[1], outputs[2], true);
    const at::Tensor expected = moeLayerReference(
        x, outputs[1], outputs[2], at::cat(allGather(comm, w_gate.cpu())),
        at::cat(allGather(comm, w_up.cpu())),
        at::cat(allGather(comm, w_down.cpu())));
    const double scale = expected.to(at::kFloat).abs().max().item<double>();
    const double error = (outputs[0].to(at::kFloat) - expected.to(at::kFloat))
                             .abs()
                             .max()
                             .item<double>() /
                         std::max(scale, 1e-30);
    std::cout << "rank " << rank << " on " << device.str() << ": routing error "
              << routing_error
              << ", max |out - reference| / max |reference| = " << error
              << "\n";
    const double worst = maxOverRanks(comm, std::max(error, 0.0));
    const double worst_routing = maxOverRanks(comm, routing_error);
    ok = worst <= tolerance && worst_routing <= 1e-5;
    if (rank == 0) {
      std::cout << "check: " << (ok ? "OK" : "FAILED")
                << " (largest relative error " << worst << " over "
                << comm.size() << " ranks, tolerance " << tolerance
                << "; routing error " << worst_routing << ")\n";
    }
    comm.shutdown();
  } catch (const std::exception& e) {
    std::cerr << "moe_layer_example failed on rank " << rank << ": " << e.what()
              << "\n";
    return 1;
  }
  return ok ? 0 : 1;
}
