#include <hostfuse/ir/container.h>

#include <algorithm>
#include <sstream>
#include <unordered_set>

namespace hostfuse {

Val* IrContainer::registerVal(std::unique_ptr<Val> val) {
  HF_ERROR(val->container_ == nullptr, "value registered twice");
  val->container_ = this;
  val->name_ =
      val->valType() == ValType::TensorView ? num_tensors_++ : num_scalars_++;
  vals_.push_back(std::move(val));
  return vals_.back().get();
}

Expr* IrContainer::registerExpr(std::unique_ptr<Expr> expr) {
  HF_ERROR(expr->container_ == nullptr, "expression registered twice");
  for (size_t i = 0; i < expr->inputs().size(); ++i) {
    const Val* input = expr->inputs()[i];
    HF_CHECK(owns(input), expr->opName(), ": input ", i, " (",
             input->describe(),
             ") belongs to another container; values cannot be shared "
             "between a Fusion and a host program");
  }
  for (size_t i = 0; i < expr->outputs().size(); ++i) {
    const Val* output = expr->outputs()[i];
    HF_CHECK(owns(output), expr->opName(), ": output ", i, " (",
             output->describe(), ") belongs to another container");
    HF_CHECK(output->definition() == nullptr, expr->opName(), ": output ", i,
             " (", output->describe(),
             ") is already computed by another expression");
    HF_CHECK(std::find(expr->inputs().begin(), expr->inputs().end(), output) ==
                 expr->inputs().end(),
             expr->opName(), ": output ", i, " (", output->describe(),
             ") is also one of its inputs");
  }
  expr->validate();

  expr->container_ = this;
  for (Val* input : expr->inputs()) {
    input->uses_.push_back(expr.get());
  }
  for (Val* output : expr->outputs()) {
    output->definition_ = expr.get();
  }
  exprs_.push_back(std::move(expr));
  onExprRegistered(exprs_.back().get());
  return exprs_.back().get();
}

std::vector<Val*> IrContainer::vals() const {
  std::vector<Val*> result;
  result.reserve(vals_.size());
  for (const auto& val : vals_) {
    result.push_back(val.get());
  }
  return result;
}

std::vector<Expr*> IrContainer::unorderedExprs() const {
  std::vector<Expr*> result;
  result.reserve(exprs_.size());
  for (const auto& expr : exprs_) {
    result.push_back(expr.get());
  }
  return result;
}

void Fusion::addInput(Val* input) {
  HF_CHECK(input != nullptr, "Fusion::addInput: the input is null");
  HF_CHECK(owns(input), "Fusion::addInput: ", input->describe(),
           " belongs to another container");
  HF_CHECK(input->definition() == nullptr,
           "Fusion::addInput: ", input->describe(), " is computed by ",
           input->definition()->toInlineString(), " and so cannot be an input");
  HF_CHECK(!isInput(input), "Fusion::addInput: ", input->describe(),
           " is an input already");
  if (const auto* scalar = dynamic_cast<const Scalar*>(input)) {
    HF_CHECK(!scalar->isConstant(), "Fusion::addInput: the constant ",
             scalar->toString(), " cannot be an input");
  }
  inputs_.push_back(input);
}

void Fusion::addOutput(Val* output) {
  HF_CHECK(output != nullptr, "Fusion::addOutput: the output is null");
  HF_CHECK(owns(output), "Fusion::addOutput: ", output->describe(),
           " belongs to another container");
  HF_CHECK(output->isA<TensorView>(), "Fusion::addOutput: ", output->describe(),
           " is a scalar; outputs must be tensors");
  outputs_.push_back(output);
}

bool Fusion::isInput(const Val* val) const {
  return std::find(inputs_.begin(), inputs_.end(), val) != inputs_.end();
}

bool Fusion::isOutput(const Val* val) const {
  return std::find(outputs_.begin(), outputs_.end(), val) != outputs_.end();
}

std::vector<Expr*> Fusion::exprs() const {
  // Depth-first from the outputs, emitting an expression after the
  // expressions that define its inputs (post-order).
  std::vector<Expr*> order;
  std::unordered_set<const Expr*> done;
  std::vector<std::pair<Expr*, size_t>> stack;
  for (Val* output : outputs_) {
    if (output->definition() == nullptr ||
        done.count(output->definition()) != 0) {
      continue;
    }
    stack.emplace_back(output->definition(), 0);
    while (!stack.empty()) {
      auto& [expr, next_input] = stack.back();
      if (next_input < expr->inputs().size()) {
        Expr* producer = expr->inputs()[next_input++]->definition();
        if (producer != nullptr && done.count(producer) == 0) {
          stack.emplace_back(producer, 0);
        }
        continue;
      }
      if (done.insert(expr).second) {
        order.push_back(expr);
      }
      stack.pop_back();
    }
  }
  return order;
}

std::string Fusion::describeInput(size_t index) const {
  HF_ERROR(index < inputs_.size(), "no input ", index);
  return "input " + std::to_string(index) + " (" + inputs_[index]->describe() +
         ")";
}

std::string Fusion::toString() const {
  std::ostringstream ss;
  ss << "Fusion {\n";
  for (const Val* input : inputs_) {
    ss << "  input " << input->toDeclString() << "\n";
  }
  for (const Expr* expr : exprs()) {
    ss << "  " << expr->toString();
  }
  for (const Val* output : outputs_) {
    ss << "  output " << output->toDeclString() << "\n";
  }
  ss << "}\n";
  return ss.str();
}

std::unique_ptr<Fusion> Fusion::clone() const {
  auto copy = std::make_unique<Fusion>();
  IrCloner cloner(copy.get());
  copyInto(copy.get(), cloner);
  return copy;
}

void Fusion::copyInto(Fusion* target, IrCloner& cloner) const {
  // In creation order, so that every node gets the same name in the copy.
  for (const Val* val : vals()) {
    cloner.clone(val);
  }
  for (const Expr* expr : unorderedExprs()) {
    cloner.clone(expr);
  }
  for (const Val* input : inputs_) {
    target->addInput(cloner.clone(input));
  }
  for (const Val* output : outputs_) {
    target->addOutput(cloner.clone(output));
  }
}

namespace {
thread_local IrContainer* active_container = nullptr;
}  // namespace

FusionGuard::FusionGuard(IrContainer* container) : previous_(active_container) {
  active_container = container;
}

FusionGuard::~FusionGuard() { active_container = previous_; }

IrContainer* FusionGuard::current() {
  HF_CHECK(active_container != nullptr,
           "no Fusion is active: create a FusionGuard for the Fusion or "
           "host program you are building (from Python: build inside "
           "`with program:` or `with fusion:`)");
  return active_container;
}

Val* IrCloner::clone(const Val* val) {
  if (val == nullptr) {
    return nullptr;
  }
  auto it = vals_.find(val);
  if (it != vals_.end()) {
    return it->second;
  }
  Val* copy = val->cloneInto(*this);
  copy->setUserName(val->userName());
  vals_.emplace(val, copy);
  return copy;
}

std::vector<Val*> IrCloner::clone(const std::vector<Val*>& vals) {
  std::vector<Val*> copies;
  copies.reserve(vals.size());
  for (const Val* val : vals) {
    copies.push_back(clone(val));
  }
  return copies;
}

Expr* IrCloner::clone(const Expr* expr) {
  auto it = exprs_.find(expr);
  if (it != exprs_.end()) {
    return it->second;
  }
  Expr* copy =
      expr->cloneWith(target_, clone(expr->inputs()), clone(expr->outputs()));
  exprs_.emplace(expr, copy);
  return copy;
}

}  // namespace hostfuse
