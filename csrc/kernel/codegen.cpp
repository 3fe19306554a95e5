#include "kernel/codegen.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>
#include <unordered_set>

#include "kernel/device_helpers.h"

namespace hostfuse {

namespace {

// C types of values in generated code.
enum class CType { kBool, kInt, kInt64, kFloat, kDouble };

std::string cName(CType type) {
  switch (type) {
    case CType::kBool:
      return "bool";
    case CType::kInt:
      return "int";
    case CType::kInt64:
      return "long long";
    case CType::kFloat:
      return "float";
    case CType::kDouble:
      return "double";
  }
  return "void";
}

// The type that arithmetic on values of `dtype` happens in.
CType computeType(DataType dtype) {
  switch (dtype) {
    case DataType::Bool:
      return CType::kBool;
    case DataType::Int32:
      return CType::kInt;
    case DataType::Int64:
      return CType::kInt64;
    case DataType::Double:
      return CType::kDouble;
    case DataType::Half:
    case DataType::BFloat16:
    case DataType::Float:
      return CType::kFloat;
  }
  return CType::kFloat;
}

// The C type that tensors of `dtype` are stored as.
std::string storageType(DataType dtype) {
  switch (dtype) {
    case DataType::Half:
      return "hf_f16";
    case DataType::BFloat16:
      return "hf_bf16";
    default:
      return cName(computeType(dtype));
  }
}

bool isSixteenBitFloat(DataType dtype) {
  return dtype == DataType::Half || dtype == DataType::BFloat16;
}

std::string convert(const std::string& expr, CType from, CType to) {
  return from == to ? expr : "static_cast<" + cName(to) + ">(" + expr + ")";
}

std::string parenthesizeNegative(std::string literal) {
  return literal[0] == '-' ? "(" + literal + ")" : literal;
}

std::string floatLiteral(double value, CType type) {
  const bool single = type == CType::kFloat;
  if (single) {
    value = static_cast<float>(value);
  }
  if (std::isnan(value)) {
    return single ? "__uint_as_float(0x7fc00000u)"
                  : "__longlong_as_double(0x7ff8000000000000ll)";
  }
  if (std::isinf(value)) {
    const std::string inf = single
                                ? "__uint_as_float(0x7f800000u)"
                                : "__longlong_as_double(0x7ff0000000000000ll)";
    return value > 0 ? inf : "(-" + inf + ")";
  }
  std::ostringstream ss;
  ss << std::setprecision(single ? 9 : 17) << value;
  std::string text = ss.str();
  if (text.find_first_of(".eE") == std::string::npos) {
    text += ".0";
  }
  return parenthesizeNegative(single ? text + "f" : text);
}

std::string intLiteral(int64_t value, CType type) {
  if (type == CType::kInt) {
    const auto narrow = static_cast<int32_t>(value);
    if (narrow == std::numeric_limits<int32_t>::min()) {
      return "(-2147483647 - 1)";
    }
    return parenthesizeNegative(std::to_string(narrow));
  }
  if (value == std::numeric_limits<int64_t>::min()) {
    return "(-9223372036854775807ll - 1)";
  }
  return parenthesizeNegative(std::to_string(value) + "ll");
}

// A constant written directly in the type it is used in.
std::string literal(const ScalarValue& value, CType type) {
  double number = 0.0;
  if (const auto* b = std::get_if<bool>(&value)) {
    number = *b ? 1.0 : 0.0;
  } else if (const auto* i = std::get_if<int64_t>(&value)) {
    if (type == CType::kInt || type == CType::kInt64) {
      return intLiteral(*i, type);
    }
    number = static_cast<double>(*i);
  } else {
    number = std::get<double>(value);
  }
  switch (type) {
    case CType::kBool:
      return number != 0.0 ? "true" : "false";
    case CType::kInt:
    case CType::kInt64:
      return intLiteral(static_cast<int64_t>(number), type);
    case CType::kFloat:
    case CType::kDouble:
      return floatLiteral(number, type);
  }
  return "0";
}

bool isIdentifier(const std::string& text) {
  if (text.empty() || std::isdigit(static_cast<unsigned char>(text[0]))) {
    return false;
  }
  return std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  });
}

std::string join(const std::vector<std::string>& pieces,
                 const std::string& separator) {
  std::string result;
  for (size_t i = 0; i < pieces.size(); ++i) {
    result += (i == 0 ? "" : separator) + pieces[i];
  }
  return result;
}

// The variable that holds a tensor's value at the current element: t3 for
// T3.
std::string valueName(const TensorView* tv) {
  return "t" + std::to_string(tv->name());
}

std::string loopIndex(int64_t loop_dim) {
  return "i" + std::to_string(loop_dim);
}

std::string loopSize(int64_t loop_dim) {
  return "size" + std::to_string(loop_dim);
}

class KernelWriter {
 public:
  KernelWriter(const FusionAnalysis& analysis, const InputSignature& signature)
      : analysis_(analysis), fusion_(analysis.fusion()) {
    kernel_.signature = signature;
    kernel_.is_reduction = analysis.hasReduction();
    kernel_.max_block_size =
        kernel_.is_reduction ? kMaxReductionBlockSize : kPointwiseBlockSize;
    // Scalar parameters carry the IR's name (s_eps for eps, s_i1 for the
    // extent i1) when it makes a unique C identifier.
    std::unordered_set<std::string> taken;
    for (const Scalar* scalar : analysis.scalarParams()) {
      std::string name = "s_" + scalar->toString();
      if (!isIdentifier(scalar->toString()) || taken.count(name) != 0) {
        name = "s" + std::to_string(scalar->name());
      }
      taken.insert(name);
      scalar_names_[scalar] = name;
    }
  }

  GeneratedKernel write();

 private:
  // How tensors are addressed in the loop body being written.
  enum class Access {
    kStrided,  // loop indices times strides
    kLinear,   // the linear index `index`
    kVector,   // element j of a vector loaded or stored at `base`
  };

  void line(const std::string& text) {
    if (!text.empty()) {
      code_ << std::string(2 * indent_, ' ') << text;
    }
    code_ << "\n";
  }
  void open(const std::string& text) {
    line(text + " {");
    ++indent_;
  }
  void close() {
    --indent_;
    line("}");
  }

  void writeHeader();
  void writeSignature();
  void writeLoopIndices(const std::string& linear, int64_t num_dims);
  void writePointwise();
  void writeContiguous();
  void writeReduction();

  // Values needed for `targets` that are not available yet, in order.
  std::vector<const TensorView*> needed(
      const std::vector<const TensorView*>& targets) const;
  void emitValue(const TensorView* tv, Access access);
  void emitStore(int64_t output, Access access, int64_t guarded_dims);
  void emitPass(const std::vector<const ReductionOp*>& pass);

  CType valueType(const Val* val) const;
  std::string operand(const Val* val, CType type) const;
  std::string rhs(const Expr* expr) const;
  std::string offset(const std::string& tensor,
                     const std::vector<int64_t>& loop_dims) const;

  const TensorView* output(int64_t index) const {
    return fusion_.outputs()[index]->as<TensorView>();
  }
  int64_t vectorWidth() const { return kernel_.signature.vector_width; }

  const FusionAnalysis& analysis_;
  const Fusion& fusion_;
  GeneratedKernel kernel_;
  std::ostringstream code_;
  int indent_ = 0;
  std::unordered_map<const Scalar*, std::string> scalar_names_;
  // Values computed in the enclosing (row) scope, visible in every loop.
  std::unordered_set<const Val*> available_;
};

GeneratedKernel KernelWriter::write() {
  writeHeader();
  code_ << deviceHelpersSource() << "\n";
  line(kernel_.signature.index32 ? "using index_t = int;"
                                 : "using index_t = long long;");
  line("");
  writeSignature();
  ++indent_;
  if (kernel_.is_reduction) {
    writeReduction();
  } else if (kernel_.signature.contiguous) {
    writeContiguous();
  } else {
    writePointwise();
  }
  close();
  kernel_.source = code_.str();
  return std::move(kernel_);
}

void KernelWriter::writeHeader() {
  line("// Generated by hostfuse from:");
  line("//");
  std::istringstream fusion_text(fusion_.toString());
  for (std::string text; std::getline(fusion_text, text);) {
    line("//   " + text);
  }
  line("//");
  const TensorView* reference = analysis_.reference();
  line(std::string(kernel_.is_reduction
                       ? "// Reduction kernel, one block per row, over "
                       : "// Pointwise kernel over ") +
       std::to_string(analysis_.numLoopDims()) + " loop dims,");
  line("// those of " + reference->describe() + ": " + reference->typeString() +
       (kernel_.is_reduction ? "; the last is reduced." : "."));
  line("// Signature: " + kernel_.signature.toString() + ".");
  line("");
}

void KernelWriter::writeSignature() {
  const bool strided = !kernel_.signature.contiguous;
  std::vector<std::string> params;
  auto add = [&](std::string text, KernelParam param) {
    params.push_back(std::move(text));
    kernel_.params.push_back(param);
  };
  const KernelPlan& plan = analysis_.plan();
  for (size_t i = 0; i < fusion_.inputs().size(); ++i) {
    if (!plan.input_used[i]) {
      continue;
    }
    const auto* tv = fusion_.inputs()[i]->as<TensorView>();
    const std::string name = tv->toString();
    const auto index = static_cast<int64_t>(i);
    add("const " + storageType(tv->dtype()) + "* __restrict__ " + name,
        {KernelParam::Kind::kInputData, index});
    for (int64_t d = 0; strided && d < tv->rank(); ++d) {
      add("index_t " + name + "_stride" + std::to_string(d),
          {KernelParam::Kind::kInputStride, index, d});
    }
  }
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    const TensorView* tv = output(static_cast<int64_t>(o));
    const std::string name = "out" + std::to_string(o);
    const auto index = static_cast<int64_t>(o);
    add(storageType(tv->dtype()) + "* __restrict__ " + name,
        {KernelParam::Kind::kOutputData, index});
    const std::vector<int64_t>& dims = analysis_.loopDims(tv);
    for (int64_t d = 0; strided && d < tv->rank(); ++d) {
      if (dims[d] >= 0) {
        add("index_t " + name + "_stride" + std::to_string(d),
            {KernelParam::Kind::kOutputStride, index, d});
      }
    }
  }
  const int64_t num_dims = analysis_.numLoopDims();
  if (kernel_.is_reduction) {
    for (int64_t c = 1; c < num_dims - 1; ++c) {
      add("index_t " + loopSize(c), {KernelParam::Kind::kLoopSize, c});
    }
    add("index_t num_rows", {KernelParam::Kind::kNumRows});
    add("index_t " + loopSize(num_dims - 1),
        {KernelParam::Kind::kLoopSize, num_dims - 1});
  } else {
    for (int64_t c = 1; strided && c < num_dims; ++c) {
      add("index_t " + loopSize(c), {KernelParam::Kind::kLoopSize, c});
    }
    add("index_t numel", {KernelParam::Kind::kNumel});
  }
  const std::vector<const Scalar*>& scalars = analysis_.scalarParams();
  for (size_t k = 0; k < scalars.size(); ++k) {
    const CType type = scalars[k]->dtype() == DataType::Double ? CType::kDouble
                                                               : CType::kInt64;
    add(cName(type) + " " + scalar_names_.at(scalars[k]),
        {KernelParam::Kind::kScalar, static_cast<int64_t>(k)});
  }

  line("extern \"C\" __global__ void __launch_bounds__(" +
       std::to_string(kernel_.max_block_size) + ")");
  line(std::string(kKernelName) + "(");
  for (size_t i = 0; i < params.size(); ++i) {
    line("    " + params[i] + (i + 1 < params.size() ? "," : ") {"));
  }
}

// Declares i0 ... i<num_dims - 1> from a linear index over those dims.
void KernelWriter::writeLoopIndices(const std::string& linear,
                                    int64_t num_dims) {
  if (num_dims == 1) {
    line("const index_t i0 = " + linear + ";");
    return;
  }
  if (num_dims == 0) {
    return;
  }
  line("index_t rest = " + linear + ";");
  for (int64_t c = num_dims - 1; c >= 1; --c) {
    line("const index_t " + loopIndex(c) + " = rest % " + loopSize(c) + ";");
    line("rest /= " + loopSize(c) + ";");
  }
  line("const index_t i0 = rest;");
}

void KernelWriter::writePointwise() {
  line("const index_t first =");
  line("    static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;");
  line("const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;");
  open("for (index_t index = first; index < numel; index += step)");
  writeLoopIndices("index", analysis_.numLoopDims());
  std::vector<const TensorView*> targets;
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    targets.push_back(output(static_cast<int64_t>(o)));
  }
  for (const TensorView* tv : needed(targets)) {
    emitValue(tv, Access::kStrided);
  }
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    emitStore(static_cast<int64_t>(o), Access::kStrided,
              analysis_.numLoopDims());
  }
  close();
}

void KernelWriter::writeContiguous() {
  std::vector<const TensorView*> targets;
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    targets.push_back(output(static_cast<int64_t>(o)));
  }
  const std::vector<const TensorView*> values = needed(targets);
  line("const index_t first =");
  line("    static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;");
  line("const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;");
  std::string tail_start = "first";
  if (vectorWidth() > 1) {
    const std::string width = std::to_string(vectorWidth());
    auto vecType = [&](DataType dtype) {
      return "hf_vec<" + storageType(dtype) + ", " + width + ">";
    };
    line("const index_t num_chunks = numel / " + width + ";");
    open("for (index_t chunk = first; chunk < num_chunks; chunk += step)");
    line("const index_t base = chunk * " + width + ";");
    for (const TensorView* tv : values) {
      if (fusion_.isInput(tv)) {
        const std::string type = vecType(tv->dtype());
        line("const " + type + " " + tv->toString() + "_vec =\n" +
             std::string(2 * indent_ + 4, ' ') + "*reinterpret_cast<const " +
             type + "*>(" + tv->toString() + " + base);");
      }
    }
    for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
      line(vecType(output(static_cast<int64_t>(o))->dtype()) + " out" +
           std::to_string(o) + "_vec;");
    }
    line("#pragma unroll");
    open("for (int j = 0; j < " + width + "; ++j)");
    for (const TensorView* tv : values) {
      emitValue(tv, Access::kVector);
    }
    for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
      emitStore(static_cast<int64_t>(o), Access::kVector, 0);
    }
    close();
    for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
      const std::string name = "out" + std::to_string(o);
      line("*reinterpret_cast<" +
           vecType(output(static_cast<int64_t>(o))->dtype()) + "*>(" + name +
           " + base) = " + name + "_vec;");
    }
    close();
    line("// The elements after the last whole chunk.");
    tail_start = "num_chunks * " + width + " + first";
  }
  open("for (index_t index = " + tail_start +
       "; index < numel; index += step)");
  for (const TensorView* tv : values) {
    emitValue(tv, Access::kLinear);
  }
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    emitStore(static_cast<int64_t>(o), Access::kLinear, 0);
  }
  close();
}

void KernelWriter::writeReduction() {
  const int64_t reduced = analysis_.numLoopDims() - 1;
  const std::string index = loopIndex(reduced);
  open("for (index_t row = blockIdx.x; row < num_rows; row += gridDim.x)");
  writeLoopIndices("row", reduced);
  for (size_t p = 0; p < analysis_.passes().size(); ++p) {
    line("");
    std::vector<std::string> names;
    for (const ReductionOp* reduction : analysis_.passes()[p]) {
      names.push_back(reduction->toInlineString());
    }
    line("// Pass " + std::to_string(p) + ": " + join(names, "; "));
    emitPass(analysis_.passes()[p]);
  }

  // The outputs: element-level ones in a last loop over the row, row-level
  // ones by one thread.
  line("");
  line("// Outputs");
  std::vector<const TensorView*> targets;
  std::vector<int64_t> element_outputs;
  std::vector<int64_t> row_outputs;
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    const TensorView* tv = output(static_cast<int64_t>(o));
    targets.push_back(tv);
    (analysis_.dependsOnReducedDim(tv) ? element_outputs : row_outputs)
        .push_back(static_cast<int64_t>(o));
  }
  std::vector<const TensorView*> loop_values;
  for (const TensorView* tv : needed(targets)) {
    if (analysis_.dependsOnReducedDim(tv)) {
      loop_values.push_back(tv);
    } else {
      emitValue(tv, Access::kStrided);
      available_.insert(tv);
    }
  }
  if (!element_outputs.empty()) {
    open("for (index_t " + index + " = threadIdx.x; " + index + " < " +
         loopSize(reduced) + "; " + index + " += blockDim.x)");
    for (const TensorView* tv : loop_values) {
      emitValue(tv, Access::kStrided);
    }
    for (int64_t o : element_outputs) {
      emitStore(o, Access::kStrided, reduced + 1);
    }
    close();
  }
  if (!row_outputs.empty()) {
    open("if (threadIdx.x == 0)");
    for (int64_t o : row_outputs) {
      emitStore(o, Access::kStrided, reduced);
    }
    close();
  }
  close();
}

void KernelWriter::emitPass(const std::vector<const ReductionOp*>& pass) {
  const int64_t reduced = analysis_.numLoopDims() - 1;
  const std::string index = loopIndex(reduced);
  std::vector<const TensorView*> targets;
  for (const ReductionOp* reduction : pass) {
    targets.push_back(reduction->in());
  }
  std::vector<const TensorView*> loop_values;
  for (const TensorView* tv : needed(targets)) {
    if (analysis_.dependsOnReducedDim(tv)) {
      loop_values.push_back(tv);
    } else {
      emitValue(tv, Access::kStrided);
      available_.insert(tv);
    }
  }
  for (const ReductionOp* reduction : pass) {
    const CType type = computeType(reduction->out()->dtype());
    const std::string init = reduction->opType() == ReductionOpType::Sum
                                 ? literal(ScalarValue(int64_t{0}), type)
                                 : "hf_lowest<" + cName(type) + ">()";
    line(cName(type) + " " + valueName(reduction->out()) +
         "_partial = " + init + ";");
  }
  open("for (index_t " + index + " = threadIdx.x; " + index + " < " +
       loopSize(reduced) + "; " + index + " += blockDim.x)");
  for (const TensorView* tv : loop_values) {
    emitValue(tv, Access::kStrided);
  }
  for (const ReductionOp* reduction : pass) {
    const CType type = computeType(reduction->out()->dtype());
    const std::string partial = valueName(reduction->out()) + "_partial";
    const std::string value = operand(reduction->in(), type);
    if (reduction->opType() == ReductionOpType::Sum) {
      line(partial + " += " + value + ";");
    } else {
      line(partial + " = hf_max(" + partial + ", " + value + ");");
    }
  }
  close();
  for (const ReductionOp* reduction : pass) {
    const TensorView* out = reduction->out();
    const std::string op = reduction->opType() == ReductionOpType::Sum
                               ? "hf_sum_op()"
                               : "hf_max_op()";
    line(cName(computeType(out->dtype())) + " " + valueName(out) +
         " = hf_block_reduce(" + valueName(out) + "_partial, " + op + ");");
    available_.insert(out);
  }
}

std::vector<const TensorView*> KernelWriter::needed(
    const std::vector<const TensorView*>& targets) const {
  std::unordered_set<const TensorView*> seen;
  std::vector<const TensorView*> result;
  std::vector<const TensorView*> stack(targets.begin(), targets.end());
  while (!stack.empty()) {
    const TensorView* tv = stack.back();
    stack.pop_back();
    if (available_.count(tv) != 0 || !seen.insert(tv).second) {
      continue;
    }
    result.push_back(tv);
    const Expr* definition = tv->definition();
    if (definition == nullptr || fusion_.isInput(tv)) {
      continue;
    }
    HF_ERROR(!definition->isA<ReductionOp>(), "the result of ",
             definition->toInlineString(), " is needed before its pass");
    for (const Val* operand : definition->inputs()) {
      if (const auto* operand_tv = dynamic_cast<const TensorView*>(operand)) {
        stack.push_back(operand_tv);
      }
    }
  }
  std::sort(result.begin(), result.end(),
            [&](const TensorView* a, const TensorView* b) {
              return analysis_.order(a) < analysis_.order(b);
            });
  return result;
}

void KernelWriter::emitValue(const TensorView* tv, Access access) {
  const std::string declaration =
      cName(computeType(tv->dtype())) + " " + valueName(tv) + " = ";
  if (!fusion_.isInput(tv)) {
    line(declaration + rhs(tv->definition()) + ";");
    return;
  }
  const std::string name = tv->toString();
  std::string element;
  switch (access) {
    case Access::kStrided:
      element = name + "[" + offset(name, analysis_.loopDims(tv)) + "]";
      break;
    case Access::kLinear:
      element = name + "[index]";
      break;
    case Access::kVector:
      element = name + "_vec.v[j]";
      break;
  }
  line(declaration +
       (isSixteenBitFloat(tv->dtype()) ? "hf_to_float(" + element + ")"
                                       : element) +
       ";");
}

// Stores output `output`. With strided access, only the first of the loop
// dims below `guarded_dims` that the output lacks stores.
void KernelWriter::emitStore(int64_t output_index, Access access,
                             int64_t guarded_dims) {
  const TensorView* tv = output(output_index);
  const std::string name = "out" + std::to_string(output_index);
  std::string value = valueName(tv);
  if (tv->dtype() == DataType::Half) {
    value = "hf_to_f16(" + value + ")";
  } else if (tv->dtype() == DataType::BFloat16) {
    value = "hf_to_bf16(" + value + ")";
  }
  if (access == Access::kVector) {
    line(name + "_vec.v[j] = " + value + ";");
    return;
  }
  if (access == Access::kLinear) {
    line(name + "[index] = " + value + ";");
    return;
  }
  const std::vector<int64_t>& dims = analysis_.loopDims(tv);
  std::vector<std::string> guards;
  for (int64_t c = 0; c < guarded_dims; ++c) {
    if (std::find(dims.begin(), dims.end(), c) == dims.end()) {
      guards.push_back(loopIndex(c) + " == 0");
    }
  }
  const std::string store =
      name + "[" + offset(name, dims) + "] = " + value + ";";
  line(guards.empty() ? store : "if (" + join(guards, " && ") + ") " + store);
}

std::string KernelWriter::offset(const std::string& tensor,
                                 const std::vector<int64_t>& loop_dims) const {
  std::vector<std::string> terms;
  for (size_t d = 0; d < loop_dims.size(); ++d) {
    if (loop_dims[d] >= 0) {
      terms.push_back(loopIndex(loop_dims[d]) + " * " + tensor + "_stride" +
                      std::to_string(d));
    }
  }
  return terms.empty() ? "0" : join(terms, " + ");
}

CType KernelWriter::valueType(const Val* val) const {
  if (val->isA<TensorView>()) {
    return computeType(val->dtype());
  }
  // Symbolic scalars arrive as double or long long parameters.
  switch (val->dtype()) {
    case DataType::Bool:
      return CType::kBool;
    case DataType::Double:
      return CType::kDouble;
    default:
      return CType::kInt64;
  }
}

std::string KernelWriter::operand(const Val* val, CType type) const {
  if (const auto* scalar = dynamic_cast<const Scalar*>(val)) {
    if (scalar->isConstant()) {
      return literal(*scalar->value(), type);
    }
    const std::string& name = scalar_names_.at(scalar);
    return convert(
        val->dtype() == DataType::Bool ? "(" + name + " != 0)" : name,
        valueType(val), type);
  }
  return convert(valueName(val->as<TensorView>()), valueType(val), type);
}

std::string KernelWriter::rhs(const Expr* expr) const {
  if (const auto* op = dynamic_cast<const UnaryOp*>(expr)) {
    const std::string x = operand(op->in(), computeType(op->out()->dtype()));
    switch (op->opType()) {
      case UnaryOpType::Neg:
        return "-" + x;
      case UnaryOpType::Abs:
        return "hf_abs(" + x + ")";
      case UnaryOpType::Relu:
        return "hf_relu(" + x + ")";
      case UnaryOpType::Exp:
        return "hf_exp(" + x + ")";
      case UnaryOpType::Log:
        return "hf_log(" + x + ")";
      case UnaryOpType::Sqrt:
        return "hf_sqrt(" + x + ")";
      case UnaryOpType::Rsqrt:
        return "hf_rsqrt(" + x + ")";
      case UnaryOpType::Reciprocal:
        return "hf_reciprocal(" + x + ")";
      case UnaryOpType::Tanh:
        return "hf_tanh(" + x + ")";
      case UnaryOpType::Sigmoid:
        return "hf_sigmoid(" + x + ")";
      case UnaryOpType::Silu:
        return "hf_silu(" + x + ")";
    }
  }
  if (const auto* op = dynamic_cast<const BinaryOp*>(expr)) {
    // Comparisons happen in the operands' common type: the result type of
    // maximum, which ATen's promotion gives without adjustments.
    const CType type = isComparison(op->opType())
                           ? computeType(inferBinaryDtype(BinaryOpType::Maximum,
                                                          op->lhs(), op->rhs()))
                           : computeType(op->out()->dtype());
    const std::string a = operand(op->lhs(), type);
    const std::string b = operand(op->rhs(), type);
    switch (op->opType()) {
      case BinaryOpType::Add:
        return a + " + " + b;
      case BinaryOpType::Sub:
        return a + " - " + b;
      case BinaryOpType::Mul:
        return a + " * " + b;
      case BinaryOpType::Div:
        return a + " / " + b;
      case BinaryOpType::Maximum:
        return "hf_max(" + a + ", " + b + ")";
      case BinaryOpType::Minimum:
        return "hf_min(" + a + ", " + b + ")";
      case BinaryOpType::Lt:
        return a + " < " + b;
      case BinaryOpType::Le:
        return a + " <= " + b;
      case BinaryOpType::Gt:
        return a + " > " + b;
      case BinaryOpType::Ge:
        return a + " >= " + b;
      case BinaryOpType::Eq:
        return a + " == " + b;
      case BinaryOpType::Ne:
        return a + " != " + b;
    }
  }
  if (const auto* op = dynamic_cast<const TernaryOp*>(expr)) {
    const CType type = computeType(op->out()->dtype());
    return operand(op->condition(), CType::kBool) + " ? " +
           operand(op->lhs(), type) + " : " + operand(op->rhs(), type);
  }
  if (const auto* op = dynamic_cast<const CastOp*>(expr)) {
    const DataType to = op->out()->dtype();
    if (isSixteenBitFloat(to)) {
      return std::string(to == DataType::Half ? "hf_round_f16("
                                              : "hf_round_bf16(") +
             operand(op->in(), CType::kFloat) + ")";
    }
    return operand(op->in(), computeType(to));
  }
  if (const auto* op = dynamic_cast<const BroadcastOp*>(expr)) {
    return operand(op->in(), computeType(op->out()->dtype()));
  }
  HF_ERROR(false, "no code for ", expr->toInlineString());
  return "";
}

}  // namespace

std::string InputSignature::toString() const {
  std::ostringstream ss;
  if (contiguous) {
    ss << "contiguous, vector " << vector_width;
  } else {
    ss << "strided";
  }
  ss << ", " << (index32 ? "32" : "64") << "-bit indices";
  return ss.str();
}

GeneratedKernel generateKernel(const FusionAnalysis& analysis,
                               const InputSignature& signature) {
  const int64_t width = signature.vector_width;
  HF_ERROR(width == 1 || width == 2 || width == 4 || width == 8 || width == 16,
           "vector width ", width, " is not a power of two up to 16");
  HF_ERROR(signature.contiguous || width == 1, "vector width ", width,
           " without a contiguous signature");
  HF_ERROR(!signature.contiguous || !analysis.hasReduction(),
           "a contiguous signature for a reduction kernel");
  if (signature.contiguous) {
    const Fusion& fusion = analysis.fusion();
    std::vector<const Val*> tensors(fusion.outputs().begin(),
                                    fusion.outputs().end());
    for (size_t i = 0; i < fusion.inputs().size(); ++i) {
      if (analysis.plan().input_used[i]) {
        tensors.push_back(fusion.inputs()[i]);
      }
    }
    for (const Val* tensor : tensors) {
      const std::vector<int64_t>& dims =
          analysis.loopDims(tensor->as<TensorView>());
      for (size_t d = 0; d < dims.size(); ++d) {
        HF_ERROR(
            dims[d] == static_cast<int64_t>(d) &&
                static_cast<int64_t>(dims.size()) == analysis.numLoopDims(),
            "a contiguous signature, but ", tensor->describe(),
            " does not span the loop dims in order");
      }
      HF_ERROR(sizeOf(tensor->dtype()) * width <= 16, "vector width ", width,
               " of ", tensor->dtype(), " is wider than 16 bytes");
    }
  }
  return KernelWriter(analysis, signature).write();
}

std::string generateCudaSource(const Fusion& fusion,
                               const InputSignature& signature) {
  return generateKernel(FusionAnalysis(fusion), signature).source;
}

}  // namespace hostfuse
