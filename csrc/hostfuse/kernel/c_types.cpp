#include <hostfuse/kernel/c_types.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>

#include <hostfuse/utils/exceptions.h>

namespace hostfuse::gen {

namespace {

std::string parenthesizeNegative(std::string literal) {
  return literal[0] == '-' ? "(" + literal + ")" : literal;
}

std::string floatLiteral(double value, CType type) {
  const bool single = type == CType::kFloat;
  if (single) {
    value = static_cast<float>(value);
  }
  if (std::isnan(value)) {
    return single ? "__uint_as_float(0x7fc00000u)"
                  : "__longlong_as_double(0x7ff8000000000000ll)";
  }
  if (std::isinf(value)) {
    const std::string inf = single
                                ? "__uint_as_float(0x7f800000u)"
                                : "__longlong_as_double(0x7ff0000000000000ll)";
    return value > 0 ? inf : "(-" + inf + ")";
  }
  std::ostringstream ss;
  ss << std::setprecision(single ? 9 : 17) << value;
  std::string text = ss.str();
  if (text.find_first_of(".eE") == std::string::npos) {
    text += ".0";
  }
  return parenthesizeNegative(single ? text + "f" : text);
}

std::string intLiteral(int64_t value, CType type) {
  if (type == CType::kInt) {
    const auto narrow = static_cast<int32_t>(value);
    if (narrow == std::numeric_limits<int32_t>::min()) {
      return "(-2147483647 - 1)";
    }
    return parenthesizeNegative(std::to_string(narrow));
  }
  if (value == std::numeric_limits<int64_t>::min()) {
    return "(-9223372036854775807ll - 1)";
  }
  return parenthesizeNegative(std::to_string(value) + "ll");
}

}  // namespace

std::string cName(CType type) {
  switch (type) {
    case CType::kBool:
      return "bool";
    case CType::kInt:
      return "int";
    case CType::kInt64:
      return "long long";
    case CType::kFloat:
      return "float";
    case CType::kDouble:
      return "double";
  }
  return "void";
}

CType computeType(DataType dtype) {
  switch (dtype) {
    case DataType::Bool:
      return CType::kBool;
    case DataType::Int32:
      return CType::kInt;
    case DataType::Int64:
      return CType::kInt64;
    case DataType::Double:
      return CType::kDouble;
    case DataType::Half:
    case DataType::BFloat16:
    case DataType::Float:
      return CType::kFloat;
    case DataType::Float8E4M3:
      HF_THROW(
          "fp8 (f8e4m3) tensors cannot enter a fused kernel; dequantize them "
          "first with their scales (DequantizeFp8, Python "
          "hf.dequantize_fp8; GroupedMatmul also takes them with x_scales)");
  }
  return CType::kFloat;
}

std::string storageType(DataType dtype) {
  switch (dtype) {
    case DataType::Half:
      return "hf_f16";
    case DataType::BFloat16:
      return "hf_bf16";
    default:
      return cName(computeType(dtype));
  }
}

bool isSixteenBitFloat(DataType dtype) {
  return dtype == DataType::Half || dtype == DataType::BFloat16;
}

std::string convert(const std::string& expr, CType from, CType to) {
  return from == to ? expr : "static_cast<" + cName(to) + ">(" + expr + ")";
}

std::string literal(const ScalarValue& value, CType type) {
  double number = 0.0;
  if (const auto* b = std::get_if<bool>(&value)) {
    number = *b ? 1.0 : 0.0;
  } else if (const auto* i = std::get_if<int64_t>(&value)) {
    if (type == CType::kInt || type == CType::kInt64) {
      return intLiteral(*i, type);
    }
    number = static_cast<double>(*i);
  } else {
    number = std::get<double>(value);
  }
  switch (type) {
    case CType::kBool:
      return number != 0.0 ? "true" : "false";
    case CType::kInt:
    case CType::kInt64:
      return intLiteral(static_cast<int64_t>(number), type);
    case CType::kFloat:
    case CType::kDouble:
      return floatLiteral(number, type);
  }
  return "0";
}

bool isIdentifier(const std::string& text) {
  if (text.empty() || std::isdigit(static_cast<unsigned char>(text[0]))) {
    return false;
  }
  return std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  });
}

std::string join(const std::vector<std::string>& pieces,
                 const std::string& separator) {
  std::string result;
  for (size_t i = 0; i < pieces.size(); ++i) {
    result += (i == 0 ? "" : separator) + pieces[i];
  }
  return result;
}

}  // namespace hostfuse::gen
