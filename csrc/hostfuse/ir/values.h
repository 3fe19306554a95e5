// The values of the IR: scalars and tensors.
#pragma once

#include <optional>
#include <variant>

#include <hostfuse/ir/base_nodes.h>

namespace hostfuse {

using ScalarValue = std::variant<int64_t, double, bool>;

// A scalar: a constant (64, 0.5, true) or a symbolic value known only when
// the program runs (a program input, or a tensor extent such as the number
// of tokens, bound from the input tensors).
class Scalar : public Val {
 public:
  // A symbolic scalar.
  explicit Scalar(DataType dtype);
  // A constant; dtype must be Int64, Double or Bool to match the value.
  explicit Scalar(ScalarValue value);

  bool isConstant() const { return value_.has_value(); }
  const std::optional<ScalarValue>& value() const { return value_; }
  // The constant's value as an integer; nullopt if symbolic or not integral.
  std::optional<int64_t> constantInt() const;
  bool isConstantInt(int64_t expected) const {
    return constantInt() == expected;
  }

  std::string toString() const override;
  std::string toDeclString() const override;
  Val* cloneInto(IrCloner& cloner) const override;

 private:
  std::optional<ScalarValue> value_;
};

// A tensor: element type and one extent per dimension. Each extent is an
// Int64 Scalar: a constant (a known size; 1 marks a dimension that
// broadcasts) or symbolic. Tensors that share one symbolic extent must have
// the same size there when the program runs; the evaluators check this.
class TensorView : public Val {
 public:
  TensorView(DataType dtype, std::vector<Scalar*> extents);

  int64_t rank() const { return static_cast<int64_t>(extents_.size()); }
  const std::vector<Scalar*>& extents() const { return extents_; }
  Scalar* extent(int64_t dim) const;

  std::string toString() const override;
  std::string toDeclString() const override;
  // "f32[tokens, 64]"
  std::string typeString() const;
  Val* cloneInto(IrCloner& cloner) const override;

 private:
  std::vector<Scalar*> extents_;
};

}  // namespace hostfuse
