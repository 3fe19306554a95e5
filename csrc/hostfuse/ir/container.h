// Owners of IR nodes.
//
// IrContainer  owns Vals and Exprs, numbers them and links definitions/uses.
// Fusion       an IrContainer with inputs and outputs: a dataflow graph of
//              math that becomes one generated kernel.
// FusionGuard  makes a container the target of the builder functions in
//              ir/ops.h for the current scope.
// IrCloner     copies a container's nodes into another container.
#pragma once

#include <memory>
#include <unordered_map>
#include <vector>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

class IrContainer {
 public:
  IrContainer() = default;
  virtual ~IrContainer() = default;
  IrContainer(const IrContainer&) = delete;
  IrContainer& operator=(const IrContainer&) = delete;

  // Creates a value or an expression owned by this container. An expression
  // is validated first; if validate() throws, nothing is added.
  template <typename T, typename... Args>
  T* create(Args&&... args) {
    if constexpr (std::is_base_of_v<Expr, T>) {
      return static_cast<T*>(
          registerExpr(std::make_unique<T>(std::forward<Args>(args)...)));
    } else {
      return static_cast<T*>(
          registerVal(std::make_unique<T>(std::forward<Args>(args)...)));
    }
  }

  Val* registerVal(std::unique_ptr<Val> val);
  Expr* registerExpr(std::unique_ptr<Expr> expr);

  // All values and expressions, in creation order.
  std::vector<Val*> vals() const;
  std::vector<Expr*> unorderedExprs() const;

  bool owns(const Val* val) const { return val->container() == this; }

 protected:
  // Called after an expression joined the container.
  virtual void onExprRegistered(Expr* /*expr*/) {}

 private:
  std::vector<std::unique_ptr<Val>> vals_;
  std::vector<std::unique_ptr<Expr>> exprs_;
  int64_t num_tensors_ = 0;
  int64_t num_scalars_ = 0;
};

class Fusion : public IrContainer {
 public:
  Fusion() = default;

  // Marks a value as the next input. Inputs are bound by position when the
  // fusion runs. A value computed by an expression cannot be an input.
  void addInput(Val* input);
  void addOutput(Val* output);

  const std::vector<Val*>& inputs() const { return inputs_; }
  const std::vector<Val*>& outputs() const { return outputs_; }
  bool isInput(const Val* val) const;
  bool isOutput(const Val* val) const;

  // The expressions the outputs depend on, each after the expressions that
  // compute its inputs.
  std::vector<Expr*> exprs() const;

  // "input 1 (T1 'w')": how error messages refer to an input.
  std::string describeInput(size_t index) const;

  // The whole fusion as readable text: declarations of inputs and outputs,
  // then one line per expression.
  virtual std::string toString() const;

  // A deep copy. The copy prints the same and computes the same, and
  // changing one does not change the other.
  std::unique_ptr<Fusion> clone() const;

 protected:
  // Copies this fusion's nodes, inputs and outputs into `target`.
  void copyInto(Fusion* target, IrCloner& cloner) const;

 private:
  std::vector<Val*> inputs_;
  std::vector<Val*> outputs_;
};

// Makes `container` the target of IrBuilder::create and the ops in ir/ops.h
// until the guard goes out of scope; guards nest.
class FusionGuard {
 public:
  explicit FusionGuard(IrContainer* container);
  ~FusionGuard();
  FusionGuard(const FusionGuard&) = delete;
  FusionGuard& operator=(const FusionGuard&) = delete;

  // The active container; throws if no guard is active.
  static IrContainer* current();

 private:
  IrContainer* previous_;
};

struct IrBuilder {
  template <typename T, typename... Args>
  static T* create(Args&&... args) {
    return FusionGuard::current()->create<T>(std::forward<Args>(args)...);
  }
};

class IrCloner {
 public:
  explicit IrCloner(IrContainer* target) : target_(target) {}

  IrContainer* target() const { return target_; }

  // The copy of `val` in the target container, made on first request.
  Val* clone(const Val* val);
  template <typename T>
  T* clone(const T* val) {
    return static_cast<T*>(clone(static_cast<const Val*>(val)));
  }
  std::vector<Val*> clone(const std::vector<Val*>& vals);

  Expr* clone(const Expr* expr);

 private:
  IrContainer* target_;
  std::unordered_map<const Val*, Val*> vals_;
  std::unordered_map<const Expr*, Expr*> exprs_;
};

}  // namespace hostfuse
