#include <hostfuse/ir/fp8_rows.h>

#include <ATen/ATen.h>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/kernels/fp8_dequant.h>
#include <hostfuse/ir/operand_checks.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

at::Tensor dequantizeFp8Rows(const at::Tensor& x, const at::Tensor& scales,
                             at::ScalarType dtype,
                             const at::Tensor& row_counts) {
  // The scales are GroupedMatmul's x_scales or DequantizeFp8's scales.
  HF_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat8_e4m3fn,
           "dequantizeFp8Rows: the rows x must be a 2-D Float8_e4m3fn "
           "tensor, got ",
           x.scalar_type(), " of sizes ", x.sizes());
  const int64_t rows = x.size(0);
  const int64_t hidden = x.size(1);
  HF_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat &&
               scales.size(0) == rows && scales.size(1) > 0 &&
               hidden % scales.size(1) == 0,
           "dequantizeFp8Rows: the scales (", scales.scalar_type(),
           " of sizes ", scales.sizes(),
           ") must be f32, one per row and block of channels of the rows x ",
           x.sizes());
  HF_CHECK(scales.device() == x.device(),
           "dequantizeFp8Rows: the scales are on ", scales.device(),
           " but the rows x on ", x.device());
  HF_CHECK(at::isFloatingType(dtype) && c10::elementSize(dtype) >= 2,
           "dequantizeFp8Rows: the output dtype must be f64, f32, bf16 or "
           "f16, got ",
           dtype);
  const int64_t blocks = scales.size(1);
  if (row_counts.defined()) {
    HF_CHECK(row_counts.dim() == 1 && row_counts.scalar_type() == at::kLong &&
                 row_counts.device() == x.device(),
             "dequantizeFp8Rows: row_counts (", row_counts.scalar_type(),
             " of sizes ", row_counts.sizes(), " on ", row_counts.device(),
             ") must be i64 of rank 1 on the device of the rows, ", x.device());
  }
  if (x.is_cuda() &&
      (dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat)) {
    // One kernel over the rows where they are (with the cuda backend,
    // recv_x and recv_scales are strided views of its buffer; a broadcast
    // row stride of 0 is read as it is).
    const at::Tensor q = x.stride(1) == 1 ? x : x.contiguous();
    const at::Tensor s = scales.stride(1) == 1 ? scales : scales.contiguous();
    at::Tensor out = at::empty({rows, hidden}, x.options().dtype(dtype));
    const int device = x.device().index();
    const cuda::DeviceScope scope(device);
    const kernels::DequantOut out_type =
        dtype == at::kBFloat16 ? kernels::DequantOut::kBFloat16
        : dtype == at::kHalf   ? kernels::DequantOut::kFloat16
                               : kernels::DequantOut::kFloat32;
    const at::Tensor counts =
        row_counts.defined() ? row_counts.contiguous() : at::Tensor();
    HF_CUDA_CHECK(kernels::launchDequantizeFp8Rows(
        q.const_data_ptr(), rows > 1 ? q.stride(0) : hidden,
        s.const_data_ptr<float>(), rows > 1 ? s.stride(0) : blocks, rows,
        hidden, blocks, out_type, out.mutable_data_ptr(),
        cuda::currentStream(device),
        counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr,
        counts.defined() ? counts.numel() : -1));
    return out;
  }
  return (x.to(at::kFloat).reshape({rows, blocks, hidden / blocks}) *
          scales.unsqueeze(2))
      .reshape({rows, hidden})
      .to(dtype);
}

DequantizeFp8::DequantizeFp8(TensorView* out, TensorView* x, TensorView* scales,
                             TensorView* row_counts) {
  addOutput(out);
  addInput(x);
  addInput(scales);
  if (row_counts != nullptr) {
    addInput(row_counts);
  }
}

std::string DequantizeFp8::toInlineString() const {
  return out()->toString() + " = dequantize_fp8(" + x()->toString() +
         ", scales=" + scales()->toString() +
         (rowCounts() != nullptr ? ", row_counts=" + rowCounts()->toString()
                                 : "") +
         ")";
}

void DequantizeFp8::validate() const {
  checkTensor(
      this, "x", x(), 2, [](DataType d) { return d == DataType::Float8E4M3; },
      "f8e4m3");
  checkTensor(
      this, "scales", scales(), 2,
      [](DataType d) { return d == DataType::Float; }, "f32");
  checkSameExtent(this, x()->extent(0), "the rows of x", scales()->extent(0),
                  "the rows of scales");
  checkFloating(this, "out", out(), 2);
  if (rowCounts() != nullptr) {
    checkInt64(this, "row_counts", rowCounts(), 1);
  }
  checkSameExtent(this, x()->extent(0), "the rows of x", out()->extent(0),
                  "the rows of out");
  checkSameExtent(this, x()->extent(1), "the width of x", out()->extent(1),
                  "the width of out");
  const std::optional<int64_t> width = x()->extent(1)->constantInt();
  const std::optional<int64_t> blocks = scales()->extent(1)->constantInt();
  HF_CHECK(!width.has_value() || !blocks.has_value() ||
               (*blocks > 0 && *width % *blocks == 0),
           "DequantizeFp8: the width ", width.value_or(0), " of ",
           x()->describe(), " is not a multiple of the ", blocks.value_or(0),
           " scales per row of ", scales()->describe());
}

std::vector<c10::IValue> DequantizeFp8::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  return {dequantizeFp8Rows(
      inputs.at(0).toTensor(), inputs.at(1).toTensor(),
      toScalarType(out()->dtype()),
      inputs.size() > 2 ? inputs.at(2).toTensor() : at::Tensor())};
}

TensorView* dequantizeFp8(TensorView* x, TensorView* scales, DataType dtype,
                          TensorView* row_counts) {
  HF_CHECK(x != nullptr && scales != nullptr,
           "dequantizeFp8: an operand is null");
  HF_CHECK(x->rank() == 2, "dequantizeFp8: x ", x->toDeclString(),
           " must have rank 2, got rank ", x->rank());
  TensorView* out = makeTensor({x->extent(0), x->extent(1)}, dtype);
  IrBuilder::create<DequantizeFp8>(out, x, scales, row_counts);
  return out;
}

HF_DEFINE_EXPR(DequantizeFp8)

}  // namespace hostfuse
