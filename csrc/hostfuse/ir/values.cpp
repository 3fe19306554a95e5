#include <hostfuse/ir/values.h>

#include <iomanip>
#include <sstream>

#include <hostfuse/ir/container.h>

namespace hostfuse {

namespace {

DataType dtypeOf(const ScalarValue& value) {
  if (std::holds_alternative<int64_t>(value)) {
    return DataType::Int64;
  }
  if (std::holds_alternative<double>(value)) {
    return DataType::Double;
  }
  return DataType::Bool;
}

std::string scalarPrefix(DataType dtype) {
  if (dtype == DataType::Bool) {
    return "b";
  }
  return isFloatingPoint(dtype) ? "d" : "i";
}

}  // namespace

Scalar::Scalar(DataType dtype) : Val(ValType::Scalar, dtype) {}

Scalar::Scalar(ScalarValue value)
    : Val(ValType::Scalar, dtypeOf(value)), value_(value) {}

std::optional<int64_t> Scalar::constantInt() const {
  if (value_.has_value() && std::holds_alternative<int64_t>(*value_)) {
    return std::get<int64_t>(*value_);
  }
  return std::nullopt;
}

std::string Scalar::toString() const {
  if (!value_.has_value()) {
    if (!userName().empty()) {
      return userName();
    }
    return scalarPrefix(dtype()) + std::to_string(name());
  }
  std::ostringstream ss;
  if (const auto* i = std::get_if<int64_t>(&*value_)) {
    ss << *i;
  } else if (const auto* d = std::get_if<double>(&*value_)) {
    // The shortest form that reads back as the same double: 1e-06, not
    // 9.9999999999999995e-07.
    std::string text;
    for (int precision = 1; precision <= 17; ++precision) {
      std::ostringstream attempt;
      attempt << std::setprecision(precision) << *d;
      text = attempt.str();
      if (std::stod(text) == *d) {
        break;
      }
    }
    ss << text;
    // Keep a double recognizable as one: "2.0", not "2".
    if (text.find_first_of(".eEni") == std::string::npos) {
      ss << ".0";
    }
  } else {
    ss << (std::get<bool>(*value_) ? "true" : "false");
  }
  return ss.str();
}

std::string Scalar::toDeclString() const {
  // A symbolic scalar prints as its user name already.
  return toString() + ": " + hostfuse::toString(dtype());
}

Val* Scalar::cloneInto(IrCloner& cloner) const {
  if (value_.has_value()) {
    return cloner.target()->create<Scalar>(*value_);
  }
  return cloner.target()->create<Scalar>(dtype());
}

TensorView::TensorView(DataType dtype, std::vector<Scalar*> extents)
    : Val(ValType::TensorView, dtype), extents_(std::move(extents)) {
  for (size_t i = 0; i < extents_.size(); ++i) {
    HF_CHECK(extents_[i] != nullptr, "extent ", i, " of a tensor is null");
    HF_CHECK(extents_[i]->dtype() == DataType::Int64, "extent ", i,
             " of a tensor must be an i64 scalar, got ", extents_[i]->dtype());
    const std::optional<int64_t> size = extents_[i]->constantInt();
    HF_CHECK(!size.has_value() || *size >= 0, "extent ", i,
             " of a tensor must not be negative, got ", *size);
  }
}

Scalar* TensorView::extent(int64_t dim) const {
  HF_CHECK(dim >= 0 && dim < rank(), "dim ", dim,
           " is out of range for a tensor of rank ", rank());
  return extents_[dim];
}

std::string TensorView::toString() const {
  return "T" + std::to_string(name());
}

std::string TensorView::typeString() const {
  std::ostringstream ss;
  ss << dtype() << "[";
  for (size_t i = 0; i < extents_.size(); ++i) {
    ss << (i == 0 ? "" : ", ") << extents_[i]->toString();
  }
  ss << "]";
  return ss.str();
}

std::string TensorView::toDeclString() const {
  return describe() + ": " + typeString();
}

Val* TensorView::cloneInto(IrCloner& cloner) const {
  std::vector<Scalar*> extents;
  extents.reserve(extents_.size());
  for (Scalar* extent : extents_) {
    extents.push_back(cloner.clone(extent));
  }
  return cloner.target()->create<TensorView>(dtype(), std::move(extents));
}

}  // namespace hostfuse
