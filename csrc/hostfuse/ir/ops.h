// Free functions that build IR in the active container (see FusionGuard):
//
//   Fusion fusion;
//   FusionGuard guard(&fusion);
//   Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
//   TensorView* x = makeTensor({tokens, 64}, DataType::BFloat16, "x");
//   TensorView* w = makeTensor({64}, DataType::BFloat16, "w");
//   fusion.addInput(x);
//   fusion.addInput(w);
//   fusion.addOutput(mul(silu(x), broadcast(w, {true, false})));
//
// Every function validates its operands and throws hostfuse::Error naming
// the one that does not fit.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <hostfuse/ir/exprs.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// One size of a tensor being declared: a known size, or a symbolic extent
// (shared between tensors that must agree), or kSymbolic for a fresh one.
class SizeSpec {
 public:
  SizeSpec(int64_t size) : size_(size) {}        // NOLINT: implicit by design
  SizeSpec(int size) : size_(size) {}            // NOLINT: avoids 0 -> nullptr
  SizeSpec(Scalar* extent) : extent_(extent) {}  // NOLINT

  int64_t size() const { return size_; }
  Scalar* extent() const { return extent_; }

 private:
  int64_t size_ = 0;
  Scalar* extent_ = nullptr;
};

// A fresh symbolic size, bound when the program runs.
constexpr int64_t kSymbolic = -1;

Scalar* makeConstant(int64_t value);
Scalar* makeConstant(double value);
Scalar* makeConstant(bool value);
// A symbolic scalar: a program input or a shared tensor extent.
Scalar* makeSymbolicScalar(DataType dtype, const std::string& name = "");

TensorView* makeTensor(const std::vector<SizeSpec>& sizes,
                       DataType dtype = DataType::Float,
                       const std::string& name = "");
// A tensor of the given rank with a fresh symbolic size in every dim.
TensorView* makeSymbolicTensor(int64_t rank, DataType dtype = DataType::Float,
                               const std::string& name = "");

// Unary pointwise ops.
TensorView* neg(TensorView* x);
TensorView* abs(TensorView* x);
TensorView* relu(TensorView* x);
TensorView* exp(TensorView* x);
TensorView* log(TensorView* x);
TensorView* sqrt(TensorView* x);
TensorView* rsqrt(TensorView* x);
TensorView* reciprocal(TensorView* x);
TensorView* tanh(TensorView* x);
TensorView* sigmoid(TensorView* x);
TensorView* silu(TensorView* x);
TensorView* unaryOp(UnaryOpType type, TensorView* x);

// Binary pointwise ops; one operand may be a scalar (a Val* or a number).
TensorView* binaryOp(BinaryOpType type, Val* lhs, Val* rhs);

#define HF_DECLARE_BINARY_BUILDER_(name)         \
  TensorView* name(Val* lhs, Val* rhs);          \
  TensorView* name(TensorView* lhs, double rhs); \
  TensorView* name(double lhs, TensorView* rhs);
HF_DECLARE_BINARY_BUILDER_(add)
HF_DECLARE_BINARY_BUILDER_(sub)
HF_DECLARE_BINARY_BUILDER_(mul)
HF_DECLARE_BINARY_BUILDER_(div)
HF_DECLARE_BINARY_BUILDER_(maximum)
HF_DECLARE_BINARY_BUILDER_(minimum)
HF_DECLARE_BINARY_BUILDER_(lt)
HF_DECLARE_BINARY_BUILDER_(le)
HF_DECLARE_BINARY_BUILDER_(gt)
HF_DECLARE_BINARY_BUILDER_(ge)
HF_DECLARE_BINARY_BUILDER_(eq)
HF_DECLARE_BINARY_BUILDER_(ne)
#undef HF_DECLARE_BINARY_BUILDER_

// where(condition, a, b): a where condition is true, else b.
TensorView* where(Val* condition, Val* a, Val* b);

TensorView* cast(TensorView* x, DataType dtype);

// Inserts a size-1 dim at every position where is_broadcast_dim is true.
TensorView* broadcast(TensorView* x, const std::vector<bool>& is_broadcast_dim);

// Reductions along one dim (negative dims count from the end).
TensorView* sum(TensorView* x, int64_t dim, bool keep_dim = false);
TensorView* max(TensorView* x, int64_t dim, bool keep_dim = false);

TensorView* matmul(TensorView* a, TensorView* b);
// x [..., in] times weight [out, in] transposed, plus bias [out] if given.
// The output has x's dtype, or `out_dtype`: f32 for bf16 or f16 operands
// sums the products in fp32 and returns them unrounded (see
// LinearOp::accumulatesToFloat); other combinations fail validation.
TensorView* linear(TensorView* x, TensorView* weight,
                   TensorView* bias = nullptr,
                   std::optional<DataType> out_dtype = std::nullopt);

// The k largest entries of x along its last dim, largest first, and their
// indices (i64): at::topk(x, k, -1).
struct TopKResult {
  TensorView* values = nullptr;
  TensorView* indices = nullptr;
};
TopKResult topk(TensorView* x, int64_t k);

// Numerically stable softmax along `dim`, composed of the ops above.
TensorView* softmax(TensorView* x, int64_t dim);

}  // namespace hostfuse
