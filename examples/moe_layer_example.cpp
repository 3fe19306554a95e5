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
//       [--cpu]
// which runs tools/launch.sh N build/moe_layer_example (N = 2 on CPUs, the
// number of GPUs otherwise).
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iomanip>
#include <iostream>

#include "host_ir/graph_runner.h"
#include "host_ir/moe_layer.h"
#include "multidevice/comm/communicator.h"
#include "utils/torch_cuda.h"

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

struct Args {
  int64_t tokens = 0;
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t local_experts = 0;
  int64_t topk = 0;
  int steps = 50;
  bool force_cpu = false;
};

bool parse(int argc, char** argv, Args& args) {
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--tokens") == 0 && has_value) {
      args.tokens = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--hidden") == 0 && has_value) {
      args.hidden = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--intermediate") == 0 && has_value) {
      args.intermediate = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--experts-per-rank") == 0 && has_value) {
      args.local_experts = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--topk") == 0 && has_value) {
      args.topk = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--steps") == 0 && has_value) {
      args.steps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--cpu") == 0) {
      args.force_cpu = true;
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, args)) {
    std::cerr << "usage: " << argv[0]
              << " [--tokens T] [--hidden H] [--intermediate I]"
                 " [--experts-per-rank L] [--topk K] [--steps N] [--cpu]\n";
    return 2;
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
  config.topk = std::min(pick(args.topk, 4, 2, gpu), config.num_experts);
  config.dtype = gpu ? DataType::BFloat16 : DataType::Float;
  config.backend = gpu ? MoeBackend::Cuda : MoeBackend::Collective;
  const int64_t tokens = pick(args.tokens, 256, 32, gpu);
  const double tolerance = gpu ? 3e-2 : 1e-4;  // of the largest |output|

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
                << ", " << config.dtype << "\n"
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
    const std::vector<c10::IValue> inputs = {x, router_w, w_gate, w_up, w_down};

    std::vector<at::Tensor> outputs;
    if (gpu) {
      GraphRunnerOptions options;
      options.persistent_inputs = {1, 2, 3, 4};  // router and experts
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
