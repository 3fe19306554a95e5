// The one list of every expression type, and the visitor it drives.
//
// Adding an expression type means: one line in the list below, the class with
// HF_DECLARE_EXPR in its header, HF_DEFINE_EXPR in its .cpp, and a `handle`
// overload wherever it needs special treatment (the HostIrEvaluator, codegen).
//
// Only names appear here. The classes of upper layers (host IR,
// multidevice) are forward declared, so this header imports nothing from
// them; the default handler of each type is defined next to the type by
// HF_DEFINE_EXPR, where the class is complete.
#pragma once

namespace hostfuse {

class Expr;

// Expressions of csrc/hostfuse/ir: fusion math with reference semantics on
// ATen.
#define HOSTFUSE_IR_EXPRS(X) \
  X(UnaryOp)                 \
  X(BinaryOp)                \
  X(TernaryOp)               \
  X(CastOp)                  \
  X(BroadcastOp)             \
  X(ReductionOp)             \
  X(MatmulOp)                \
  X(LinearOp)                \
  X(TopKOp)                  \
  X(TopKSoftmax)             \
  X(GroupedMatmul)           \
  X(DequantizeFp8)           \
  X(Narrow)

// Expressions of csrc/hostfuse/host_ir: nodes that only make sense in a host
// program.
#define HOSTFUSE_HOST_EXPRS(X) \
  X(RunFusion)                 \
  X(Allocate)

// Expressions of csrc/hostfuse/multidevice: MoE expert parallelism across
// ranks.
#define HOSTFUSE_MULTIDEVICE_EXPRS(X) \
  X(MoeDispatch)                      \
  X(MoeCombine)

#define HOSTFUSE_ALL_EXPRS(X) \
  HOSTFUSE_IR_EXPRS(X)        \
  HOSTFUSE_HOST_EXPRS(X)      \
  HOSTFUSE_MULTIDEVICE_EXPRS(X)

#define HF_FORWARD_DECLARE_(T) class T;
HOSTFUSE_ALL_EXPRS(HF_FORWARD_DECLARE_)
#undef HF_FORWARD_DECLARE_

// Visits expressions by their concrete type. Every `handle` overload that a
// subclass does not override falls back to handleDefault(), so a visitor
// names only the types it cares about.
class ExprVisitor {
 public:
  virtual ~ExprVisitor() = default;

  // Calls the handle overload for the concrete type of `expr`.
  void dispatch(Expr* expr);

#define HF_DECLARE_HANDLE_(T) virtual void handle(T* expr);
  HOSTFUSE_ALL_EXPRS(HF_DECLARE_HANDLE_)
#undef HF_DECLARE_HANDLE_

 protected:
  // The fallback for types without their own overload. Throws, naming the
  // expression, unless a subclass overrides it.
  virtual void handleDefault(Expr* expr);
};

// ExprVisitor for code that only reads the IR, such as kernel codegen, which
// holds a `const Fusion&`: the same dispatch over const pointers, so that
// reading code needs no const_cast to visit.
class ConstExprVisitor {
 public:
  virtual ~ConstExprVisitor() = default;

  // Calls the handle overload for the concrete type of `expr`.
  void dispatch(const Expr* expr);

#define HF_DECLARE_CONST_HANDLE_(T) virtual void handle(const T* expr);
  HOSTFUSE_ALL_EXPRS(HF_DECLARE_CONST_HANDLE_)
#undef HF_DECLARE_CONST_HANDLE_

 protected:
  // The fallback for types without their own overload. Throws, naming the
  // expression, unless a subclass overrides it.
  virtual void handleDefault(const Expr* expr);
};

}  // namespace hostfuse
