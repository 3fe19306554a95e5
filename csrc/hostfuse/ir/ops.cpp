#include <hostfuse/ir/ops.h>

#include <hostfuse/ir/container.h>

namespace hostfuse {

namespace {

TensorView* newTensor(DataType dtype, std::vector<Scalar*> extents) {
  return IrBuilder::create<TensorView>(dtype, std::move(extents));
}

// Resolves a negative dim and checks the range, naming the operation.
int64_t normalizeDim(const char* op, const TensorView* x, int64_t dim) {
  const int64_t wrapped = dim < 0 ? dim + x->rank() : dim;
  HF_CHECK(wrapped >= 0 && wrapped < x->rank(), op, ": dim ", dim,
           " is out of range for operand ", x->describe(), " of rank ",
           x->rank());
  return wrapped;
}

}  // namespace

Scalar* makeConstant(int64_t value) {
  return IrBuilder::create<Scalar>(ScalarValue(value));
}

Scalar* makeConstant(double value) {
  return IrBuilder::create<Scalar>(ScalarValue(value));
}

Scalar* makeConstant(bool value) {
  return IrBuilder::create<Scalar>(ScalarValue(value));
}

Scalar* makeSymbolicScalar(DataType dtype, const std::string& name) {
  Scalar* scalar = IrBuilder::create<Scalar>(dtype);
  scalar->setUserName(name);
  return scalar;
}

TensorView* makeTensor(const std::vector<SizeSpec>& sizes, DataType dtype,
                       const std::string& name) {
  std::vector<Scalar*> extents;
  extents.reserve(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    const SizeSpec& spec = sizes[i];
    if (spec.extent() != nullptr) {
      HF_CHECK(FusionGuard::current()->owns(spec.extent()),
               "makeTensor: ", "the extent of dim ", i,
               " belongs to another container");
      extents.push_back(spec.extent());
    } else if (spec.size() == kSymbolic) {
      extents.push_back(IrBuilder::create<Scalar>(DataType::Int64));
    } else {
      HF_CHECK(spec.size() >= 0, "makeTensor: size of dim ", i,
               " must be >= 0 or kSymbolic, got ", spec.size());
      extents.push_back(makeConstant(spec.size()));
    }
  }
  TensorView* tv = newTensor(dtype, std::move(extents));
  tv->setUserName(name);
  return tv;
}

TensorView* makeSymbolicTensor(int64_t rank, DataType dtype,
                               const std::string& name) {
  HF_CHECK(rank >= 0, "makeSymbolicTensor: rank must be >= 0, got ", rank);
  return makeTensor(std::vector<SizeSpec>(rank, SizeSpec(kSymbolic)), dtype,
                    name);
}

TensorView* unaryOp(UnaryOpType type, TensorView* x) {
  HF_CHECK(x != nullptr, toString(type), ": operand is null");
  TensorView* out = newTensor(inferUnaryDtype(type, x), x->extents());
  IrBuilder::create<UnaryOp>(out, type, x);
  return out;
}

#define HF_DEFINE_UNARY_BUILDER_(name, type) \
  TensorView* name(TensorView* x) { return unaryOp(UnaryOpType::type, x); }
HF_DEFINE_UNARY_BUILDER_(neg, Neg)
HF_DEFINE_UNARY_BUILDER_(abs, Abs)
HF_DEFINE_UNARY_BUILDER_(relu, Relu)
HF_DEFINE_UNARY_BUILDER_(exp, Exp)
HF_DEFINE_UNARY_BUILDER_(log, Log)
HF_DEFINE_UNARY_BUILDER_(sqrt, Sqrt)
HF_DEFINE_UNARY_BUILDER_(rsqrt, Rsqrt)
HF_DEFINE_UNARY_BUILDER_(reciprocal, Reciprocal)
HF_DEFINE_UNARY_BUILDER_(tanh, Tanh)
HF_DEFINE_UNARY_BUILDER_(sigmoid, Sigmoid)
HF_DEFINE_UNARY_BUILDER_(silu, Silu)
#undef HF_DEFINE_UNARY_BUILDER_

TensorView* binaryOp(BinaryOpType type, Val* lhs, Val* rhs) {
  HF_CHECK(lhs != nullptr && rhs != nullptr, toString(type),
           ": an operand is null");
  const DataType dtype = inferBinaryDtype(type, lhs, rhs);
  TensorView* out =
      newTensor(dtype, inferPointwiseExtents(toString(type), {lhs, rhs}));
  IrBuilder::create<BinaryOp>(out, type, lhs, rhs);
  return out;
}

#define HF_DEFINE_BINARY_BUILDER_(name, type)                    \
  TensorView* name(Val* lhs, Val* rhs) {                         \
    return binaryOp(BinaryOpType::type, lhs, rhs);               \
  }                                                              \
  TensorView* name(TensorView* lhs, double rhs) {                \
    return binaryOp(BinaryOpType::type, lhs, makeConstant(rhs)); \
  }                                                              \
  TensorView* name(double lhs, TensorView* rhs) {                \
    return binaryOp(BinaryOpType::type, makeConstant(lhs), rhs); \
  }
HF_DEFINE_BINARY_BUILDER_(add, Add)
HF_DEFINE_BINARY_BUILDER_(sub, Sub)
HF_DEFINE_BINARY_BUILDER_(mul, Mul)
HF_DEFINE_BINARY_BUILDER_(div, Div)
HF_DEFINE_BINARY_BUILDER_(maximum, Maximum)
HF_DEFINE_BINARY_BUILDER_(minimum, Minimum)
HF_DEFINE_BINARY_BUILDER_(lt, Lt)
HF_DEFINE_BINARY_BUILDER_(le, Le)
HF_DEFINE_BINARY_BUILDER_(gt, Gt)
HF_DEFINE_BINARY_BUILDER_(ge, Ge)
HF_DEFINE_BINARY_BUILDER_(eq, Eq)
HF_DEFINE_BINARY_BUILDER_(ne, Ne)
#undef HF_DEFINE_BINARY_BUILDER_

TensorView* where(Val* condition, Val* a, Val* b) {
  HF_CHECK(condition != nullptr && a != nullptr && b != nullptr,
           "where: an operand is null");
  const DataType dtype = inferWhereDtype(condition, a, b);
  TensorView* out =
      newTensor(dtype, inferPointwiseExtents("where", {condition, a, b}));
  IrBuilder::create<TernaryOp>(out, condition, a, b);
  return out;
}

TensorView* cast(TensorView* x, DataType dtype) {
  HF_CHECK(x != nullptr, "cast: operand is null");
  TensorView* out = newTensor(dtype, x->extents());
  IrBuilder::create<CastOp>(out, x);
  return out;
}

TensorView* broadcast(TensorView* x,
                      const std::vector<bool>& is_broadcast_dim) {
  HF_CHECK(x != nullptr, "broadcast: operand is null");
  const auto kept = static_cast<int64_t>(
      std::count(is_broadcast_dim.begin(), is_broadcast_dim.end(), false));
  HF_CHECK(kept == x->rank(), "broadcast: is_broadcast_dim has ", kept,
           " entries that are false, but the operand ", x->describe(),
           " has rank ", x->rank(), "; they must be equal");
  std::vector<Scalar*> extents;
  int64_t next = 0;
  for (bool is_new : is_broadcast_dim) {
    extents.push_back(is_new ? makeConstant(int64_t{1}) : x->extent(next++));
  }
  TensorView* out = newTensor(x->dtype(), std::move(extents));
  IrBuilder::create<BroadcastOp>(out, x, is_broadcast_dim);
  return out;
}

namespace {

TensorView* reduction(ReductionOpType type, TensorView* x, int64_t dim,
                      bool keep_dim) {
  HF_CHECK(x != nullptr, toString(type), ": operand is null");
  dim = normalizeDim(toString(type), x, dim);
  std::vector<Scalar*> extents;
  for (int64_t d = 0; d < x->rank(); ++d) {
    if (d != dim) {
      extents.push_back(x->extent(d));
    } else if (keep_dim) {
      extents.push_back(makeConstant(int64_t{1}));
    }
  }
  TensorView* out = newTensor(inferReductionDtype(type, x), std::move(extents));
  IrBuilder::create<ReductionOp>(out, type, x, dim, keep_dim);
  return out;
}

}  // namespace

TensorView* sum(TensorView* x, int64_t dim, bool keep_dim) {
  return reduction(ReductionOpType::Sum, x, dim, keep_dim);
}

TensorView* max(TensorView* x, int64_t dim, bool keep_dim) {
  return reduction(ReductionOpType::Max, x, dim, keep_dim);
}

TensorView* matmul(TensorView* a, TensorView* b) {
  HF_CHECK(a != nullptr && b != nullptr, "matmul: an operand is null");
  HF_CHECK(a->rank() >= 2, "matmul: operand a ", a->describe(),
           " must have rank >= 2, got ", a->rank());
  HF_CHECK(b->rank() >= 2, "matmul: operand b ", b->describe(),
           " must have rank >= 2, got ", b->rank());
  std::vector<Scalar*> extents(a->extents().begin(), a->extents().end() - 1);
  extents.push_back(b->extent(b->rank() - 1));
  // The node's validate() checks dtypes, ranks and the inner size.
  TensorView* out = newTensor(a->dtype(), std::move(extents));
  IrBuilder::create<MatmulOp>(out, a, b);
  return out;
}

TensorView* linear(TensorView* x, TensorView* weight, TensorView* bias,
                   std::optional<DataType> out_dtype) {
  HF_CHECK(x != nullptr && weight != nullptr, "linear: an operand is null");
  HF_CHECK(x->rank() >= 1, "linear: input x ", x->describe(),
           " must have rank >= 1");
  HF_CHECK(weight->rank() == 2, "linear: weight ", weight->describe(),
           " must have rank 2 ([out_features, in_features]), got rank ",
           weight->rank());
  std::vector<Scalar*> extents(x->extents().begin(), x->extents().end() - 1);
  extents.push_back(weight->extent(0));
  HF_CHECK(!out_dtype.has_value() || *out_dtype == x->dtype() ||
               LinearOp::accumulatesToFloat(x->dtype(), *out_dtype),
           "linear: out_dtype ", *out_dtype, " with operands of ", x->dtype(),
           "; it may be x's dtype, or f32 for bf16 or f16 operands");
  TensorView* out =
      newTensor(out_dtype.value_or(x->dtype()), std::move(extents));
  IrBuilder::create<LinearOp>(out, x, weight, bias);
  return out;
}

TopKResult topk(TensorView* x, int64_t k) {
  HF_CHECK(x != nullptr, "topk: operand is null");
  HF_CHECK(x->rank() >= 1, "topk: operand ", x->describe(),
           " must have rank >= 1");
  std::vector<Scalar*> extents(x->extents().begin(), x->extents().end() - 1);
  extents.push_back(makeConstant(k));
  TopKResult result;
  result.values = newTensor(x->dtype(), extents);
  result.indices = newTensor(DataType::Int64, std::move(extents));
  // The node's validate() checks k and the dtype.
  IrBuilder::create<TopKOp>(result.values, result.indices, x, k);
  return result;
}

TensorView* softmax(TensorView* x, int64_t dim) {
  HF_CHECK(x != nullptr, "softmax: operand is null");
  HF_CHECK(isFloatingPoint(x->dtype()), "softmax: operand ", x->describe(),
           " must be floating point, got ", x->dtype());
  dim = normalizeDim("softmax", x, dim);
  TensorView* shifted = sub(x, max(x, dim, /*keep_dim=*/true));
  TensorView* numerator = exp(shifted);
  return div(numerator, sum(numerator, dim, /*keep_dim=*/true));
}

}  // namespace hostfuse
