#include <hostfuse/ir/data_type.h>

#include <ostream>

#include <hostfuse/utils/exceptions.h>

namespace hostfuse {

at::ScalarType toScalarType(DataType dtype) {
  switch (dtype) {
    case DataType::Bool:
      return at::kBool;
    case DataType::Int32:
      return at::kInt;
    case DataType::Int64:
      return at::kLong;
    case DataType::Half:
      return at::kHalf;
    case DataType::BFloat16:
      return at::kBFloat16;
    case DataType::Float:
      return at::kFloat;
    case DataType::Double:
      return at::kDouble;
    case DataType::Float8E4M3:
      return at::kFloat8_e4m3fn;
  }
  HF_ERROR(false, "unknown DataType ", static_cast<int>(dtype));
  return at::kFloat;
}

DataType toDataType(at::ScalarType scalar_type) {
  switch (scalar_type) {
    case at::kBool:
      return DataType::Bool;
    case at::kInt:
      return DataType::Int32;
    case at::kLong:
      return DataType::Int64;
    case at::kHalf:
      return DataType::Half;
    case at::kBFloat16:
      return DataType::BFloat16;
    case at::kFloat:
      return DataType::Float;
    case at::kDouble:
      return DataType::Double;
    case at::kFloat8_e4m3fn:
      return DataType::Float8E4M3;
    default:
      HF_THROW("hostfuse does not support the ATen scalar type ",
               c10::toString(scalar_type));
  }
}

bool isFloatingPoint(DataType dtype) {
  return dtype == DataType::Half || dtype == DataType::BFloat16 ||
         dtype == DataType::Float || dtype == DataType::Double;
}

bool isIntegral(DataType dtype) {
  return dtype == DataType::Int32 || dtype == DataType::Int64;
}

int64_t sizeOf(DataType dtype) {
  return static_cast<int64_t>(c10::elementSize(toScalarType(dtype)));
}

DataType promoteTypes(DataType a, DataType b) {
  return toDataType(c10::promoteTypes(toScalarType(a), toScalarType(b)));
}

std::string toString(DataType dtype) {
  switch (dtype) {
    case DataType::Bool:
      return "bool";
    case DataType::Int32:
      return "i32";
    case DataType::Int64:
      return "i64";
    case DataType::Half:
      return "f16";
    case DataType::BFloat16:
      return "bf16";
    case DataType::Float:
      return "f32";
    case DataType::Double:
      return "f64";
    case DataType::Float8E4M3:
      return "f8e4m3";
  }
  return "unknown";
}

std::ostream& operator<<(std::ostream& os, DataType dtype) {
  return os << toString(dtype);
}

}  // namespace hostfuse
