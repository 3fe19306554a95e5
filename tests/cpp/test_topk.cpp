// Tests of the TopKOp and TopKSoftmax expressions: building, validation,
// printing, cloning, and their ATen semantics when a host program runs
// them (TopKSoftmax's kernel on GPUs against the ATen composition), and of
// linear's fp32 output for bf16 operands (a router's logits).
#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/ir/topk_softmax.h>
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

TEST_F(TopK, TopKSoftmaxGivesF32WeightsAndI64Indices) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* logits = makeTensor({tokens, 8}, DataType::Float, "logits");
  const TopKSoftmaxResult top = topkSoftmax(logits, 3, true);
  EXPECT_EQ(top.weights->typeString(), "f32[tokens, 3]");
  EXPECT_EQ(top.indices->typeString(), "i64[tokens, 3]");
  const auto* node = top.weights->definition()->as<TopKSoftmax>();
  EXPECT_EQ(node, top.indices->definition());
  EXPECT_EQ(node->k(), 3);
  EXPECT_TRUE(node->renormalize());
  EXPECT_EQ(node->toString(),
            "(T1, T2) = topk_softmax(T0, k=3, renormalize=true)\n");
}

TEST_F(TopK, TopKSoftmaxRejectsBadLogitsAndK) {
  TensorView* logits = makeTensor({4, 8}, DataType::Float, "logits");
  test::expectErrorContains([&] { topkSoftmax(logits, 0, true); },
                            {"topk_softmax: k must be >= 1, got 0"});
  test::expectErrorContains([&] { topkSoftmax(logits, 9, false); },
                            {"k = 9 exceeds the 8 columns of T0 'logits'"});
  test::expectErrorContains(
      [&] {
        topkSoftmax(makeTensor({4, 8}, DataType::BFloat16, "half"), 2, true);
      },
      {"logits", "'half'", "f32"});
  test::expectErrorContains(
      [&] { topkSoftmax(makeTensor({4}, DataType::Float, "flat"), 2, true); },
      {"topkSoftmax: logits", "'flat'", "must have rank 2"});
}

TEST_F(TopK, LinearReturnsF32OnlyForBf16OrF16Operands) {
  TensorView* x = makeTensor({4, 16}, DataType::BFloat16, "x");
  TensorView* w = makeTensor({8, 16}, DataType::BFloat16, "w");
  TensorView* logits = linear(x, w, nullptr, DataType::Float);
  EXPECT_EQ(logits->typeString(), "f32[4, 8]");
  EXPECT_TRUE(logits->definition()->as<LinearOp>()->accumulatesToFloat());
  EXPECT_FALSE(
      linear(x, w)->definition()->as<LinearOp>()->accumulatesToFloat());
  TensorView* xf = makeTensor({4, 16}, DataType::Float, "xf");
  TensorView* wf = makeTensor({8, 16}, DataType::Float, "wf");
  test::expectErrorContains(
      [&] { linear(xf, wf, nullptr, DataType::BFloat16); },
      {"linear: out_dtype bf16 with operands of f32",
       "f32 for bf16 or f16 operands"});
}

class TopKSoftmaxOnDevice : public testing::TestWithParam<at::Device> {};

// The op against the ATen composition it stands for, on random logits
// (no ties) of several widths, including the kernel's limit of 256 columns
// and one past it (the ATen path on GPUs).
TEST_P(TopKSoftmaxOnDevice, MatchesTheATenComposition) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  for (const int64_t experts : {1, 8, 33, 256, 257}) {
    for (const bool renormalize : {true, false}) {
      const int64_t k = std::min<int64_t>(experts, 8);
      SCOPED_TRACE("E = " + std::to_string(experts) +
                   ", K = " + std::to_string(k) + ", renormalize " +
                   std::to_string(renormalize));
      auto program = std::make_unique<HostIrContainer>();
      {
        FusionGuard guard(program.get());
        TensorView* logits = makeSymbolicTensor(2, DataType::Float, "logits");
        program->addInput(logits);
        const TopKSoftmaxResult top = topkSoftmax(logits, k, renormalize);
        program->addOutput(top.weights);
        program->addOutput(top.indices);
      }
      HostIrEvaluator evaluator(std::move(program));
      const at::Tensor logits =
          test::randomTensor({37, experts}, at::kFloat, device, 11 + experts) *
          3;
      const std::vector<at::Tensor> out = evaluator.run({logits});
      const at::Tensor probabilities = at::softmax(logits, -1);
      auto [weights, indices] = at::topk(probabilities, k, -1);
      if (renormalize) {
        weights = weights / weights.sum(-1, /*keepdim=*/true);
      }
      EXPECT_EQ(out[1].scalar_type(), at::kLong);
      EXPECT_EQ(out[0].device(), device);
      EXPECT_TRUE(at::equal(out[1], indices)) << out[1] << indices;
      test::expectClose(out[0], weights, 1e-6, 1e-7);
    }
  }
}

// bf16 operands with an f32 output: the same sums as the fp32 linear of
// the operands cast to f32 (exact products; only the order of the sums may
// differ on GPUs).
TEST_P(TopKSoftmaxOnDevice, LinearWithF32OutputMatchesTheCastOperands) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(2, DataType::BFloat16, "x");
    TensorView* w = makeSymbolicTensor(2, DataType::BFloat16, "w");
    program->addInput(x);
    program->addInput(w);
    program->addOutput(linear(x, w, nullptr, DataType::Float));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor x = test::randomTensor({19, 300}, at::kBFloat16, device, 3);
  const at::Tensor w = test::randomTensor({8, 300}, at::kBFloat16, device, 4);
  const at::Tensor out = evaluator.run({x, w})[0];
  EXPECT_EQ(out.scalar_type(), at::kFloat);
  const at::Tensor expected =
      at::linear(x.to(at::kFloat), w.to(at::kFloat)).cpu();
  if (device.is_cpu()) {
    EXPECT_TRUE(at::equal(out, expected));
  } else {
    test::expectClose(out.cpu(), expected, 1e-5, 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, TopKSoftmaxOnDevice,
                         testing::ValuesIn(test::testDevices()),
                         test::deviceName);

INSTANTIATE_TEST_SUITE_P(Devices, TopKOnDevice,
                         testing::ValuesIn(test::testDevices()),
                         test::deviceName);

}  // namespace
}  // namespace hostfuse
