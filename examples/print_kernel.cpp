// Prints the CUDA source hostfuse generates for an example fusion, and
// checks that NVRTC compiles it (to PTX for compute_90, so no GPU is
// needed).
//
//   build/print_kernel [rmsnorm | silu | swiglu]
#include <cstdio>
#include <optional>
#include <string>

#include <hostfuse/ir/ops.h>
#include <hostfuse/kernel/codegen.h>
#include <hostfuse/kernel/compile.h>
#include "cli_flags.h"

namespace hostfuse {
namespace {

// y = x * rsqrt(mean(x^2) + eps) * w in bf16, with the per-row rsqrt as a
// second output.
void buildRmsNorm(Fusion& fusion) {
  FusionGuard guard(&fusion);
  TensorView* x = makeSymbolicTensor(2, DataType::BFloat16, "x");
  TensorView* w = makeTensor({x->extent(1)}, DataType::BFloat16, "w");
  Scalar* eps = makeSymbolicScalar(DataType::Double, "eps");
  fusion.addInput(x);
  fusion.addInput(w);
  fusion.addInput(eps);
  TensorView* xf = cast(x, DataType::Float);
  TensorView* mean_square = div(sum(mul(xf, xf), 1, true), x->extent(1));
  TensorView* rstd = rsqrt(add(mean_square, eps));
  TensorView* wf = broadcast(cast(w, DataType::Float), {true, false});
  TensorView* normalized = mul(mul(xf, rstd), wf);
  fusion.addOutput(cast(normalized, DataType::BFloat16));
  fusion.addOutput(rstd);
}

void buildSiluChain(Fusion& fusion) {
  FusionGuard guard(&fusion);
  TensorView* a = makeSymbolicTensor(1, DataType::BFloat16, "a");
  TensorView* b = makeTensor({a->extent(0)}, DataType::BFloat16, "b");
  TensorView* c = makeTensor({a->extent(0)}, DataType::BFloat16, "c");
  fusion.addInput(a);
  fusion.addInput(b);
  fusion.addInput(c);
  TensorView* gated = mul(silu(a), b);
  fusion.addOutput(add(gated, c));
}

// The MoE layer's activation, silu(gate) * up in fp32 rounded once to
// bf16, where gate and up are the two halves of one [rows, 2 I] GEMM
// output: views whose rows are 2 I elements apart.
void buildSwiGlu(Fusion& fusion) {
  FusionGuard guard(&fusion);
  TensorView* gate = makeSymbolicTensor(2, DataType::BFloat16, "gate");
  TensorView* up =
      makeTensor({gate->extent(0), gate->extent(1)}, DataType::BFloat16, "up");
  fusion.addInput(gate);
  fusion.addInput(up);
  TensorView* act =
      mul(silu(cast(gate, DataType::Float)), cast(up, DataType::Float));
  fusion.addOutput(cast(act, DataType::BFloat16));
}

// `which`: "rmsnorm", "silu" or "swiglu".
int run(const std::string& which) {
  Fusion fusion;
  InputSignature signature;
  signature.index32 = true;
  if (which == "rmsnorm") {
    buildRmsNorm(fusion);
  } else if (which == "swiglu") {
    buildSwiGlu(fusion);
    signature.pitched_rows = true;
    signature.vector_width = 8;
  } else {
    buildSiluChain(fusion);
    signature.contiguous = true;
    signature.vector_width = 8;
  }
  const std::string source = generateCudaSource(fusion, signature);
  std::fputs(source.c_str(), stdout);
  compileCudaSource(source, CompileTarget{90, /*cubin=*/false});
  return 0;
}

}  // namespace
}  // namespace hostfuse

int main(int argc, char** argv) {
  std::string which = "rmsnorm";
  hostfuse::cli::Flags flags(
      "print_kernel",
      "Prints the CUDA source hostfuse generates for an example fusion and "
      "checks that NVRTC compiles it (to PTX for compute_90: no GPU "
      "needed).");
  flags.positionalChoice(
      "FUSION", &which, {"rmsnorm", "silu", "swiglu"},
      "rmsnorm: RMSNorm in bf16 with the per-row rsqrt as a second output; "
      "silu: silu(a) * b + c in bf16 (contiguous); swiglu: silu(gate) * up "
      "in bf16 on the two halves of one wider tensor (pitched rows)");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  try {
    return hostfuse::run(which);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "print_kernel failed: %s\n", e.what());
    return 1;
  }
}
