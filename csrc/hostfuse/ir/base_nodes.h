// Val and Expr: the two kinds of IR node.
//
// A Val is a value (a tensor or a scalar). An Expr computes its outputs from
// its inputs. Both are owned by an IrContainer (a Fusion or a host program)
// and created through IrContainer::create / IrBuilder::create, which number
// them, link definitions and uses, and run Expr::validate() before the node
// becomes part of the container.
#pragma once

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include <hostfuse/ir/data_type.h>
#include <hostfuse/ir/dispatch.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse {

class Expr;
class IrContainer;
class IrCloner;

enum class ValType { Scalar, TensorView };

class Val {
 public:
  virtual ~Val() = default;
  Val(const Val&) = delete;
  Val& operator=(const Val&) = delete;

  ValType valType() const { return val_type_; }
  DataType dtype() const { return dtype_; }
  IrContainer* container() const { return container_; }
  // Number within the container, per ValType: T0, T1, ... for tensors.
  int64_t name() const { return name_; }

  // A name given by the user, shown next to the IR name in printed programs
  // and error messages; empty if none was given.
  const std::string& userName() const { return user_name_; }
  void setUserName(std::string user_name) { user_name_ = std::move(user_name); }

  // The expression that computes this value, or nullptr for program inputs
  // and constants.
  Expr* definition() const { return definition_; }
  const std::vector<Expr*>& uses() const { return uses_; }

  template <typename T>
  bool isA() const {
    return dynamic_cast<const T*>(this) != nullptr;
  }
  template <typename T>
  T* as() {
    auto* result = dynamic_cast<T*>(this);
    HF_ERROR(result != nullptr, "bad cast of ", toString());
    return result;
  }
  template <typename T>
  const T* as() const {
    auto* result = dynamic_cast<const T*>(this);
    HF_ERROR(result != nullptr, "bad cast of ", toString());
    return result;
  }

  // How the value is referred to in printed IR: T3, a constant's value, or a
  // symbolic scalar's name.
  virtual std::string toString() const = 0;
  // Its declaration: name, user name, type and shape, e.g.
  // "T0 'x': bf16[tokens, 64]".
  virtual std::string toDeclString() const;
  // "T0 'x'", "T0" or, for a symbolic scalar, "tokens": what error
  // messages use to point at a value.
  std::string describe() const;

  // Creates the copy of this value in the cloner's target container.
  virtual Val* cloneInto(IrCloner& cloner) const = 0;

 protected:
  Val(ValType val_type, DataType dtype) : val_type_(val_type), dtype_(dtype) {}

 private:
  friend class IrContainer;

  const ValType val_type_;
  const DataType dtype_;
  IrContainer* container_ = nullptr;
  int64_t name_ = -1;
  std::string user_name_;
  Expr* definition_ = nullptr;
  std::vector<Expr*> uses_;
};

// Data attached to an expression: op kinds, dims, flags, dtypes.
using Attribute = std::variant<bool, int64_t, double, std::string,
                               std::vector<int64_t>, DataType>;

class Expr {
 public:
  virtual ~Expr() = default;
  Expr(const Expr&) = delete;
  Expr& operator=(const Expr&) = delete;

  // The class name, e.g. "BinaryOp".
  virtual const char* opName() const = 0;

  const std::vector<Val*>& inputs() const { return inputs_; }
  const std::vector<Val*>& outputs() const { return outputs_; }
  Val* input(size_t i) const {
    HF_ERROR(i < inputs_.size(), opName(), " has no input ", i);
    return inputs_[i];
  }
  Val* output(size_t i) const {
    HF_ERROR(i < outputs_.size(), opName(), " has no output ", i);
    return outputs_[i];
  }
  const std::vector<Attribute>& attributes() const { return attributes_; }
  IrContainer* container() const { return container_; }

  template <typename T>
  bool isA() const {
    return dynamic_cast<const T*>(this) != nullptr;
  }
  template <typename T>
  T* as() {
    auto* result = dynamic_cast<T*>(this);
    HF_ERROR(result != nullptr, "bad cast of ", opName());
    return result;
  }
  template <typename T>
  const T* as() const {
    auto* result = dynamic_cast<const T*>(this);
    HF_ERROR(result != nullptr, "bad cast of ", opName());
    return result;
  }

  // One line, no trailing newline, e.g. "T2 = add(T0, T1)".
  virtual std::string toInlineString() const = 0;
  std::string toString() const { return toInlineString() + "\n"; }

  // Checks dtypes, ranks and shapes of inputs, outputs and attributes.
  // Called once, when the expression is added to its container; throws
  // hostfuse::Error naming the bad argument. Everything downstream (the
  // evaluators, codegen) trusts a validated expression.
  virtual void validate() const {}

  // Reference semantics on ATen: values of the outputs given values of the
  // inputs, in order. Tensors are at::Tensor, scalars int64_t/double/bool.
  // The default throws: not every node can run on its own (host nodes need
  // the evaluator's context).
  virtual std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const;

  // Why this expression cannot be captured into a CUDA graph that runs on
  // `device` (each reason one line), or nothing when it can. Every
  // concrete expression must say (pure virtual): a new expression type
  // does not compile until it does. Most use HF_ALWAYS_CAPTURABLE.
  virtual std::vector<std::string> captureProblems(
      const at::Device& device) const = 0;

  virtual void accept(ExprVisitor& visitor) = 0;
  virtual void accept(ConstExprVisitor& visitor) const = 0;

  // Creates a copy of this expression in `container` with the given
  // (already cloned) inputs and outputs.
  virtual Expr* cloneWith(IrContainer* container, std::vector<Val*> inputs,
                          std::vector<Val*> outputs) const = 0;

 protected:
  Expr() = default;
  // The copy constructor used by cloneWith: same attributes, new inputs and
  // outputs.
  Expr(const Expr& other, std::vector<Val*> inputs, std::vector<Val*> outputs)
      : inputs_(std::move(inputs)),
        outputs_(std::move(outputs)),
        attributes_(other.attributes_) {}

  void addInput(Val* input);
  void addOutput(Val* output);
  void addDataAttribute(Attribute attribute) {
    attributes_.push_back(std::move(attribute));
  }
  template <typename T>
  const T& attribute(size_t i) const {
    HF_ERROR(i < attributes_.size(), opName(), " has no attribute ", i);
    const T* value = std::get_if<T>(&attributes_[i]);
    HF_ERROR(value != nullptr, opName(), " attribute ", i, " has another type");
    return *value;
  }

 private:
  friend class IrContainer;

  std::vector<Val*> inputs_;
  std::vector<Val*> outputs_;
  std::vector<Attribute> attributes_;
  IrContainer* container_ = nullptr;
};

// "a, b, c" of the values' toString().
std::string joinValues(const std::vector<Val*>& values);

}  // namespace hostfuse

// Boilerplate of every concrete expression class: put HF_DECLARE_EXPR(Name)
// in the class body (public section) and HF_DEFINE_EXPR(Name) in its .cpp.
// A class with data members beyond its attributes uses
// HF_DECLARE_EXPR_CUSTOM_COPY and writes the copy constructor
// `Name(const Name& other, std::vector<Val*> inputs, std::vector<Val*>
// outputs)` itself.
#define HF_DECLARE_EXPR_CUSTOM_COPY(ClassName)                       \
  const char* opName() const override { return #ClassName; }         \
  void accept(::hostfuse::ExprVisitor& visitor) override;            \
  void accept(::hostfuse::ConstExprVisitor& visitor) const override; \
  ::hostfuse::Expr* cloneWith(::hostfuse::IrContainer* container,    \
                              std::vector<::hostfuse::Val*> inputs,  \
                              std::vector<::hostfuse::Val*> outputs) \
      const override;

#define HF_DECLARE_EXPR(ClassName)                                        \
  HF_DECLARE_EXPR_CUSTOM_COPY(ClassName)                                  \
  ClassName(const ClassName& other, std::vector<::hostfuse::Val*> inputs, \
            std::vector<::hostfuse::Val*> outputs)                        \
      : ::hostfuse::Expr(other, std::move(inputs), std::move(outputs)) {}

// In the class body of an expression that any CUDA graph can capture (its
// work is device work on the current stream, with no host
// synchronization).
#define HF_ALWAYS_CAPTURABLE                                                   \
  std::vector<std::string> captureProblems(const at::Device&) const override { \
    return {};                                                                 \
  }

// Defines both accept() overloads, cloneWith() and the default handle()
// overloads of both visitors for the type, which fall back to
// ExprVisitor::handleDefault and ConstExprVisitor::handleDefault.
#define HF_DEFINE_EXPR(ClassName)                                       \
  void ClassName::accept(::hostfuse::ExprVisitor& visitor) {            \
    visitor.handle(this);                                               \
  }                                                                     \
  void ClassName::accept(::hostfuse::ConstExprVisitor& visitor) const { \
    visitor.handle(this);                                               \
  }                                                                     \
  ::hostfuse::Expr* ClassName::cloneWith(                               \
      ::hostfuse::IrContainer* container,                               \
      std::vector<::hostfuse::Val*> inputs,                             \
      std::vector<::hostfuse::Val*> outputs) const {                    \
    return container->registerExpr(std::unique_ptr<::hostfuse::Expr>(   \
        new ClassName(*this, std::move(inputs), std::move(outputs))));  \
  }                                                                     \
  void ::hostfuse::ExprVisitor::handle(ClassName* expr) {               \
    handleDefault(expr);                                                \
  }                                                                     \
  void ::hostfuse::ConstExprVisitor::handle(const ClassName* expr) {    \
    handleDefault(expr);                                                \
  }
