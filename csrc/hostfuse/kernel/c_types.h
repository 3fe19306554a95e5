// The C side of generated code: the types values have there, conversions
// between them, and constants written as C literals.
#pragma once

#include <string>
#include <vector>

#include <hostfuse/ir/data_type.h>
#include <hostfuse/ir/values.h>

namespace hostfuse::gen {

// C types of values in generated code.
enum class CType { kBool, kInt, kInt64, kFloat, kDouble };

// "bool", "int", "long long", "float", "double".
std::string cName(CType type);

// The type that arithmetic on values of `dtype` happens in: float for
// f16, bf16 and f32.
CType computeType(DataType dtype);

// The C type that tensors of `dtype` are stored as: hf_f16 and hf_bf16
// (device_helpers.h) for the 16-bit floating types.
std::string storageType(DataType dtype);

bool isSixteenBitFloat(DataType dtype);

// `expr`, of type `from`, as a `to`.
std::string convert(const std::string& expr, CType from, CType to);

// A constant written directly in the type it is used in: 2.0f, 3ll, true;
// infinities and NaN as bit patterns; negative numbers in parentheses.
std::string literal(const ScalarValue& value, CType type);

// True for a valid C identifier.
bool isIdentifier(const std::string& text);

std::string join(const std::vector<std::string>& pieces,
                 const std::string& separator);

}  // namespace hostfuse::gen
