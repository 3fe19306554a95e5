#include <hostfuse/ir/operand_checks.h>

namespace hostfuse {

void checkTensor(const Expr* expr, const char* what, const TensorView* tv,
                 int64_t rank, const std::function<bool(DataType)>& ok,
                 const char* expected) {
  HF_CHECK(tv != nullptr, expr->opName(), ": ", what, " is null");
  HF_CHECK(tv->rank() == rank, expr->opName(), ": ", what, " ",
           tv->toDeclString(), " must have rank ", rank, ", got rank ",
           tv->rank());
  HF_CHECK(ok(tv->dtype()), expr->opName(), ": ", what, " ", tv->toDeclString(),
           " must be ", expected, ", got ", tv->dtype());
}

void checkFloating(const Expr* expr, const char* what, const TensorView* tv,
                   int64_t rank) {
  checkTensor(expr, what, tv, rank, isFloatingPoint, "floating point");
}

void checkInt64(const Expr* expr, const char* what, const TensorView* tv,
                int64_t rank) {
  checkTensor(
      expr, what, tv, rank, [](DataType d) { return d == DataType::Int64; },
      "i64");
}

void checkSameExtent(const Expr* expr, const Scalar* a, const char* a_what,
                     const Scalar* b, const char* b_what) {
  const std::optional<int64_t> size_a = a->constantInt();
  const std::optional<int64_t> size_b = b->constantInt();
  HF_CHECK(a == b || !size_a.has_value() || !size_b.has_value() ||
               *size_a == *size_b,
           expr->opName(), ": ", b_what, " (", b->toString(), ") must equal ",
           a_what, " (", a->toString(), ")");
}

}  // namespace hostfuse
