#include <hostfuse/ir/topk_softmax.h>

#include <ATen/ATen.h>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/exprs.h>
#include <hostfuse/ir/kernels/topk_softmax.h>
#include <hostfuse/ir/operand_checks.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

TopKSoftmax::TopKSoftmax(TensorView* weights, TensorView* indices,
                         TensorView* logits, int64_t k, bool renormalize) {
  addOutput(weights);
  addOutput(indices);
  addInput(logits);
  addDataAttribute(k);
  addDataAttribute(renormalize);
}

std::string TopKSoftmax::toInlineString() const {
  return "(" + joinValues(outputs()) + ") = topk_softmax(" +
         logits()->toString() + ", k=" + std::to_string(k()) +
         ", renormalize=" + (renormalize() ? "true" : "false") + ")";
}

void TopKSoftmax::validate() const {
  checkTensor(
      this, "logits", logits(), 2,
      [](DataType dtype) { return dtype == DataType::Float; }, "f32");
  HF_CHECK(k() >= 1, "topk_softmax: k must be >= 1, got ", k());
  const std::optional<int64_t> experts = logits()->extent(1)->constantInt();
  HF_CHECK(!experts.has_value() || k() <= *experts, "topk_softmax: k = ", k(),
           " exceeds the ", *experts, " columns of ", logits()->describe());
  checkTensor(
      this, "weights", weights(), 2,
      [](DataType dtype) { return dtype == DataType::Float; }, "f32");
  checkInt64(this, "indices", indices(), 2);
  for (const TensorView* out : {weights(), indices()}) {
    checkSameExtent(this, logits()->extent(0), "the rows of logits",
                    out->extent(0), "the rows of an output");
  }
}

namespace {

// TopKSoftmax's computation (see the class comment).
std::vector<c10::IValue> topkSoftmaxOfLogits(const at::Tensor& logits,
                                             int64_t k, bool renormalize) {
  HF_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
           "topk_softmax: logits must be a 2-D f32 tensor, got ",
           logits.scalar_type(), " of sizes ", logits.sizes());
  const int64_t rows = logits.size(0);
  const int64_t columns = logits.size(1);
  HF_CHECK(k <= columns, "topk_softmax: k = ", k, " exceeds the ", columns,
           " columns of logits");
  if (logits.is_cuda() && columns <= kernels::kTopKSoftmaxMaxColumns) {
    const at::Tensor in = logits.contiguous();
    at::Tensor weights = at::empty({rows, k}, in.options());
    at::Tensor indices = at::empty({rows, k}, in.options().dtype(at::kLong));
    const int device = in.device().index();
    const cuda::DeviceScope scope(device);
    HF_CUDA_CHECK(kernels::launchTopKSoftmax(
        in.const_data_ptr<float>(), rows, columns, k, renormalize,
        weights.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>(),
        cuda::currentStream(device)));
    return {weights, indices};
  }
  auto [weights, indices] = at::topk(at::softmax(logits, -1), k, /*dim=*/-1,
                                     /*largest=*/true, /*sorted=*/true);
  if (renormalize) {
    weights = weights / weights.sum(-1, /*keepdim=*/true);
  }
  return {weights, indices};
}

bool isBf16OrF16(DataType dtype) {
  return dtype == DataType::BFloat16 || dtype == DataType::Half;
}

}  // namespace

std::vector<c10::IValue> TopKSoftmax::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  return topkSoftmaxOfLogits(inputs.at(0).toTensor(), k(), renormalize());
}

RouterTopK::RouterTopK(TensorView* weights, TensorView* indices, TensorView* x,
                       TensorView* router_w, int64_t k, bool renormalize) {
  addOutput(weights);
  addOutput(indices);
  addInput(x);
  addInput(router_w);
  addDataAttribute(k);
  addDataAttribute(renormalize);
}

std::string RouterTopK::toInlineString() const {
  return "(" + joinValues(outputs()) + ") = router_topk(" + x()->toString() +
         ", " + routerWeights()->toString() + ", k=" + std::to_string(k()) +
         ", renormalize=" + (renormalize() ? "true" : "false") + ")";
}

void RouterTopK::validate() const {
  checkTensor(this, "x", x(), 2, isBf16OrF16, "bf16 or f16");
  checkTensor(this, "router_w", routerWeights(), 2, isBf16OrF16, "bf16 or f16");
  HF_CHECK(x()->dtype() == routerWeights()->dtype(), "router_topk: x ",
           x()->describe(), " and router_w ", routerWeights()->describe(),
           " must have the same dtype");
  checkSameExtent(this, x()->extent(1), "the columns of x",
                  routerWeights()->extent(1), "the columns of router_w");
  HF_CHECK(k() >= 1, "router_topk: k must be >= 1, got ", k());
  const std::optional<int64_t> experts =
      routerWeights()->extent(0)->constantInt();
  HF_CHECK(!experts.has_value() || k() <= *experts, "router_topk: k = ", k(),
           " exceeds the ", *experts, " experts (rows) of ",
           routerWeights()->describe());
  checkTensor(
      this, "weights", weights(), 2,
      [](DataType dtype) { return dtype == DataType::Float; }, "f32");
  checkInt64(this, "indices", indices(), 2);
  for (const TensorView* out : {weights(), indices()}) {
    checkSameExtent(this, x()->extent(0), "the rows of x", out->extent(0),
                    "the rows of an output");
  }
}

std::vector<c10::IValue> RouterTopK::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = inputs.at(0).toTensor();
  const at::Tensor router_w = inputs.at(1).toTensor();
  HF_CHECK(
      x.dim() == 2 && router_w.dim() == 2 && x.size(1) == router_w.size(1) &&
          x.scalar_type() == router_w.scalar_type() &&
          (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
      "router_topk: x and router_w must be 2-D, of the same bf16 or f16 "
      "dtype and the same number of columns, got x ",
      x.scalar_type(), " of sizes ", x.sizes(), " and router_w ",
      router_w.scalar_type(), " of sizes ", router_w.sizes());
  HF_CHECK(x.device() == router_w.device(), "router_topk: x is on ", x.device(),
           " and router_w on ", router_w.device());
  const int64_t experts = router_w.size(0);
  HF_CHECK(k() <= experts, "router_topk: k = ", k(), " exceeds the ", experts,
           " experts (rows) of router_w");
  if (x.is_cuda() && x.is_contiguous() && router_w.is_contiguous() &&
      kernels::routerTopKSupports(x.const_data_ptr(), router_w.const_data_ptr(),
                                  x.size(1), experts)) {
    const int64_t rows = x.size(0);
    at::Tensor weights = at::empty({rows, k()}, x.options().dtype(at::kFloat));
    at::Tensor indices = at::empty({rows, k()}, x.options().dtype(at::kLong));
    const int device = x.device().index();
    const cuda::DeviceScope scope(device);
    HF_CUDA_CHECK(kernels::launchRouterTopK(
        x.scalar_type() == at::kHalf ? kernels::RouterDtype::kHalf
                                     : kernels::RouterDtype::kBFloat16,
        x.const_data_ptr(), router_w.const_data_ptr(), rows, x.size(1), experts,
        k(), renormalize(), weights.mutable_data_ptr<float>(),
        indices.mutable_data_ptr<int64_t>(), cuda::currentStream(device)));
    return {weights, indices};
  }
  return topkSoftmaxOfLogits(LinearOp::toFloat(x, router_w, std::nullopt), k(),
                             renormalize());
}

TopKSoftmaxResult topkSoftmax(TensorView* logits, int64_t k, bool renormalize) {
  HF_CHECK(logits != nullptr, "topkSoftmax: logits is null");
  HF_CHECK(logits->rank() == 2, "topkSoftmax: logits ", logits->describe(),
           " must have rank 2 ([tokens, experts]), got rank ", logits->rank());
  TopKSoftmaxResult result;
  result.weights = makeTensor({logits->extent(0), k}, DataType::Float);
  result.indices = makeTensor({logits->extent(0), k}, DataType::Int64);
  IrBuilder::create<TopKSoftmax>(result.weights, result.indices, logits, k,
                                 renormalize);
  return result;
}

TopKSoftmaxResult routerTopK(TensorView* x, TensorView* router_w, int64_t k,
                             bool renormalize) {
  HF_CHECK(x != nullptr && router_w != nullptr,
           "routerTopK: an operand is null");
  HF_CHECK(x->rank() == 2, "routerTopK: x ", x->describe(),
           " must have rank 2 ([tokens, hidden]), got rank ", x->rank());
  TopKSoftmaxResult result;
  result.weights = makeTensor({x->extent(0), k}, DataType::Float);
  result.indices = makeTensor({x->extent(0), k}, DataType::Int64);
  IrBuilder::create<RouterTopK>(result.weights, result.indices, x, router_w, k,
                                renormalize);
  return result;
}

HF_DEFINE_EXPR(TopKSoftmax)
HF_DEFINE_EXPR(RouterTopK)

}  // namespace hostfuse
