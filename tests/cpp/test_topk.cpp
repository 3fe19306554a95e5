// Tests of the TopKOp expression: building, validation, printing, cloning,
// and its ATen semantics when a host program runs it.
#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/ir/ops.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

class TopK : public testing::Test {
 protected:
  TopK() : program_(std::make_unique<HostIrContainer>()) {}

  std::unique_ptr<HostIrContainer> program_;
  FusionGuard guard_{program_.get()};
};

TEST_F(TopK, GivesValuesAndI64IndicesWithKInTheLastDim) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* scores = makeTensor({tokens, 8}, DataType::Float, "scores");
  const TopKResult top = topk(scores, 3);
  EXPECT_EQ(top.values->typeString(), "f32[tokens, 3]");
  EXPECT_EQ(top.indices->typeString(), "i64[tokens, 3]");
  const auto* node = top.values->definition()->as<TopKOp>();
  EXPECT_EQ(node, top.indices->definition());
  EXPECT_EQ(node->k(), 3);
  EXPECT_EQ(node->x(), scores);
  EXPECT_EQ(node->toString(), "(T1, T2) = topk(T0, k=3)\n");
}

TEST_F(TopK, RejectsBadOperandsAndK) {
  TensorView* scores = makeTensor({4, 8}, DataType::Float, "scores");
  test::expectErrorContains([&] { topk(scores, 0); },
                            {"topk: k must be >= 1, got 0"});
  test::expectErrorContains(
      [&] { topk(scores, 9); },
      {"k = 9 exceeds the size 8 of the last dim of T0 'scores'"});
  test::expectErrorContains(
      [&] {
        topk(makeTensor({4, 8}, DataType::Bool, "mask"), 2);
      },
      {"topk: operand", "'mask'", "must not be bool"});
  test::expectErrorContains(
      [&] {
        IrBuilder::create<TopKOp>(makeTensor({4, 2}, DataType::Float),
                                  makeTensor({4, 2}, DataType::Int32), scores,
                                  2);
      },
      {"topk: indices", "must be i64, got i32"});
  test::expectErrorContains(
      [&] {
        IrBuilder::create<TopKOp>(makeTensor({4, 3}, DataType::Float),
                                  makeTensor({4, 3}, DataType::Int64), scores,
                                  2);
      },
      {"must be k = 2"});
}

TEST_F(TopK, ClonedProgramPrintsTheSame) {
  TensorView* scores = makeSymbolicTensor(2, DataType::Float, "scores");
  program_->addInput(scores);
  const TopKResult top = topk(scores, 2);
  program_->addOutput(top.values);
  program_->addOutput(top.indices);
  const std::unique_ptr<HostIrContainer> copy = program_->clone();
  EXPECT_EQ(copy->toString(), program_->toString());
  EXPECT_NE(program_->toString().find("(T1, T2) = topk(T0, k=2)"),
            std::string::npos)
      << program_->toString();
}

TEST_F(TopK, KLargerThanTheRuntimeSizeNamesTheOperand) {
  TensorView* scores = makeSymbolicTensor(2, DataType::Float, "scores");
  program_->addInput(scores);
  program_->addOutput(topk(scores, 4).values);
  HostIrEvaluator evaluator(std::move(program_));
  test::expectErrorContains(
      [&] {
        evaluator.run({test::randomTensor({5, 3}, at::kFloat, at::kCPU, 1)});
      },
      {"k = 4 exceeds the size 3", "'scores'"});
}

class TopKOnDevice : public testing::TestWithParam<at::Device> {};

TEST_P(TopKOnDevice, MatchesATenExactly) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(3, DataType::BFloat16, "x");
    program->addInput(x);
    // A router: softmax scores in fp32, then the top 4.
    const TopKResult top = topk(softmax(cast(x, DataType::Float), -1), 4);
    program->addOutput(top.values);
    program->addOutput(top.indices);
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor x =
      test::randomTensor({3, 10, 16}, at::kBFloat16, device, 7);
  const std::vector<at::Tensor> out = evaluator.run({x});
  const auto [values, indices] =
      at::topk(at::softmax(x.to(at::kFloat), -1), 4, -1);
  test::expectClose(out[0], values, 1e-6, 1e-7);
  // Indices of the same top-4 scores: compare the scores they pick.
  test::expectClose(at::softmax(x.to(at::kFloat), -1).gather(-1, out[1]),
                    values, 1e-6, 1e-7);
  EXPECT_EQ(out[1].scalar_type(), at::kLong);
  EXPECT_EQ(out[1].device(), device);
}

INSTANTIATE_TEST_SUITE_P(Devices, TopKOnDevice,
                         testing::ValuesIn(test::testDevices()),
                         test::deviceName);

}  // namespace
}  // namespace hostfuse
