// Values of IR nodes during a run, input binding with its checks, and the
// ATen reference run of a Fusion.
#pragma once

#include <ATen/core/ivalue.h>

#include <unordered_map>
#include <vector>

#include <hostfuse/ir/container.h>

namespace hostfuse {

// The runtime value of each Val that has one: at::Tensor for tensors,
// int64_t/double/bool for scalars. Constants need no binding.
class ValueMap {
 public:
  void bind(const Val* val, c10::IValue value);
  bool has(const Val* val) const;
  // The value of `val`; throws naming `val` if it has none.
  c10::IValue get(const Val* val) const;
  std::vector<c10::IValue> get(const std::vector<Val*>& vals) const;
  void clear() { values_.clear(); }

 private:
  std::unordered_map<const Val*, c10::IValue> values_;
};

// Binds `args` to the inputs of `fusion` by position, checking each: the
// count, tensor vs scalar, dtype, rank, constant sizes, and that tensors
// sharing a symbolic extent agree on it (which binds that extent). Errors
// name the input. Devices are the caller's business.
void bindInputs(const Fusion& fusion, const std::vector<c10::IValue>& args,
                ValueMap& values);

// Evaluates `expr` from the values of its inputs and binds its outputs.
// An ATen error is rethrown as hostfuse::Error naming the expression.
void evaluateExpr(const Expr* expr, ValueMap& values);

// Runs a Fusion with the reference semantics of its expressions.
std::vector<at::Tensor> evaluateFusion(const Fusion& fusion,
                                       const std::vector<c10::IValue>& args);

// Values of the fusion's outputs, as tensors.
std::vector<at::Tensor> collectOutputs(const Fusion& fusion,
                                       const ValueMap& values);

}  // namespace hostfuse
