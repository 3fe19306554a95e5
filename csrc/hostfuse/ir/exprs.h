// The expressions of a Fusion: pointwise math, broadcasts, reductions,
// matmul and linear. Each validates its operands when it is built and has
// reference semantics on ATen tensors (evaluate()).
//
// Constructors take outputs first, then inputs, then options, and only
// record them; typed accessors read them back.
//
// Pointwise ops broadcast like ATen, except that ranks must match: a size-1
// dimension (a constant extent 1) broadcasts against any size, and
// broadcast() inserts size-1 dimensions explicitly.
#pragma once

#include <optional>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

enum class UnaryOpType {
  Neg,
  Abs,
  Relu,
  Exp,
  Log,
  Sqrt,
  Rsqrt,
  Reciprocal,
  Tanh,
  Sigmoid,
  Silu,
};

enum class BinaryOpType {
  Add,
  Sub,
  Mul,
  Div,
  Maximum,
  Minimum,
  Lt,
  Le,
  Gt,
  Ge,
  Eq,
  Ne,
};

enum class ReductionOpType { Sum, Max };

const char* toString(UnaryOpType type);
const char* toString(BinaryOpType type);
const char* toString(ReductionOpType type);

// True for the comparisons (Lt ... Ne), whose result is Bool.
bool isComparison(BinaryOpType type);

// ---------------------------------------------------------------------------
// Type and shape inference, shared by the builders in ir/ops.h (to make the
// output) and by validate() (to check a node built by hand). Each throws
// hostfuse::Error naming the operand that does not fit.

DataType inferUnaryDtype(UnaryOpType type, const Val* in);
DataType inferBinaryDtype(BinaryOpType type, const Val* lhs, const Val* rhs);
DataType inferWhereDtype(const Val* condition, const Val* lhs, const Val* rhs);
DataType inferReductionDtype(ReductionOpType type, const Val* in);

// Extents of a pointwise result. Operands are tensors or scalars; the
// tensors must have one rank; `op` names the operation in errors.
std::vector<Scalar*> inferPointwiseExtents(const std::string& op,
                                           const std::vector<Val*>& operands);

// ---------------------------------------------------------------------------

class UnaryOp : public Expr {
 public:
  UnaryOp(Val* out, UnaryOpType type, Val* in);
  HF_DECLARE_EXPR(UnaryOp)
  HF_ALWAYS_CAPTURABLE

  UnaryOpType opType() const {
    return static_cast<UnaryOpType>(attribute<int64_t>(0));
  }
  Val* out() const { return output(0); }
  Val* in() const { return input(0); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

class BinaryOp : public Expr {
 public:
  BinaryOp(Val* out, BinaryOpType type, Val* lhs, Val* rhs);
  HF_DECLARE_EXPR(BinaryOp)
  HF_ALWAYS_CAPTURABLE

  BinaryOpType opType() const {
    return static_cast<BinaryOpType>(attribute<int64_t>(0));
  }
  Val* out() const { return output(0); }
  Val* lhs() const { return input(0); }
  Val* rhs() const { return input(1); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// where(condition, lhs, rhs): lhs where condition is true, else rhs.
class TernaryOp : public Expr {
 public:
  TernaryOp(Val* out, Val* condition, Val* lhs, Val* rhs);
  HF_DECLARE_EXPR(TernaryOp)
  HF_ALWAYS_CAPTURABLE

  Val* out() const { return output(0); }
  Val* condition() const { return input(0); }
  Val* lhs() const { return input(1); }
  Val* rhs() const { return input(2); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Converts element type; the target type is the output's dtype.
class CastOp : public Expr {
 public:
  CastOp(Val* out, Val* in);
  HF_DECLARE_EXPR(CastOp)
  HF_ALWAYS_CAPTURABLE

  Val* out() const { return output(0); }
  Val* in() const { return input(0); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Inserts size-1 dimensions: output dimension i is new where
// isBroadcastDim()[i] is true; the others are the input's, in order.
class BroadcastOp : public Expr {
 public:
  BroadcastOp(TensorView* out, TensorView* in,
              const std::vector<bool>& is_broadcast_dim);
  HF_DECLARE_EXPR(BroadcastOp)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* in() const { return input(0)->as<TensorView>(); }
  std::vector<bool> isBroadcastDim() const;

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Sum or max along one dimension, optionally keeping it with size 1.
class ReductionOp : public Expr {
 public:
  ReductionOp(TensorView* out, ReductionOpType type, TensorView* in,
              int64_t dim, bool keep_dim);
  HF_DECLARE_EXPR(ReductionOp)
  HF_ALWAYS_CAPTURABLE

  ReductionOpType opType() const {
    return static_cast<ReductionOpType>(attribute<int64_t>(0));
  }
  int64_t dim() const { return attribute<int64_t>(1); }
  bool keepDim() const { return attribute<bool>(2); }
  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* in() const { return input(0)->as<TensorView>(); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// at::matmul of a [..., M, K] and b [K, N] or [..., K, N] (same batch dims).
class MatmulOp : public Expr {
 public:
  MatmulOp(TensorView* out, TensorView* a, TensorView* b);
  HF_DECLARE_EXPR(MatmulOp)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* a() const { return input(0)->as<TensorView>(); }
  TensorView* b() const { return input(1)->as<TensorView>(); }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// at::linear: x [..., in] times weight [out, in] transposed, plus an
// optional bias [out].
class LinearOp : public Expr {
 public:
  LinearOp(TensorView* out, TensorView* x, TensorView* weight,
           TensorView* bias);
  HF_DECLARE_EXPR(LinearOp)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* x() const { return input(0)->as<TensorView>(); }
  TensorView* weight() const { return input(1)->as<TensorView>(); }
  // nullptr without a bias.
  TensorView* bias() const {
    return inputs().size() > 2 ? input(2)->as<TensorView>() : nullptr;
  }

  // Whether x is bf16 or f16 and out is f32: the products are summed in
  // fp32 and returned in fp32 (a router's logits), with no rounding to x's
  // dtype in between.
  bool accumulatesToFloat() const {
    return accumulatesToFloat(x()->dtype(), out()->dtype());
  }
  // The same for operands of `x` and an output of `out`.
  static bool accumulatesToFloat(DataType x, DataType out);

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// The k largest entries along the last dim, sorted from the largest (what
// at::topk returns): values [..., k] in x's dtype and their indices [..., k]
// i64 into the last dim. Ties keep ATen's order. The router of an MoE layer
// (softmax scores -> the top-k experts of every token).
class TopKOp : public Expr {
 public:
  TopKOp(TensorView* values, TensorView* indices, TensorView* x, int64_t k);
  HF_DECLARE_EXPR(TopKOp)
  HF_ALWAYS_CAPTURABLE

  int64_t k() const { return attribute<int64_t>(0); }
  TensorView* values() const { return output(0)->as<TensorView>(); }
  TensorView* indices() const { return output(1)->as<TensorView>(); }
  TensorView* x() const { return input(0)->as<TensorView>(); }

  // "(T3, T4) = topk(T2, k=8)"
  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

}  // namespace hostfuse
