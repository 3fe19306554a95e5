// The catalog of fusions for the kernel tests; included by kernel_cases.h.
#pragma once

#include "kernel_cases.h"

namespace hostfuse::test {

namespace cases {

using Inputs = std::vector<c10::IValue>;
using Outputs = std::vector<at::Tensor>;

inline TensorView* tv(const std::vector<Val*>& in, size_t i) {
  return in.at(i)->as<TensorView>();
}
inline at::Tensor arg(const Inputs& in, size_t i) {
  return in.at(i).toTensor();
}
inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

inline void addOutputs(Fusion& fusion, const std::vector<TensorView*>& outs) {
  for (TensorView* out : outs) {
    fusion.addOutput(out);
  }
}

inline InputSpec tensor(std::vector<int64_t> sizes, DataType dtype) {
  return InputSpec{std::move(sizes), dtype};
}
inline InputSpec matrix(DataType dtype) {
  return tensor({kRows, kCols}, dtype);
}
inline InputSpec scalar(DataType dtype, double value) {
  return InputSpec{{}, dtype, /*is_scalar=*/true, value};
}

// Two float sums of up to 7001 normal values, in different orders, differ
// by up to about K * eps * max |partial sum| (7001 * 6e-8 * 1 ~ 4e-4, the
// partial sums staying far below K), which no relative tolerance covers
// when a sum lands near zero.
constexpr Tolerance kLongSum{1e-5, 1e-3};

constexpr DataType kF32 = DataType::Float;
constexpr DataType kBF16 = DataType::BFloat16;
constexpr DataType kF16 = DataType::Half;

}  // namespace cases

inline const std::vector<FusionCase>& fusionCases() {
  using namespace cases;
  static const std::vector<FusionCase> all = {
      {"pointwise_f32",
       {matrix(kF32), matrix(kF32), matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(add(mul(tv(in, 0), tv(in, 1)), tv(in, 2)));
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0) * arg(in, 1) + arg(in, 2)};
       }},
      {"silu_mul_add_bf16",
       {matrix(kBF16), matrix(kBF16), matrix(kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(add(mul(silu(tv(in, 0)), tv(in, 1)), tv(in, 2)));
       },
       [](const Inputs& in) -> Outputs {
         return {(at::silu(f32(arg(in, 0))) * f32(arg(in, 1)) + f32(arg(in, 2)))
                     .to(at::kBFloat16)};
       }},
      {"unary_ops_f32",
       {matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         TensorView* magnitude = abs(x);
         TensorView* positive = add(magnitude, 0.5);
         addOutputs(f, {neg(x), magnitude, relu(x), exp(x), log(positive),
                        sqrt(magnitude), rsqrt(positive), reciprocal(positive),
                        tanh(x), sigmoid(x), silu(x)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         const at::Tensor positive = x.abs() + 0.5;
         return {-x,
                 x.abs(),
                 at::relu(x),
                 x.exp(),
                 positive.log(),
                 x.abs().sqrt(),
                 positive.rsqrt(),
                 positive.reciprocal(),
                 x.tanh(),
                 x.sigmoid(),
                 at::silu(x)};
       }},
      {"unary_chain_f16",
       {matrix(kF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         f.addOutput(mul(tanh(exp(neg(abs(x)))), sigmoid(x)));
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = f32(arg(in, 0));
         return {(at::tanh(at::exp(-x.abs())) * x.sigmoid()).to(at::kHalf)};
       }},
      {"binary_ops_f32",
       {matrix(kF32), matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* a = tv(in, 0);
         TensorView* b = tv(in, 1);
         addOutputs(f, {sub(a, b), div(a, add(abs(b), 0.5)), maximum(a, b),
                        minimum(a, b)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor a = arg(in, 0);
         const at::Tensor b = arg(in, 1);
         return {a - b, a / (b.abs() + 0.5), at::maximum(a, b),
                 at::minimum(a, b)};
       }},
      {"comparisons_bf16",
       {matrix(kBF16), matrix(kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* a = tv(in, 0);
         TensorView* b = tv(in, 1);
         addOutputs(
             f, {lt(a, b), le(a, b), gt(a, 0.0), ge(a, b), eq(a, b), ne(a, b)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor a = arg(in, 0);
         const at::Tensor b = arg(in, 1);
         return {a<b, a <= b, a> 0.0, a >= b, a == b, a != b};
       }},
      {"where_f32",
       {matrix(kF32), matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* a = tv(in, 0);
         TensorView* b = tv(in, 1);
         addOutputs(f, {where(gt(a, b), a, mul(b, 0.5)),
                        where(lt(a, 0.0), makeConstant(1.5), a)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor a = arg(in, 0);
         const at::Tensor b = arg(in, 1);
         return {at::where(a > b, a, b * 0.5), at::where(a < 0.0, 1.5, a)};
       }},
      {"casts_bf16",
       {matrix(kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         TensorView* xf = cast(x, DataType::Float);
         TensorView* y = mul(xf, 3.0);
         addOutputs(
             f, {add(cast(cast(y, kF16), kF32), 1.0), cast(y, DataType::Int32),
                 cast(x, DataType::Bool), cast(xf, DataType::Double)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         const at::Tensor y = f32(x) * 3.0;
         return {f32(y.to(at::kHalf)) + 1.0, y.to(at::kInt), x.to(at::kBool),
                 x.to(at::kDouble)};
       }},
      {"broadcast_row_bf16",
       {matrix(kBF16), tensor({kCols}, kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(
             add(mul(tv(in, 0), broadcast(tv(in, 1), {true, false})), 1.0));
       },
       [](const Inputs& in) -> Outputs {
         return {(f32(arg(in, 0)) * f32(arg(in, 1)) + 1.0).to(at::kBFloat16)};
       }},
      {"broadcast_column_f32",
       {matrix(kF32), tensor({kRows}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(sub(tv(in, 0), broadcast(tv(in, 1), {false, true})));
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0) - arg(in, 1).unsqueeze(1)};
       }},
      {"size_one_input_f32",
       {matrix(kF32), tensor({1, kCols}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {mul(tv(in, 0), tv(in, 1)), relu(tv(in, 1))});
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0) * arg(in, 1), at::relu(arg(in, 1))};
       }},
      {"scalar_operands_f32",
       {matrix(kF32), scalar(DataType::Double, 2.5),
        scalar(DataType::Int64, 7)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         addOutputs(f, {div(sub(mul(x, in[1]), 2.0), 4.0),
                        add(x, makeConstant(int64_t{3})), mul(x, in[2])});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         return {(x * 2.5 - 2.0) / 4.0, x + 3, x * 7};
       }},
      {"mixed_dtypes",
       {matrix(kBF16), matrix(kF32), matrix(kF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {add(tv(in, 0), tv(in, 1)), mul(tv(in, 0), tv(in, 2))});
       },
       [](const Inputs& in) -> Outputs {
         return {f32(arg(in, 0)) + arg(in, 1),
                 f32(arg(in, 0)) * f32(arg(in, 2))};
       }},
      {"int_arith",
       {matrix(DataType::Int32), matrix(DataType::Int32),
        matrix(DataType::Int64)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* a = tv(in, 0);
         TensorView* b = tv(in, 1);
         addOutputs(f, {add(mul(a, b), a), maximum(a, tv(in, 2)),
                        div(a, add(abs(b), 1.0)), neg(relu(a))});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor a = arg(in, 0);
         const at::Tensor b = arg(in, 1);
         return {a * b + a, at::maximum(a, arg(in, 2)), a / (b.abs() + 1.0),
                 -at::relu(a)};
       }},
      {"softmax_f32",
       {matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(softmax(tv(in, 0), 1));
       },
       [](const Inputs& in) -> Outputs {
         return {at::softmax(arg(in, 0), 1)};
       }},
      {"softmax_bf16",
       {matrix(kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(softmax(tv(in, 0), -1));
       },
       [](const Inputs& in) -> Outputs {
         return {at::softmax(f32(arg(in, 0)), -1).to(at::kBFloat16)};
       }},
      {"rmsnorm_bf16",
       {matrix(kBF16), tensor({kCols}, kBF16), scalar(DataType::Double, 1e-6)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar* cols) {
         TensorView* x = cast(tv(in, 0), kF32);
         TensorView* mean_square = div(sum(mul(x, x), 1, true), cols);
         TensorView* rstd = rsqrt(add(mean_square, in[2]));
         TensorView* w = broadcast(cast(tv(in, 1), kF32), {true, false});
         addOutputs(f, {cast(mul(mul(x, rstd), w), kBF16), rstd});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = f32(arg(in, 0));
         const at::Tensor rstd =
             at::rsqrt((x * x).mean(1, /*keepdim=*/true) + 1e-6);
         return {(x * rstd * f32(arg(in, 1))).to(at::kBFloat16), rstd};
       }},
      {"sum_max_inner_f32",
       {matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {sum(tv(in, 0), 1), max(tv(in, 0), 1, true)});
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0).sum(1), arg(in, 0).amax(1, /*keepdim=*/true)};
       },
       kLongSum},
      {"max_keepdim_f16",
       {matrix(kF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* m = max(tv(in, 0), 1, true);
         addOutputs(f, {sub(tv(in, 0), m), m});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor m = arg(in, 0).amax(1, /*keepdim=*/true);
         return {(f32(arg(in, 0)) - f32(m)).to(at::kHalf), m};
       }},
      {"int_reductions",
       {matrix(DataType::Int32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {sum(tv(in, 0), 1), max(tv(in, 0), 1)});
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0).sum(1), arg(in, 0).amax(1)};
       }},
      {"rank3_pointwise_f32",
       {tensor({3, kRows, kCols}, kF32), tensor({3, kCols}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(
             add(tv(in, 0), broadcast(tv(in, 1), {false, true, false})));
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0) + arg(in, 1).unsqueeze(1)};
       }},
      {"rank3_softmax_bf16",
       {tensor({2, kRows, kCols}, kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(softmax(tv(in, 0), 2));
       },
       [](const Inputs& in) -> Outputs {
         return {at::softmax(f32(arg(in, 0)), 2).to(at::kBFloat16)};
       }},
      {"layernorm_f32",
       {matrix(kF32), tensor({kCols}, kF32), tensor({kCols}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar* cols) {
         TensorView* x = tv(in, 0);
         TensorView* centered = sub(x, div(sum(x, 1, true), cols));
         TensorView* variance =
             div(sum(mul(centered, centered), 1, true), cols);
         TensorView* rstd = rsqrt(add(variance, 1e-5));
         TensorView* y =
             add(mul(mul(centered, rstd), broadcast(tv(in, 1), {true, false})),
                 broadcast(tv(in, 2), {true, false}));
         addOutputs(f, {y, rstd});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         const at::Tensor centered = x - x.mean(1, /*keepdim=*/true);
         const at::Tensor rstd =
             at::rsqrt((centered * centered).mean(1, true) + 1e-5);
         return {centered * rstd * arg(in, 1) + arg(in, 2), rstd};
       }},
      {"log_softmax_f32",
       {matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         TensorView* shifted = sub(x, max(x, 1, true));
         f.addOutput(sub(shifted, log(sum(exp(shifted), 1, true))));
       },
       [](const Inputs& in) -> Outputs {
         return {at::log_softmax(arg(in, 0), 1)};
       }},
      {"rank1_reductions_f32",
       {tensor({kCols}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {sum(tv(in, 0), 0), max(tv(in, 0), 0, true)});
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0).sum(0), arg(in, 0).amax(0, /*keepdim=*/true)};
       },
       kLongSum},
      {"outer_product_f32",
       {tensor({kRows}, kF32), tensor({kCols}, kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         f.addOutput(mul(broadcast(tv(in, 0), {false, true}),
                         broadcast(tv(in, 1), {true, false})));
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0).unsqueeze(1) * arg(in, 1).unsqueeze(0)};
       }},
      {"double_f64",
       {matrix(DataType::Double)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         addOutputs(f, {sum(mul(exp(x), 0.5), 1), mul(x, x)});
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         return {(x.exp() * 0.5).sum(1), x * x};
       }},
      {"bool_where_bf16",
       {matrix(DataType::Bool), matrix(kBF16), matrix(kBF16)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {where(tv(in, 0), tv(in, 1), tv(in, 2)),
                        cast(tv(in, 0), kF32)});
       },
       [](const Inputs& in) -> Outputs {
         return {at::where(arg(in, 0), arg(in, 1), arg(in, 2)),
                 f32(arg(in, 0))};
       }},
      {"passthrough_and_unused_input",
       {matrix(kF32), matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         addOutputs(f, {tv(in, 0), add(tv(in, 0), 1.0)});
       },
       [](const Inputs& in) -> Outputs {
         return {arg(in, 0), arg(in, 0) + 1.0};
       }},
      {"row_scale_without_keep_dim_f32",
       {matrix(kF32)},
       [](Fusion& f, const std::vector<Val*>& in, Scalar*) {
         TensorView* x = tv(in, 0);
         TensorView* total = add(sum(relu(x), 1), 1.0);
         f.addOutput(div(x, broadcast(total, {false, true})));
       },
       [](const Inputs& in) -> Outputs {
         const at::Tensor x = arg(in, 0);
         return {x / (at::relu(x).sum(1) + 1.0).unsqueeze(1)};
       }},
  };
  return all;
}

}  // namespace hostfuse::test
