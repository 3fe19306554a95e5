// fp8 rows with one scale per block of channels, as MoeDispatch with
// quantize=fp8_e4m3 returns them, back to a floating dtype: the function
// (GroupedMatmul calls it on rows it is given with x_scales) and the IR op
// DequantizeFp8, with which a program dequantizes rows once for several
// matmuls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// The rows of fp8 x [rows, H] dequantized with `scales` [rows, H / B]
// (one per block of B channels), in `dtype`: each product rounded to fp32,
// then to `dtype`. x is Float8_e4m3fn, scales f32 on x's device. On a GPU,
// for bf16, f16 and f32 outputs, one kernel that reads x and scales where
// they are (strided views too); otherwise ATen. With `row_counts` (i64 [G]
// on x's device), that kernel writes only the first rows the counts add up
// to (each count clamped to [0, rows], at most rows), read on the device:
// the valid rows of a cuda-backend dispatch's capacity rows. The rest is
// unspecified; ATen computes every row.
at::Tensor dequantizeFp8Rows(const at::Tensor& x, const at::Tensor& scales,
                             at::ScalarType dtype,
                             const at::Tensor& row_counts = at::Tensor());

// out [rows, H] = dequantizeFp8Rows(x, scales, out's dtype, row_counts):
// x [rows, H] f8e4m3, scales [rows, H / B] f32, out floating, optionally
// row_counts [G] i64 (a third input). Capturable on both paths.
class DequantizeFp8 : public Expr {
 public:
  DequantizeFp8(TensorView* out, TensorView* x, TensorView* scales,
                TensorView* row_counts = nullptr);
  HF_DECLARE_EXPR(DequantizeFp8)
  HF_ALWAYS_CAPTURABLE

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* x() const { return input(0)->as<TensorView>(); }
  TensorView* scales() const { return input(1)->as<TensorView>(); }
  TensorView* rowCounts() const {
    return inputs().size() > 2 ? input(2)->as<TensorView>() : nullptr;
  }

  // "T5 = dequantize_fp8(T3, scales=T4)", with ", row_counts=T8" when
  // given
  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Builds a DequantizeFp8 in the active container (see FusionGuard); the
// result has x's extents and `dtype`.
TensorView* dequantizeFp8(TensorView* x, TensorView* scales, DataType dtype,
                          TensorView* row_counts = nullptr);

}  // namespace hostfuse
