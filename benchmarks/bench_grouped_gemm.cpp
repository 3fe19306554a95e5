// Benchmark of the MoE layer's grouped GEMMs on one GPU: GroupedMatmul
// (ir/grouped_matmul.h) next to torch's grouped GEMM, which is what a
// PyTorch user runs instead, at the layer's shapes, in one run.
//
//   build/bench_grouped_gemm [--rows-per-group 128,512,4096] [--groups 8]
//       [--hidden 7168] [--intermediate 2048] [--calls 20] [--blocks 7]
//
// For every rows-per-group R (every group gets R rows: uniform routing), three
// problems: gate and up (x [G R, H] times [G, H, 2I]), down ([G R, I] times
// [G, I, H]), and gate and up followed by silu(gate) * up. Columns:
//   torch          at::_grouped_mm on weights in torch's [G, K, N] layout
//                  (as GroupedMatmul calls it there, with its group-ends
//                  kernel); for the activation, then at::silu(gate) * up
//                  on the bf16 halves, what F.silu(gate) * up runs (two
//                  kernels, bf16 rounding after silu)
//   torch K-major  the same on weights stored K-major (as nn.Linear keeps
//                  them), HOSTFUSE_TORCH_GROUPED_GEMM=1
//   hostfuse       GroupedMatmul on the K-major weights as the layer runs
//                  it: hostfuse's sm_90a grouped GEMM on compute capability
//                  9.0 up to kOwnGroupedGemmMaxRowsPerGroup rows per group,
//                  with the activation in its epilogue; else _grouped_mm
//                  (the "ran" column says which)
// Each is one CUDA graph (GraphRunner, every input used in place); time =
// median over B blocks of the mean per call of N back-to-back replays. Every
// hostfuse output is checked against torch's (bf16 rounding apart) before
// its row is printed; a mismatch is printed and makes the exit status 1.
// Needs a GPU where GroupedMatmul has a device path (compute capability 9.x
// or 10.x); elsewhere it says so and exits 0. --help lists the flags.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/narrow.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/utils/torch_cuda.h>
#include "../examples/cli_flags.h"

namespace {

using namespace hostfuse;

struct Args {
  std::vector<int64_t> rows_per_group = {128, 512, 4096};
  int64_t groups = 8;
  int64_t hidden = 7168;
  int64_t intermediate = 2048;
  int calls = 20;
  int blocks = 7;
};

cli::Flags makeFlags(Args& args) {
  cli::Flags flags(
      "bench_grouped_gemm",
      "The MoE layer's grouped GEMMs (gate and up, down, gate and up with "
      "silu(gate) * up) on one GPU: hostfuse's GroupedMatmul next to "
      "torch's grouped GEMM on the same rows, each graph-replayed, with "
      "each output checked against torch's. Needs a GPU of compute "
      "capability 9.x or 10.x; elsewhere it says so and exits 0.\n"
      "\n"
      "  build/bench_grouped_gemm [flags]");
  flags.integerList("--rows-per-group", "R1,R2,...", &args.rows_per_group, 1,
                    1 << 20, "rows of every group, one set of rows each");
  flags.integer("--groups", "G", &args.groups, 1, 256,
                "groups (experts on the rank)");
  flags.integer("--hidden", "H", &args.hidden, 8, 1 << 16,
                "hidden size; a multiple of 8");
  flags.integer("--intermediate", "I", &args.intermediate, 8, 1 << 16,
                "intermediate size of an expert; a multiple of 8");
  flags.integer("--calls", "N", &args.calls, 1, 10000,
                "back-to-back calls per timed block");
  flags.integer("--blocks", "B", &args.blocks, 1, 1000,
                "timed blocks; the median is reported");
  return flags;
}

// Sets an environment variable for its lifetime (unset before and after).
class ScopedVariable {
 public:
  ScopedVariable(const char* name, bool set) : name_(name), set_(set) {
    if (set_) {
      setenv(name_, "1", 1);
    }
  }
  ~ScopedVariable() {
    if (set_) {
      unsetenv(name_);
    }
  }
  ScopedVariable(const ScopedVariable&) = delete;
  ScopedVariable& operator=(const ScopedVariable&) = delete;

 private:
  const char* name_;
  bool set_;
};

// A program of one GroupedMatmul: inputs x [rows, K], w [G, K, N], counts
// [G]; output the product or the activation: with `epilogue` SiluMul in
// GroupedMatmul's epilogue, with `aten_activation` as at::silu(gate) * up
// on the product's bf16 halves (program-level ops: ATen calls).
std::unique_ptr<HostIrContainer> groupedMatmulProgram(
    int64_t k, int64_t n, int64_t groups, GroupedMatmulEpilogue epilogue,
    bool aten_activation) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, k}, DataType::BFloat16, "x");
  TensorView* w = makeTensor({groups, k, n}, DataType::BFloat16, "w");
  TensorView* counts = makeTensor({groups}, DataType::Int64, "counts");
  program->addInput(x);
  program->addInput(w);
  program->addInput(counts);
  if (aten_activation) {
    TensorView* product = groupedMatmul(x, w, counts);
    program->addOutput(mul(silu(narrow(product, 1, 0, n / 2)),
                           narrow(product, 1, n / 2, n / 2)));
  } else {
    program->addOutput(groupedMatmul(x, w, counts, nullptr, epilogue));
  }
  return program;
}

struct Timed {
  double us = 0;
  at::Tensor out;  // the output of the last call
};

// The program as one CUDA graph on `inputs` (all used in place), captured
// with HOSTFUSE_TORCH_GROUPED_GEMM=1 if `torch_kernel`; microseconds per
// call (median over `blocks` of the mean of `calls` back-to-back replays).
Timed timeProgram(std::unique_ptr<HostIrContainer> program,
                  const std::vector<c10::IValue>& inputs, bool torch_kernel,
                  int device, int calls, int blocks) {
  GraphRunnerOptions options;
  options.persistent_inputs = {0, 1, 2};
  GraphRunner runner(std::move(program), {}, options);
  {
    const ScopedVariable variable("HOSTFUSE_TORCH_GROUPED_GEMM", torch_kernel);
    runner.run(inputs);  // eager
    runner.run(inputs);  // capture
  }
  std::vector<double> per_block;
  for (int block = 0; block < blocks; ++block) {
    cuda::synchronize(device);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) {
      runner.run(inputs);
    }
    cuda::synchronize(device);
    per_block.push_back(std::chrono::duration<double, std::micro>(
                            std::chrono::steady_clock::now() - start)
                            .count() /
                        calls);
  }
  runner.checkStatus();
  std::sort(per_block.begin(), per_block.end());
  return {per_block[per_block.size() / 2], runner.run(inputs).at(0).clone()};
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  cli::Flags flags = makeFlags(args);
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (args.hidden % 8 != 0 || args.intermediate % 8 != 0) {
    return flags.fail(
        "--hidden and --intermediate must be multiples of 8 (16-byte rows "
        "for the TMA loads)");
  }
  if (std::getenv("HOSTFUSE_TORCH_GROUPED_GEMM") != nullptr) {
    return flags.fail(
        "HOSTFUSE_TORCH_GROUPED_GEMM is set: unset it (the benchmark sets it "
        "for the K-major torch column only)");
  }
  const int64_t G = args.groups, H = args.hidden, I = args.intermediate;
  if (!cuda::isAvailable()) {
    std::printf("bench_grouped_gemm: no GPU; nothing to measure\n");
    return 0;
  }
  const int device = cuda::currentDevice();
  const at::Device gpu(at::kCUDA, device);
  std::string why_not;
  if (!groupedMatmulRunsOnDevice(at::kBFloat16, gpu, H, 2 * I, G, &why_not)) {
    std::printf(
        "bench_grouped_gemm: GroupedMatmul has no device path here (%s); "
        "nothing to measure\n",
        why_not.c_str());
    return 0;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, device);
  std::printf(
      "%s: %lld groups, H = %lld, I = %lld, bf16; per call, median over %d "
      "blocks of %d graph replays\n"
      "torch = at::_grouped_mm on [G, K, N] weights (then at::silu(gate) * "
      "up in bf16); K-major = the same on K-major weights; hostfuse = "
      "GroupedMatmul on K-major weights (ran: which kernel; the activation "
      "in its epilogue)\n\n",
      properties.name, static_cast<long long>(G), static_cast<long long>(H),
      static_cast<long long>(I), args.blocks, args.calls);
  std::printf("%6s  %-24s  %10s  %10s  %10s  %8s  %-14s  %8s  %7s  %s\n", "R",
              "GEMM (K x N)", "torch", "K-major", "hostfuse", "torch/hf",
              "hostfuse ran", "w GB/s", "TFLOPS", "check");
  bool all_ok = true;
  try {
    for (const int64_t rows_per_group : args.rows_per_group) {
      const int64_t rows = G * rows_per_group;
      const at::Tensor counts = at::full(
          {G}, rows_per_group, at::TensorOptions(at::kLong).device(gpu));
      struct Problem {
        const char* name;
        int64_t k, n;
        GroupedMatmulEpilogue epilogue;
      };
      const Problem problems[] = {
          {"gate and up", H, 2 * I, GroupedMatmulEpilogue::None},
          {"down", I, H, GroupedMatmulEpilogue::None},
          {"gate, up, silu(g) * u", H, 2 * I, GroupedMatmulEpilogue::SiluMul},
      };
      for (const Problem& p : problems) {
        at::manual_seed(static_cast<uint64_t>(rows_per_group * 7 + p.k));
        const auto options = at::TensorOptions().device(gpu);
        const at::Tensor x = at::randn({rows, p.k}, options).to(at::kBFloat16);
        const at::Tensor w =
            (at::randn({G, p.k, p.n}, options) / std::sqrt(double(p.k)))
                .to(at::kBFloat16);
        const at::Tensor k_major =
            w.transpose(1, 2).contiguous().transpose(1, 2);
        // The torch columns run the activation as a PyTorch user writes it.
        const bool activation = p.epilogue == GroupedMatmulEpilogue::SiluMul;
        auto time = [&](const at::Tensor& weights, bool torch_kernel) {
          return timeProgram(groupedMatmulProgram(p.k, p.n, G, p.epilogue,
                                                  activation && torch_kernel),
                             {x, weights, counts}, torch_kernel, device,
                             args.calls, args.blocks);
        };
        // [G, K, N] weights never run the own kernel: torch's either way.
        const Timed torch = time(w, true);
        const Timed torch_k_major = time(k_major, true);
        const Timed hostfuse = time(k_major, false);
        const bool own = groupedMatmulUsesOwnKernel(k_major) &&
                         rows_per_group <= kOwnGroupedGemmMaxRowsPerGroup;
        const double difference =
            (hostfuse.out.to(at::kFloat) - torch.out.to(at::kFloat))
                .abs()
                .max()
                .item<double>();
        const double scale =
            torch.out.to(at::kFloat).abs().max().item<double>();
        const bool ok = difference <= 2e-2 * std::max(scale, 1.0);
        all_ok = all_ok && ok;
        char check[64];
        std::snprintf(check, sizeof(check), ok ? "ok" : "MISMATCH (%.3g)",
                      difference);
        const std::string shape = std::string(p.name) + " (" +
                                  std::to_string(p.k) + " x " +
                                  std::to_string(p.n) + ")";
        std::printf(
            "%6lld  %-24s  %7.1f us  %7.1f us  %7.1f us  %7.2fx  %-14s  "
            "%8.0f  %7.1f  %s\n",
            static_cast<long long>(rows_per_group), shape.c_str(), torch.us,
            torch_k_major.us, hostfuse.us, torch.us / hostfuse.us,
            own ? "sm_90a kernel" : "_grouped_mm",
            double(G) * p.k * p.n * 2 / hostfuse.us / 1e3,
            2.0 * rows * p.k * p.n / hostfuse.us / 1e6, check);
        std::fflush(stdout);
      }
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_grouped_gemm failed: %s\n", error.what());
    return 1;
  }
  std::printf(
      "\ntorch/hf: torch's time over hostfuse's (above 1: hostfuse faster). "
      "w GB/s: the weights' bytes over hostfuse's time; TFLOPS: 2 R G K N "
      "over it. check: hostfuse's output against torch's, bf16 rounding "
      "apart (max |difference| <= 2%% of the largest |value|)\n");
  return all_ok ? 0 : 1;
}
