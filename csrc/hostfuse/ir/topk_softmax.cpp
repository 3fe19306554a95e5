#include <hostfuse/ir/topk_softmax.h>

#include <ATen/ATen.h>

#include <hostfuse/ir/container.h>
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

std::vector<c10::IValue> TopKSoftmax::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor logits = inputs.at(0).toTensor();
  HF_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
           "topk_softmax: logits must be a 2-D f32 tensor, got ",
           logits.scalar_type(), " of sizes ", logits.sizes());
  const int64_t rows = logits.size(0);
  const int64_t columns = logits.size(1);
  HF_CHECK(k() <= columns, "topk_softmax: k = ", k(), " exceeds the ", columns,
           " columns of logits");
  if (logits.is_cuda() && columns <= kernels::kTopKSoftmaxMaxColumns) {
    const at::Tensor in = logits.contiguous();
    at::Tensor weights = at::empty({rows, k()}, in.options());
    at::Tensor indices = at::empty({rows, k()}, in.options().dtype(at::kLong));
    const int device = in.device().index();
    const cuda::DeviceScope scope(device);
    HF_CUDA_CHECK(kernels::launchTopKSoftmax(
        in.const_data_ptr<float>(), rows, columns, k(), renormalize(),
        weights.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>(),
        cuda::currentStream(device)));
    return {weights, indices};
  }
  auto [weights, indices] = at::topk(at::softmax(logits, -1), k(), /*dim=*/-1,
                                     /*largest=*/true, /*sorted=*/true);
  if (renormalize()) {
    weights = weights / weights.sum(-1, /*keepdim=*/true);
  }
  return {weights, indices};
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

HF_DEFINE_EXPR(TopKSoftmax)

}  // namespace hostfuse
