// Tests of the TopKOp and TopKSoftmax expressions: building, validation,
// printing, cloning, and their ATen semantics when a host program runs
// them (TopKSoftmax's kernel on GPUs against the ATen composition), and of
// linear's fp32 output for bf16 operands (a router's logits, against an
// fp64 reference).
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

// A program of one TopKSoftmax node.
std::vector<at::Tensor> runTopKSoftmax(const at::Tensor& logits, int64_t k,
                                       bool renormalize) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* in = makeSymbolicTensor(2, DataType::Float, "logits");
    program->addInput(in);
    const TopKSoftmaxResult top = topkSoftmax(in, k, renormalize);
    program->addOutput(top.weights);
    program->addOutput(top.indices);
  }
  HostIrEvaluator evaluator(std::move(program));
  return evaluator.run({logits});
}

// The op against the ATen composition it stands for, on random logits
// (no ties) of several widths: each register layout of the kernel (up to
// 32, 64, 128 and 256 columns, full and one past), k past one lane's picks
// (k > 32), and 257 columns (the ATen path on GPUs).
TEST_P(TopKSoftmaxOnDevice, MatchesTheATenComposition) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  for (const int64_t experts : {1, 8, 32, 33, 64, 65, 128, 129, 256, 257}) {
    for (const bool renormalize : {true, false}) {
      const int64_t k =
          experts >= 64 && renormalize ? 40 : std::min<int64_t>(experts, 8);
      SCOPED_TRACE("E = " + std::to_string(experts) +
                   ", K = " + std::to_string(k) + ", renormalize " +
                   std::to_string(renormalize));
      const at::Tensor logits =
          test::randomTensor({37, experts}, at::kFloat, device, 11 + experts) *
          3;
      const std::vector<at::Tensor> out =
          runTopKSoftmax(logits, k, renormalize);
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

// Ties on the device path: equal logits give equal probabilities, and the
// lower column comes first (its documented order; the host path keeps
// at::topk's, which does not promise one). Integer logits in [0, 4) tie
// often and never round to the same probability unless equal; the
// reference is a stable sort of the logits.
TEST_P(TopKSoftmaxOnDevice, TiesPickTheLowerColumnFirst) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  if (!device.is_cuda()) {
    GTEST_SKIP() << "the host path orders ties as at::topk does";
  }
  for (const int64_t experts : {8, 40, 256}) {
    SCOPED_TRACE("E = " + std::to_string(experts));
    const int64_t k = std::min<int64_t>(experts, 36);
    const at::Tensor logits =
        (test::randomTensor({21, experts}, at::kFloat, at::kCPU, 5 + experts)
             .abs() *
         4)
            .floor()
            .clamp_max(3);
    const std::vector<at::Tensor> out =
        runTopKSoftmax(logits.to(device), k, /*renormalize=*/false);
    const at::Tensor expected = std::get<1>(
        at::sort(logits, /*stable=*/true, /*dim=*/-1, /*descending=*/true));
    EXPECT_TRUE(at::equal(out[1].cpu(), expected.narrow(1, 0, k)))
        << out[1] << expected;
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

// A linear with few f32 outputs (a router's logits) over the shapes a
// router meets: bf16 and f16, 1 to 33 outputs, H from 8 to 7168 (300: not
// a multiple of 8), 1 to 1500 rows, rows that start 2 bytes past a 16-byte
// boundary, x of rank 3 and a transposed x. Against an fp64 reference
// within the error bound of an fp32 sum, and the same bits on a second run.
TEST_P(TopKSoftmaxOnDevice, LinearWithFewF32OutputsMatchesAnFp64Reference) {
  const at::Device device = GetParam();
  HF_SKIP_IF_UNAVAILABLE(device);
  struct Case {
    at::ScalarType dtype;
    int64_t rows, hidden, outputs;
    bool misaligned = false, transposed = false, rank3 = false;
  };
  const std::vector<Case> cases = {
      {at::kBFloat16, 128, 7168, 8},
      {at::kBFloat16, 1, 8, 1},
      {at::kBFloat16, 5, 2048, 9},
      {at::kHalf, 130, 1024, 16},
      {at::kBFloat16, 3, 4096, 17},
      {at::kHalf, 67, 512, 32},
      {at::kBFloat16, 1500, 1024, 8},
      {at::kHalf, 1027, 512, 12},
      {at::kBFloat16, 9, 256, 33},
      {at::kBFloat16, 6, 300, 8},
      {at::kBFloat16, 7, 512, 8, true},
      {at::kBFloat16, 64, 512, 8, false, true},
      {at::kHalf, 10, 768, 12, false, false, true}};
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c10::toString(c.dtype)) + " rows = " +
                 std::to_string(c.rows) + ", H = " + std::to_string(c.hidden) +
                 ", outputs = " + std::to_string(c.outputs) +
                 (c.misaligned ? ", misaligned" : "") +
                 (c.transposed ? ", transposed" : "") +
                 (c.rank3 ? ", rank 3" : ""));
    auto program = std::make_unique<HostIrContainer>();
    {
      FusionGuard guard(program.get());
      const DataType dtype =
          c.dtype == at::kHalf ? DataType::Half : DataType::BFloat16;
      TensorView* x = makeSymbolicTensor(c.rank3 ? 3 : 2, dtype, "x");
      TensorView* w = makeSymbolicTensor(2, dtype, "w");
      program->addInput(x);
      program->addInput(w);
      program->addOutput(linear(x, w, nullptr, DataType::Float));
    }
    HostIrEvaluator evaluator(std::move(program));
    const uint64_t seed = static_cast<uint64_t>(c.rows * 131 + c.outputs);
    at::Tensor x;
    if (c.misaligned) {  // contiguous rows that start 2 bytes past 16
      x = test::randomTensor({c.rows * c.hidden + 1}, c.dtype, device, seed)
              .narrow(0, 1, c.rows * c.hidden)
              .view({c.rows, c.hidden});
    } else if (c.transposed) {
      x = test::randomTensor({c.hidden, c.rows}, c.dtype, device, seed).t();
    } else if (c.rank3) {
      x = test::randomTensor({2, c.rows, c.hidden}, c.dtype, device, seed);
    } else {
      x = test::randomTensor({c.rows, c.hidden}, c.dtype, device, seed);
    }
    const at::Tensor w =
        test::randomTensor({c.outputs, c.hidden}, c.dtype, device, seed + 1);
    const at::Tensor out = evaluator.run({x, w})[0];
    ASSERT_EQ(out.scalar_type(), at::kFloat);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = c.outputs;
    ASSERT_EQ(out.sizes(), at::IntArrayRef(sizes));
    const at::Tensor xd = x.cpu().to(at::kDouble);
    const at::Tensor wd = w.cpu().to(at::kDouble);
    const at::Tensor expected = at::linear(xd, wd);
    // |fp32 sum - exact| <= H * 2^-24 * sum |products| (a loose bound for
    // any order; products of bf16/f16 values are exact in fp32).
    const at::Tensor bound =
        at::linear(xd.abs(), wd.abs()) * (c.hidden * std::ldexp(1.0, -24));
    const at::Tensor error = (out.cpu().to(at::kDouble) - expected).abs();
    EXPECT_TRUE(at::all(error <= bound).item<bool>())
        << "largest error " << error.max().item<double>() << ", bound there "
        << bound.flatten()[error.flatten().argmax()].item<double>();
    EXPECT_TRUE(at::equal(evaluator.run({x, w})[0], out))
        << "a second run gave other bits";
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
