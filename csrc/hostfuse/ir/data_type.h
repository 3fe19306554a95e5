// Element types of IR values and their mapping to ATen's scalar types.
#pragma once

#include <c10/core/ScalarType.h>

#include <iosfwd>
#include <string>

namespace hostfuse {

// Float8E4M3 is a storage type (fp8 MoE dispatch, GroupedMatmul's scaled
// rows): no arithmetic, no fused kernel; isFloatingPoint is false for it.
enum class DataType {
  Bool,
  Int32,
  Int64,
  Half,
  BFloat16,
  Float,
  Double,
  Float8E4M3
};

at::ScalarType toScalarType(DataType dtype);

// Throws hostfuse::Error for ATen types hostfuse does not support.
DataType toDataType(at::ScalarType scalar_type);

bool isFloatingPoint(DataType dtype);
bool isIntegral(DataType dtype);  // Int32, Int64 (not Bool)

// Size of one element in bytes.
int64_t sizeOf(DataType dtype);

// The type of `a op b` under ATen's promotion rules for two tensors.
DataType promoteTypes(DataType a, DataType b);

// Short names used in printed IR: bool, i32, i64, f16, bf16, f32, f64,
// f8e4m3.
std::string toString(DataType dtype);
std::ostream& operator<<(std::ostream& os, DataType dtype);

}  // namespace hostfuse
