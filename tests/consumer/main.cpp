// A host program built with hostfuse's installed headers and library: a
// small MLP-style program and a one-rank MoE dispatch and combine, both run
// by the HostIrEvaluator on CPU tensors and checked against ATen. Prints
// "consumer: ok" and exits 0 when both agree, else says what differs and
// exits 1.
#include <ATen/ATen.h>

#include <iostream>
#include <memory>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/nodes.h>

namespace {

using namespace hostfuse;

bool check(const char* what, const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() == want.sizes() && at::allclose(got, want, 1e-5, 1e-5)) {
    return true;
  }
  std::cerr << "consumer: " << what << " differs from its ATen reference: "
            << "got sizes " << got.sizes() << ", want " << want.sizes() << "\n";
  return false;
}

bool runMlp() {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({tokens, 64}, DataType::Float, "x");
    TensorView* w = makeTensor({32, 64}, DataType::Float, "w");
    program->addInput(x);
    program->addInput(w);
    TensorView* h = silu(linear(x, w));
    program->addOutput(sum(mul(h, h), 1));
  }
  std::cout << program->toString();
  at::manual_seed(7);
  const at::Tensor x = at::randn({5, 64});
  const at::Tensor w = at::randn({32, 64});
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor got = evaluator.run({x, w}).at(0);
  const at::Tensor h = at::matmul(x, w.t());
  const at::Tensor silu = h * at::sigmoid(h);
  return check("the MLP program's output", got, (silu * silu).sum(1));
}

// One rank holds every expert: dispatch sends each token to itself once per
// pick, the expert doubles its rows, and the weighted combine gives
// 2 * x * (sum of the token's weights).
bool runMoe() {
  constexpr int64_t kTokens = 6;
  constexpr int64_t kTopk = 2;
  constexpr int64_t kExperts = 4;
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({tokens, 16}, DataType::Float, "x");
    TensorView* idx = makeTensor({tokens, kTopk}, DataType::Int64, "idx");
    TensorView* weights =
        makeTensor({tokens, kTopk}, DataType::Float, "weights");
    for (TensorView* input : {x, idx, weights}) {
      program->addInput(input);
    }
    const MoeDispatchResult d = moeDispatch(x, idx, weights, kExperts);
    TensorView* y = mul(d.recv_x, 2.0);
    program->addOutput(moeCombine(y, d, weights, tokens));
  }
  std::cout << program->toString();
  at::manual_seed(11);
  const at::Tensor x = at::randn({kTokens, 16});
  // Two distinct experts per token.
  const at::Tensor first = at::randint(kExperts, {kTokens, 1}, at::kLong);
  const at::Tensor idx = at::cat({first, (first + 1) % kExperts}, 1);
  const at::Tensor weights = at::rand({kTokens, kTopk});
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor got = evaluator.run({x, idx, weights}).at(0);
  return check("the MoE program's output", got,
               2.0 * x * weights.sum(1, /*keepdim=*/true));
}

}  // namespace

int main() {
  try {
    const bool ok = runMlp() && runMoe();
    std::cout << (ok ? "consumer: ok\n" : "consumer: FAILED\n");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "consumer: " << e.what() << "\n";
    return 1;
  }
}
