#include <hostfuse/kernel/analysis.h>

#include <algorithm>
#include <set>
#include <sstream>

namespace hostfuse {

namespace {

// Disjoint sets of tensor dims that must share a loop dim.
class DimSets {
 public:
  int64_t add() {
    parent_.push_back(static_cast<int64_t>(parent_.size()));
    return parent_.back();
  }
  int64_t find(int64_t node) {
    while (parent_[node] != node) {
      parent_[node] = parent_[parent_[node]];
      node = parent_[node];
    }
    return node;
  }
  void unite(int64_t a, int64_t b) {
    a = find(a);
    b = find(b);
    // The smaller root wins, so that the result does not depend on the
    // order of unions.
    if (a != b) {
      parent_[std::max(a, b)] = std::min(a, b);
    }
  }

 private:
  std::vector<int64_t> parent_;
};

// Appends the dims of `from` that `into` lacks.
void mergeSizes(SizeSource& into, const SizeSource& from) {
  for (const InputDim& dim : from) {
    const bool present =
        std::any_of(into.begin(), into.end(), [&](const InputDim& other) {
          return other.input == dim.input && other.dim == dim.dim;
        });
    if (!present) {
      into.push_back(dim);
    }
  }
}

// Visits the expressions that kernel codegen supports: pointwise ops (casts
// among them) in one handler, broadcasts and reductions in their own. The
// base of the analysis's visitors, so that the supported set is spelled out
// once and every other expression fails with the same error.
class KernelExprVisitor : public ConstExprVisitor {
 protected:
  void handle(const UnaryOp* op) override { handlePointwise(op); }
  void handle(const BinaryOp* op) override { handlePointwise(op); }
  void handle(const TernaryOp* op) override { handlePointwise(op); }
  void handle(const CastOp* op) override { handlePointwise(op); }
  void handle(const BroadcastOp* op) override = 0;
  void handle(const ReductionOp* op) override = 0;
  virtual void handlePointwise(const Expr* expr) = 0;

  void handleDefault(const Expr* expr) override {
    HF_THROW("kernel codegen does not support ", expr->opName(), " (",
             expr->toInlineString(),
             "); it handles pointwise ops, casts, broadcasts and reductions");
  }
};

// Checks what codegen needs of an expression beyond its type: a tensor
// result, operands that the fusion provides, and for a reduction the
// innermost dim.
class SupportChecker : public KernelExprVisitor {
 public:
  explicit SupportChecker(const Fusion& fusion) : fusion_(fusion) {}

 protected:
  void handlePointwise(const Expr* expr) override { checkOperands(expr); }
  void handle(const BroadcastOp* op) override { checkOperands(op); }
  void handle(const ReductionOp* reduction) override {
    checkOperands(reduction);
    HF_CHECK(reduction->dim() == reduction->in()->rank() - 1,
             "kernel codegen supports reductions along the innermost dim "
             "only, but ",
             reduction->toInlineString(), " reduces dim ", reduction->dim(),
             " of the rank ", reduction->in()->rank(), " tensor ",
             reduction->in()->describe());
  }

 private:
  void checkOperands(const Expr* expr) const {
    HF_CHECK(expr->output(0)->isA<TensorView>(),
             "kernel codegen computes tensors only, but ",
             expr->toInlineString(), " computes a scalar");
    for (const Val* input : expr->inputs()) {
      HF_CHECK(!input->isA<TensorView>() || input->definition() != nullptr ||
                   fusion_.isInput(input),
               "kernel codegen: ", input->describe(), ", used by ",
               expr->toInlineString(),
               ", is neither an input of the fusion nor computed in it");
    }
  }

  const Fusion& fusion_;
};

// Per tensor and dim: its node in a DimSets, or -1 for a broadcast dim.
using DimNodes = std::unordered_map<const TensorView*, std::vector<int64_t>>;
// Per tensor and dim: its run-time size.
using DimSizes = std::unordered_map<const TensorView*, std::vector<SizeSource>>;

// The dims of an expression's output, from those of its operands: their
// DimSets nodes (-1 for broadcast dims) and run-time sizes.
struct OutputDims {
  std::vector<int64_t> ids;
  std::vector<SizeSource> sizes;
};

// Lines the dims of an expression's output up with those of its operands
// (already mapped): unites the dims that a pointwise op combines, and
// records the node that a reduction reduces.
class OutputDimMapper : public KernelExprVisitor {
 public:
  OutputDimMapper(DimSets& sets, const DimNodes& nodes, const DimSizes& sizes,
                  std::vector<int64_t>& reduced_nodes)
      : sets_(sets),
        nodes_(nodes),
        sizes_(sizes),
        reduced_nodes_(reduced_nodes) {}

  OutputDims map(const Expr* expr) {
    out_ = OutputDims{};
    dispatch(expr);
    return std::move(out_);
  }

 protected:
  void handle(const BroadcastOp* broadcast) override;
  void handle(const ReductionOp* reduction) override;
  void handlePointwise(const Expr* expr) override;

 private:
  DimSets& sets_;
  const DimNodes& nodes_;
  const DimSizes& sizes_;
  std::vector<int64_t>& reduced_nodes_;
  OutputDims out_;
};

void OutputDimMapper::handle(const BroadcastOp* broadcast) {
  const std::vector<int64_t>& in_ids = nodes_.at(broadcast->in());
  const std::vector<SizeSource>& in_sizes = sizes_.at(broadcast->in());
  size_t next = 0;
  for (bool is_new : broadcast->isBroadcastDim()) {
    out_.ids.push_back(is_new ? -1 : in_ids[next]);
    out_.sizes.push_back(is_new ? SizeSource{} : in_sizes[next]);
    next += is_new ? 0 : 1;
  }
}

void OutputDimMapper::handle(const ReductionOp* reduction) {
  const std::vector<int64_t>& in_ids = nodes_.at(reduction->in());
  const std::vector<SizeSource>& in_sizes = sizes_.at(reduction->in());
  const int64_t reduced = reduction->dim();
  HF_CHECK(in_ids[reduced] >= 0,
           "kernel codegen cannot reduce a broadcast dim (size 1 by "
           "construction): ",
           reduction->toInlineString());
  reduced_nodes_.push_back(in_ids[reduced]);
  for (int64_t d = 0; d < reduction->in()->rank(); ++d) {
    if (d != reduced) {
      out_.ids.push_back(in_ids[d]);
      out_.sizes.push_back(in_sizes[d]);
    } else if (reduction->keepDim()) {
      out_.ids.push_back(-1);
      out_.sizes.emplace_back();
    }
  }
}

// Dim d of the result lines up with dim d of every tensor operand that is
// not a broadcast dim there.
void OutputDimMapper::handlePointwise(const Expr* expr) {
  const auto* out = expr->output(0)->as<TensorView>();
  out_.ids.assign(out->rank(), -1);
  out_.sizes.assign(out->rank(), SizeSource{});
  for (const Val* operand : expr->inputs()) {
    const auto* tv = dynamic_cast<const TensorView*>(operand);
    if (tv == nullptr) {
      continue;
    }
    const std::vector<int64_t>& operand_ids = nodes_.at(tv);
    for (int64_t d = 0; d < out->rank(); ++d) {
      mergeSizes(out_.sizes[d], sizes_.at(tv)[d]);
      if (operand_ids[d] < 0) {
        continue;
      }
      if (out_.ids[d] < 0) {
        out_.ids[d] = operand_ids[d];
      } else {
        sets_.unite(out_.ids[d], operand_ids[d]);
      }
    }
  }
}

// Groups the reductions into passes, in expression order: a reduction runs
// in the pass after the last one whose result it needs (through any chain
// of other expressions).
class PassAssigner : public KernelExprVisitor {
 public:
  explicit PassAssigner(std::vector<std::vector<const ReductionOp*>>& passes)
      : passes_(passes) {}

 protected:
  void handlePointwise(const Expr* expr) override { inheritStage(expr); }
  void handle(const BroadcastOp* op) override { inheritStage(op); }
  void handle(const ReductionOp* reduction) override {
    const int64_t pass = lastNeededPass(reduction) + 1;
    if (static_cast<int64_t>(passes_.size()) <= pass) {
      passes_.resize(pass + 1);
    }
    passes_[pass].push_back(reduction);
    stage_[reduction->out()] = pass;
  }

 private:
  // The last pass whose result an operand of `expr` needs; -1 for none.
  int64_t lastNeededPass(const Expr* expr) const {
    int64_t needs = -1;
    for (const Val* operand : expr->inputs()) {
      if (const auto* tv = dynamic_cast<const TensorView*>(operand)) {
        auto it = stage_.find(tv);
        needs = std::max(needs, it == stage_.end() ? -1 : it->second);
      }
    }
    return needs;
  }
  // An expression other than a reduction computes its output wherever its
  // operands are available.
  void inheritStage(const Expr* expr) {
    stage_[expr->output(0)->as<TensorView>()] = lastNeededPass(expr);
  }

  std::vector<std::vector<const ReductionOp*>>& passes_;
  // The last pass whose result a tensor needs; -1 for none.
  std::unordered_map<const TensorView*, int64_t> stage_;
};

}  // namespace

FusionAnalysis::FusionAnalysis(const Fusion& fusion)
    : fusion_(fusion), exprs_(fusion.exprs()) {
  HF_CHECK(!fusion.outputs().empty(),
           "kernel codegen needs a fusion with at least one output");
  for (const Expr* expr : exprs_) {
    checkSupported(expr);
  }
  assignLoopDims();
  assignPasses();
  assignScalars();
  buildPlan();
}

void FusionAnalysis::checkSupported(const Expr* expr) const {
  SupportChecker(fusion_).dispatch(expr);
}

void FusionAnalysis::assignLoopDims() {
  DimSets sets;
  // Per tensor and dim: its node in `sets`, or -1 for a broadcast dim.
  DimNodes nodes;
  // Tensors in their fixed order: used inputs, then computed tensors.
  std::vector<const TensorView*> tensors;
  auto record = [&](const TensorView* tv, std::vector<int64_t> ids,
                    std::vector<SizeSource> sizes) {
    nodes[tv] = std::move(ids);
    sizes_[tv] = std::move(sizes);
    order_[tv] = static_cast<int64_t>(tensors.size());
    tensors.push_back(tv);
  };

  std::set<const Val*> used(fusion_.outputs().begin(), fusion_.outputs().end());
  for (const Expr* expr : exprs_) {
    used.insert(expr->inputs().begin(), expr->inputs().end());
  }
  for (size_t i = 0; i < fusion_.inputs().size(); ++i) {
    const auto* tv = dynamic_cast<const TensorView*>(fusion_.inputs()[i]);
    if (tv == nullptr || used.count(tv) == 0) {
      continue;
    }
    std::vector<int64_t> ids;
    std::vector<SizeSource> sizes;
    for (int64_t d = 0; d < tv->rank(); ++d) {
      ids.push_back(sets.add());
      sizes.push_back({InputDim{static_cast<int64_t>(i), d}});
    }
    record(tv, std::move(ids), std::move(sizes));
  }

  std::vector<int64_t> reduced_nodes;
  OutputDimMapper mapper(sets, nodes, sizes_, reduced_nodes);
  for (const Expr* expr : exprs_) {
    OutputDims dims = mapper.map(expr);
    record(expr->output(0)->as<TensorView>(), std::move(dims.ids),
           std::move(dims.sizes));
  }

  // Roots of every tensor's dims; no tensor may use one loop dim twice.
  std::set<int64_t> all_roots;
  std::unordered_map<const TensorView*, std::vector<int64_t>> roots;
  for (const TensorView* tv : tensors) {
    std::vector<int64_t>& tv_roots = roots[tv];
    for (int64_t node : nodes.at(tv)) {
      const int64_t root = node < 0 ? -1 : sets.find(node);
      HF_CHECK(root < 0 || std::find(tv_roots.begin(), tv_roots.end(), root) ==
                               tv_roots.end(),
               "kernel codegen: two dims of ", tv->describe(), " (",
               tv->typeString(),
               ") line up with one loop dim, as when one value is "
               "broadcast in two different layouts; this is not supported");
      tv_roots.push_back(root);
      if (root >= 0) {
        all_roots.insert(root);
      }
    }
  }
  for (size_t i = 1; i < reduced_nodes.size(); ++i) {
    HF_CHECK(sets.find(reduced_nodes[i]) == sets.find(reduced_nodes[0]),
             "kernel codegen needs all reductions of a fusion to reduce the "
             "same dim; they reduce different ones here");
  }

  // The reference: the first tensor that spans the most loop dims.
  int64_t best = -1;
  for (const TensorView* tv : tensors) {
    const auto count = static_cast<int64_t>(
        std::count_if(roots[tv].begin(), roots[tv].end(),
                      [](int64_t root) { return root >= 0; }));
    if (count > best) {
      best = count;
      reference_ = tv;
    }
  }
  HF_ERROR(reference_ != nullptr, "a fusion with outputs has tensors");
  HF_CHECK(best == static_cast<int64_t>(all_roots.size()),
           "kernel codegen needs one tensor that spans the whole iteration "
           "space, but the largest, ",
           reference_->describe(), " (", reference_->typeString(), "), spans ",
           best, " of its ", all_roots.size(), " dims");
  std::unordered_map<int64_t, int64_t> position;
  for (int64_t root : roots[reference_]) {
    if (root >= 0) {
      position.emplace(root, static_cast<int64_t>(position.size()));
    }
  }
  plan_.num_loop_dims = static_cast<int64_t>(position.size());
  plan_.has_reduction = !reduced_nodes.empty();
  if (plan_.has_reduction) {
    HF_CHECK(
        position.at(sets.find(reduced_nodes[0])) == plan_.num_loop_dims - 1,
        "kernel codegen needs the reduced dim to be the innermost dim "
        "of the iteration space, that of ",
        reference_->describe(), " (", reference_->typeString(), ")");
  }
  for (const TensorView* tv : tensors) {
    std::vector<int64_t>& dims = loop_dims_[tv];
    for (int64_t root : roots[tv]) {
      dims.push_back(root < 0 ? -1 : position.at(root));
    }
  }
}

void FusionAnalysis::assignPasses() {
  PassAssigner assigner(passes_);
  for (const Expr* expr : exprs_) {
    assigner.dispatch(expr);
  }
}

void FusionAnalysis::assignScalars() {
  for (const Expr* expr : exprs_) {
    for (const Val* operand : expr->inputs()) {
      const auto* scalar = dynamic_cast<const Scalar*>(operand);
      if (scalar == nullptr || scalar->isConstant() ||
          std::find(scalar_params_.begin(), scalar_params_.end(), scalar) !=
              scalar_params_.end()) {
        continue;
      }
      std::optional<ScalarSource> source;
      const std::vector<Val*>& inputs = fusion_.inputs();
      for (size_t i = 0; i < inputs.size() && !source; ++i) {
        if (inputs[i] == scalar) {
          source = ScalarSource{static_cast<int64_t>(i), -1};
        }
      }
      for (size_t i = 0; i < inputs.size() && !source; ++i) {
        const auto* tv = dynamic_cast<const TensorView*>(inputs[i]);
        for (int64_t d = 0; tv != nullptr && d < tv->rank() && !source; ++d) {
          if (tv->extent(d) == scalar) {
            source = ScalarSource{static_cast<int64_t>(i), d};
          }
        }
      }
      HF_CHECK(source.has_value(), "kernel codegen: the scalar ",
               scalar->describe(), " used by ", expr->toInlineString(),
               " is neither an input of the fusion nor a size of one");
      scalar_params_.push_back(scalar);
      plan_.scalars.push_back(*source);
    }
  }
}

void FusionAnalysis::buildPlan() {
  for (const Val* input : fusion_.inputs()) {
    const auto* tv = dynamic_cast<const TensorView*>(input);
    auto it = tv == nullptr ? loop_dims_.end() : loop_dims_.find(tv);
    plan_.input_loop_dims.push_back(
        it == loop_dims_.end() ? std::vector<int64_t>{} : it->second);
    plan_.input_used.push_back(it != loop_dims_.end());
  }
  for (const Val* output : fusion_.outputs()) {
    const auto* tv = output->as<TensorView>();
    plan_.output_loop_dims.push_back(loop_dims_.at(tv));
    plan_.output_sizes.push_back(sizes_.at(tv));
  }
  std::vector<const Val*> tensors(fusion_.outputs().begin(),
                                  fusion_.outputs().end());
  for (size_t i = 0; i < fusion_.inputs().size(); ++i) {
    if (plan_.input_used[i]) {
      tensors.push_back(fusion_.inputs()[i]);
    }
  }
  plan_.contiguous_possible = !plan_.has_reduction;
  int64_t widest = 1;
  for (const Val* tensor : tensors) {
    const std::vector<int64_t>& dims = loopDims(tensor->as<TensorView>());
    for (size_t d = 0; d < dims.size(); ++d) {
      plan_.contiguous_possible &= dims[d] == static_cast<int64_t>(d);
    }
    plan_.contiguous_possible &=
        static_cast<int64_t>(dims.size()) == plan_.num_loop_dims;
    widest = std::max(widest, sizeOf(tensor->dtype()));
  }
  plan_.max_vector_width = 16 / widest;
  for (const auto& pass : passes_) {
    for (const ReductionOp* reduction : pass) {
      plan_.reduced_sizes.push_back(
          sizes_.at(reduction->in()).at(reduction->dim()));
      plan_.reduction_names.push_back(reduction->toInlineString());
      plan_.has_max_reduction |= reduction->opType() == ReductionOpType::Max;
    }
  }
}

const std::vector<int64_t>& FusionAnalysis::loopDims(
    const TensorView* tv) const {
  auto it = loop_dims_.find(tv);
  HF_ERROR(it != loop_dims_.end(), tv->describe(),
           " is not part of the analyzed fusion");
  return it->second;
}

bool FusionAnalysis::dependsOnReducedDim(const TensorView* tv) const {
  if (!hasReduction()) {
    return false;
  }
  const std::vector<int64_t>& dims = loopDims(tv);
  return std::find(dims.begin(), dims.end(), numLoopDims() - 1) != dims.end();
}

int64_t FusionAnalysis::order(const TensorView* tv) const {
  auto it = order_.find(tv);
  HF_ERROR(it != order_.end(), tv->describe(),
           " is not part of the analyzed fusion");
  return it->second;
}

}  // namespace hostfuse
