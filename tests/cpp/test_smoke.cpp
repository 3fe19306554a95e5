#include "test_utils.h"

#include "host_ir/evaluator.h"
#include "host_ir/host_ir.h"
#include "ir/ops.h"

namespace hostfuse {

TEST(Smoke, BuildsAndEvaluates) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* w = makeTensor({8, 4}, DataType::Float, "w");
  program->addInput(x);
  program->addInput(w);
  program->addOutput(sum(silu(matmul(x, w)), 1));
  std::cout << program->toString();
  HostIrEvaluator evaluator(std::move(program));
  at::Tensor xv = test::randomTensor({5, 8}, at::kFloat, at::kCPU, 1);
  at::Tensor wv = test::randomTensor({8, 4}, at::kFloat, at::kCPU, 2);
  auto out = evaluator.run({xv, wv});
  test::expectClose(out[0], at::silu(at::matmul(xv, wv)).sum(1), 1e-6, 1e-6);
}

}  // namespace hostfuse
