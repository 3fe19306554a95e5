// Tests of csrc/hostfuse/ir: building values and expressions, type and shape
// inference, validation errors, printing, cloning and the visitor.
//
// What runs a program (the HostIrEvaluator) is tested in test_host_ir.cpp;
// here evaluation appears only to show that a clone computes what its
// original computes.
#include "test_utils.h"

#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/dispatch.h>
#include <hostfuse/ir/evaluation.h>
#include <hostfuse/ir/exprs.h>
#include <hostfuse/ir/ops.h>

namespace hostfuse {
namespace {

// Sizes of a tensor, with kSymbolic for each symbolic extent.
std::vector<int64_t> sizesOf(const TensorView* tv) {
  std::vector<int64_t> sizes;
  for (const Scalar* extent : tv->extents()) {
    sizes.push_back(extent->constantInt().value_or(kSymbolic));
  }
  return sizes;
}

using Sizes = std::vector<int64_t>;

// ---------------------------------------------------------------------------
// Construction: values, builders, type and shape inference.

TEST(IrConstruction, MakeTensorWithConstantExtentsRecordsSizesAndName) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::BFloat16, "x");
  TensorView* y = makeTensor({5}, DataType::Int32);

  EXPECT_EQ(x->dtype(), DataType::BFloat16);
  EXPECT_EQ(x->rank(), 2);
  EXPECT_EQ(sizesOf(x), (Sizes{3, 4}));
  EXPECT_EQ(x->userName(), "x");
  EXPECT_EQ(x->valType(), ValType::TensorView);
  EXPECT_EQ(x->container(), &fusion);
  EXPECT_EQ(x->definition(), nullptr);
  // Tensors are numbered in creation order, independently of scalars.
  EXPECT_EQ(x->name(), 0);
  EXPECT_EQ(y->name(), 1);
  EXPECT_EQ(y->dtype(), DataType::Int32);
  EXPECT_TRUE(y->userName().empty());
  for (const Scalar* extent : x->extents()) {
    EXPECT_TRUE(extent->isConstant());
    EXPECT_EQ(extent->dtype(), DataType::Int64);
  }
}

TEST(IrConstruction, MakeTensorWithSymbolicExtentsGetsFreshExtentPerDim) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({kSymbolic, 8, kSymbolic});
  TensorView* y = makeSymbolicTensor(2, DataType::Half, "y");

  EXPECT_EQ(x->dtype(), DataType::Float);  // the default
  EXPECT_EQ(sizesOf(x), (Sizes{kSymbolic, 8, kSymbolic}));
  EXPECT_NE(x->extent(0), x->extent(2));
  EXPECT_FALSE(x->extent(0)->isConstant());
  EXPECT_EQ(sizesOf(y), (Sizes{kSymbolic, kSymbolic}));
  EXPECT_EQ(y->dtype(), DataType::Half);
  EXPECT_NE(y->extent(0), y->extent(1));
  EXPECT_NE(y->extent(0), x->extent(0));
}

TEST(IrConstruction, MakeTensorSharesAGivenSymbolicExtent) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 64}, DataType::Float, "x");
  TensorView* ids = makeTensor({tokens, 2}, DataType::Int64, "ids");

  EXPECT_FALSE(tokens->isConstant());
  EXPECT_EQ(tokens->userName(), "tokens");
  EXPECT_EQ(x->extent(0), tokens);
  EXPECT_EQ(ids->extent(0), tokens);
  EXPECT_EQ(sizesOf(ids), (Sizes{kSymbolic, 2}));
  // The shared extent flows into results.
  TensorView* y = relu(x);
  EXPECT_EQ(y->extent(0), tokens);
  EXPECT_EQ(y->extent(1), x->extent(1));
}

TEST(IrConstruction, MakeTensorRejectsNegativeSize) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  test::expectErrorContains(
      [] {
        makeTensor({4, -2});
      },
      {"makeTensor", "dim 1", "got -2"});
}

TEST(IrConstruction, UnaryOpsKeepExtentsAndGiveFloatForIntegerMath) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* f = makeTensor({tokens, 4}, DataType::BFloat16, "f");
  TensorView* i = makeTensor({tokens, 4}, DataType::Int32, "i");

  const std::vector<std::pair<UnaryOpType, TensorView* (*)(TensorView*)>>
      builders = {
          {UnaryOpType::Neg, neg},     {UnaryOpType::Abs, abs},
          {UnaryOpType::Relu, relu},   {UnaryOpType::Exp, exp},
          {UnaryOpType::Log, log},     {UnaryOpType::Sqrt, sqrt},
          {UnaryOpType::Rsqrt, rsqrt}, {UnaryOpType::Reciprocal, reciprocal},
          {UnaryOpType::Tanh, tanh},   {UnaryOpType::Sigmoid, sigmoid},
          {UnaryOpType::Silu, silu}};
  for (const auto& [type, build] : builders) {
    SCOPED_TRACE(toString(type));
    TensorView* out = build(f);
    EXPECT_EQ(out->dtype(), DataType::BFloat16);
    EXPECT_EQ(out->extents(), f->extents());
    ASSERT_NE(out->definition(), nullptr);
    ASSERT_TRUE(out->definition()->isA<UnaryOp>());
    EXPECT_EQ(out->definition()->as<UnaryOp>()->opType(), type);
    EXPECT_EQ(out->definition()->as<UnaryOp>()->in(), f);

    // Like ATen: neg, abs and relu keep an integer type; the others
    // compute in the default floating type.
    const bool keeps_integer = type == UnaryOpType::Neg ||
                               type == UnaryOpType::Abs ||
                               type == UnaryOpType::Relu;
    EXPECT_EQ(build(i)->dtype(),
              keeps_integer ? DataType::Int32 : DataType::Float);
  }
}

TEST(IrConstruction, BinaryOpsPromoteTypesLikeATen) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* bf16 = makeTensor({2, 3}, DataType::BFloat16);
  TensorView* f16 = makeTensor({2, 3}, DataType::Half);
  TensorView* f32 = makeTensor({2, 3}, DataType::Float);
  TensorView* f64 = makeTensor({2, 3}, DataType::Double);
  TensorView* i32 = makeTensor({2, 3}, DataType::Int32);
  TensorView* i64 = makeTensor({2, 3}, DataType::Int64);
  TensorView* b = makeTensor({2, 3}, DataType::Bool);

  // Two tensors: the wider type; bf16 and f16 meet in f32.
  EXPECT_EQ(add(bf16, f32)->dtype(), DataType::Float);
  EXPECT_EQ(mul(f16, bf16)->dtype(), DataType::Float);
  EXPECT_EQ(sub(f32, f64)->dtype(), DataType::Double);
  EXPECT_EQ(add(i32, i64)->dtype(), DataType::Int64);
  EXPECT_EQ(add(i64, f16)->dtype(), DataType::Half);
  EXPECT_EQ(mul(b, i32)->dtype(), DataType::Int32);
  // A scalar of a higher category gives its category's default type.
  EXPECT_EQ(add(i32, 2.5)->dtype(), DataType::Float);
  EXPECT_EQ(add(2.5, i64)->dtype(), DataType::Float);
  EXPECT_EQ(add(b, makeConstant(int64_t{3}))->dtype(), DataType::Int64);
  EXPECT_EQ(mul(b, 0.5)->dtype(), DataType::Float);
  // A scalar of the same or a lower category does not change the type.
  EXPECT_EQ(mul(bf16, 0.5)->dtype(), DataType::BFloat16);
  EXPECT_EQ(add(f16, makeConstant(int64_t{7}))->dtype(), DataType::Half);
  EXPECT_EQ(add(i32, makeConstant(int64_t{7}))->dtype(), DataType::Int32);
  EXPECT_EQ(sub(f32, makeSymbolicScalar(DataType::Double))->dtype(),
            DataType::Float);
  EXPECT_EQ(maximum(i32, makeConstant(true))->dtype(), DataType::Int32);
  EXPECT_EQ(minimum(b, b)->dtype(), DataType::Bool);
}

TEST(IrConstruction, IntegerDivisionGivesFloat) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* i32 = makeTensor({4}, DataType::Int32);
  TensorView* i64 = makeTensor({4}, DataType::Int64);
  TensorView* f64 = makeTensor({4}, DataType::Double);
  TensorView* bf16 = makeTensor({4}, DataType::BFloat16);

  EXPECT_EQ(div(i32, i32)->dtype(), DataType::Float);
  EXPECT_EQ(div(i64, makeConstant(int64_t{2}))->dtype(), DataType::Float);
  EXPECT_EQ(div(2.0, i32)->dtype(), DataType::Float);
  EXPECT_EQ(div(f64, i64)->dtype(), DataType::Double);
  EXPECT_EQ(div(bf16, 3.0)->dtype(), DataType::BFloat16);
}

TEST(IrConstruction, ComparisonsGiveBoolWithScalarOnEitherSide) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({kSymbolic, 4}, DataType::BFloat16, "x");
  TensorView* i = makeTensor({1, 4}, DataType::Int32, "i");

  using Builder = TensorView* (*)(Val*, Val*);
  const std::vector<std::pair<BinaryOpType, Builder>> comparisons = {
      {BinaryOpType::Lt, lt}, {BinaryOpType::Le, le}, {BinaryOpType::Gt, gt},
      {BinaryOpType::Ge, ge}, {BinaryOpType::Eq, eq}, {BinaryOpType::Ne, ne}};
  for (const auto& [type, build] : comparisons) {
    SCOPED_TRACE(toString(type));
    EXPECT_TRUE(isComparison(type));
    TensorView* tensor_tensor = build(x, i);
    EXPECT_EQ(tensor_tensor->dtype(), DataType::Bool);
    EXPECT_EQ(sizesOf(tensor_tensor), (Sizes{kSymbolic, 4}));
    TensorView* scalar_lhs = build(makeConstant(0.5), i);
    EXPECT_EQ(scalar_lhs->dtype(), DataType::Bool);
    EXPECT_EQ(scalar_lhs->definition()->as<BinaryOp>()->rhs(), i);
    EXPECT_EQ(build(x, makeConstant(int64_t{1}))->dtype(), DataType::Bool);
  }
  EXPECT_EQ(lt(2.0, x)->dtype(), DataType::Bool);
  EXPECT_EQ(ne(x, 2.0)->dtype(), DataType::Bool);
  EXPECT_FALSE(isComparison(BinaryOpType::Maximum));
}

TEST(IrConstruction, BinaryOpBroadcastsSizeOneDimensions) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* column = makeTensor({tokens, 1}, DataType::Float, "column");
  TensorView* row = makeTensor({1, 5}, DataType::Float, "row");
  TensorView* unknown = makeTensor({kSymbolic, kSymbolic});

  TensorView* outer = mul(column, row);
  EXPECT_EQ(outer->extent(0), tokens);
  EXPECT_EQ(outer->extent(1), row->extent(1));
  EXPECT_EQ(sizesOf(outer), (Sizes{kSymbolic, 5}));

  // A known size wins over a symbolic one; the first symbolic one is kept.
  TensorView* mixed = add(unknown, row);
  EXPECT_EQ(mixed->extent(0), unknown->extent(0));
  EXPECT_EQ(sizesOf(mixed), (Sizes{kSymbolic, 5}));
}

TEST(IrConstruction, BinaryOpTakesScalarOperandOnEitherSide) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({2, 3}, DataType::Float, "x");
  Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");

  TensorView* lhs_scalar = sub(2.0, x);
  const auto* op = lhs_scalar->definition()->as<BinaryOp>();
  EXPECT_EQ(op->opType(), BinaryOpType::Sub);
  ASSERT_TRUE(op->lhs()->isA<Scalar>());
  EXPECT_EQ(op->lhs()->as<Scalar>()->value(), ScalarValue(2.0));
  EXPECT_EQ(op->rhs(), x);
  EXPECT_EQ(lhs_scalar->extents(), x->extents());

  TensorView* symbolic = mul(x, alpha);
  EXPECT_EQ(symbolic->definition()->as<BinaryOp>()->rhs(), alpha);
  EXPECT_EQ(symbolic->dtype(), DataType::Float);
  EXPECT_EQ(alpha->uses().size(), 1u);
}

TEST(IrConstruction, WhereTakesTypeOfBranchesAndBroadcasts) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* condition = makeTensor({4, 1}, DataType::Bool, "condition");
  TensorView* x = makeTensor({1, 5}, DataType::BFloat16, "x");
  TensorView* y = makeTensor({4, 5}, DataType::Float, "y");

  TensorView* both = where(condition, x, y);
  EXPECT_EQ(both->dtype(), DataType::Float);
  EXPECT_EQ(sizesOf(both), (Sizes{4, 5}));
  ASSERT_TRUE(both->definition()->isA<TernaryOp>());
  const auto* op = both->definition()->as<TernaryOp>();
  EXPECT_EQ(op->condition(), condition);
  EXPECT_EQ(op->lhs(), x);
  EXPECT_EQ(op->rhs(), y);

  // A double scalar branch does not widen a floating tensor.
  EXPECT_EQ(where(condition, x, makeConstant(0.0))->dtype(),
            DataType::BFloat16);
  TensorView* ints = makeTensor({4, 5}, DataType::Int32);
  EXPECT_EQ(where(condition, ints, makeConstant(0.5))->dtype(),
            DataType::Float);
}

TEST(IrConstruction, CastChangesOnlyTheDtype) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({kSymbolic, 3}, DataType::BFloat16, "x");
  TensorView* y = cast(x, DataType::Float);
  EXPECT_EQ(y->dtype(), DataType::Float);
  EXPECT_EQ(y->extents(), x->extents());
  ASSERT_TRUE(y->definition()->isA<CastOp>());
  EXPECT_EQ(y->definition()->as<CastOp>()->in(), x);
  EXPECT_EQ(cast(y, DataType::Int64)->dtype(), DataType::Int64);
}

TEST(IrConstruction, BroadcastInsertsSizeOneDimensions) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 4}, DataType::Half, "x");

  TensorView* y = broadcast(x, {true, false, true, false});
  EXPECT_EQ(y->dtype(), DataType::Half);
  EXPECT_EQ(sizesOf(y), (Sizes{1, kSymbolic, 1, 4}));
  EXPECT_EQ(y->extent(1), tokens);
  EXPECT_EQ(y->extent(3), x->extent(1));
  ASSERT_TRUE(y->definition()->isA<BroadcastOp>());
  EXPECT_EQ(y->definition()->as<BroadcastOp>()->isBroadcastDim(),
            (std::vector<bool>{true, false, true, false}));

  // No new dimension is a valid (if useless) broadcast.
  EXPECT_EQ(broadcast(x, {false, false})->extents(), x->extents());
}

TEST(IrConstruction, SumAndMaxWithKeepDimAndNegativeDims) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({2, tokens, 8}, DataType::Float, "x");

  TensorView* last = sum(x, -1);
  EXPECT_EQ(sizesOf(last), (Sizes{2, kSymbolic}));
  EXPECT_EQ(last->extent(1), tokens);
  const auto* op = last->definition()->as<ReductionOp>();
  EXPECT_EQ(op->opType(), ReductionOpType::Sum);
  EXPECT_EQ(op->dim(), 2);  // stored normalized
  EXPECT_FALSE(op->keepDim());

  TensorView* kept = sum(x, 1, /*keep_dim=*/true);
  EXPECT_EQ(sizesOf(kept), (Sizes{2, 1, 8}));
  EXPECT_TRUE(kept->definition()->as<ReductionOp>()->keepDim());

  TensorView* first = max(x, -3);
  EXPECT_EQ(sizesOf(first), (Sizes{kSymbolic, 8}));
  EXPECT_EQ(first->definition()->as<ReductionOp>()->opType(),
            ReductionOpType::Max);
  EXPECT_EQ(first->definition()->as<ReductionOp>()->dim(), 0);
  EXPECT_EQ(first->dtype(), DataType::Float);

  TensorView* max_kept = max(x, -2, /*keep_dim=*/true);
  EXPECT_EQ(sizesOf(max_kept), (Sizes{2, 1, 8}));
}

TEST(IrConstruction, SumOfIntegersGivesInt64AndMaxKeepsType) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* i32 = makeTensor({3, 4}, DataType::Int32);
  TensorView* b = makeTensor({3, 4}, DataType::Bool);
  TensorView* bf16 = makeTensor({3, 4}, DataType::BFloat16);

  EXPECT_EQ(sum(i32, 0)->dtype(), DataType::Int64);
  EXPECT_EQ(sum(b, 1)->dtype(), DataType::Int64);
  EXPECT_EQ(sum(bf16, 1)->dtype(), DataType::BFloat16);
  EXPECT_EQ(max(i32, 1)->dtype(), DataType::Int32);
  EXPECT_EQ(max(bf16, 0)->dtype(), DataType::BFloat16);
}

TEST(IrConstruction, Matmul2DGivesRowsOfAAndColumnsOfB) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* a = makeTensor({tokens, 16}, DataType::BFloat16, "a");
  TensorView* b = makeTensor({16, 32}, DataType::BFloat16, "b");

  TensorView* c = matmul(a, b);
  EXPECT_EQ(c->dtype(), DataType::BFloat16);
  EXPECT_EQ(sizesOf(c), (Sizes{kSymbolic, 32}));
  EXPECT_EQ(c->extent(0), tokens);
  ASSERT_TRUE(c->definition()->isA<MatmulOp>());
  EXPECT_EQ(c->definition()->as<MatmulOp>()->a(), a);
  EXPECT_EQ(c->definition()->as<MatmulOp>()->b(), b);
}

TEST(IrConstruction, MatmulBatchedWithBatchedOrSharedB) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* experts = makeSymbolicScalar(DataType::Int64, "experts");
  TensorView* a = makeTensor({experts, 6, 8}, DataType::Float, "a");
  TensorView* batched_b = makeTensor({experts, 8, 3}, DataType::Float, "b");
  TensorView* shared_b = makeTensor({8, 5}, DataType::Float, "w");

  TensorView* batched = matmul(a, batched_b);
  EXPECT_EQ(sizesOf(batched), (Sizes{kSymbolic, 6, 3}));
  EXPECT_EQ(batched->extent(0), experts);

  TensorView* shared = matmul(a, shared_b);
  EXPECT_EQ(sizesOf(shared), (Sizes{kSymbolic, 6, 5}));
  EXPECT_EQ(shared->dtype(), DataType::Float);
}

TEST(IrConstruction, LinearWithAndWithoutBias) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({2, tokens, 16}, DataType::Half, "x");
  TensorView* w = makeTensor({24, 16}, DataType::Half, "w");
  TensorView* b = makeTensor({24}, DataType::Half, "b");

  TensorView* plain = linear(x, w);
  EXPECT_EQ(plain->dtype(), DataType::Half);
  EXPECT_EQ(sizesOf(plain), (Sizes{2, kSymbolic, 24}));
  EXPECT_EQ(plain->extent(1), tokens);
  EXPECT_EQ(plain->extent(2), w->extent(0));
  const auto* plain_op = plain->definition()->as<LinearOp>();
  EXPECT_EQ(plain_op->bias(), nullptr);
  EXPECT_EQ(plain_op->inputs().size(), 2u);

  TensorView* biased = linear(x, w, b);
  EXPECT_EQ(sizesOf(biased), (Sizes{2, kSymbolic, 24}));
  const auto* biased_op = biased->definition()->as<LinearOp>();
  EXPECT_EQ(biased_op->x(), x);
  EXPECT_EQ(biased_op->weight(), w);
  EXPECT_EQ(biased_op->bias(), b);
}

TEST(IrConstruction, SoftmaxIsMaxSubExpSumDiv) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 10}, DataType::BFloat16, "x");

  TensorView* y = softmax(x, -1);
  EXPECT_EQ(y->dtype(), DataType::BFloat16);
  EXPECT_EQ(y->extents(), x->extents());

  fusion.addInput(x);
  fusion.addOutput(y);
  std::vector<std::string> ops;
  for (const Expr* expr : fusion.exprs()) {
    ops.push_back(expr->toInlineString());
  }
  EXPECT_EQ(ops, (std::vector<std::string>{
                     "T1 = max(T0, dim=1, keep_dim=true)",
                     "T2 = sub(T0, T1)",
                     "T3 = exp(T2)",
                     "T4 = sum(T3, dim=1, keep_dim=true)",
                     "T5 = div(T3, T4)",
                 }));
}

TEST(IrConstruction, DefinitionsAndUsesAreLinked) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4}, DataType::Float, "x");
  TensorView* y = neg(x);
  TensorView* z = mul(x, y);

  EXPECT_EQ(x->uses(), (std::vector<Expr*>{y->definition(), z->definition()}));
  EXPECT_EQ(y->uses(), (std::vector<Expr*>{z->definition()}));
  EXPECT_TRUE(z->uses().empty());
  EXPECT_EQ(z->definition()->inputs(), (std::vector<Val*>{x, y}));
  EXPECT_EQ(z->definition()->outputs(), (std::vector<Val*>{z}));
  EXPECT_EQ(z->definition()->container(), &fusion);
  EXPECT_EQ(fusion.unorderedExprs().size(), 2u);
}

// The builders' dtypes against what ATen itself computes for a tensor of
// each dtype and a Python-number operand, for every combination.
TEST(IrConstruction, ScalarOperandPromotionMatchesATen) {
  const std::vector<DataType> dtypes = {
      DataType::Bool,     DataType::Int32, DataType::Int64, DataType::Half,
      DataType::BFloat16, DataType::Float, DataType::Double};
  const std::vector<c10::Scalar> numbers = {
      c10::Scalar(int64_t{3}), c10::Scalar(2.5), c10::Scalar(true)};
  for (DataType dtype : dtypes) {
    for (const c10::Scalar& number : numbers) {
      SCOPED_TRACE(toString(dtype) + " with " + c10::toString(number.type()));
      Fusion fusion;
      FusionGuard guard(&fusion);
      TensorView* x = makeTensor({2}, dtype);
      Scalar* constant =
          number.isIntegral(false)   ? makeConstant(number.toLong())
          : number.isFloatingPoint() ? makeConstant(number.toDouble())
                                     : makeConstant(number.toBool());
      const at::Tensor ones = at::ones({2}, toScalarType(dtype));

      EXPECT_EQ(toScalarType(lt(x, constant)->dtype()),
                at::lt(ones, number).scalar_type());
      EXPECT_EQ(toScalarType(maximum(x, constant)->dtype()),
                at::result_type(ones, number));
      if (dtype == DataType::Bool && number.isBoolean()) {
        continue;  // arithmetic on bools: rejected, see Validation
      }
      EXPECT_EQ(toScalarType(add(x, constant)->dtype()),
                at::add(ones, number).scalar_type());
      EXPECT_EQ(toScalarType(mul(constant, x)->dtype()),
                at::mul(ones, number).scalar_type());
      EXPECT_EQ(toScalarType(div(x, constant)->dtype()),
                at::div(ones, number).scalar_type());
    }
  }
}

// ---------------------------------------------------------------------------
// Validation: every expression checks its operands when built, and the
// error names the operand and shows what was expected and what was given.

TEST(Validation, BinaryOpRankMismatchNamesOperand) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4, 5, 6}, DataType::Float, "x");
  TensorView* bias = makeTensor({6}, DataType::Float, "bias");
  test::expectErrorContains([&] { add(x, bias); },
                            {"add", "T1 'bias'", "has rank 1", "T0 'x'",
                             "has rank 3", "broadcast()"});
}

TEST(Validation, BinaryOpIncompatibleSizesShowsBothSizes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  TensorView* y = makeTensor({3, 5}, DataType::Float, "y");
  test::expectErrorContains(
      [&] { mul(x, y); },
      {"mul", "T1 'y'", "size 5 in dim 1", "size 4", "must match or be 1"});
  // Nothing was added for the failed op.
  EXPECT_TRUE(fusion.unorderedExprs().empty());
  EXPECT_TRUE(x->uses().empty());
}

TEST(Validation, ArithmeticOnBoolTensorsIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* a = makeTensor({3}, DataType::Bool, "a");
  TensorView* b = makeTensor({3}, DataType::Bool, "b");
  test::expectErrorContains([&] { sub(a, b); },
                            {"sub", "T0 'a'", "T1 'b'", "bool"});
}

TEST(Validation, BinaryOpOfTwoScalarsIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");
  test::expectErrorContains(
      [&] { add(alpha, makeConstant(1.0)); },
      {"add", "at least one operand must be a tensor", "alpha", "1.0"});
}

TEST(Validation, WhereConditionMustBeBool) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* mask = makeTensor({4}, DataType::Float, "mask");
  TensorView* x = makeTensor({4}, DataType::Float, "x");
  test::expectErrorContains(
      [&] { where(mask, x, makeConstant(0.0)); },
      {"where", "condition T0 'mask'", "must be bool", "got f32"});
}

TEST(Validation, ReductionDimOutOfRangeNamesOperandAndRank) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4, 5}, DataType::Float, "x");
  test::expectErrorContains(
      [&] { sum(x, 2); }, {"sum", "dim 2 is out of range", "T0 'x'", "rank 2"});
  test::expectErrorContains(
      [&] { max(x, -3, /*keep_dim=*/true); },
      {"max", "dim -3 is out of range", "T0 'x'", "rank 2"});
  // The node checks a dim given to it directly too.
  TensorView* out = makeTensor({4}, DataType::Float);
  test::expectErrorContains(
      [&] {
        IrBuilder::create<ReductionOp>(out, ReductionOpType::Sum, x, 7, false);
      },
      {"sum", "dim 7 is out of range", "T0 'x'", "rank 2"});
}

TEST(Validation, BroadcastFlagsCountMustMatchRank) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  test::expectErrorContains(
      [&] {
        broadcast(x, {true, false});
      },
      {"broadcast", "is_broadcast_dim has 1 entries", "false", "T0 'x'",
       "rank 2"});
}

TEST(Validation, MatmulInnerSizeMismatchShowsBothSizes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* a = makeTensor({3, 4}, DataType::Float, "a");
  TensorView* b = makeTensor({5, 6}, DataType::Float, "b");
  test::expectErrorContains(
      [&] { matmul(a, b); },
      {"matmul", "T0 'a'", "inner size 4", "T1 'b'", "has 5"});
}

TEST(Validation, MatmulDtypeMismatchShowsBothDtypes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* a = makeTensor({3, 4}, DataType::Float, "a");
  TensorView* b = makeTensor({4, 6}, DataType::BFloat16, "b");
  test::expectErrorContains(
      [&] { matmul(a, b); },
      {"matmul", "T1 'b'", "dtype bf16", "T0 'a'", "dtype f32"});
}

TEST(Validation, MatmulBatchSizeMismatchShowsBothSizes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* a = makeTensor({2, 3, 4}, DataType::Float, "a");
  TensorView* b = makeTensor({5, 4, 6}, DataType::Float, "b");
  test::expectErrorContains(
      [&] { matmul(a, b); },
      {"matmul", "T1 'b'", "size 5 in batch dim 0", "T0 'a'", "has size 2"});
  // No broadcasting of a size-1 batch either: the output takes a's sizes.
  // (T2 is the output the failed matmul made before its node was rejected.)
  TensorView* single = makeTensor({1, 3, 4}, DataType::Float, "single");
  test::expectErrorContains([&] { matmul(single, b); },
                            {"matmul", "T1 'b'", "size 5 in batch dim 0",
                             "T3 'single'", "has size 1"});
}

TEST(Validation, MatmulOfIntegersIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* a = makeTensor({3, 4}, DataType::Int64, "a");
  TensorView* b = makeTensor({4, 6}, DataType::Int64, "b");
  test::expectErrorContains(
      [&] { matmul(a, b); },
      {"matmul", "T0 'a'", "must be floating point", "got i64"});
}

TEST(Validation, LinearWeightMustHaveRankTwo) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({5, 4}, DataType::Float, "x");
  TensorView* w = makeTensor({2, 6, 4}, DataType::Float, "w");
  test::expectErrorContains(
      [&] { linear(x, w); },
      {"linear", "weight T1 'w'", "must have rank 2", "got rank 3"});
}

TEST(Validation, LinearInFeaturesMismatchShowsBothSizes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({5, 4}, DataType::Float, "x");
  TensorView* w = makeTensor({6, 3}, DataType::Float, "w");
  test::expectErrorContains(
      [&] { linear(x, w); },
      {"linear", "weight T1 'w'", "in_features 3", "x T0 'x'", "has 4"});
}

TEST(Validation, LinearBiasSizeMismatchShowsBothSizes) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({5, 4}, DataType::Float, "x");
  TensorView* w = makeTensor({6, 4}, DataType::Float, "w");
  TensorView* b = makeTensor({7}, DataType::Float, "b");
  test::expectErrorContains(
      [&] { linear(x, w, b); },
      {"linear", "bias T2 'b'", "size 7", "out_features 6"});
}

TEST(Validation, NegOfBoolTensorIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* flags = makeTensor({4}, DataType::Bool, "flags");
  test::expectErrorContains(
      [&] { neg(flags); }, {"neg", "T0 'flags'", "is bool", "numeric operand"});
}

TEST(Validation, ReluOfBoolTensorIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* flags = makeTensor({2, 2}, DataType::Bool, "flags");
  test::expectErrorContains(
      [&] { relu(flags); },
      {"relu", "T0 'flags'", "is bool", "numeric operand"});
}

TEST(Validation, SoftmaxOfIntegerTensorIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({2, 3}, DataType::Int32, "x");
  test::expectErrorContains(
      [&] { softmax(x, 1); },
      {"softmax", "T0 'x'", "must be floating point", "got i32"});
}

TEST(Validation, ExprBuiltByHandIsValidatedBeforeJoining) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4}, DataType::Float, "x");
  TensorView* y = makeTensor({4}, DataType::Float, "y");
  // A comparison gives bool, but the output says f32.
  TensorView* out = makeTensor({4}, DataType::Float, "out");
  test::expectErrorContains(
      [&] { IrBuilder::create<BinaryOp>(out, BinaryOpType::Lt, x, y); },
      {"BinaryOp output T2 'out'", "has dtype f32", "the op gives bool"});
  EXPECT_EQ(out->definition(), nullptr);
  EXPECT_TRUE(x->uses().empty());
  EXPECT_TRUE(fusion.unorderedExprs().empty());
}

TEST(Validation, AddInputOfComputedValueIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4}, DataType::Float, "x");
  TensorView* y = neg(x);
  y->setUserName("y");
  test::expectErrorContains([&] { fusion.addInput(y); },
                            {"Fusion::addInput", "T1 'y'",
                             "computed by T1 = neg(T0)", "cannot be an input"});
  EXPECT_TRUE(fusion.inputs().empty());
}

TEST(Validation, AddInputOfConstantOrTwiceIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({4}, DataType::Float, "x");
  fusion.addInput(x);
  test::expectErrorContains([&] { fusion.addInput(x); },
                            {"Fusion::addInput", "T0 'x'", "already"});
  test::expectErrorContains([&] { fusion.addInput(makeConstant(2.0)); },
                            {"Fusion::addInput", "constant 2.0"});
  EXPECT_EQ(fusion.inputs(), (std::vector<Val*>{x}));
}

TEST(Validation, ValueFromAnotherContainerIsRejected) {
  Fusion first;
  TensorView* x = nullptr;
  {
    FusionGuard guard(&first);
    x = makeTensor({4}, DataType::Float, "x");
  }
  Fusion second;
  FusionGuard guard(&second);
  TensorView* y = makeTensor({4}, DataType::Float, "y");
  test::expectErrorContains(
      [&] { add(y, x); },
      {"BinaryOp", "input 1", "T0 'x'", "belongs to another container"});
  test::expectErrorContains(
      [&] { second.addInput(x); },
      {"Fusion::addInput", "T0 'x'", "belongs to another container"});
  test::expectErrorContains(
      [&] { second.addOutput(x); },
      {"Fusion::addOutput", "T0 'x'", "belongs to another container"});
  test::expectErrorContains(
      [&] { makeTensor({x->extent(0)}); },
      {"makeTensor", "dim 0", "belongs to another container"});
  EXPECT_TRUE(second.unorderedExprs().empty());
  EXPECT_TRUE(x->uses().empty());
}

TEST(Validation, BuildingWithoutFusionGuardFails) {
  test::expectErrorContains([] { makeTensor({4}); },
                            {"no Fusion is active", "FusionGuard"});
  test::expectErrorContains([] { makeConstant(1.0); }, {"no Fusion is active"});
  // A guard is active only in its scope, and guards nest.
  Fusion outer;
  Fusion inner;
  {
    FusionGuard outer_guard(&outer);
    {
      FusionGuard inner_guard(&inner);
      EXPECT_EQ(FusionGuard::current(), &inner);
    }
    EXPECT_EQ(FusionGuard::current(), &outer);
  }
  test::expectErrorContains([] { FusionGuard::current(); },
                            {"no Fusion is active"});
}

TEST(Validation, AddOutputOfScalarIsRejected) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");
  test::expectErrorContains([&] { fusion.addOutput(alpha); },
                            {"Fusion::addOutput", "alpha", "is a scalar"});
}

// ---------------------------------------------------------------------------
// Printing.

TEST(Printing, FusionPrintsAsReadableText) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 4}, DataType::BFloat16, "x");
  TensorView* w = makeTensor({4}, DataType::Float, "w");
  fusion.addInput(x);
  fusion.addInput(w);
  TensorView* activated = silu(x);
  TensorView* row = broadcast(w, {true, false});
  TensorView* scaled = mul(activated, row);
  TensorView* total = sum(scaled, -1, /*keep_dim=*/true);
  TensorView* y = add(total, 2.0);
  y->setUserName("y");
  fusion.addOutput(y);

  EXPECT_EQ(fusion.toString(),
            "Fusion {\n"
            "  input T0 'x': bf16[tokens, 4]\n"
            "  input T1 'w': f32[4]\n"
            "  T2 = silu(T0)\n"
            "  T3 = broadcast(T1, {true, false})\n"
            "  T4 = mul(T2, T3)\n"
            "  T5 = sum(T4, dim=1, keep_dim=true)\n"
            "  T6 = add(T5, 2.0)\n"
            "  output T6 'y': f32[tokens, 1]\n"
            "}\n");
}

TEST(Printing, EveryExprPrintsOnOneLine) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");  // T0
  TensorView* w = makeTensor({5, 4}, DataType::Float, "w");  // T1
  TensorView* b = makeTensor({5}, DataType::Float, "b");     // T2
  TensorView* m = makeTensor({3, 4}, DataType::Bool, "m");   // T3
  TensorView* k = makeTensor({4, 2}, DataType::Float, "k");  // T4

  EXPECT_EQ(cast(x, DataType::Half)->definition()->toInlineString(),
            "T5 = cast(T0, f16)");
  EXPECT_EQ(where(m, x, makeConstant(0.5))->definition()->toInlineString(),
            "T6 = where(T3, T0, 0.5)");
  EXPECT_EQ(linear(x, w, b)->definition()->toInlineString(),
            "T7 = linear(T0, T1, T2)");
  EXPECT_EQ(linear(x, w)->definition()->toInlineString(),
            "T8 = linear(T0, T1)");
  EXPECT_EQ(matmul(x, k)->definition()->toInlineString(),
            "T9 = matmul(T0, T4)");
  EXPECT_EQ(max(x, 0)->definition()->toInlineString(), "T10 = max(T0, dim=0)");
  EXPECT_EQ(sub(1.0, x)->definition()->toInlineString(), "T11 = sub(1.0, T0)");
  EXPECT_EQ(ge(x, makeConstant(int64_t{-3}))->definition()->toInlineString(),
            "T12 = ge(T0, -3)");
  const Expr* neg_expr = neg(x)->definition();
  EXPECT_EQ(neg_expr->toString(), neg_expr->toInlineString() + "\n");
  EXPECT_STREQ(neg_expr->opName(), "UnaryOp");
}

TEST(Printing, DeclStringShowsUserNameTypeAndShape) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 64}, DataType::BFloat16, "x");
  TensorView* anonymous = makeTensor({2, kSymbolic}, DataType::Int32);
  TensorView* rank0 = makeTensor({}, DataType::Double, "r");

  EXPECT_EQ(x->toString(), "T0");
  EXPECT_EQ(x->describe(), "T0 'x'");
  EXPECT_EQ(x->toDeclString(), "T0 'x': bf16[tokens, 64]");
  EXPECT_EQ(x->typeString(), "bf16[tokens, 64]");
  // The fresh extent is scalar 3: tokens is 0, 64 is 1 and 2 is 2.
  EXPECT_EQ(anonymous->toDeclString(), "T1: i32[2, i3]");
  EXPECT_EQ(rank0->toDeclString(), "T2 'r': f64[]");
  EXPECT_EQ(tokens->toDeclString(), "tokens: i64");
}

TEST(Printing, ConstantsPrintTheirValues) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  EXPECT_EQ(makeConstant(2.0)->toString(), "2.0");
  EXPECT_EQ(makeConstant(-3.0)->toString(), "-3.0");
  EXPECT_EQ(makeConstant(0.5)->toString(), "0.5");
  EXPECT_EQ(makeConstant(1e20)->toString(), "1e+20");
  EXPECT_EQ(makeConstant(int64_t{64})->toString(), "64");
  EXPECT_EQ(makeConstant(int64_t{-1})->toString(), "-1");
  EXPECT_EQ(makeConstant(true)->toString(), "true");
  EXPECT_EQ(makeConstant(false)->toString(), "false");
  EXPECT_EQ(makeConstant(2.0)->toDeclString(), "2.0: f64");
  EXPECT_EQ(makeConstant(int64_t{7})->toDeclString(), "7: i64");
  EXPECT_EQ(makeConstant(true)->toDeclString(), "true: bool");
}

TEST(Printing, SymbolicScalarsPrintAsUserNameOrTypedNumber) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  Scalar* i = makeSymbolicScalar(DataType::Int64);
  Scalar* d = makeSymbolicScalar(DataType::Double);
  Scalar* b = makeSymbolicScalar(DataType::Bool);
  Scalar* alpha = makeSymbolicScalar(DataType::Double, "alpha");
  EXPECT_EQ(i->toString(), "i0");
  EXPECT_EQ(d->toString(), "d1");
  EXPECT_EQ(b->toString(), "b2");
  EXPECT_EQ(alpha->toString(), "alpha");
  EXPECT_EQ(d->toDeclString(), "d1: f64");
  EXPECT_EQ(alpha->toDeclString(), "alpha: f64");
  // The user name is shown once, not as "alpha 'alpha'".
  EXPECT_EQ(alpha->describe(), "alpha");
  EXPECT_EQ(i->describe(), "i0");
}

TEST(Printing, DataTypesHaveShortNames) {
  EXPECT_EQ(toString(DataType::Bool), "bool");
  EXPECT_EQ(toString(DataType::Int32), "i32");
  EXPECT_EQ(toString(DataType::Int64), "i64");
  EXPECT_EQ(toString(DataType::Half), "f16");
  EXPECT_EQ(toString(DataType::BFloat16), "bf16");
  EXPECT_EQ(toString(DataType::Float), "f32");
  EXPECT_EQ(toString(DataType::Double), "f64");
  std::ostringstream ss;
  ss << DataType::BFloat16;
  EXPECT_EQ(ss.str(), "bf16");
}

// ---------------------------------------------------------------------------
// Cloning.

// x [tokens, 8] and w [8] in, softmax(x * w) and the row sums of x out.
std::unique_ptr<Fusion> makeCloneSubject() {
  auto fusion = std::make_unique<Fusion>();
  FusionGuard guard(fusion.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* w = makeTensor({8}, DataType::Float, "w");
  fusion->addInput(x);
  fusion->addInput(w);
  TensorView* row = broadcast(w, {true, false});
  TensorView* probs = softmax(mul(x, row), -1);
  probs->setUserName("probs");
  fusion->addOutput(probs);
  fusion->addOutput(sum(x, 1));
  return fusion;
}

TEST(Cloning, FusionClonePrintsIdentically) {
  std::unique_ptr<Fusion> fusion = makeCloneSubject();
  std::unique_ptr<Fusion> copy = fusion->clone();
  EXPECT_EQ(copy->toString(), fusion->toString());
  EXPECT_NE(fusion->toString().find("probs"), std::string::npos);
}

TEST(Cloning, FusionCloneEvaluatesToSameResults) {
  std::unique_ptr<Fusion> fusion = makeCloneSubject();
  std::unique_ptr<Fusion> copy = fusion->clone();
  const at::Tensor x = test::randomTensor({5, 8}, at::kFloat, at::kCPU, 11);
  const at::Tensor w = test::randomTensor({8}, at::kFloat, at::kCPU, 12);
  const std::vector<at::Tensor> expected = evaluateFusion(*fusion, {x, w});
  const std::vector<at::Tensor> actual = evaluateFusion(*copy, {x, w});
  ASSERT_EQ(actual.size(), 2u);
  // The same ops on the same inputs: bit for bit.
  test::expectClose(actual[0], expected[0]);
  test::expectClose(actual[1], expected[1]);
  // And both are right.
  test::expectClose(actual[0], at::softmax(x * w, -1), 1e-5, 1e-6);
  test::expectClose(actual[1], x.sum(1), 1e-5, 1e-5);
}

TEST(Cloning, FusionCloneHasDistinctNodesWithSameNames) {
  std::unique_ptr<Fusion> fusion = makeCloneSubject();
  std::unique_ptr<Fusion> copy = fusion->clone();

  const std::vector<Val*> vals = fusion->vals();
  const std::vector<Val*> copied_vals = copy->vals();
  ASSERT_EQ(copied_vals.size(), vals.size());
  for (size_t i = 0; i < vals.size(); ++i) {
    EXPECT_NE(copied_vals[i], vals[i]);
    EXPECT_EQ(copied_vals[i]->container(), copy.get());
    EXPECT_EQ(copied_vals[i]->name(), vals[i]->name());
    EXPECT_EQ(copied_vals[i]->userName(), vals[i]->userName());
    EXPECT_EQ(copied_vals[i]->dtype(), vals[i]->dtype());
  }
  const std::vector<Expr*> exprs = fusion->exprs();
  const std::vector<Expr*> copied_exprs = copy->exprs();
  ASSERT_EQ(copied_exprs.size(), exprs.size());
  for (size_t i = 0; i < exprs.size(); ++i) {
    EXPECT_NE(copied_exprs[i], exprs[i]);
    EXPECT_EQ(copied_exprs[i]->container(), copy.get());
    EXPECT_EQ(copied_exprs[i]->attributes(), exprs[i]->attributes());
    for (const Val* input : copied_exprs[i]->inputs()) {
      EXPECT_EQ(input->container(), copy.get());
    }
  }
  // The shared extent is still shared, by the copy's own scalar.
  const auto* x = copy->inputs()[0]->as<TensorView>();
  const auto* probs = copy->outputs()[0]->as<TensorView>();
  EXPECT_EQ(probs->extent(0), x->extent(0));
  EXPECT_NE(x->extent(0), fusion->inputs()[0]->as<TensorView>()->extent(0));
}

TEST(Cloning, ChangingFusionCloneLeavesOriginalUnchanged) {
  std::unique_ptr<Fusion> fusion = makeCloneSubject();
  const std::string before = fusion->toString();
  std::unique_ptr<Fusion> copy = fusion->clone();
  {
    FusionGuard guard(copy.get());
    copy->addOutput(neg(copy->outputs()[0]->as<TensorView>()));
  }
  EXPECT_EQ(copy->outputs().size(), 3u);
  EXPECT_EQ(fusion->outputs().size(), 2u);
  EXPECT_EQ(fusion->toString(), before);
  EXPECT_NE(copy->toString(), before);
  EXPECT_EQ(fusion->vals().size() + 1, copy->vals().size());
}

// ---------------------------------------------------------------------------
// Visitor.

// Counts the expressions it sees, by the overload that got them.
class CountingVisitor : public ExprVisitor {
 public:
  using ExprVisitor::handle;

  void handle(UnaryOp* expr) override { unary.push_back(expr->opType()); }
  void handle(BinaryOp* expr) override { binary.push_back(expr->opType()); }
  void handle(MatmulOp* /*expr*/) override { ++matmuls; }

  std::vector<UnaryOpType> unary;
  std::vector<BinaryOpType> binary;
  int matmuls = 0;
  std::map<std::string, int> others;

 protected:
  void handleDefault(Expr* expr) override { ++others[expr->opName()]; }
};

TEST(Visitor, DispatchReachesTypedOverloadOrHandleDefault) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  TensorView* w = makeTensor({4, 4}, DataType::Float, "w");
  TensorView* m = makeTensor({3, 4}, DataType::Bool, "m");
  fusion.addInput(x);
  fusion.addInput(w);
  fusion.addInput(m);
  TensorView* h = matmul(x, w);
  TensorView* r = relu(h);
  TensorView* p = sub(r, x);
  TensorView* e = exp(p);
  TensorView* c = cast(e, DataType::Half);
  TensorView* s = sum(c, 0);
  TensorView* t = where(m, x, makeConstant(0.0));
  TensorView* b = broadcast(s, {true, false});
  TensorView* l = linear(t, w);
  fusion.addOutput(b);
  fusion.addOutput(l);

  CountingVisitor visitor;
  for (Expr* expr : fusion.exprs()) {
    visitor.dispatch(expr);
  }
  EXPECT_EQ(visitor.unary,
            (std::vector<UnaryOpType>{UnaryOpType::Relu, UnaryOpType::Exp}));
  EXPECT_EQ(visitor.binary, (std::vector<BinaryOpType>{BinaryOpType::Sub}));
  EXPECT_EQ(visitor.matmuls, 1);
  EXPECT_EQ(visitor.others, (std::map<std::string, int>{{"BroadcastOp", 1},
                                                        {"CastOp", 1},
                                                        {"LinearOp", 1},
                                                        {"ReductionOp", 1},
                                                        {"TernaryOp", 1}}));
}

TEST(Visitor, DefaultHandlerThrowsNamingTheExpr) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  Expr* reduction = sum(x, 1)->definition();
  ExprVisitor visitor;
  test::expectErrorContains(
      [&] { visitor.dispatch(reduction); },
      {"does not handle ReductionOp", "T1 = sum(T0, dim=1)"});
}

// Like CountingVisitor, through const pointers, as code that only reads the
// IR (kernel codegen) visits it.
class ConstCountingVisitor : public ConstExprVisitor {
 public:
  using ConstExprVisitor::handle;

  void handle(const UnaryOp* expr) override { unary.push_back(expr->opType()); }
  void handle(const ReductionOp* /*expr*/) override { ++reductions; }

  std::vector<UnaryOpType> unary;
  int reductions = 0;
  std::map<std::string, int> others;

 protected:
  void handleDefault(const Expr* expr) override { ++others[expr->opName()]; }
};

TEST(Visitor, ConstDispatchReachesTypedOverloadOrHandleDefault) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  fusion.addInput(x);
  TensorView* n = neg(x);
  TensorView* e = exp(n);
  TensorView* s = sum(e, 1);
  fusion.addOutput(add(broadcast(s, {false, true}), x));

  const Fusion& read_only = fusion;
  ConstCountingVisitor visitor;
  for (const Expr* expr : read_only.exprs()) {
    visitor.dispatch(expr);
  }
  EXPECT_EQ(visitor.unary,
            (std::vector<UnaryOpType>{UnaryOpType::Neg, UnaryOpType::Exp}));
  EXPECT_EQ(visitor.reductions, 1);
  EXPECT_EQ(visitor.others,
            (std::map<std::string, int>{{"BinaryOp", 1}, {"BroadcastOp", 1}}));
}

TEST(Visitor, ConstDefaultHandlerThrowsNamingTheExpr) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3, 4}, DataType::Float, "x");
  const Expr* reduction = sum(x, 1)->definition();
  ConstExprVisitor visitor;
  test::expectErrorContains(
      [&] { visitor.dispatch(reduction); },
      {"does not handle ReductionOp", "T1 = sum(T0, dim=1)"});
}

TEST(Evaluation, ExprEvaluateComputesOutputsFromInputValues) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeTensor({3}, DataType::Float, "x");
  const Expr* expr = neg(x)->definition();
  const std::vector<c10::IValue> results =
      expr->evaluate({at::arange(3, at::kFloat)});
  ASSERT_EQ(results.size(), 1u);
  test::expectClose(results[0].toTensor(), at::tensor({0.0f, -1.0f, -2.0f}));
}

// A user error (hostfuse::Error) says what was wrong and where it was
// raised, not the C++ condition that caught it; an internal error keeps
// the condition, for the bug report it asks for.
TEST(Errors, UserErrorsNameThePlaceButNotTheCondition) {
  const int64_t tokens = -3;
  try {
    HF_CHECK(tokens >= 0, "tokens must be >= 0; got ", tokens);
    FAIL() << "HF_CHECK did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind("tokens must be >= 0; got -3\n  at test_ir.cpp:", 0),
              0u)
        << what;
    EXPECT_EQ(what.find("tokens >= 0"), std::string::npos) << what;
  }
  try {
    HF_ERROR(tokens >= 0, "the planner lost a token");
    FAIL() << "HF_ERROR did not throw";
  } catch (const InternalError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("please report"), std::string::npos) << what;
    EXPECT_NE(what.find("check failed: tokens >= 0"), std::string::npos)
        << what;
  }
}

}  // namespace
}  // namespace hostfuse
