#include <hostfuse/kernel/codegen.h>

#include <algorithm>
#include <sstream>
#include <unordered_set>

#include <hostfuse/kernel/c_types.h>
#include <hostfuse/kernel/device_helpers.h>

namespace hostfuse {

namespace {

using gen::cName;
using gen::computeType;
using gen::convert;
using gen::CType;
using gen::isSixteenBitFloat;
using gen::join;
using gen::literal;
using gen::storageType;

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
      if (!gen::isIdentifier(scalar->toString()) || taken.count(name) != 0) {
        name = "s" + std::to_string(scalar->name());
      }
      taken.insert(name);
      scalar_names_[scalar] = name;
    }
    for (const std::vector<const ReductionOp*>& pass : analysis.passes()) {
      for (const ReductionOp* reduction : pass) {
        reduction_results_.insert(reduction->out());
      }
    }
  }

  GeneratedKernel write();

 private:
  class ExprEmitter;

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
  void writeGridStride();
  void writeRowLimit();
  void openRowLoop();
  void writePointwise();
  void writeContiguous();
  void writeReduction();

  // Values needed for `targets` that are not available yet, in order.
  std::vector<const TensorView*> needed(
      const std::vector<const TensorView*>& targets) const;
  // Emits the row-level values `targets` need in the row scope, making
  // them available; returns the element-level ones, for a loop over R.
  std::vector<const TensorView*> emitRowValues(
      const std::vector<const TensorView*>& targets);
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
  std::vector<const TensorView*> outputs() const {
    std::vector<const TensorView*> result;
    for (const Val* out : fusion_.outputs()) {
      result.push_back(out->as<TensorView>());
    }
    return result;
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
  // The outputs of reductions, which only their pass computes (emitPass),
  // never an element-wise statement.
  std::unordered_set<const TensorView*> reduction_results_;
};

// Writes the right-hand side of the statement that computes an expression's
// output at one element: one handle() overload per expression type that
// kernel codegen supports, except reductions (see emitPass).
class KernelWriter::ExprEmitter : public ConstExprVisitor {
 public:
  explicit ExprEmitter(const KernelWriter& writer) : writer_(writer) {}

  std::string emit(const Expr* expr) {
    dispatch(expr);
    return std::move(rhs_);
  }

 protected:
  void handle(const UnaryOp* op) override;
  void handle(const BinaryOp* op) override;
  void handle(const TernaryOp* op) override;
  void handle(const CastOp* op) override;
  void handle(const BroadcastOp* op) override;
  // Also called by the handlers for an op type their switch lacks.
  void handleDefault(const Expr* expr) override {
    HF_ERROR(false, "no code for ", expr->toInlineString());
  }

 private:
  std::string operand(const Val* val, CType type) const {
    return writer_.operand(val, type);
  }

  const KernelWriter& writer_;
  std::string rhs_;
};

GeneratedKernel KernelWriter::write() {
  writeHeader();
  code_ << deviceHelpersSource() << "\n";
  line(kernel_.signature.index32 ? "using index_t = int;"
                                 : "using index_t = long long;");
  line("");
  writeSignature();
  ++indent_;
  if (kernel_.signature.row_limited) {
    writeRowLimit();
  }
  if (kernel_.is_reduction) {
    writeReduction();
  } else if (kernel_.signature.contiguous || kernel_.signature.pitched_rows) {
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
  const bool pitched = kernel_.signature.pitched_rows;
  const bool strided = !kernel_.signature.contiguous && !pitched;
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
    if (pitched) {
      add("index_t " + name + "_pitch",
          {KernelParam::Kind::kInputPitch, index});
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
    if (pitched) {
      add("index_t " + name + "_pitch",
          {KernelParam::Kind::kOutputPitch, index});
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
    if (pitched) {
      add("index_t " + loopSize(num_dims - 1),
          {KernelParam::Kind::kLoopSize, num_dims - 1});
    }
    if (kernel_.signature.row_limited) {
      // numel is then what the row limit leaves of numel_all.
      add("index_t numel_all", {KernelParam::Kind::kNumel});
      add("index_t " + loopSize(0), {KernelParam::Kind::kLoopSize, 0});
      add("const long long* __restrict__ row_counts",
          {KernelParam::Kind::kRowCounts});
      add("long long row_groups", {KernelParam::Kind::kRowGroups});
    } else {
      add("index_t numel", {KernelParam::Kind::kNumel});
    }
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

// A row-limited kernel's numel: the rows of loop dim 0 that the row counts
// add up to (each count clamped to [0, size0], the sum kept at most size0
// as it goes, so it cannot overflow), found by the first warp of each
// block, times the elements per row.
void KernelWriter::writeRowLimit() {
  line("__shared__ index_t hf_rows;");
  open("if (threadIdx.x < 32)");
  line("long long sum = 0;");
  open("for (long long g = threadIdx.x; g < row_groups; g += 32)");
  line("const long long count = row_counts[g];");
  line("sum += count <= 0 ? 0 : count < " + loopSize(0) +
       " ? count : " + loopSize(0) + ";");
  line("sum = sum < " + loopSize(0) + " ? sum : " + loopSize(0) + ";");
  close();
  open("for (int offset = 16; offset > 0; offset /= 2)");
  line("sum += __shfl_xor_sync(0xffffffffu, sum, offset);");
  close();
  open("if (threadIdx.x == 0)");
  line("hf_rows = static_cast<index_t>(sum < " + loopSize(0) +
       " ? sum : " + loopSize(0) + ");");
  close();
  close();
  line("__syncthreads();");
  line("const index_t numel = hf_rows * (numel_all / " + loopSize(0) + ");");
}

// The first element of this thread and the step of a grid-stride loop.
void KernelWriter::writeGridStride() {
  line("const index_t first =");
  line("    static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;");
  line("const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;");
}

// The loop over R in which each thread of the block takes every
// blockDim.x-th element of the row.
void KernelWriter::openRowLoop() {
  const int64_t reduced = analysis_.numLoopDims() - 1;
  const std::string index = loopIndex(reduced);
  open("for (index_t " + index + " = threadIdx.x; " + index + " < " +
       loopSize(reduced) + "; " + index + " += blockDim.x)");
}

void KernelWriter::writePointwise() {
  writeGridStride();
  open("for (index_t index = first; index < numel; index += step)");
  writeLoopIndices("index", analysis_.numLoopDims());
  for (const TensorView* tv : needed(outputs())) {
    emitValue(tv, Access::kStrided);
  }
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    emitStore(static_cast<int64_t>(o), Access::kStrided,
              analysis_.numLoopDims());
  }
  close();
}

// Contiguous: chunks of vector_width elements at one linear index, then
// the elements of the last partial chunk one by one. Pitched rows: chunk
// c is at column (c % chunks per row) * vector_width of row c / (chunks
// per row), the row starting `pitch` elements after the one before; the
// width divides the row length, so there is no partial chunk.
void KernelWriter::writeContiguous() {
  const std::vector<const TensorView*> values = needed(outputs());
  const bool pitched = kernel_.signature.pitched_rows;
  writeGridStride();
  // Where a chunk of `tensor` starts.
  auto chunkAt = [&](const std::string& tensor) {
    return pitched ? tensor + " + row * " + tensor + "_pitch + column"
                   : tensor + " + base";
  };
  std::string tail_start = "first";
  if (vectorWidth() > 1 || pitched) {
    const std::string width = std::to_string(vectorWidth());
    auto vecType = [&](DataType dtype) {
      return "hf_vec<" + storageType(dtype) + ", " + width + ">";
    };
    if (pitched) {
      line("const index_t row_chunks = " +
           loopSize(analysis_.numLoopDims() - 1) + " / " + width + ";");
    }
    line("const index_t num_chunks = numel / " + width + ";");
    open("for (index_t chunk = first; chunk < num_chunks; chunk += step)");
    if (pitched) {
      line("const index_t row = chunk / row_chunks;");
      line("const index_t column = (chunk - row * row_chunks) * " + width +
           ";");
    } else {
      line("const index_t base = chunk * " + width + ";");
    }
    for (const TensorView* tv : values) {
      if (fusion_.isInput(tv)) {
        const std::string type = vecType(tv->dtype());
        line("const " + type + " " + tv->toString() + "_vec =\n" +
             std::string(2 * indent_ + 4, ' ') + "*reinterpret_cast<const " +
             type + "*>(" + chunkAt(tv->toString()) + ");");
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
           vecType(output(static_cast<int64_t>(o))->dtype()) + "*>(" +
           chunkAt(name) + ") = " + name + "_vec;");
    }
    close();
    if (pitched) {
      return;
    }
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
  std::vector<int64_t> element_outputs;
  std::vector<int64_t> row_outputs;
  for (size_t o = 0; o < fusion_.outputs().size(); ++o) {
    (analysis_.dependsOnReducedDim(output(static_cast<int64_t>(o)))
         ? element_outputs
         : row_outputs)
        .push_back(static_cast<int64_t>(o));
  }
  const std::vector<const TensorView*> loop_values = emitRowValues(outputs());
  if (!element_outputs.empty()) {
    openRowLoop();
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
  std::vector<const TensorView*> targets;
  for (const ReductionOp* reduction : pass) {
    targets.push_back(reduction->in());
  }
  const std::vector<const TensorView*> loop_values = emitRowValues(targets);
  for (const ReductionOp* reduction : pass) {
    const CType type = computeType(reduction->out()->dtype());
    const std::string init = reduction->opType() == ReductionOpType::Sum
                                 ? literal(ScalarValue(int64_t{0}), type)
                                 : "hf_lowest<" + cName(type) + ">()";
    line(cName(type) + " " + valueName(reduction->out()) +
         "_partial = " + init + ";");
  }
  openRowLoop();
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
    HF_ERROR(reduction_results_.count(tv) == 0, "the result of ",
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

std::vector<const TensorView*> KernelWriter::emitRowValues(
    const std::vector<const TensorView*>& targets) {
  std::vector<const TensorView*> loop_values;
  for (const TensorView* tv : needed(targets)) {
    if (analysis_.dependsOnReducedDim(tv)) {
      loop_values.push_back(tv);
    } else {
      emitValue(tv, Access::kStrided);
      available_.insert(tv);
    }
  }
  return loop_values;
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
  return ExprEmitter(*this).emit(expr);
}

void KernelWriter::ExprEmitter::handle(const UnaryOp* op) {
  const std::string x = operand(op->in(), computeType(op->out()->dtype()));
  switch (op->opType()) {
    case UnaryOpType::Neg:
      rhs_ = "-" + x;
      return;
    case UnaryOpType::Abs:
      rhs_ = "hf_abs(" + x + ")";
      return;
    case UnaryOpType::Relu:
      rhs_ = "hf_relu(" + x + ")";
      return;
    case UnaryOpType::Exp:
      rhs_ = "hf_exp(" + x + ")";
      return;
    case UnaryOpType::Log:
      rhs_ = "hf_log(" + x + ")";
      return;
    case UnaryOpType::Sqrt:
      rhs_ = "hf_sqrt(" + x + ")";
      return;
    case UnaryOpType::Rsqrt:
      rhs_ = "hf_rsqrt(" + x + ")";
      return;
    case UnaryOpType::Reciprocal:
      rhs_ = "hf_reciprocal(" + x + ")";
      return;
    case UnaryOpType::Tanh:
      rhs_ = "hf_tanh(" + x + ")";
      return;
    case UnaryOpType::Sigmoid:
      rhs_ = "hf_sigmoid(" + x + ")";
      return;
    case UnaryOpType::Silu:
      rhs_ = "hf_silu(" + x + ")";
      return;
  }
  handleDefault(op);
}

void KernelWriter::ExprEmitter::handle(const BinaryOp* op) {
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
      rhs_ = a + " + " + b;
      return;
    case BinaryOpType::Sub:
      rhs_ = a + " - " + b;
      return;
    case BinaryOpType::Mul:
      rhs_ = a + " * " + b;
      return;
    case BinaryOpType::Div:
      rhs_ = a + " / " + b;
      return;
    case BinaryOpType::Maximum:
      rhs_ = "hf_max(" + a + ", " + b + ")";
      return;
    case BinaryOpType::Minimum:
      rhs_ = "hf_min(" + a + ", " + b + ")";
      return;
    case BinaryOpType::Lt:
      rhs_ = a + " < " + b;
      return;
    case BinaryOpType::Le:
      rhs_ = a + " <= " + b;
      return;
    case BinaryOpType::Gt:
      rhs_ = a + " > " + b;
      return;
    case BinaryOpType::Ge:
      rhs_ = a + " >= " + b;
      return;
    case BinaryOpType::Eq:
      rhs_ = a + " == " + b;
      return;
    case BinaryOpType::Ne:
      rhs_ = a + " != " + b;
      return;
  }
  handleDefault(op);
}

void KernelWriter::ExprEmitter::handle(const TernaryOp* op) {
  const CType type = computeType(op->out()->dtype());
  rhs_ = operand(op->condition(), CType::kBool) + " ? " +
         operand(op->lhs(), type) + " : " + operand(op->rhs(), type);
}

void KernelWriter::ExprEmitter::handle(const CastOp* op) {
  const DataType to = op->out()->dtype();
  if (isSixteenBitFloat(to)) {
    rhs_ =
        std::string(to == DataType::Half ? "hf_round_f16(" : "hf_round_bf16(") +
        operand(op->in(), CType::kFloat) + ")";
    return;
  }
  rhs_ = operand(op->in(), computeType(to));
}

void KernelWriter::ExprEmitter::handle(const BroadcastOp* op) {
  rhs_ = operand(op->in(), computeType(op->out()->dtype()));
}

}  // namespace

std::string InputSignature::toString() const {
  std::ostringstream ss;
  if (contiguous) {
    ss << "contiguous, vector " << vector_width;
  } else if (pitched_rows) {
    ss << "pitched rows, vector " << vector_width;
  } else {
    ss << "strided";
  }
  ss << ", " << (index32 ? "32" : "64") << "-bit indices";
  if (row_limited) {
    ss << ", row-limited";
  }
  return ss.str();
}

GeneratedKernel generateKernel(const FusionAnalysis& analysis,
                               const InputSignature& signature) {
  // A caller's signature (hf.kernel.cuda_source takes one from Python):
  // user errors, naming the field.
  const int64_t width = signature.vector_width;
  HF_CHECK(width == 1 || width == 2 || width == 4 || width == 8 || width == 16,
           "kernel signature: vector_width ", width,
           " is not a power of two up to 16");
  HF_CHECK(signature.contiguous || signature.pitched_rows || width == 1,
           "kernel signature: vector_width ", width,
           " needs contiguous or pitched_rows");
  HF_CHECK(!(signature.contiguous && signature.pitched_rows),
           "kernel signature: both contiguous and of pitched rows; choose one");
  HF_CHECK(!signature.contiguous || analysis.plan().contiguous_possible,
           "kernel signature: contiguous, for a fusion that cannot have it "
           "(a reduction, or an input not of the full loop shape)");
  HF_CHECK(!signature.pitched_rows || (analysis.plan().contiguous_possible &&
                                       analysis.numLoopDims() >= 2),
           "kernel signature: pitched_rows, for a fusion that cannot have it "
           "(it needs inputs and outputs of the full loop shape, of two or "
           "more dims, and no reduction)");
  HF_CHECK(!signature.row_limited || analysis.plan().rowsCanBeLimited(),
           "kernel signature: row_limited, for a fusion that cannot have it "
           "(a reduction, or an output whose dim 0 is not the first loop "
           "dim)");
  HF_CHECK(width <= analysis.plan().max_vector_width,
           "kernel signature: vector_width ", width,
           " would make accesses of this fusion's widest dtype wider than 16 "
           "bytes (at most ",
           analysis.plan().max_vector_width, ")");
  return KernelWriter(analysis, signature).write();
}

std::string generateCudaSource(const Fusion& fusion,
                               const InputSignature& signature) {
  return generateKernel(FusionAnalysis(fusion), signature).source;
}

}  // namespace hostfuse
