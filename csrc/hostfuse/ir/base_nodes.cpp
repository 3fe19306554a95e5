#include <hostfuse/ir/base_nodes.h>

#include <sstream>

#include <hostfuse/ir/container.h>

namespace hostfuse {

std::string Val::toDeclString() const {
  return describe() + ": " + hostfuse::toString(dtype_);
}

std::string Val::describe() const {
  // A symbolic scalar prints as its user name already: "alpha", not
  // "alpha 'alpha'".
  const std::string printed = toString();
  if (user_name_.empty() || printed == user_name_) {
    return printed;
  }
  return printed + " '" + user_name_ + "'";
}

std::vector<c10::IValue> Expr::evaluate(
    const std::vector<c10::IValue>& /*inputs*/) const {
  HF_THROW(opName(),
           " has no stand-alone reference semantics; it runs only inside an "
           "evaluator that handles it: ",
           toInlineString());
}

void Expr::addInput(Val* input) {
  HF_CHECK(input != nullptr, opName(), ": input ", inputs_.size(), " is null");
  inputs_.push_back(input);
}

void Expr::addOutput(Val* output) {
  HF_CHECK(output != nullptr, opName(), ": output ", outputs_.size(),
           " is null");
  outputs_.push_back(output);
}

std::string joinValues(const std::vector<Val*>& values) {
  std::ostringstream ss;
  for (size_t i = 0; i < values.size(); ++i) {
    ss << (i == 0 ? "" : ", ") << values[i]->toString();
  }
  return ss.str();
}

void ExprVisitor::dispatch(Expr* expr) { expr->accept(*this); }

void ExprVisitor::handleDefault(Expr* expr) {
  HF_THROW("this visitor does not handle ", expr->opName(), ": ",
           expr->toInlineString());
}

void ConstExprVisitor::dispatch(const Expr* expr) { expr->accept(*this); }

void ConstExprVisitor::handleDefault(const Expr* expr) {
  HF_THROW("this visitor does not handle ", expr->opName(), ": ",
           expr->toInlineString());
}

}  // namespace hostfuse
