#include <hostfuse/ir/evaluation.h>

#include <c10/util/Exception.h>

namespace hostfuse {

namespace {

c10::IValue constantValue(const ScalarValue& value) {
  if (const auto* i = std::get_if<int64_t>(&value)) {
    return *i;
  }
  if (const auto* d = std::get_if<double>(&value)) {
    return *d;
  }
  return std::get<bool>(value);
}

std::string kindOf(const c10::IValue& value) {
  if (value.isTensor()) {
    return "a tensor";
  }
  if (value.isInt()) {
    return "an int";
  }
  if (value.isDouble()) {
    return "a double";
  }
  if (value.isBool()) {
    return "a bool";
  }
  return std::string("a ") + value.tagKind();
}

// Binds the symbolic extents of `tv` from `tensor`, checking constant ones
// and ones bound already.
// `bound_by` remembers which input bound each extent, for the error message.
void bindExtents(const Fusion& fusion, size_t index, const TensorView* tv,
                 const at::Tensor& tensor, ValueMap& values,
                 std::unordered_map<const Val*, size_t>& bound_by) {
  const std::string what = fusion.describeInput(index);
  HF_CHECK(tensor.dim() == tv->rank(), what, " must have rank ", tv->rank(),
           " (", tv->typeString(), "), got a tensor of rank ", tensor.dim(),
           " with sizes ", tensor.sizes());
  for (int64_t d = 0; d < tv->rank(); ++d) {
    const Scalar* extent = tv->extent(d);
    const int64_t actual = tensor.size(d);
    if (extent->isConstant()) {
      HF_CHECK(extent->isConstantInt(actual), what, " must have size ",
               extent->toString(), " in dim ", d, " (", tv->typeString(),
               "), got sizes ", tensor.sizes());
    } else if (values.has(extent)) {
      const int64_t bound = values.get(extent).toInt();
      HF_CHECK(bound == actual, what, " has size ", actual, " in dim ", d,
               ", but its extent ", extent->toString(), " was bound to ", bound,
               " by ", fusion.describeInput(bound_by.at(extent)), " (",
               tv->typeString(), ", got sizes ", tensor.sizes(), ")");
    } else {
      values.bind(extent, actual);
      bound_by[extent] = index;
    }
  }
}

}  // namespace

void ValueMap::bind(const Val* val, c10::IValue value) {
  values_[val] = std::move(value);
}

bool ValueMap::has(const Val* val) const {
  if (const auto* scalar = dynamic_cast<const Scalar*>(val)) {
    if (scalar->isConstant()) {
      return true;
    }
  }
  return values_.count(val) != 0;
}

c10::IValue ValueMap::get(const Val* val) const {
  if (const auto* scalar = dynamic_cast<const Scalar*>(val)) {
    if (scalar->isConstant()) {
      return constantValue(*scalar->value());
    }
  }
  auto it = values_.find(val);
  HF_CHECK(it != values_.end(), "no value is bound to ", val->describe(),
           "; is it an input of the program, or computed by an earlier "
           "expression?");
  return it->second;
}

std::vector<c10::IValue> ValueMap::get(const std::vector<Val*>& vals) const {
  std::vector<c10::IValue> result;
  result.reserve(vals.size());
  for (const Val* val : vals) {
    result.push_back(get(val));
  }
  return result;
}

void bindInputs(const Fusion& fusion, const std::vector<c10::IValue>& args,
                ValueMap& values) {
  HF_CHECK(args.size() == fusion.inputs().size(), "the program takes ",
           fusion.inputs().size(), " inputs, but ", args.size(), " were given");
  std::unordered_map<const Val*, size_t> bound_by;
  for (size_t i = 0; i < args.size(); ++i) {
    const Val* input = fusion.inputs()[i];
    const c10::IValue& arg = args[i];
    const std::string what = fusion.describeInput(i);
    if (const auto* tv = dynamic_cast<const TensorView*>(input)) {
      HF_CHECK(arg.isTensor(), what, " must be a tensor (", tv->typeString(),
               "), got ", kindOf(arg));
      const at::Tensor& tensor = arg.toTensor();
      HF_CHECK(tensor.defined(), what, " is an undefined tensor");
      HF_CHECK(tensor.scalar_type() == toScalarType(tv->dtype()), what,
               " must have dtype ", tv->dtype(), " (", tv->typeString(),
               "), got ", c10::toString(tensor.scalar_type()));
      bindExtents(fusion, i, tv, tensor, values, bound_by);
      values.bind(input, arg);
      continue;
    }
    const DataType dtype = input->dtype();
    if (dtype == DataType::Bool) {
      HF_CHECK(arg.isBool(), what, " must be a bool, got ", kindOf(arg));
      values.bind(input, arg);
    } else if (isIntegral(dtype)) {
      HF_CHECK(arg.isInt(), what, " must be an int, got ", kindOf(arg));
      // The scalar may also be an extent of a tensor input before it, and
      // so bound already; rebinding would hide the disagreement.
      if (values.has(input)) {
        const int64_t bound = values.get(input).toInt();
        HF_CHECK(arg.toInt() == bound, what, " is ", arg.toInt(),
                 ", but it is also a tensor extent, bound to ", bound, " by ",
                 fusion.describeInput(bound_by.at(input)));
      }
      values.bind(input, arg);
    } else {
      HF_CHECK(arg.isDouble() || arg.isInt(), what, " must be a number, got ",
               kindOf(arg));
      values.bind(input, arg.isInt() ? c10::IValue(double(arg.toInt())) : arg);
    }
  }
}

void evaluateExpr(const Expr* expr, ValueMap& values) {
  std::vector<c10::IValue> results;
  try {
    results = expr->evaluate(values.get(expr->inputs()));
  } catch (const c10::Error& e) {
    HF_THROW("ATen failed while evaluating ", expr->toInlineString(), ": ",
             e.what_without_backtrace());
  }
  HF_ERROR(results.size() == expr->outputs().size(), expr->opName(),
           " returned ", results.size(), " values for ", expr->outputs().size(),
           " outputs");
  for (size_t i = 0; i < results.size(); ++i) {
    values.bind(expr->output(i), std::move(results[i]));
  }
}

std::vector<at::Tensor> collectOutputs(const Fusion& fusion,
                                       const ValueMap& values) {
  std::vector<at::Tensor> outputs;
  outputs.reserve(fusion.outputs().size());
  for (const Val* output : fusion.outputs()) {
    outputs.push_back(values.get(output).toTensor());
  }
  return outputs;
}

std::vector<at::Tensor> evaluateFusion(const Fusion& fusion,
                                       const std::vector<c10::IValue>& args) {
  ValueMap values;
  bindInputs(fusion, args, values);
  for (const Expr* expr : fusion.exprs()) {
    evaluateExpr(expr, values);
  }
  return collectOutputs(fusion, values);
}

}  // namespace hostfuse
