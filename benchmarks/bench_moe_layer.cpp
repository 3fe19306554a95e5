// Benchmark of a whole MoE layer (host_ir/moe_layer.h): router (fp32
// linear, softmax, top-k), MoeDispatch, grouped GEMMs for gate and up, the
// silu(gate) * up fusion, the down grouped GEMM, MoeCombine. Three ways, in
// one run, for every T:
//   eager-collective  HostIrEvaluator, MoeBackend::Collective (NCCL; counts
//                     go through the host)
//   eager-cuda        the GraphRunner's evaluator, MoeBackend::Cuda
//   graph replay      GraphRunner::run, MoeBackend::Cuda: the layer as one
//                     CUDA graph (inputs copied in: x; the router and expert
//                     weights are persistent inputs)
// Default shape: T = 128 and 4096 tokens per rank, H = 7168, I = 2048
// (intermediate size of an expert), 8 experts per rank, K = 8, bf16.
//
//   tools/launch.sh 4 build/bench_moe_layer [--tokens 128,4096] [--hidden H]
//       [--intermediate I] [--experts-per-rank L] [--topk K] [--steps N]
//       [--blocks B]
//
// Reported: the median over B blocks of the mean time per step of N
// back-to-back steps (each block starts after a barrier; the time of a
// block is its slowest rank's), and the ratios to eager-collective. The
// cuda backend's capacity is the worst case R * T * min(K, L) rows, so the
// activation fusion runs over that many rows (see docs/cuda_graphs.md).
// Without one GPU per rank it says so and exits 0. --help lists the flags.
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/utils/torch_cuda.h>
#include "../examples/cli_flags.h"

namespace {

using namespace hostfuse;

struct Args {
  std::vector<int64_t> tokens = {128, 4096};
  int64_t hidden = 7168;
  int64_t intermediate = 2048;
  int64_t local_experts = 8;
  int64_t topk = 0;  // 0: 8, at most the number of experts
  int steps = 0;     // 0: 20 for T <= 1024, else 5
  int blocks = 7;
};

cli::Flags makeFlags(Args& args) {
  cli::Flags flags(
      "bench_moe_layer",
      "Benchmark of a whole MoE layer (router, MoeDispatch, grouped GEMMs, "
      "silu(gate) * up, MoeCombine) in bf16, three ways for every T: "
      "eager-collective (HostIrEvaluator, the collective backend over NCCL), "
      "eager-cuda (the cuda backend), graph replay (the cuda backend as one "
      "CUDA graph). Reports the median over B blocks of the mean time per "
      "step of N back-to-back steps, the slowest rank's. Needs one GPU per "
      "rank; without, it says so and exits 0.\n"
      "\n"
      "  tools/launch.sh N build/bench_moe_layer [flags]");
  flags.integerList("--tokens", "T1,T2,...", &args.tokens, 1, cli::kMaxCount,
                    "tokens per rank, one table row each");
  flags.integer("--hidden", "H", &args.hidden, 1, cli::kMaxCount,
                "hidden size");
  flags.integer("--intermediate", "I", &args.intermediate, 1, cli::kMaxCount,
                "intermediate size of an expert");
  flags.integer("--experts-per-rank", "L", &args.local_experts, 1,
                cli::kMaxCount, "experts on each rank");
  flags.integer("--topk", "K", &args.topk, 1, cli::kMaxCount,
                "experts each token goes to; at most the number of experts, "
                "L x ranks",
                "8, at most L x ranks");
  flags.integer("--steps", "N", &args.steps, 1, cli::kMaxCount,
                "back-to-back steps per timed block",
                "20 for T <= 1024, else 5");
  flags.integer("--blocks", "B", &args.blocks, 1, cli::kMaxCount,
                "timed blocks; the median is reported");
  return flags;
}

// Every rank's value, over Gloo (CPU); also a barrier.
std::vector<double> allGather(Communicator& comm, double value) {
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < comm.size(); ++r) {
    outputs[0].push_back(at::empty({1}, at::kDouble));
  }
  std::vector<at::Tensor> inputs = {at::full({1}, value, at::kDouble)};
  comm.backend(c10::DeviceType::CPU).allgather(outputs, inputs)->wait();
  std::vector<double> values;
  for (const at::Tensor& v : outputs[0]) {
    values.push_back(v.item<double>());
  }
  return values;
}

double slowest(Communicator& comm, double value) {
  const std::vector<double> all = allGather(comm, value);
  return *std::max_element(all.begin(), all.end());
}

// Median over `blocks` of the mean microseconds per step of `steps`
// back-to-back steps, each block's time being its slowest rank's.
double timeSteps(Communicator& comm, int device, int steps, int blocks,
                 const std::function<void()>& step) {
  for (int i = 0; i < 3; ++i) {
    step();
  }
  std::vector<double> per_block;
  for (int block = 0; block < blocks; ++block) {
    cuda::synchronize(device);
    allGather(comm, 0.0);  // start together
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) {
      step();
    }
    cuda::synchronize(device);
    const double us = std::chrono::duration<double, std::micro>(
                          std::chrono::steady_clock::now() - start)
                          .count();
    per_block.push_back(slowest(comm, us / steps));
  }
  std::sort(per_block.begin(), per_block.end());
  return per_block[per_block.size() / 2];
}

std::string formatTime(double us) {
  char text[32];
  if (us < 0) {
    return "n/a";
  }
  std::snprintf(text, sizeof(text), "%.1f us", us);
  return text;
}

std::string formatRatio(double numerator, double denominator) {
  char text[32];
  if (numerator < 0 || denominator <= 0) {
    return "n/a";
  }
  std::snprintf(text, sizeof(text), "%.2fx", numerator / denominator);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  cli::Flags flags = makeFlags(args);
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  Communicator& comm = Communicator::getInstance();
  const int64_t rank = comm.rank();
  const int64_t num_experts = args.local_experts * comm.size();
  if (args.topk > num_experts) {
    comm.shutdown();
    return flags.fail(
        cli::topkExceedsExperts(args.topk, args.local_experts, comm.size()));
  }
  if (!cuda::isAvailable() || comm.localSize() > cuda::deviceCount()) {
    if (rank == 0) {
      std::cout << "bench_moe_layer: needs one GPU per rank (" << comm.size()
                << " ranks, " << cuda::deviceCount()
                << " GPUs visible); nothing to measure\n";
    }
    comm.shutdown();
    return 0;
  }
  const at::Device device = comm.device();
  const int index = device.index();

  MoeLayerConfig config;
  config.hidden = args.hidden;
  config.intermediate = args.intermediate;
  config.local_experts = args.local_experts;
  config.num_experts = num_experts;
  config.topk = args.topk > 0 ? args.topk : std::min<int64_t>(8, num_experts);
  config.dtype = DataType::BFloat16;
  MoeLayerConfig collective_config = config;
  collective_config.backend = MoeBackend::Collective;
  config.backend = MoeBackend::Cuda;

  struct Row {
    int64_t tokens = 0;
    double collective = -1, eager = -1, replay = -1, difference = -1;
    std::string note;
  };
  std::vector<Row> rows;
  try {
    // Weights made on the GPU: the router the same on every rank, the
    // experts this rank's.
    const auto options = at::TensorOptions().device(device);
    const int64_t H = config.hidden;
    const int64_t I = config.intermediate;
    const int64_t L = config.local_experts;
    at::manual_seed(7);
    const at::Tensor router_w =
        at::randn({config.num_experts, H}, options).to(at::kBFloat16);
    at::manual_seed(1000 + static_cast<uint64_t>(rank));
    auto expert = [&](std::vector<int64_t> sizes) {
      return (at::randn(sizes, options) / std::sqrt(double(sizes[1])))
          .to(at::kBFloat16);
    };
    const at::Tensor w_gate = expert({L, H, I});
    const at::Tensor w_up = expert({L, H, I});
    const at::Tensor w_down = expert({L, I, H});
    HostIrEvaluator collective(makeMoeLayerProgram(collective_config));

    for (const int64_t tokens : args.tokens) {
      Row row;
      row.tokens = tokens;
      const int steps = args.steps > 0 ? args.steps : (tokens <= 1024 ? 20 : 5);
      const at::Tensor x = at::randn({tokens, H}, options).to(at::kBFloat16);
      const std::vector<c10::IValue> inputs = {x, router_w, w_gate, w_up,
                                               w_down};
      const at::Tensor reference = collective.run(inputs)[0];
      row.collective = timeSteps(comm, index, steps, args.blocks,
                                 [&] { collective.run(inputs); });

      // A runner per T: its MoE workspaces are sized for this T.
      GraphRunnerOptions runner_options;
      runner_options.persistent_inputs = {1, 2, 3, 4};
      GraphRunner runner(makeMoeLayerProgram(config), {}, runner_options);
      bool have_cuda = true;
      try {
        runner.run(inputs);  // eager: workspaces (a rendezvous), cuBLAS
      } catch (const std::exception& error) {
        // Every rank fails here alike (a host-side check), so all go on.
        have_cuda = false;
        row.note = std::string("cuda backend: ") + error.what();
      }
      if (have_cuda) {
        runner.run(inputs);  // capture
        row.eager = timeSteps(comm, index, steps, args.blocks,
                              [&] { runner.evaluator().run(inputs); });
        row.replay = timeSteps(comm, index, steps, args.blocks,
                               [&] { runner.run(inputs); });
        runner.checkStatus();
        const at::Tensor out = runner.run(inputs)[0].to(at::kFloat);
        const double scale =
            reference.to(at::kFloat).abs().max().item<double>();
        row.difference = slowest(
            comm, (out - reference.to(at::kFloat)).abs().max().item<double>() /
                      std::max(scale, 1e-30));
      }
      // No rank frees its workspace while a peer may still use it.
      cuda::synchronize(index);
      allGather(comm, 0.0);
      rows.push_back(row);
    }
  } catch (const std::exception& error) {
    std::cerr << "bench_moe_layer failed on rank " << rank << ": "
              << error.what() << "\n";
    return 1;
  }

  if (rank == 0) {
    cudaDeviceProp properties{};
    cudaGetDeviceProperties(&properties, index);
    std::printf(
        "MoE layer: %lld ranks (%s), H = %lld, I = %lld, E = %lld (%lld per "
        "rank), K = %lld, bf16 (router in fp32)\n"
        "time per step: median over %d blocks of back-to-back steps, slowest "
        "rank\n\n",
        static_cast<long long>(comm.size()), properties.name,
        static_cast<long long>(config.hidden),
        static_cast<long long>(config.intermediate),
        static_cast<long long>(config.num_experts),
        static_cast<long long>(config.local_experts),
        static_cast<long long>(config.topk), args.blocks);
    std::printf("%6s  %16s  %12s  %12s  %18s  %16s  %10s\n", "T",
                "eager-collective", "eager-cuda", "graph replay",
                "collective/replay", "eager-cuda/replay", "max diff");
    for (const Row& row : rows) {
      char difference[32] = "n/a";
      if (row.difference >= 0) {
        std::snprintf(difference, sizeof(difference), "%.2e", row.difference);
      }
      std::printf("%6lld  %16s  %12s  %12s  %18s  %16s  %10s\n",
                  static_cast<long long>(row.tokens),
                  formatTime(row.collective).c_str(),
                  formatTime(row.eager).c_str(), formatTime(row.replay).c_str(),
                  formatRatio(row.collective, row.replay).c_str(),
                  formatRatio(row.eager, row.replay).c_str(), difference);
      if (!row.note.empty()) {
        std::printf("        (%s)\n", row.note.c_str());
      }
    }
    std::printf(
        "\nmax diff: max |replay - eager-collective| / max |eager-collective| "
        "of the layer's output (rounding: bf16, another GEMM tiling)\n");
  }
  comm.shutdown();
  return 0;
}
