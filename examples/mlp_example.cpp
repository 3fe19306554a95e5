// A host program built with the IR API and run by the HostIrEvaluator:
// RMSNorm (a Fusion run by a RunFusion node), then a gated MLP (linear,
// silu, mul, linear) with a residual add, then the sum of each row.
// The result is checked against the same computation written directly in
// ATen. Runs on the GPU when one is present, else on the CPU.
//
//   mlp_example [--tokens N] [--cpu]   (--help lists the flags)

#include <ATen/ATen.h>

#include <iostream>
#include <memory>
#include <optional>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/utils/torch_cuda.h>
#include "cli_flags.h"

namespace {

using namespace hostfuse;

constexpr int64_t kHidden = 256;
constexpr int64_t kIntermediate = 512;
constexpr double kEpsilon = 1e-6;

// y = x * rsqrt(mean(x^2) + eps) * weight, along the last dim.
std::shared_ptr<Fusion> makeRmsNorm() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* x = makeTensor({kSymbolic, kHidden}, DataType::Float, "x");
  TensorView* weight = makeTensor({kHidden}, DataType::Float, "weight");
  fusion->addInput(x);
  fusion->addInput(weight);
  TensorView* mean_square =
      div(sum(mul(x, x), 1, /*keep_dim=*/true), double(kHidden));
  TensorView* normalized = mul(x, rsqrt(add(mean_square, kEpsilon)));
  fusion->addOutput(mul(normalized, broadcast(weight, {true, false})));
  return fusion;
}

std::unique_ptr<HostIrContainer> makeProgram() {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, kHidden}, DataType::Float, "x");
  TensorView* norm_weight = makeTensor({kHidden}, DataType::Float, "norm_w");
  TensorView* w_gate =
      makeTensor({kIntermediate, kHidden}, DataType::Float, "w_gate");
  TensorView* w_up =
      makeTensor({kIntermediate, kHidden}, DataType::Float, "w_up");
  TensorView* w_down =
      makeTensor({kHidden, kIntermediate}, DataType::Float, "w_down");
  for (TensorView* input : {x, norm_weight, w_gate, w_up, w_down}) {
    program->addInput(input);
  }

  TensorView* h = runFusion(makeRmsNorm(), {x, norm_weight}).at(0);
  TensorView* gate = silu(linear(h, w_gate));
  TensorView* up = linear(h, w_up);
  TensorView* down = linear(mul(gate, up), w_down);
  TensorView* y = add(x, down);
  program->addOutput(y);
  program->addOutput(sum(y, 1));
  return program;
}

double maxAbsDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 1000;
  bool force_cpu = false;
  cli::Flags flags(
      "mlp_example",
      "A host program built with the IR API and run by the HostIrEvaluator: "
      "RMSNorm (a Fusion), a gated MLP (H = 256, I = 512) with a residual "
      "add, then the sum of each row; checked against the same computation "
      "in ATen. Runs on the GPU when there is one, else on the CPU.");
  flags.integer("--tokens", "N", &tokens, 1, cli::kMaxCount,
                "rows of the input x [N, 256]");
  flags.option("--cpu", &force_cpu, "run on the CPU even with a GPU");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  const at::Device device = !force_cpu && cuda::isAvailable()
                                ? at::Device(at::kCUDA, 0)
                                : at::Device(at::kCPU);

  try {
    std::unique_ptr<HostIrContainer> program = makeProgram();
    std::cout << "program:\n" << program->toString() << "\n";

    at::manual_seed(2026);
    const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
    const at::Tensor x = at::randn({tokens, kHidden}, options);
    const at::Tensor norm_w = 1.0 + 0.1 * at::randn({kHidden}, options);
    const at::Tensor w_gate = at::randn({kIntermediate, kHidden}, options) /
                              std::sqrt(double(kHidden));
    const at::Tensor w_up = at::randn({kIntermediate, kHidden}, options) /
                            std::sqrt(double(kHidden));
    const at::Tensor w_down = at::randn({kHidden, kIntermediate}, options) /
                              std::sqrt(double(kIntermediate));

    HostIrEvaluator evaluator(std::move(program));
    const std::vector<at::Tensor> outputs =
        evaluator.run({x, norm_w, w_gate, w_up, w_down});

    // The same computation, written directly in ATen.
    const at::Tensor h =
        x * at::rsqrt(x.pow(2).mean(1, /*keepdim=*/true) + kEpsilon) * norm_w;
    const at::Tensor y =
        x + at::linear(at::silu(at::linear(h, w_gate)) * at::linear(h, w_up),
                       w_down);
    const at::Tensor row_sums = y.sum(1);

    const double error_y = maxAbsDifference(outputs[0], y);
    const double error_sums = maxAbsDifference(outputs[1], row_sums);
    const double tolerance = 1e-3;
    std::cout << "device: " << device.str() << ", tokens: " << tokens
              << ", hidden: " << kHidden << "\n"
              << "output y: " << outputs[0].sizes()
              << ", row sums: " << outputs[1].sizes() << "\n"
              << "first row sums:";
    const at::Tensor first = outputs[1].slice(0, 0, 4).cpu();
    for (int64_t i = 0; i < first.size(0); ++i) {
      std::cout << " " << first[i].item<float>();
    }
    std::cout << "\n"
              << "max |y - ATen| = " << error_y
              << ", max |row sums - ATen| = " << error_sums << " (tolerance "
              << tolerance << ")\n";
    const bool ok = error_y <= tolerance && error_sums <= tolerance;
    std::cout << "check against ATen: " << (ok ? "OK" : "FAILED") << "\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "mlp_example failed: " << e.what() << "\n";
    return 1;
  }
}
