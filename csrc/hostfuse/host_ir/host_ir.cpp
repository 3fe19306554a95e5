#include <hostfuse/host_ir/host_ir.h>

#include <sstream>
#include <unordered_map>

#include <hostfuse/ir/ops.h>

namespace hostfuse {

RunFusion::RunFusion(std::vector<Val*> outputs, std::shared_ptr<Fusion> fusion,
                     std::vector<Val*> inputs, TensorView* row_counts)
    : fusion_(std::move(fusion)) {
  HF_CHECK(fusion_ != nullptr, "RunFusion: the fusion is null");
  HF_CHECK(inputs.size() == fusion_->inputs().size(),
           "RunFusion: the fusion takes ", fusion_->inputs().size(),
           " inputs, but ", inputs.size(), " were given");
  for (Val* output : outputs) {
    addOutput(output);
  }
  for (Val* input : inputs) {
    addInput(input);
  }
  if (row_counts != nullptr) {
    addInput(row_counts);
  }
}

std::string RunFusion::toInlineString() const {
  std::ostringstream ss;
  ss << "(" << joinValues(outputs()) << ") = RunFusion("
     << joinValues(fusionInputs());
  if (const TensorView* counts = rowCounts()) {
    ss << ", row_counts=" << counts->toString();
  }
  ss << ")";
  return ss.str();
}

void RunFusion::validate() const {
  const Fusion& f = *fusion_;
  HF_CHECK(inputs().size() == f.inputs().size() ||
               inputs().size() == f.inputs().size() + 1,
           "RunFusion: the fusion takes ", f.inputs().size(),
           " inputs (and optionally row_counts), but ", inputs().size(),
           " were given");
  if (const TensorView* counts = rowCounts()) {
    HF_CHECK(counts->rank() == 1 && counts->dtype() == DataType::Int64,
             "RunFusion: row_counts ", counts->toDeclString(),
             " must be an i64 tensor of rank 1");
    for (const Expr* expr : f.exprs()) {
      HF_CHECK(dynamic_cast<const ReductionOp*>(expr) == nullptr,
               "RunFusion: row_counts limit the rows of pointwise fusions "
               "only; this fusion has ",
               expr->toInlineString());
    }
    for (const Val* output : f.outputs()) {
      HF_CHECK(output->as<TensorView>()->rank() >= 1,
               "RunFusion: row_counts "
               "limit the rows of dim 0, which output ",
               output->toDeclString(), " lacks");
    }
  }
  for (size_t i = 0; i < f.inputs().size(); ++i) {
    const Val* given = input(i);
    const Val* expected = f.inputs()[i];
    HF_CHECK(given->valType() == expected->valType() &&
                 given->dtype() == expected->dtype(),
             "RunFusion: input ", i, " ", given->toDeclString(),
             " does not match fusion ", f.describeInput(i), ": ",
             expected->toDeclString());
    const auto* given_tv = dynamic_cast<const TensorView*>(given);
    const auto* expected_tv = dynamic_cast<const TensorView*>(expected);
    if (given_tv == nullptr) {
      continue;
    }
    HF_CHECK(given_tv->rank() == expected_tv->rank(), "RunFusion: input ", i,
             " ", given->toDeclString(), " has rank ", given_tv->rank(),
             " but fusion ", f.describeInput(i), " has rank ",
             expected_tv->rank());
    for (int64_t d = 0; d < given_tv->rank(); ++d) {
      const std::optional<int64_t> a = given_tv->extent(d)->constantInt();
      const std::optional<int64_t> b = expected_tv->extent(d)->constantInt();
      HF_CHECK(!a.has_value() || !b.has_value() || *a == *b,
               "RunFusion: input ", i, " ", given->toDeclString(), " has size ",
               *a, " in dim ", d, " but fusion ", f.describeInput(i), " needs ",
               *b);
    }
  }
  HF_CHECK(outputs().size() == f.outputs().size(), "RunFusion: the fusion has ",
           f.outputs().size(), " outputs, but ", outputs().size(),
           " were given");
  for (size_t i = 0; i < outputs().size(); ++i) {
    const auto* given = dynamic_cast<const TensorView*>(output(i));
    const auto* expected = f.outputs()[i]->as<TensorView>();
    HF_CHECK(given != nullptr && given->dtype() == expected->dtype() &&
                 given->rank() == expected->rank(),
             "RunFusion: output ", i, " ", output(i)->toDeclString(),
             " does not match the fusion's output ", expected->toDeclString());
  }
}

Allocate::Allocate(TensorView* out) {
  addOutput(out);
  for (Scalar* extent : out->extents()) {
    addInput(extent);
  }
}

std::string Allocate::toInlineString() const {
  return out()->toString() + " = Allocate(" + out()->typeString() + ")";
}

void Allocate::validate() const {
  HF_CHECK(inputs().size() == static_cast<size_t>(out()->rank()),
           "Allocate: the inputs must be the extents of ", out()->describe());
  for (int64_t d = 0; d < out()->rank(); ++d) {
    HF_CHECK(input(d) == out()->extent(d), "Allocate: input ", d,
             " must be extent ", d, " of ", out()->describe());
  }
}

std::vector<TensorView*> runFusion(std::shared_ptr<Fusion> fusion,
                                   const std::vector<Val*>& inputs,
                                   TensorView* row_counts) {
  HF_CHECK(fusion != nullptr, "runFusion: the fusion is null");
  // Extents and scalars of the fusion, in terms of the host program's values.
  std::unordered_map<const Val*, Scalar*> host_value;
  const size_t n = std::min(inputs.size(), fusion->inputs().size());
  for (size_t i = 0; i < n; ++i) {
    const Val* inner = fusion->inputs()[i];
    if (auto* scalar = dynamic_cast<Scalar*>(inputs[i])) {
      host_value[inner] = scalar;
      continue;
    }
    const auto* inner_tv = dynamic_cast<const TensorView*>(inner);
    const auto* outer_tv = dynamic_cast<const TensorView*>(inputs[i]);
    if (inner_tv == nullptr || outer_tv == nullptr ||
        inner_tv->rank() != outer_tv->rank()) {
      continue;  // RunFusion::validate() reports the mismatch.
    }
    for (int64_t d = 0; d < inner_tv->rank(); ++d) {
      host_value.emplace(inner_tv->extent(d), outer_tv->extent(d));
    }
  }

  std::vector<Val*> outputs;
  std::vector<TensorView*> result;
  for (const Val* inner : fusion->outputs()) {
    const auto* inner_tv = inner->as<TensorView>();
    std::vector<SizeSpec> sizes;
    for (const Scalar* extent : inner_tv->extents()) {
      auto it = host_value.find(extent);
      if (it != host_value.end()) {
        sizes.emplace_back(it->second);
      } else if (const std::optional<int64_t> size = extent->constantInt()) {
        sizes.emplace_back(*size);
      } else {
        sizes.emplace_back(kSymbolic);
      }
    }
    TensorView* outer = makeTensor(sizes, inner_tv->dtype());
    outputs.push_back(outer);
    result.push_back(outer);
  }
  IrBuilder::create<RunFusion>(std::move(outputs), std::move(fusion), inputs,
                               row_counts);
  return result;
}

TensorView* allocate(const std::vector<Scalar*>& extents, DataType dtype) {
  std::vector<SizeSpec> sizes(extents.begin(), extents.end());
  TensorView* out = makeTensor(sizes, dtype);
  IrBuilder::create<Allocate>(out);
  return out;
}

std::vector<std::string> RunFusion::captureProblems(
    const at::Device& device) const {
  std::vector<std::string> problems;
  for (const Expr* expr : fusion_->exprs()) {
    for (const std::string& why : expr->captureProblems(device)) {
      problems.push_back("in its fusion, " + expr->toInlineString() + ": " +
                         why);
    }
  }
  return problems;
}

HF_DEFINE_EXPR(RunFusion)
HF_DEFINE_EXPR(Allocate)

}  // namespace hostfuse
