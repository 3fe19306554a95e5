// Checks that expressions' validate() run on their operands, with messages
// that name the expression, the operand and what was expected. Shared by the
// expressions of every layer (ir, multidevice/moe).
#pragma once

#include <cstdint>
#include <functional>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// `tv` (called `what`) is a tensor of rank `rank` whose dtype passes `ok`;
// `expected` describes the allowed dtypes in the message.
void checkTensor(const Expr* expr, const char* what, const TensorView* tv,
                 int64_t rank, const std::function<bool(DataType)>& ok,
                 const char* expected);

// A floating-point tensor of rank `rank`.
void checkFloating(const Expr* expr, const char* what, const TensorView* tv,
                   int64_t rank);

// An i64 tensor of rank `rank`.
void checkInt64(const Expr* expr, const char* what, const TensorView* tv,
                int64_t rank);

// Two extents that must be equal: an error when both are known and differ.
void checkSameExtent(const Expr* expr, const Scalar* a, const char* a_what,
                     const Scalar* b, const char* b_what);

}  // namespace hostfuse
