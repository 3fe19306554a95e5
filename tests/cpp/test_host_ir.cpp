// Tests of csrc/hostfuse/host_ir: host programs (HostIrContainer, RunFusion,
// Allocate), their printing and cloning, and the HostIrEvaluator on CPU and
// CUDA, compared with the same computation written directly in ATen.
//
// Tolerances: the evaluator runs each op with ATen today, so most results
// match the references bit for bit; the tolerances below are those the
// arithmetic allows (the references are written differently, and generated
// kernels will later round differently), not the observed differences.
//   f32:  rtol 1e-5, atol 1e-5 (a few ulps over short reductions)
//   bf16: rtol 2e-2, atol 5e-2 (8-bit mantissa, rounding after every op)
//   f16:  rtol 4e-3, atol 1e-2 (11-bit mantissa, rounding after every op)
// Integers, booleans and data movement are compared exactly.
#include "test_utils.h"

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/ir/narrow.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/kernel/executor.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {
namespace {

constexpr double kF32Rtol = 1e-5;
constexpr double kF32Atol = 1e-5;

// silu written without at::silu: z * sigmoid(z) = z / (1 + exp(-z)).
at::Tensor siluReference(const at::Tensor& z) { return z / (1 + at::exp(-z)); }

// RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * w.
at::Tensor rmsNormReference(const at::Tensor& x, const at::Tensor& w,
                            double eps) {
  return x / at::sqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * w;
}

// The same RMSNorm in the IR, for x [rows, hidden] and w [hidden] with a
// constant hidden size.
TensorView* rmsNorm(TensorView* x, TensorView* w, double eps) {
  const auto hidden =
      static_cast<double>(x->extent(x->rank() - 1)->constantInt().value());
  TensorView* squares = mul(x, x);
  TensorView* mean = div(sum(squares, -1, /*keep_dim=*/true), hidden);
  TensorView* inverse = rsqrt(add(mean, eps));
  TensorView* row = broadcast(w, {true, false});
  return mul(mul(x, inverse), row);
}

// ---------------------------------------------------------------------------
// The evaluator on each device: programs built with the IR API against
// ATen references on random inputs.

class EvaluatorTest : public testing::TestWithParam<at::Device> {
 protected:
  void SetUp() override { HF_SKIP_IF_UNAVAILABLE(GetParam()); }

  at::Device device() const { return GetParam(); }
  at::Tensor random(at::IntArrayRef sizes, at::ScalarType dtype,
                    uint64_t seed) const {
    return test::randomTensor(sizes, dtype, device(), seed);
  }
};

TEST_P(EvaluatorTest, PointwiseOpsMatchATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 16}, DataType::Float, "x");
  TensorView* y = makeTensor({tokens, 16}, DataType::Float, "y");
  program->addInput(x);
  program->addInput(y);
  // A positive operand for log, sqrt and friends.
  TensorView* p = add(abs(y), 0.5);
  for (TensorView* out :
       {neg(x), abs(x), relu(x), exp(x), log(p), sqrt(p), rsqrt(p),
        reciprocal(p), tanh(x), sigmoid(x), silu(x), add(x, y), sub(x, y),
        mul(x, y), div(x, p), maximum(x, y), minimum(x, y)}) {
    program->addOutput(out);
  }

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({7, 16}, at::kFloat, 1);
  const at::Tensor yv = random({7, 16}, at::kFloat, 2);
  const std::vector<at::Tensor> out = evaluator.run({xv, yv});

  const at::Tensor pv = yv.abs() + 0.5;
  const std::vector<at::Tensor> expected = {-xv,
                                            at::where(xv < 0, -xv, xv),
                                            at::clamp_min(xv, 0),
                                            at::exp(xv),
                                            at::log(pv),
                                            at::sqrt(pv),
                                            1 / at::sqrt(pv),
                                            1 / pv,
                                            at::tanh(xv),
                                            1 / (1 + at::exp(-xv)),
                                            siluReference(xv),
                                            xv + yv,
                                            xv - yv,
                                            xv * yv,
                                            xv / pv,
                                            at::where(xv > yv, xv, yv),
                                            at::where(xv < yv, xv, yv)};
  ASSERT_EQ(out.size(), expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    SCOPED_TRACE("output " + std::to_string(i));
    EXPECT_EQ(out[i].device(), device());
    test::expectClose(out[i], expected[i], kF32Rtol, kF32Atol);
  }
}

TEST_P(EvaluatorTest, ComparisonsAndWhereMatchATenExactly) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
  TensorView* a = makeTensor({rows, 12}, DataType::Int32, "a");
  TensorView* b = makeTensor({rows, 12}, DataType::Int32, "b");
  TensorView* x = makeTensor({rows, 12}, DataType::Float, "x");
  program->addInput(a);
  program->addInput(b);
  program->addInput(x);
  for (TensorView* out :
       {lt(a, b), le(a, b), gt(a, b), ge(a, b), eq(a, b), ne(a, b), gt(x, 0.0),
        le(1.0, x), where(lt(a, b), x, makeConstant(-1.0)),
        where(ge(x, 0.5), a, b)}) {
    program->addOutput(out);
  }

  HostIrEvaluator evaluator(std::move(program));
  // Values in [-50, 50): 40 rows make ties for eq/le/ge likely.
  const at::Tensor av = random({40, 12}, at::kInt, 3);
  const at::Tensor bv = random({40, 12}, at::kInt, 4);
  const at::Tensor xv = random({40, 12}, at::kFloat, 5);
  ASSERT_TRUE(at::eq(av, bv).any().item<bool>());
  const std::vector<at::Tensor> out = evaluator.run({av, bv, xv});

  const std::vector<at::Tensor> expected = {
      av<bv, av <= bv, av> bv,
      av >= bv,
      av == bv,
      av != bv,
      xv > 0,
      xv >= 1,
      at::where(av < bv, xv, at::full_like(xv, -1)),
      at::where(xv >= 0.5, av, bv)};
  ASSERT_EQ(out.size(), expected.size());
  for (size_t i = 0; i < out.size(); ++i) {
    SCOPED_TRACE("output " + std::to_string(i));
    test::expectClose(out[i], expected[i]);
  }
}

TEST_P(EvaluatorTest, TypePromotionMatchesATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
  TensorView* a = makeTensor({rows, 4}, DataType::Int32, "a");
  TensorView* b = makeTensor({rows, 4}, DataType::Int32, "b");
  TensorView* h = makeTensor({rows, 4}, DataType::BFloat16, "h");
  TensorView* f = makeTensor({rows, 4}, DataType::Float, "f");
  TensorView* flags = makeTensor({rows, 4}, DataType::Bool, "flags");
  program->addInput(a);
  program->addInput(b);
  program->addInput(h);
  program->addInput(f);
  program->addInput(flags);
  TensorView* nonzero = add(abs(b), makeConstant(int64_t{1}));
  TensorView* int_plus_double = add(a, 2.5);
  TensorView* true_division = div(a, nonzero);
  TensorView* mixed_floats = add(h, f);
  TensorView* bf16_times_double = mul(h, 3.0);
  TensorView* int_sum = sum(a, 1);
  TensorView* bool_sum = sum(flags, 0);
  TensorView* bool_plus_int = add(flags, makeConstant(int64_t{2}));
  for (TensorView* out :
       {int_plus_double, true_division, mixed_floats, bf16_times_double,
        int_sum, bool_sum, bool_plus_int}) {
    program->addOutput(out);
  }
  EXPECT_EQ(int_plus_double->dtype(), DataType::Float);
  EXPECT_EQ(true_division->dtype(), DataType::Float);
  EXPECT_EQ(mixed_floats->dtype(), DataType::Float);
  EXPECT_EQ(bf16_times_double->dtype(), DataType::BFloat16);
  EXPECT_EQ(int_sum->dtype(), DataType::Int64);
  EXPECT_EQ(bool_sum->dtype(), DataType::Int64);
  EXPECT_EQ(bool_plus_int->dtype(), DataType::Int64);

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor av = random({6, 4}, at::kInt, 6);
  const at::Tensor bv = random({6, 4}, at::kInt, 7);
  const at::Tensor hv = random({6, 4}, at::kBFloat16, 8);
  const at::Tensor fv = random({6, 4}, at::kFloat, 9);
  const at::Tensor flagsv = random({6, 4}, at::kBool, 10);
  const std::vector<at::Tensor> out = evaluator.run({av, bv, hv, fv, flagsv});
  ASSERT_EQ(out.size(), 7u);
  // expectClose checks that the dtypes are ATen's too.
  test::expectClose(out[0], av + 2.5, kF32Rtol, kF32Atol);
  test::expectClose(out[1], av / (bv.abs() + 1), kF32Rtol, kF32Atol);
  test::expectClose(out[2], hv + fv, kF32Rtol, kF32Atol);
  test::expectClose(out[3], hv * 3.0, 1e-2, 1e-2);
  test::expectClose(out[4], av.sum(1));
  test::expectClose(out[5], flagsv.sum(0));
  test::expectClose(out[6], flagsv + 2);
}

TEST_P(EvaluatorTest, BroadcastAndReductionsAreExactOnIntegers) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, 6}, DataType::Int64, "x");
  TensorView* w = makeTensor({6}, DataType::Int64, "w");
  program->addInput(x);
  program->addInput(w);
  TensorView* scaled = mul(x, broadcast(w, {true, false}));
  program->addOutput(scaled);
  program->addOutput(sum(scaled, 0));
  program->addOutput(max(scaled, -1, /*keep_dim=*/true));
  program->addOutput(broadcast(w, {false, true, true}));
  program->addOutput(cast(x, DataType::Int32));

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({9, 6}, at::kLong, 11);
  const at::Tensor wv = random({6}, at::kLong, 12);
  const std::vector<at::Tensor> out = evaluator.run({xv, wv});
  ASSERT_EQ(out.size(), 5u);
  const at::Tensor expected_scaled = xv * wv.unsqueeze(0);
  test::expectClose(out[0], expected_scaled);
  test::expectClose(out[1], expected_scaled.sum(0));
  test::expectClose(out[2], std::get<0>(expected_scaled.max(1, true)));
  test::expectClose(out[3], wv.reshape({6, 1, 1}));
  test::expectClose(out[4], xv.to(at::kInt));
}

// x -> silu(x @ w1) -> linear(., w2, b2) -> sum over features.
struct Mlp {
  TensorView* y;
  TensorView* total;
};

Mlp buildMlp(HostIrContainer* program, DataType dtype) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 16}, dtype, "x");
  TensorView* w1 = makeTensor({16, 32}, dtype, "w1");
  TensorView* w2 = makeTensor({8, 32}, dtype, "w2");
  TensorView* b2 = makeTensor({8}, dtype, "b2");
  for (TensorView* input : {x, w1, w2, b2}) {
    program->addInput(input);
  }
  TensorView* hidden = silu(matmul(x, w1));
  TensorView* y = linear(hidden, w2, b2);
  TensorView* total = sum(y, -1);
  program->addOutput(y);
  program->addOutput(total);
  return {y, total};
}

// Inputs of the MLP for `tokens` tokens; the weights are scaled by
// 1/sqrt(fan_in) (a power of two, so exactly) to keep activations O(1).
std::vector<at::Tensor> mlpInputs(int64_t tokens, at::ScalarType dtype,
                                  const at::Device& device) {
  return {test::randomTensor({tokens, 16}, dtype, device, 21),
          test::randomTensor({16, 32}, dtype, device, 22) * 0.25,
          test::randomTensor({8, 32}, dtype, device, 23) * 0.125,
          test::randomTensor({8}, dtype, device, 24)};
}

// The MLP in ATen, computed in f32 and rounded to the inputs' dtype.
std::vector<at::Tensor> mlpReference(const std::vector<at::Tensor>& inputs) {
  const at::Tensor x = inputs[0].to(at::kFloat);
  const at::Tensor w1 = inputs[1].to(at::kFloat);
  const at::Tensor w2 = inputs[2].to(at::kFloat);
  const at::Tensor b2 = inputs[3].to(at::kFloat);
  const at::Tensor hidden = siluReference(at::mm(x, w1));
  const at::Tensor y = at::addmm(b2, hidden, w2.t());
  const at::ScalarType dtype = inputs[0].scalar_type();
  return {y.to(dtype), y.sum(-1).to(dtype)};
}

TEST_P(EvaluatorTest, MlpWithSiluAndSumMatchesATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  const Mlp mlp = buildMlp(program.get(), DataType::Float);
  EXPECT_EQ(mlp.y->toDeclString(), "T6: f32[tokens, 8]");
  EXPECT_EQ(mlp.total->toDeclString(), "T7: f32[tokens]");

  HostIrEvaluator evaluator(std::move(program));
  const std::vector<at::Tensor> inputs = mlpInputs(13, at::kFloat, device());
  const std::vector<at::Tensor> out =
      evaluator.run(std::vector<c10::IValue>(inputs.begin(), inputs.end()));
  const std::vector<at::Tensor> expected = mlpReference(inputs);
  ASSERT_EQ(out.size(), 2u);
  test::expectClose(out[0], expected[0], kF32Rtol, kF32Atol);
  test::expectClose(out[1], expected[1], kF32Rtol, kF32Atol);
}

TEST_P(EvaluatorTest, HalfPrecisionMlpIsWithinTolerance) {
  struct Case {
    DataType dtype;
    double rtol;
    double atol;
  };
  for (const Case& c : {Case{DataType::BFloat16, 2e-2, 5e-2},
                        Case{DataType::Half, 4e-3, 1e-2}}) {
    SCOPED_TRACE(toString(c.dtype));
    auto program = std::make_unique<HostIrContainer>();
    FusionGuard guard(program.get());
    const Mlp mlp = buildMlp(program.get(), c.dtype);
    EXPECT_EQ(mlp.total->dtype(), c.dtype);

    HostIrEvaluator evaluator(std::move(program));
    const std::vector<at::Tensor> inputs =
        mlpInputs(13, toScalarType(c.dtype), device());
    const std::vector<at::Tensor> out =
        evaluator.run(std::vector<c10::IValue>(inputs.begin(), inputs.end()));
    const std::vector<at::Tensor> expected = mlpReference(inputs);
    ASSERT_EQ(out.size(), 2u);
    test::expectClose(out[0], expected[0], c.rtol, c.atol);
    test::expectClose(out[1], expected[1], c.rtol, c.atol);
  }
}

TEST_P(EvaluatorTest, RmsNormThenMatmulMatchesATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 32}, DataType::Float, "x");
  TensorView* w = makeTensor({32}, DataType::Float, "w");
  TensorView* proj = makeTensor({32, 16}, DataType::Float, "proj");
  program->addInput(x);
  program->addInput(w);
  program->addInput(proj);
  TensorView* normed = rmsNorm(x, w, 1e-6);
  program->addOutput(normed);
  program->addOutput(matmul(normed, proj));

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({10, 32}, at::kFloat, 31);
  const at::Tensor wv = random({32}, at::kFloat, 32);
  const at::Tensor projv = random({32, 16}, at::kFloat, 33);
  const std::vector<at::Tensor> out = evaluator.run({xv, wv, projv});
  const at::Tensor expected = rmsNormReference(xv, wv, 1e-6);
  ASSERT_EQ(out.size(), 2u);
  test::expectClose(out[0], expected, kF32Rtol, kF32Atol);
  test::expectClose(out[1], at::mm(expected, projv), kF32Rtol, 1e-4);
}

TEST_P(EvaluatorTest, SoftmaxMatchesATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 33}, DataType::Float, "x");
  TensorView* h = makeTensor({tokens, 33}, DataType::BFloat16, "h");
  program->addInput(x);
  program->addInput(h);
  program->addOutput(softmax(x, -1));
  program->addOutput(softmax(x, 0));
  program->addOutput(softmax(h, 1));

  HostIrEvaluator evaluator(std::move(program));
  // Logits up to about +-12, where a softmax without the max shift would
  // lose precision.
  const at::Tensor xv = random({9, 33}, at::kFloat, 41) * 3;
  const at::Tensor hv = random({9, 33}, at::kBFloat16, 42) * 3;
  const std::vector<at::Tensor> out = evaluator.run({xv, hv});
  ASSERT_EQ(out.size(), 3u);
  test::expectClose(out[0], at::softmax(xv, -1), kF32Rtol, 1e-6);
  test::expectClose(out[1], at::softmax(xv, 0), kF32Rtol, 1e-6);
  test::expectClose(out[2], at::softmax(hv.to(at::kFloat), 1).to(at::kBFloat16),
                    2e-2, 5e-3);
  // Rows sum to one.
  test::expectClose(out[0].sum(-1), at::ones({9}, out[0].options()), 0, 1e-5);
}

TEST_P(EvaluatorTest, RunFusionRunsAFusionInsideTheProgram) {
  // The fusion: RMSNorm of x [i0, 32] with w [32].
  auto fusion = std::make_shared<Fusion>();
  {
    FusionGuard fusion_guard(fusion.get());
    TensorView* x = makeTensor({kSymbolic, 32}, DataType::Float, "x");
    TensorView* w = makeTensor({32}, DataType::Float, "w");
    fusion->addInput(x);
    fusion->addInput(w);
    fusion->addOutput(rmsNorm(x, w, 1e-5));
  }

  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 32}, DataType::Float, "x");
  TensorView* w = makeTensor({32}, DataType::Float, "w");
  TensorView* proj = makeTensor({16, 32}, DataType::Float, "proj");
  program->addInput(x);
  program->addInput(w);
  program->addInput(proj);
  const std::vector<TensorView*> normed = runFusion(fusion, {x, w});
  ASSERT_EQ(normed.size(), 1u);
  // The fusion's symbolic row count becomes the program's `tokens`.
  EXPECT_EQ(normed[0]->extent(0), tokens);
  EXPECT_EQ(normed[0]->toDeclString(), "T3: f32[tokens, 32]");
  ASSERT_TRUE(normed[0]->definition()->isA<RunFusion>());
  EXPECT_EQ(&normed[0]->definition()->as<RunFusion>()->fusion(), fusion.get());
  TensorView* projected = linear(normed[0], proj);
  program->addOutput(normed[0]);
  program->addOutput(relu(projected));

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({11, 32}, at::kFloat, 51);
  const at::Tensor wv = random({32}, at::kFloat, 52);
  const at::Tensor projv = random({16, 32}, at::kFloat, 53);
  const std::vector<at::Tensor> out = evaluator.run({xv, wv, projv});
  const at::Tensor expected = rmsNormReference(xv, wv, 1e-5);
  ASSERT_EQ(out.size(), 2u);
  test::expectClose(out[0], expected, kF32Rtol, kF32Atol);
  test::expectClose(out[1], at::clamp_min(at::mm(expected, projv.t()), 0),
                    kF32Rtol, 1e-4);
}

// Narrow: the halves of one tensor as views, which a fusion reads in place
// (strided); the bounds are checked where the program is built and, for a
// symbolic extent, where it runs.
TEST_P(EvaluatorTest, NarrowGivesViewsThatAFusionReadsInPlace) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
  TensorView* x = makeTensor({rows, 64}, DataType::Float, "x");
  program->addInput(x);
  TensorView* gate = narrow(x, 1, 0, 32);
  TensorView* up = narrow(x, -1, 32, 32);
  EXPECT_EQ(gate->definition()->toInlineString(),
            gate->toString() + " = narrow(" + x->toString() +
                ", dim=1, start=0, length=32)");
  EXPECT_EQ(up->toDeclString(), up->toString() + ": f32[rows, 32]");
  program->addOutput(gate);
  program->addOutput(
      runFusion(makeSiluMulFusion(32, DataType::Float), {gate, up}).at(0));

  test::expectErrorContains([&] { narrow(x, 2, 0, 1); },
                            {"narrow: dim 2 is out of range", "of rank 2"});
  test::expectErrorContains(
      [&] { narrow(x, 1, 40, 32); },
      {"a slice of length 32 from 40 in dim 1 does not fit",
       "whose size there is 64"});
  test::expectErrorContains([&] { narrow(x, 1, -1, 2); },
                            {"start -1 and length 2 must be >= 0"});
  test::expectErrorContains([&] { narrow(x, -3, 0, 1); },
                            {"narrow: dim -3 is out of range", "of rank 2"});
  // start + length past int64: refused, not wrapped around.
  test::expectErrorContains(
      [&] { narrow(x, 1, int64_t{1} << 62, int64_t{1} << 62); },
      {"does not fit", "whose size there is 64"});
  TensorView* wide = makeTensor({rows, kSymbolic}, DataType::Float, "wide");
  program->addInput(wide);
  program->addOutput(narrow(wide, 1, 4, 8));  // needs 12 columns or more

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({7, 64}, at::kFloat, 61);
  const std::vector<at::Tensor> out =
      evaluator.run({xv, random({7, 12}, at::kFloat, 62)});
  ASSERT_EQ(out.size(), 3u);
  EXPECT_TRUE(out[0].is_alias_of(xv)) << "narrow must not copy";
  EXPECT_TRUE(at::equal(out[0], xv.narrow(1, 0, 32)));
  const at::Tensor gate_v = xv.narrow(1, 0, 32);
  test::expectClose(out[1], siluReference(gate_v) * xv.narrow(1, 32, 32),
                    kF32Rtol, kF32Atol);
  test::expectErrorContains(
      [&] {
        evaluator.run({xv, random({7, 11}, at::kFloat, 63)});
      },
      {"narrow(", "dim=1, start=4, length=8)",
       "a slice of length 8 from 4 in dim 1 does not fit x of sizes [7, 11]"});
}

// A row-limited RunFusion: the rows the counts cover are the fusion's on
// every device (the GPU kernel computes only those; the CPU path all).
TEST_P(EvaluatorTest, RunFusionWithRowCountsComputesTheCountedRows) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, 64}, DataType::Float, "x");
  TensorView* counts = makeTensor({kSymbolic}, DataType::Int64, "counts");
  program->addInput(x);
  program->addInput(counts);
  TensorView* gate = narrow(x, 1, 0, 32);
  TensorView* up = narrow(x, 1, 32, 32);
  TensorView* act =
      runFusion(makeSiluMulFusion(32, DataType::Float), {gate, up}, counts)
          .at(0);
  program->addOutput(act);
  const auto* run = act->definition()->as<RunFusion>();
  EXPECT_EQ(run->rowCounts(), counts);
  EXPECT_EQ(run->fusionInputs(), (std::vector<Val*>{gate, up}));
  EXPECT_NE(
      run->toInlineString().find(", row_counts=" + counts->toString() + ")"),
      std::string::npos)
      << run->toInlineString();
  // A clone (as GraphRunner makes) keeps the counts.
  const std::string text = program->toString();
  EXPECT_EQ(program->clone()->toString(), text);

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({11, 64}, at::kFloat, 64);
  const at::Tensor want =
      siluReference(xv.narrow(1, 0, 32)) * xv.narrow(1, 32, 32);
  for (const std::vector<int64_t>& given :
       {std::vector<int64_t>{3, 5}, {4, -1, 100}, {}}) {
    SCOPED_TRACE("counts " + c10::str(given));
    int64_t rows = 0;
    for (const int64_t count : given) {
      rows = std::min<int64_t>(11, rows + std::clamp<int64_t>(count, 0, 11));
    }
    const at::Tensor out =
        evaluator.run({xv, at::tensor(given, at::kLong).to(device())})[0];
    test::expectClose(out.narrow(0, 0, rows), want.narrow(0, 0, rows), kF32Rtol,
                      kF32Atol);
  }
}

TEST(RunFusionRowCounts, AreRefusedWhereTheyCannotApply) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, 32}, DataType::Float, "x");
  TensorView* i32_counts = makeTensor({4}, DataType::Int32, "counts");
  program->addInput(x);
  program->addInput(i32_counts);
  auto relu_fusion = std::make_shared<Fusion>();
  {
    FusionGuard inner(relu_fusion.get());
    TensorView* in = makeSymbolicTensor(2, DataType::Float, "in");
    relu_fusion->addInput(in);
    relu_fusion->addOutput(relu(in));
  }
  test::expectErrorContains([&] { runFusion(relu_fusion, {x}, i32_counts); },
                            {"row_counts", "must be an i64 tensor of rank 1"});
  auto row_sum = std::make_shared<Fusion>();
  {
    FusionGuard inner(row_sum.get());
    TensorView* in = makeSymbolicTensor(2, DataType::Float, "in");
    row_sum->addInput(in);
    row_sum->addOutput(sum(in, 1));
  }
  TensorView* counts = makeTensor({4}, DataType::Int64, "counts64");
  program->addInput(counts);
  test::expectErrorContains(
      [&] { runFusion(row_sum, {x}, counts); },
      {"row_counts limit the rows of pointwise fusions only",
       "this fusion has"});
}

TEST(NarrowInAFusion, KernelCodegenRefusesItNamingTheExpression) {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* x = makeTensor({4, 8}, DataType::Float, "x");
  fusion->addInput(x);
  fusion->addOutput(relu(narrow(x, 1, 0, 4)));
  const std::optional<std::string> reason = kernelUnsupportedReason(*fusion);
  ASSERT_TRUE(reason.has_value());
  EXPECT_NE(reason->find("does not support Narrow (T1 = narrow(T0, dim=1, "
                         "start=0, length=4))"),
            std::string::npos)
      << *reason;
}

TEST_P(EvaluatorTest, AllocateUsesBoundExtentsDtypeAndDevice) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::BFloat16, "x");
  program->addInput(x);
  TensorView* buffer =
      allocate({tokens, makeConstant(int64_t{3})}, DataType::Int32);
  ASSERT_TRUE(buffer->definition()->isA<Allocate>());
  EXPECT_EQ(buffer->extent(0), tokens);
  program->addOutput(buffer);
  program->addOutput(relu(x));

  HostIrEvaluator evaluator(std::move(program));
  for (int64_t rows : {5, 2}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const at::Tensor xv = random({rows, 8}, at::kBFloat16, 60 + rows);
    const std::vector<at::Tensor> out = evaluator.run({xv});
    ASSERT_EQ(out.size(), 2u);
    // Uninitialized memory: only the type, sizes and device are defined.
    EXPECT_EQ(out[0].sizes(), (std::vector<int64_t>{rows, 3}));
    EXPECT_EQ(out[0].scalar_type(), at::kInt);
    EXPECT_EQ(out[0].device(), device());
    EXPECT_EQ(evaluator.device(), device());
    test::expectClose(out[1], at::clamp_min(xv, 0));
  }
}

TEST_P(EvaluatorTest, ExprObserverSeesEveryTopLevelExprInOrderThenNull) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, 4}, DataType::Float, "x");
  program->addInput(x);
  TensorView* y = relu(x);
  program->addOutput(mul(y, y));
  const std::vector<Expr*> expected_order = program->topLevelExprs();
  ASSERT_EQ(expected_order.size(), 2u);

  HostIrEvaluator evaluator(std::move(program));
  std::vector<const Expr*> seen;
  evaluator.setExprObserver(
      [&seen](const Expr* next) { seen.push_back(next); });
  const at::Tensor xv = random({3, 4}, at::kFloat, 73);
  for (int run = 0; run < 2; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    seen.clear();
    const std::vector<at::Tensor> out = evaluator.run({xv});
    ASSERT_EQ(seen.size(), 3u);
    EXPECT_EQ(seen[0], expected_order[0]);
    EXPECT_EQ(seen[1], expected_order[1]);
    EXPECT_EQ(seen[2], nullptr);
    const at::Tensor relu_x = at::clamp_min(xv, 0);
    test::expectClose(out[0], relu_x * relu_x);
  }
  // An empty observer is no observer.
  evaluator.setExprObserver(nullptr);
  seen.clear();
  evaluator.run({xv});
  EXPECT_TRUE(seen.empty());
}

TEST_P(EvaluatorTest, SymbolicScalarInputsMatchATen) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({kSymbolic, 5}, DataType::Float, "x");
  Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");
  Scalar* shift = makeSymbolicScalar(DataType::Int64, "shift");
  Scalar* flag = makeSymbolicScalar(DataType::Bool, "flag");
  program->addInput(x);
  program->addInput(alpha);
  program->addInput(shift);
  program->addInput(flag);
  TensorView* scaled = mul(x, alpha);
  TensorView* shifted = add(x, shift);
  TensorView* chosen = where(flag, scaled, shifted);
  EXPECT_EQ(chosen->dtype(), DataType::Float);
  program->addOutput(chosen);
  program->addOutput(sub(alpha, x));

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = random({4, 5}, at::kFloat, 71);
  std::vector<at::Tensor> out = evaluator.run({xv, 0.75, int64_t{3}, true});
  ASSERT_EQ(out.size(), 2u);
  test::expectClose(out[0], xv * 0.75, kF32Rtol, kF32Atol);
  test::expectClose(out[1], 0.75 - xv, kF32Rtol, kF32Atol);

  // An int is accepted for a double input.
  out = evaluator.run({xv, int64_t{2}, int64_t{-4}, false});
  test::expectClose(out[0], xv - 4, kF32Rtol, kF32Atol);
  test::expectClose(out[1], 2 - xv, kF32Rtol, kF32Atol);
}

TEST_P(EvaluatorTest, RerunsWithNewSymbolicSizes) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* gate = makeTensor({tokens, 1}, DataType::Float, "gate");
  TensorView* w = makeTensor({8, 4}, DataType::Float, "w");
  program->addInput(x);
  program->addInput(gate);
  program->addInput(w);
  program->addOutput(matmul(mul(x, sigmoid(gate)), w));

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor wv = random({8, 4}, at::kFloat, 80);
  for (int64_t rows : {3, 17, 1}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const at::Tensor xv = random({rows, 8}, at::kFloat, 81 + rows);
    const at::Tensor gatev = random({rows, 1}, at::kFloat, 82 + rows);
    const std::vector<at::Tensor> out = evaluator.run({xv, gatev, wv});
    ASSERT_EQ(out.size(), 1u);
    test::expectClose(out[0], at::mm(xv / (1 + at::exp(-gatev)), wv), kF32Rtol,
                      kF32Atol);
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, EvaluatorTest,
                         testing::ValuesIn(test::testDevices()),
                         test::deviceName);

// ---------------------------------------------------------------------------
// Wrong inputs: each error names the input, and the evaluator runs the next
// valid call.

// x [tokens, 8] and w [8, 4] in; relu(x @ w) out.
std::unique_ptr<HostIrContainer> makeMatmulProgram() {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* w = makeTensor({8, 4}, DataType::Float, "w");
  program->addInput(x);
  program->addInput(w);
  program->addOutput(relu(matmul(x, w)));
  return program;
}

// Runs `evaluator` (of makeMatmulProgram) on valid CPU inputs and checks
// the result.
void expectValidRunWorks(HostIrEvaluator& evaluator) {
  const at::Tensor x = test::randomTensor({6, 8}, at::kFloat, at::kCPU, 90);
  const at::Tensor w = test::randomTensor({8, 4}, at::kFloat, at::kCPU, 91);
  const std::vector<at::Tensor> out = evaluator.run({x, w});
  ASSERT_EQ(out.size(), 1u);
  test::expectClose(out[0], at::clamp_min(at::mm(x, w), 0), kF32Rtol, kF32Atol);
}

class EvaluatorInputs : public testing::Test {
 protected:
  const at::Tensor x_ = test::randomTensor({5, 8}, at::kFloat, at::kCPU, 92);
  const at::Tensor w_ = test::randomTensor({8, 4}, at::kFloat, at::kCPU, 93);
};

TEST_F(EvaluatorInputs, WrongInputCountShowsBothCounts) {
  HostIrEvaluator evaluator(makeMatmulProgram());
  test::expectErrorContains([&] { evaluator.run({x_}); },
                            {"takes 2 inputs", "1 were given"});
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, w_, w_});
      },
      {"takes 2 inputs", "3 were given"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, ScalarGivenForTensorNamesInput) {
  HostIrEvaluator evaluator(makeMatmulProgram());
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, 2.0});
      },
      {"input 1 (T1 'w')", "must be a tensor", "f32[8, 4]", "got a double"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, TensorGivenForScalarNamesInput) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeTensor({4}, DataType::Float, "x");
    Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");
    Scalar* count = makeSymbolicScalar(DataType::Int64, "count");
    program->addInput(x);
    program->addInput(alpha);
    program->addInput(count);
    program->addOutput(add(mul(x, alpha), count));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor xv = test::randomTensor({4}, at::kFloat, at::kCPU, 94);
  test::expectErrorContains(
      [&] {
        evaluator.run({xv, xv, int64_t{1}});
      },
      {"input 1 (alpha)", "must be a number", "got a tensor"});
  test::expectErrorContains(
      [&] {
        evaluator.run({xv, 1.0, 2.5});
      },
      {"input 2 (count)", "must be an int", "got a double"});
  const std::vector<at::Tensor> out = evaluator.run({xv, 1.5, int64_t{2}});
  test::expectClose(out[0], xv * 1.5 + 2, kF32Rtol, kF32Atol);
}

TEST_F(EvaluatorInputs, WrongDtypeNamesInputAndBothDtypes) {
  HostIrEvaluator evaluator(makeMatmulProgram());
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, w_.to(at::kDouble)});
      },
      {"input 1 (T1 'w')", "must have dtype f32", "got Double"});
  test::expectErrorContains(
      [&] {
        evaluator.run({x_.to(at::kBFloat16), w_});
      },
      {"input 0 (T0 'x')", "must have dtype f32", "got BFloat16"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, WrongRankNamesInputAndBothRanks) {
  HostIrEvaluator evaluator(makeMatmulProgram());
  test::expectErrorContains(
      [&] {
        evaluator.run({x_.unsqueeze(-1), w_});
      },
      {"input 0 (T0 'x')", "must have rank 2", "f32[tokens, 8]", "rank 3",
       "[5, 8, 1]"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, WrongConstantSizeNamesInputAndBothSizes) {
  HostIrEvaluator evaluator(makeMatmulProgram());
  const at::Tensor short_w =
      test::randomTensor({7, 4}, at::kFloat, at::kCPU, 95);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, short_w});
      },
      {"input 1 (T1 'w')", "must have size 8 in dim 0", "f32[8, 4]",
       "got sizes [7, 4]"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, InconsistentSharedExtentNamesInputAndBothSizes) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
    TensorView* gate = makeTensor({tokens, 1}, DataType::Float, "gate");
    program->addInput(x);
    program->addInput(gate);
    program->addOutput(mul(x, gate));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor gate = test::randomTensor({6, 1}, at::kFloat, at::kCPU, 96);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, gate});
      },
      {"input 1 (T1 'gate')", "size 6 in dim 0", "extent tokens",
       "bound to 5"});
  const at::Tensor good_gate = gate.narrow(0, 0, 5);
  const std::vector<at::Tensor> out = evaluator.run({x_, good_gate});
  test::expectClose(out[0], x_ * good_gate, kF32Rtol, kF32Atol);
}

TEST_F(EvaluatorInputs, ScalarInputMustAgreeWithExtentBoundBefore) {
  // `tokens` is both an input and the row count of x, which comes first.
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
    program->addInput(x);
    program->addInput(tokens);
    program->addOutput(
        allocate({tokens, makeConstant(int64_t{2})}, DataType::Float));
  }
  HostIrEvaluator evaluator(std::move(program));
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, int64_t{6}});
      },
      {"input 1 (tokens)", "is 6", "bound to 5"});
  const std::vector<at::Tensor> out = evaluator.run({x_, int64_t{5}});
  EXPECT_EQ(out[0].sizes(), (std::vector<int64_t>{5, 2}));
}

TEST_F(EvaluatorInputs, InputOnAnotherDeviceNamesBothInputs) {
  // A meta tensor stands for "another device" on a machine without a GPU.
  HostIrEvaluator evaluator(makeMatmulProgram());
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, w_.to(at::kMeta)});
      },
      {"input 1 (T1 'w')", "is on meta", "runs on cpu",
       "the device of input 0 (T0 'x')"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, InputNotOnConfiguredDeviceIsRejected) {
  HostIrEvaluatorParams params;
  params.device = at::Device(at::kCPU);
  HostIrEvaluator evaluator(makeMatmulProgram(), params);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_.to(at::kMeta), w_.to(at::kMeta)});
      },
      {"input 0 (T0 'x')", "is on meta", "runs on cpu",
       "set in HostIrEvaluatorParams"});
  expectValidRunWorks(evaluator);
}

TEST_F(EvaluatorInputs, CpuInputsToCudaProgramAreRejected) {
  // Needs no GPU: the inputs are checked before anything runs on CUDA.
  HostIrEvaluatorParams params;
  params.device = at::Device(at::kCUDA, 0);
  HostIrEvaluator evaluator(makeMatmulProgram(), params);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, w_});
      },
      {"input 0 (T0 'x')", "is on cpu", "runs on cuda:0",
       "set in HostIrEvaluatorParams"});
}

TEST_F(EvaluatorInputs, CudaProgramWithoutGpuSaysSo) {
  if (cuda::isAvailable()) {
    GTEST_SKIP() << "this machine has a GPU";
  }
  HostIrEvaluatorParams params;
  params.device = at::Device(at::kCUDA);
  HostIrEvaluator evaluator(makeMatmulProgram(), params);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, w_});
      },
      {"set to run on CUDA", "no CUDA device is available"});
}

TEST_F(EvaluatorInputs, InputsOnCpuAndCudaAreRejected) {
  HF_SKIP_IF_UNAVAILABLE(at::Device(at::kCUDA, 0));
  HostIrEvaluator evaluator(makeMatmulProgram());
  const at::Device cuda(at::kCUDA, 0);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_.to(cuda), w_});
      },
      {"input 1 (T1 'w')", "is on cpu", "runs on cuda:0",
       "the device of input 0 (T0 'x')"});
  const std::vector<at::Tensor> out = evaluator.run({x_.to(cuda), w_.to(cuda)});
  EXPECT_EQ(out[0].device(), cuda);
  test::expectClose(out[0], at::clamp_min(at::mm(x_, w_), 0).to(cuda), kF32Rtol,
                    kF32Atol);
}

TEST_F(EvaluatorInputs, AtenFailureNamesTheExpression) {
  // Two independent symbolic row counts: the program is valid, but the
  // add fails when they differ at run time.
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* a = makeTensor({kSymbolic, 8}, DataType::Float, "a");
    TensorView* b = makeTensor({kSymbolic, 8}, DataType::Float, "b");
    program->addInput(a);
    program->addInput(b);
    program->addOutput(add(a, b));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor b = test::randomTensor({3, 8}, at::kFloat, at::kCPU, 97);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, b});
      },
      {"ATen failed while evaluating", "T2 = add(T0, T1)"});
  const at::Tensor good_b =
      test::randomTensor({5, 8}, at::kFloat, at::kCPU, 98);
  const std::vector<at::Tensor> out = evaluator.run({x_, good_b});
  test::expectClose(out[0], x_ + good_b, kF32Rtol, kF32Atol);
}

TEST_F(EvaluatorInputs, RunFusionErrorNamesTheNodeAndTheFusionInput) {
  // The fusion needs its two inputs to share a row count; the program
  // cannot know that its own two row counts agree.
  auto fusion = std::make_shared<Fusion>();
  {
    FusionGuard guard(fusion.get());
    Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
    TensorView* p = makeTensor({rows, 8}, DataType::Float, "p");
    TensorView* q = makeTensor({rows, 8}, DataType::Float, "q");
    fusion->addInput(p);
    fusion->addInput(q);
    fusion->addOutput(sub(p, q));
  }
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* a = makeTensor({kSymbolic, 8}, DataType::Float, "a");
    TensorView* b = makeTensor({kSymbolic, 8}, DataType::Float, "b");
    program->addInput(a);
    program->addInput(b);
    program->addOutput(runFusion(fusion, {a, b})[0]);
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor b = test::randomTensor({3, 8}, at::kFloat, at::kCPU, 99);
  test::expectErrorContains(
      [&] {
        evaluator.run({x_, b});
      },
      {"while running (T2) = RunFusion(T0, T1)", "input 1 (T1 'q')",
       "size 3 in dim 0", "extent rows", "bound to 5"});
  const at::Tensor good_b =
      test::randomTensor({5, 8}, at::kFloat, at::kCPU, 100);
  const std::vector<at::Tensor> out = evaluator.run({x_, good_b});
  test::expectClose(out[0], x_ - good_b, kF32Rtol, kF32Atol);
}

TEST(HostIrEvaluator, NullProgramIsRejected) {
  test::expectErrorContains([] { HostIrEvaluator evaluator(nullptr); },
                            {"HostIrEvaluator", "program is null"});
}

// ---------------------------------------------------------------------------
// Host programs: structure, validation, printing, cloning.

// relu(x) * 0.5 for x [i0, 4].
std::shared_ptr<Fusion> makeHalfReluFusion() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* x = makeTensor({kSymbolic, 4}, DataType::Float, "x");
  fusion->addInput(x);
  TensorView* activated = relu(x);
  fusion->addOutput(mul(activated, 0.5));
  return fusion;
}

// Runs the fusion twice, multiplies by w, and allocates a buffer.
std::unique_ptr<HostIrContainer> makeProgram() {
  std::shared_ptr<Fusion> fusion = makeHalfReluFusion();
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 4}, DataType::Float, "x");
  TensorView* w = makeTensor({4, 4}, DataType::Float, "w");
  program->addInput(x);
  program->addInput(w);
  TensorView* once = runFusion(fusion, {x})[0];
  TensorView* twice = runFusion(fusion, {once})[0];
  TensorView* out = matmul(twice, w);
  out->setUserName("out");
  TensorView* buffer =
      allocate({tokens, makeConstant(int64_t{2})}, DataType::Int64);
  program->addOutput(out);
  program->addOutput(buffer);
  return program;
}

// What makeProgram computes, for its first output.
at::Tensor programReference(const at::Tensor& x, const at::Tensor& w) {
  const at::Tensor once = at::clamp_min(x, 0) * 0.5;
  const at::Tensor twice = at::clamp_min(once, 0) * 0.5;
  return at::mm(twice, w);
}

TEST(HostIrPrinting, ProgramPrintsTopLevelExprsThenEachFusionOnce) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  EXPECT_EQ(program->toString(),
            "HostIrContainer {\n"
            "  input T0 'x': f32[tokens, 4]\n"
            "  input T1 'w': f32[4, 4]\n"
            "  (T2) = RunFusion(T0)  # fusion 0\n"
            "  (T3) = RunFusion(T2)  # fusion 0\n"
            "  T4 = matmul(T3, T1)\n"
            "  T5 = Allocate(i64[tokens, 2])\n"
            "  output T4 'out': f32[tokens, 4]\n"
            "  output T5: i64[tokens, 2]\n"
            "}\n"
            "fusion 0: Fusion {\n"
            "  input T0 'x': f32[i0, 4]\n"
            "  T1 = relu(T0)\n"
            "  T2 = mul(T1, 0.5)\n"
            "  output T2: f32[i0, 4]\n"
            "}\n");
}

TEST(HostIrPrinting, DistinctFusionsAreNumberedInOrderOfFirstUse) {
  std::shared_ptr<Fusion> first = makeHalfReluFusion();
  std::shared_ptr<Fusion> second = makeHalfReluFusion();
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  program->addInput(x);
  TensorView* a = runFusion(second, {x})[0];
  TensorView* b = runFusion(first, {a})[0];
  TensorView* c = runFusion(second, {b})[0];
  program->addOutput(c);
  const std::string text = program->toString();
  EXPECT_NE(text.find("(T1) = RunFusion(T0)  # fusion 0\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("(T2) = RunFusion(T1)  # fusion 1\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("(T3) = RunFusion(T2)  # fusion 0\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("fusion 1: Fusion {"), std::string::npos) << text;
  EXPECT_EQ(text.find("fusion 2:"), std::string::npos) << text;
}

TEST(HostIrContainer, TopLevelExprsAreInCreationOrderIncludingUnused) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  program->addInput(x);
  TensorView* unused = exp(x);
  TensorView* y = neg(x);
  TensorView* z = sum(y, 0);
  program->addOutput(z);
  EXPECT_EQ(program->topLevelExprs(),
            (std::vector<Expr*>{unused->definition(), y->definition(),
                                z->definition()}));
  // As a Fusion, only what the outputs need.
  EXPECT_EQ(program->exprs(),
            (std::vector<Expr*>{y->definition(), z->definition()}));
}

TEST(HostIrContainer, RunFusionOutputsFollowTheFusionsExtents) {
  auto fusion = std::make_shared<Fusion>();
  {
    FusionGuard guard(fusion.get());
    TensorView* x = makeTensor({kSymbolic, kSymbolic}, DataType::Float, "x");
    fusion->addInput(x);
    fusion->addOutput(sum(x, 1, /*keep_dim=*/true));              // [i0, 1]
    fusion->addOutput(makeTensor({kSymbolic}, DataType::Int64));  // fresh
    fusion->addOutput(cast(x, DataType::BFloat16));               // [i0, i1]
  }
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 6}, DataType::Float, "x");
  const std::vector<TensorView*> out = runFusion(fusion, {x});
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0]->extent(0), tokens);
  EXPECT_TRUE(out[0]->extent(1)->isConstantInt(1));
  EXPECT_EQ(out[1]->dtype(), DataType::Int64);
  EXPECT_FALSE(out[1]->extent(0)->isConstant());
  EXPECT_EQ(out[2]->dtype(), DataType::BFloat16);
  EXPECT_EQ(out[2]->extents(), x->extents());
}

TEST(HostIrValidation, RunFusionChecksInputsAgainstTheFusion) {
  std::shared_ptr<Fusion> fusion = makeHalfReluFusion();
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 4}, DataType::Float, "x");
  TensorView* h = makeTensor({tokens, 4}, DataType::BFloat16, "h");
  TensorView* wide = makeTensor({tokens, 5}, DataType::Float, "wide");
  test::expectErrorContains(
      [&] {
        runFusion(fusion, {x, x});
      },
      {"RunFusion", "takes 1 inputs", "2 were given"});
  test::expectErrorContains(
      [&] { runFusion(fusion, {h}); },
      {"RunFusion: input 0", "T1 'h': bf16[tokens, 4]", "does not match",
       "input 0 (T0 'x')", "f32[i0, 4]"});
  test::expectErrorContains([&] { runFusion(fusion, {wide}); },
                            {"RunFusion: input 0", "T2 'wide'",
                             "size 5 in dim 1", "input 0 (T0 'x')", "needs 4"});
  test::expectErrorContains([&] { runFusion(nullptr, {x}); },
                            {"runFusion", "fusion is null"});
  EXPECT_TRUE(program->topLevelExprs().empty());
}

TEST(HostIrValidation, HostNodesHaveNoStandaloneSemantics) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  const Expr* run_fusion = program->topLevelExprs()[0];
  ASSERT_TRUE(run_fusion->isA<RunFusion>());
  test::expectErrorContains(
      [&] {
        run_fusion->evaluate({at::ones({2, 4})});
      },
      {"RunFusion has no stand-alone reference semantics",
       "(T2) = RunFusion(T0)"});
}

// Counts host nodes by overload; everything else goes to handleDefault.
class HostNodeCounter : public ExprVisitor {
 public:
  using ExprVisitor::handle;

  void handle(RunFusion* /*expr*/) override { ++run_fusions; }
  void handle(Allocate* /*expr*/) override { ++allocates; }

  int run_fusions = 0;
  int allocates = 0;
  std::vector<std::string> others;

 protected:
  void handleDefault(Expr* expr) override { others.push_back(expr->opName()); }
};

TEST(HostIrVisitor, DispatchReachesHostNodeOverloads) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  HostNodeCounter counter;
  for (Expr* expr : program->topLevelExprs()) {
    counter.dispatch(expr);
  }
  EXPECT_EQ(counter.run_fusions, 2);
  EXPECT_EQ(counter.allocates, 1);
  EXPECT_EQ(counter.others, (std::vector<std::string>{"MatmulOp"}));
}

TEST(HostIrCloning, ClonePrintsIdentically) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  std::unique_ptr<HostIrContainer> copy = program->clone();
  EXPECT_EQ(copy->toString(), program->toString());
}

TEST(HostIrCloning, CloneEvaluatesToSameResults) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  std::unique_ptr<HostIrContainer> copy = program->clone();
  HostIrEvaluator original_evaluator(std::move(program));
  HostIrEvaluator copy_evaluator(std::move(copy));
  const at::Tensor x = test::randomTensor({7, 4}, at::kFloat, at::kCPU, 110);
  const at::Tensor w = test::randomTensor({4, 4}, at::kFloat, at::kCPU, 111);
  const std::vector<at::Tensor> expected = original_evaluator.run({x, w});
  const std::vector<at::Tensor> actual = copy_evaluator.run({x, w});
  ASSERT_EQ(actual.size(), 2u);
  test::expectClose(actual[0], expected[0]);
  test::expectClose(actual[0], programReference(x, w), kF32Rtol, kF32Atol);
  EXPECT_EQ(actual[1].sizes(), expected[1].sizes());
  EXPECT_EQ(actual[1].sizes(), (std::vector<int64_t>{7, 2}));
  EXPECT_EQ(actual[1].scalar_type(), at::kLong);
}

TEST(HostIrCloning, CloneHasDistinctNodesAndSharesFusions) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  std::unique_ptr<HostIrContainer> copy = program->clone();
  const std::vector<Expr*>& exprs = program->topLevelExprs();
  const std::vector<Expr*>& copied = copy->topLevelExprs();
  ASSERT_EQ(copied.size(), exprs.size());
  for (size_t i = 0; i < exprs.size(); ++i) {
    EXPECT_NE(copied[i], exprs[i]);
    EXPECT_EQ(copied[i]->container(), copy.get());
    EXPECT_STREQ(copied[i]->opName(), exprs[i]->opName());
    for (const Val* output : copied[i]->outputs()) {
      EXPECT_EQ(output->container(), copy.get());
      EXPECT_EQ(output->definition(), copied[i]);
    }
  }
  for (size_t i = 0; i < program->inputs().size(); ++i) {
    EXPECT_NE(copy->inputs()[i], program->inputs()[i]);
    EXPECT_EQ(copy->inputs()[i]->userName(), program->inputs()[i]->userName());
  }
  // A fusion, once handed to RunFusion, is immutable and shared.
  ASSERT_TRUE(copied[0]->isA<RunFusion>());
  EXPECT_EQ(copied[0]->as<RunFusion>()->fusionPtr(),
            exprs[0]->as<RunFusion>()->fusionPtr());
}

TEST(HostIrCloning, ChangingCloneLeavesOriginalUnchanged) {
  std::unique_ptr<HostIrContainer> program = makeProgram();
  const std::string before = program->toString();
  std::unique_ptr<HostIrContainer> copy = program->clone();
  {
    FusionGuard guard(copy.get());
    copy->addOutput(neg(copy->outputs()[0]->as<TensorView>()));
  }
  EXPECT_EQ(copy->outputs().size(), 3u);
  EXPECT_EQ(copy->topLevelExprs().size(), 5u);
  EXPECT_EQ(program->outputs().size(), 2u);
  EXPECT_EQ(program->topLevelExprs().size(), 4u);
  EXPECT_EQ(program->toString(), before);
  EXPECT_NE(copy->toString().find("T6 = neg(T4)"), std::string::npos);

  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor x = test::randomTensor({3, 4}, at::kFloat, at::kCPU, 112);
  const at::Tensor w = test::randomTensor({4, 4}, at::kFloat, at::kCPU, 113);
  EXPECT_EQ(evaluator.run({x, w}).size(), 2u);
}

}  // namespace
}  // namespace hostfuse
