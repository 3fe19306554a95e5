#include <hostfuse/ir/exprs.h>

#include <ATen/ATen.h>

#include <sstream>

#include <hostfuse/ir/container.h>

namespace hostfuse {

const char* toString(UnaryOpType type) {
  switch (type) {
    case UnaryOpType::Neg:
      return "neg";
    case UnaryOpType::Abs:
      return "abs";
    case UnaryOpType::Relu:
      return "relu";
    case UnaryOpType::Exp:
      return "exp";
    case UnaryOpType::Log:
      return "log";
    case UnaryOpType::Sqrt:
      return "sqrt";
    case UnaryOpType::Rsqrt:
      return "rsqrt";
    case UnaryOpType::Reciprocal:
      return "reciprocal";
    case UnaryOpType::Tanh:
      return "tanh";
    case UnaryOpType::Sigmoid:
      return "sigmoid";
    case UnaryOpType::Silu:
      return "silu";
  }
  return "unknown";
}

const char* toString(BinaryOpType type) {
  switch (type) {
    case BinaryOpType::Add:
      return "add";
    case BinaryOpType::Sub:
      return "sub";
    case BinaryOpType::Mul:
      return "mul";
    case BinaryOpType::Div:
      return "div";
    case BinaryOpType::Maximum:
      return "maximum";
    case BinaryOpType::Minimum:
      return "minimum";
    case BinaryOpType::Lt:
      return "lt";
    case BinaryOpType::Le:
      return "le";
    case BinaryOpType::Gt:
      return "gt";
    case BinaryOpType::Ge:
      return "ge";
    case BinaryOpType::Eq:
      return "eq";
    case BinaryOpType::Ne:
      return "ne";
  }
  return "unknown";
}

const char* toString(ReductionOpType type) {
  return type == ReductionOpType::Sum ? "sum" : "max";
}

bool isComparison(BinaryOpType type) {
  switch (type) {
    case BinaryOpType::Lt:
    case BinaryOpType::Le:
    case BinaryOpType::Gt:
    case BinaryOpType::Ge:
    case BinaryOpType::Eq:
    case BinaryOpType::Ne:
      return true;
    default:
      return false;
  }
}

namespace {

// ATen's type categories: bool < integral < floating.
int category(DataType dtype) {
  if (dtype == DataType::Bool) {
    return 0;
  }
  return isFloatingPoint(dtype) ? 2 : 1;
}

// ATen's result type for operands that are tensors or scalars. Scalars act
// like Python numbers: they change the type only when they are of a higher
// category than every tensor, and then give the default type of their
// category (f32 or i64).
DataType resultType(const std::vector<const Val*>& operands) {
  std::optional<DataType> tensors;
  std::optional<DataType> scalars;
  for (const Val* operand : operands) {
    auto& slot = operand->isA<TensorView>() ? tensors : scalars;
    slot = slot.has_value() ? promoteTypes(*slot, operand->dtype())
                            : operand->dtype();
  }
  if (!tensors.has_value()) {
    return *scalars;
  }
  if (!scalars.has_value() || category(*tensors) >= category(*scalars)) {
    return *tensors;
  }
  return isFloatingPoint(*scalars) ? DataType::Float : DataType::Int64;
}

bool isTranscendental(UnaryOpType type) {
  switch (type) {
    case UnaryOpType::Neg:
    case UnaryOpType::Abs:
    case UnaryOpType::Relu:
      return false;
    default:
      return true;
  }
}

void checkOutputMatches(const Expr* expr, DataType dtype,
                        std::optional<int64_t> rank) {
  const Val* out = expr->output(0);
  HF_CHECK(out->dtype() == dtype, expr->opName(), " output ", out->describe(),
           " has dtype ", out->dtype(), " but the op gives ", dtype);
  if (rank.has_value()) {
    const auto* tv = dynamic_cast<const TensorView*>(out);
    HF_CHECK(tv != nullptr, expr->opName(), " output ", out->describe(),
             " must be a tensor");
    HF_CHECK(tv->rank() == *rank, expr->opName(), " output ", out->describe(),
             " has rank ", tv->rank(), " but the op gives rank ", *rank);
  }
}

// The rank of a pointwise result: that of its tensor operands, or nullopt
// when all operands are scalars.
std::optional<int64_t> pointwiseRank(const std::vector<Val*>& operands) {
  for (const Val* operand : operands) {
    if (const auto* tv = dynamic_cast<const TensorView*>(operand)) {
      return tv->rank();
    }
  }
  return std::nullopt;
}

// A scalar operand as an ATen "wrapped number": a 0-dim CPU tensor that
// takes part in type promotion like a Python number. It stays on the CPU:
// ATen accepts wrapped numbers next to CUDA tensors, and moving it would
// drop the wrapped-number flag (and cost a copy).
at::Tensor operandTensor(const c10::IValue& value) {
  if (value.isTensor()) {
    return value.toTensor();
  }
  at::Tensor tensor;
  if (value.isInt()) {
    tensor = at::scalar_tensor(value.toInt(), at::dtype(at::kLong));
  } else if (value.isDouble()) {
    tensor = at::scalar_tensor(value.toDouble(), at::dtype(at::kDouble));
  } else {
    HF_ERROR(value.isBool(), "unexpected operand value ", value.tagKind());
    tensor = at::scalar_tensor(value.toBool(), at::dtype(at::kBool));
  }
  tensor.unsafeGetTensorImpl()->set_wrapped_number(true);
  return tensor;
}

// Casts a result to the dtype the IR declared for `out`.
c10::IValue declaredType(const at::Tensor& result, const Val* out) {
  return result.to(toScalarType(out->dtype()));
}

}  // namespace

DataType inferUnaryDtype(UnaryOpType type, const Val* in) {
  HF_CHECK(in->dtype() != DataType::Bool, toString(type), ": operand ",
           in->describe(), " is bool; ", toString(type),
           " needs a numeric operand");
  if (isTranscendental(type) && !isFloatingPoint(in->dtype())) {
    return DataType::Float;  // as ATen does for integral inputs
  }
  return in->dtype();
}

DataType inferBinaryDtype(BinaryOpType type, const Val* lhs, const Val* rhs) {
  HF_CHECK(lhs->isA<TensorView>() || rhs->isA<TensorView>(), toString(type),
           ": at least one operand must be a tensor, got the scalars ",
           lhs->describe(), " and ", rhs->describe());
  if (isComparison(type)) {
    return DataType::Bool;
  }
  const DataType common = resultType({lhs, rhs});
  if (type == BinaryOpType::Div && !isFloatingPoint(common)) {
    return DataType::Float;  // true division
  }
  if (type != BinaryOpType::Maximum && type != BinaryOpType::Minimum) {
    HF_CHECK(common != DataType::Bool, toString(type), ": operands ",
             lhs->describe(), " and ", rhs->describe(),
             " are bool; arithmetic needs numeric operands");
  }
  return common;
}

DataType inferWhereDtype(const Val* condition, const Val* lhs, const Val* rhs) {
  HF_CHECK(condition->dtype() == DataType::Bool, "where: condition ",
           condition->describe(), " must be bool, got ", condition->dtype());
  HF_CHECK(condition->isA<TensorView>() || lhs->isA<TensorView>() ||
               rhs->isA<TensorView>(),
           "where: at least one operand must be a tensor");
  return resultType({lhs, rhs});
}

DataType inferReductionDtype(ReductionOpType type, const Val* in) {
  if (type == ReductionOpType::Sum && !isFloatingPoint(in->dtype())) {
    return DataType::Int64;  // as ATen sums integers and bools
  }
  return in->dtype();
}

std::vector<Scalar*> inferPointwiseExtents(const std::string& op,
                                           const std::vector<Val*>& operands) {
  const TensorView* first = nullptr;
  std::vector<Scalar*> extents;
  for (const Val* operand : operands) {
    const auto* tv = dynamic_cast<const TensorView*>(operand);
    if (tv == nullptr) {
      continue;
    }
    if (first == nullptr) {
      first = tv;
      extents = tv->extents();
      continue;
    }
    HF_CHECK(tv->rank() == first->rank(), op, ": operand ", tv->describe(),
             " has rank ", tv->rank(), " but ", first->describe(), " has rank ",
             first->rank(), "; use broadcast() to add dimensions");
    for (int64_t d = 0; d < tv->rank(); ++d) {
      Scalar* mine = extents[d];
      Scalar* theirs = tv->extent(d);
      if (mine == theirs || theirs->isConstantInt(1)) {
        continue;
      }
      if (mine->isConstantInt(1)) {
        extents[d] = theirs;
        continue;
      }
      const std::optional<int64_t> a = mine->constantInt();
      const std::optional<int64_t> b = theirs->constantInt();
      HF_CHECK(!a.has_value() || !b.has_value() || *a == *b, op, ": operand ",
               tv->describe(), " has size ", *b, " in dim ", d,
               " but another operand has size ", *a,
               "; sizes must match or be 1");
      // A known size is more useful than a symbolic one. Two different
      // symbolic sizes are checked when the program runs.
      if (!a.has_value() && b.has_value()) {
        extents[d] = theirs;
      }
    }
  }
  return extents;
}

// ---------------------------------------------------------------------------

UnaryOp::UnaryOp(Val* out, UnaryOpType type, Val* in) {
  addOutput(out);
  addInput(in);
  addDataAttribute(static_cast<int64_t>(type));
}

std::string UnaryOp::toInlineString() const {
  return out()->toString() + " = " + hostfuse::toString(opType()) + "(" +
         in()->toString() + ")";
}

void UnaryOp::validate() const {
  checkOutputMatches(this, inferUnaryDtype(opType(), in()),
                     pointwiseRank({in()}));
}

std::vector<c10::IValue> UnaryOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = operandTensor(inputs.at(0));
  at::Tensor result;
  switch (opType()) {
    case UnaryOpType::Neg:
      result = at::neg(x);
      break;
    case UnaryOpType::Abs:
      result = at::abs(x);
      break;
    case UnaryOpType::Relu:
      result = at::relu(x);
      break;
    case UnaryOpType::Exp:
      result = at::exp(x);
      break;
    case UnaryOpType::Log:
      result = at::log(x);
      break;
    case UnaryOpType::Sqrt:
      result = at::sqrt(x);
      break;
    case UnaryOpType::Rsqrt:
      result = at::rsqrt(x);
      break;
    case UnaryOpType::Reciprocal:
      result = at::reciprocal(x);
      break;
    case UnaryOpType::Tanh:
      result = at::tanh(x);
      break;
    case UnaryOpType::Sigmoid:
      result = at::sigmoid(x);
      break;
    case UnaryOpType::Silu:
      result = at::silu(x);
      break;
  }
  return {declaredType(result, out())};
}

BinaryOp::BinaryOp(Val* out, BinaryOpType type, Val* lhs, Val* rhs) {
  addOutput(out);
  addInput(lhs);
  addInput(rhs);
  addDataAttribute(static_cast<int64_t>(type));
}

std::string BinaryOp::toInlineString() const {
  return out()->toString() + " = " + hostfuse::toString(opType()) + "(" +
         lhs()->toString() + ", " + rhs()->toString() + ")";
}

void BinaryOp::validate() const {
  const DataType dtype = inferBinaryDtype(opType(), lhs(), rhs());
  inferPointwiseExtents(hostfuse::toString(opType()), inputs());
  checkOutputMatches(this, dtype, pointwiseRank(inputs()));
}

std::vector<c10::IValue> BinaryOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor a = operandTensor(inputs.at(0));
  const at::Tensor b = operandTensor(inputs.at(1));
  at::Tensor result;
  switch (opType()) {
    case BinaryOpType::Add:
      result = at::add(a, b);
      break;
    case BinaryOpType::Sub:
      result = at::sub(a, b);
      break;
    case BinaryOpType::Mul:
      result = at::mul(a, b);
      break;
    case BinaryOpType::Div:
      result = at::div(a, b);
      break;
    case BinaryOpType::Maximum:
      result = at::maximum(a, b);
      break;
    case BinaryOpType::Minimum:
      result = at::minimum(a, b);
      break;
    case BinaryOpType::Lt:
      result = at::lt(a, b);
      break;
    case BinaryOpType::Le:
      result = at::le(a, b);
      break;
    case BinaryOpType::Gt:
      result = at::gt(a, b);
      break;
    case BinaryOpType::Ge:
      result = at::ge(a, b);
      break;
    case BinaryOpType::Eq:
      result = at::eq(a, b);
      break;
    case BinaryOpType::Ne:
      result = at::ne(a, b);
      break;
  }
  return {declaredType(result, out())};
}

TernaryOp::TernaryOp(Val* out, Val* condition, Val* lhs, Val* rhs) {
  addOutput(out);
  addInput(condition);
  addInput(lhs);
  addInput(rhs);
}

std::string TernaryOp::toInlineString() const {
  return out()->toString() + " = where(" + joinValues(inputs()) + ")";
}

void TernaryOp::validate() const {
  const DataType dtype = inferWhereDtype(condition(), lhs(), rhs());
  inferPointwiseExtents("where", inputs());
  checkOutputMatches(this, dtype, pointwiseRank(inputs()));
}

std::vector<c10::IValue> TernaryOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor result =
      at::where(operandTensor(inputs.at(0)), operandTensor(inputs.at(1)),
                operandTensor(inputs.at(2)));
  return {declaredType(result, out())};
}

CastOp::CastOp(Val* out, Val* in) {
  addOutput(out);
  addInput(in);
}

std::string CastOp::toInlineString() const {
  return out()->toString() + " = cast(" + in()->toString() + ", " +
         hostfuse::toString(out()->dtype()) + ")";
}

void CastOp::validate() const {
  HF_CHECK(in()->isA<TensorView>(), "cast: operand ", in()->describe(),
           " must be a tensor");
  checkOutputMatches(this, out()->dtype(), in()->as<TensorView>()->rank());
}

std::vector<c10::IValue> CastOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  return {declaredType(inputs.at(0).toTensor(), out())};
}

BroadcastOp::BroadcastOp(TensorView* out, TensorView* in,
                         const std::vector<bool>& is_broadcast_dim) {
  addOutput(out);
  addInput(in);
  addDataAttribute(
      std::vector<int64_t>(is_broadcast_dim.begin(), is_broadcast_dim.end()));
}

std::vector<bool> BroadcastOp::isBroadcastDim() const {
  const auto& flags = attribute<std::vector<int64_t>>(0);
  return std::vector<bool>(flags.begin(), flags.end());
}

std::string BroadcastOp::toInlineString() const {
  std::ostringstream ss;
  ss << out()->toString() << " = broadcast(" << in()->toString() << ", {";
  const std::vector<bool> flags = isBroadcastDim();
  for (size_t i = 0; i < flags.size(); ++i) {
    ss << (i == 0 ? "" : ", ") << (flags[i] ? "true" : "false");
  }
  ss << "})";
  return ss.str();
}

void BroadcastOp::validate() const {
  const std::vector<bool> flags = isBroadcastDim();
  const auto kept =
      static_cast<int64_t>(std::count(flags.begin(), flags.end(), false));
  HF_CHECK(kept == in()->rank(), "broadcast: is_broadcast_dim has ", kept,
           " entries that are false, but the operand ", in()->describe(),
           " has rank ", in()->rank(), "; they must be equal");
  checkOutputMatches(this, in()->dtype(), static_cast<int64_t>(flags.size()));
  for (size_t i = 0; i < flags.size(); ++i) {
    HF_CHECK(!flags[i] || out()->extent(i)->isConstantInt(1),
             "broadcast: output dim ", i, " of ", out()->describe(),
             " is new and must have size 1");
  }
}

std::vector<c10::IValue> BroadcastOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  at::Tensor result = inputs.at(0).toTensor();
  const std::vector<bool> flags = isBroadcastDim();
  for (size_t i = 0; i < flags.size(); ++i) {
    if (flags[i]) {
      result = result.unsqueeze(static_cast<int64_t>(i));
    }
  }
  return {result};
}

ReductionOp::ReductionOp(TensorView* out, ReductionOpType type, TensorView* in,
                         int64_t dim, bool keep_dim) {
  addOutput(out);
  addInput(in);
  addDataAttribute(static_cast<int64_t>(type));
  addDataAttribute(dim);
  addDataAttribute(keep_dim);
}

std::string ReductionOp::toInlineString() const {
  return out()->toString() + " = " + hostfuse::toString(opType()) + "(" +
         in()->toString() + ", dim=" + std::to_string(dim()) +
         (keepDim() ? ", keep_dim=true" : "") + ")";
}

void ReductionOp::validate() const {
  HF_CHECK(dim() >= 0 && dim() < in()->rank(), hostfuse::toString(opType()),
           ": dim ", dim(), " is out of range for operand ", in()->describe(),
           " of rank ", in()->rank());
  HF_CHECK(opType() != ReductionOpType::Max || in()->dtype() != DataType::Bool,
           "max: operand ", in()->describe(), " must not be bool");
  checkOutputMatches(this, inferReductionDtype(opType(), in()),
                     keepDim() ? in()->rank() : in()->rank() - 1);
}

std::vector<c10::IValue> ReductionOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = inputs.at(0).toTensor();
  const at::Tensor result = opType() == ReductionOpType::Sum
                                ? at::sum(x, {dim()}, keepDim())
                                : at::amax(x, {dim()}, keepDim());
  return {declaredType(result, out())};
}

MatmulOp::MatmulOp(TensorView* out, TensorView* a, TensorView* b) {
  addOutput(out);
  addInput(a);
  addInput(b);
}

std::string MatmulOp::toInlineString() const {
  return out()->toString() + " = matmul(" + joinValues(inputs()) + ")";
}

void MatmulOp::validate() const {
  HF_CHECK(isFloatingPoint(a()->dtype()), "matmul: operand a ", a()->describe(),
           " must be floating point, got ", a()->dtype());
  HF_CHECK(a()->dtype() == b()->dtype(), "matmul: operand b ", b()->describe(),
           " has dtype ", b()->dtype(), " but operand a ", a()->describe(),
           " has dtype ", a()->dtype(), "; they must match");
  HF_CHECK(a()->rank() >= 2, "matmul: operand a ", a()->describe(),
           " must have rank >= 2, got ", a()->rank());
  HF_CHECK(b()->rank() == 2 || b()->rank() == a()->rank(), "matmul: operand b ",
           b()->describe(), " must have rank 2 or ", a()->rank(),
           " (that of a), got ", b()->rank());
  const std::optional<int64_t> k_a =
      a()->extent(a()->rank() - 1)->constantInt();
  const std::optional<int64_t> k_b =
      b()->extent(b()->rank() - 2)->constantInt();
  HF_CHECK(!k_a.has_value() || !k_b.has_value() || *k_a == *k_b,
           "matmul: operand a ", a()->describe(), " has inner size ", *k_a,
           " but operand b ", b()->describe(), " has ", *k_b,
           "; they must match");
  // The output takes its batch extents from a, so b's must be the same
  // (ATen would broadcast a size 1, and the output would not be a's).
  if (b()->rank() == a()->rank()) {
    for (int64_t d = 0; d < a()->rank() - 2; ++d) {
      const std::optional<int64_t> batch_a = a()->extent(d)->constantInt();
      const std::optional<int64_t> batch_b = b()->extent(d)->constantInt();
      HF_CHECK(
          !batch_a.has_value() || !batch_b.has_value() || *batch_a == *batch_b,
          "matmul: operand b ", b()->describe(), " has size ", *batch_b,
          " in batch dim ", d, " but operand a ", a()->describe(), " has size ",
          *batch_a, "; batch sizes must match");
    }
  }
  checkOutputMatches(this, a()->dtype(), a()->rank());
}

std::vector<c10::IValue> MatmulOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  return {at::matmul(inputs.at(0).toTensor(), inputs.at(1).toTensor())};
}

LinearOp::LinearOp(TensorView* out, TensorView* x, TensorView* weight,
                   TensorView* bias) {
  addOutput(out);
  addInput(x);
  addInput(weight);
  if (bias != nullptr) {
    addInput(bias);
  }
}

std::string LinearOp::toInlineString() const {
  return out()->toString() + " = linear(" + joinValues(inputs()) + ")";
}

void LinearOp::validate() const {
  HF_CHECK(isFloatingPoint(x()->dtype()), "linear: input x ", x()->describe(),
           " must be floating point, got ", x()->dtype());
  HF_CHECK(x()->rank() >= 1, "linear: input x ", x()->describe(),
           " must have rank >= 1");
  HF_CHECK(weight()->rank() == 2, "linear: weight ", weight()->describe(),
           " must have rank 2 ([out_features, in_features]), got rank ",
           weight()->rank());
  HF_CHECK(weight()->dtype() == x()->dtype(), "linear: weight ",
           weight()->describe(), " has dtype ", weight()->dtype(),
           " but x has ", x()->dtype());
  const std::optional<int64_t> in_x =
      x()->extent(x()->rank() - 1)->constantInt();
  const std::optional<int64_t> in_w = weight()->extent(1)->constantInt();
  HF_CHECK(!in_x.has_value() || !in_w.has_value() || *in_x == *in_w,
           "linear: weight ", weight()->describe(), " has in_features ", *in_w,
           " but x ", x()->describe(), " has ", *in_x,
           " features; they must match");
  if (bias() != nullptr) {
    HF_CHECK(bias()->rank() == 1, "linear: bias ", bias()->describe(),
             " must have rank 1, got ", bias()->rank());
    HF_CHECK(bias()->dtype() == x()->dtype(), "linear: bias ",
             bias()->describe(), " has dtype ", bias()->dtype(), " but x has ",
             x()->dtype());
    const std::optional<int64_t> out_w = weight()->extent(0)->constantInt();
    const std::optional<int64_t> out_b = bias()->extent(0)->constantInt();
    HF_CHECK(!out_w.has_value() || !out_b.has_value() || *out_w == *out_b,
             "linear: bias ", bias()->describe(), " has size ", *out_b,
             " but weight has out_features ", *out_w);
  }
  checkOutputMatches(
      this, accumulatesToFloat() ? DataType::Float : x()->dtype(), x()->rank());
}

bool LinearOp::accumulatesToFloat(DataType x, DataType out) {
  return out == DataType::Float &&
         (x == DataType::BFloat16 || x == DataType::Half);
}

std::vector<c10::IValue> LinearOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  std::optional<at::Tensor> bias;
  if (inputs.size() > 2) {
    bias = inputs[2].toTensor();
  }
  const at::Tensor x = inputs.at(0).toTensor();
  const at::Tensor weight = inputs.at(1).toTensor();
  if (!accumulatesToFloat()) {
    return {at::linear(x, weight, bias)};
  }
  // Products of bf16 or f16 values are exact in fp32: both paths sum them
  // in fp32 (in their own order) and round nothing before the output.
  if (x.is_cuda() && !bias.has_value()) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = weight.size(0);
    return {at::mm(x.reshape({-1, x.size(-1)}), weight.t(), at::kFloat)
                .view(sizes)};
  }
  return {at::linear(x.to(at::kFloat), weight.to(at::kFloat),
                     bias.has_value()
                         ? std::optional<at::Tensor>(bias->to(at::kFloat))
                         : std::nullopt)};
}

TopKOp::TopKOp(TensorView* values, TensorView* indices, TensorView* x,
               int64_t k) {
  addOutput(values);
  addOutput(indices);
  addInput(x);
  addDataAttribute(k);
}

std::string TopKOp::toInlineString() const {
  return "(" + joinValues(outputs()) + ") = topk(" + x()->toString() +
         ", k=" + std::to_string(k()) + ")";
}

void TopKOp::validate() const {
  HF_CHECK(x()->rank() >= 1, "topk: operand ", x()->describe(),
           " must have rank >= 1");
  HF_CHECK(x()->dtype() != DataType::Bool, "topk: operand ", x()->describe(),
           " must not be bool");
  HF_CHECK(k() >= 1, "topk: k must be >= 1, got ", k());
  const int64_t last = x()->rank() - 1;
  const std::optional<int64_t> size = x()->extent(last)->constantInt();
  HF_CHECK(!size.has_value() || k() <= *size, "topk: k = ", k(),
           " exceeds the size ", *size, " of the last dim of ",
           x()->describe());
  HF_CHECK(values()->dtype() == x()->dtype(), "topk: values ",
           values()->describe(), " must have the operand's dtype ",
           x()->dtype(), ", got ", values()->dtype());
  HF_CHECK(indices()->dtype() == DataType::Int64, "topk: indices ",
           indices()->describe(), " must be i64, got ", indices()->dtype());
  for (const TensorView* out : {values(), indices()}) {
    HF_CHECK(out->rank() == x()->rank(), "topk: output ", out->describe(),
             " must have the operand's rank ", x()->rank());
    for (int64_t d = 0; d < last; ++d) {
      const std::optional<int64_t> a = x()->extent(d)->constantInt();
      const std::optional<int64_t> b = out->extent(d)->constantInt();
      HF_CHECK(out->extent(d) == x()->extent(d) ||
                   (a.has_value() && b.has_value() && *a == *b),
               "topk: dim ", d, " of output ", out->describe(), " must be dim ",
               d, " of the operand ", x()->describe());
    }
    HF_CHECK(out->extent(last)->isConstantInt(k()), "topk: the last dim of ",
             out->describe(), " must be k = ", k());
  }
}

std::vector<c10::IValue> TopKOp::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = inputs.at(0).toTensor();
  HF_CHECK(k() <= x.size(-1), "topk: k = ", k(), " exceeds the size ",
           x.size(-1), " of the last dim of ", this->x()->describe(),
           " (sizes ", x.sizes(), ")");
  auto [values, indices] =
      at::topk(x, k(), /*dim=*/-1, /*largest=*/true, /*sorted=*/true);
  return {values, indices};
}

HF_DEFINE_EXPR(UnaryOp)
HF_DEFINE_EXPR(BinaryOp)
HF_DEFINE_EXPR(TernaryOp)
HF_DEFINE_EXPR(CastOp)
HF_DEFINE_EXPR(BroadcastOp)
HF_DEFINE_EXPR(ReductionOp)
HF_DEFINE_EXPR(MatmulOp)
HF_DEFINE_EXPR(LinearOp)
HF_DEFINE_EXPR(TopKOp)

}  // namespace hostfuse
