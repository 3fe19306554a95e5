#include <hostfuse/multidevice/moe/evaluator.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <hostfuse/multidevice/moe/masking.h>

namespace hostfuse {

namespace {

// Binds `tensor` to `tv` and each symbolic extent of `tv` that has no value
// yet to the matching size, so later expressions can use them.
void bindTensor(ValueMap& values, const TensorView* tv,
                const at::Tensor& tensor) {
  HF_ERROR(tensor.dim() == tv->rank(), "a tensor of rank ", tensor.dim(),
           " for ", tv->toDeclString());
  values.bind(tv, tensor);
  for (int64_t d = 0; d < tv->rank(); ++d) {
    const Scalar* extent = tv->extent(d);
    if (!values.has(extent)) {
      values.bind(extent, tensor.size(d));
      continue;
    }
    HF_ERROR(values.get(extent).toInt() == tensor.size(d), "size ",
             tensor.size(d), " in dim ", d, " of ", tv->toDeclString(),
             " disagrees with its extent ", extent->toString(), " = ",
             values.get(extent).toInt());
  }
}

std::optional<at::Tensor> optionalTensor(const ValueMap& values,
                                         const TensorView* tv) {
  if (tv == nullptr) {
    return std::nullopt;
  }
  return values.get(tv).toTensor();
}

// Every runtime error, prefixed with the node: runtimes know tensors, not
// the IR.
template <typename Fn>
auto namingNode(const Expr& expr, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error& e) {
    HF_THROW("while running ", expr.toInlineString(), ": ", e.what());
  } catch (const c10::Error& e) {
    HF_THROW("ATen failed while running ", expr.toInlineString(), ": ",
             e.what_without_backtrace());
  }
}

}  // namespace

MoeEvaluator::MoeEvaluator(Communicator& communicator, bool mask_failed_ranks)
    : communicator_(communicator), mask_failed_ranks_(mask_failed_ranks) {}

MoeEvaluator::~MoeEvaluator() = default;

MoeRuntime& MoeEvaluator::runtime(MoeBackend backend) {
  std::unique_ptr<MoeRuntime>& runtime = runtimes_[backend];
  if (runtime == nullptr) {
    runtime = createMoeRuntime(backend, communicator_, mask_failed_ranks_);
  }
  return *runtime;
}

std::vector<int64_t> MoeEvaluator::maskedRanks() const {
  return mask_failed_ranks_ ? failedRanks(communicator_)
                            : std::vector<int64_t>{};
}

void MoeEvaluator::checkStatus() {
  for (const auto& [backend, runtime] : runtimes_) {
    runtime->checkStatus();
  }
}

void MoeEvaluator::publishFailure(MoeBackend backend,
                                  const at::Device& device) noexcept {
  try {
    runtime(backend).publishFailure(device);
  } catch (...) {
    // Creating the runtime failed: the peers find out at their timeout.
  }
}

void MoeEvaluator::run(const MoeDispatch& dispatch, ValueMap& values) {
  MoeDispatchArgs args;
  args.site = &dispatch;
  args.describe_site = [&dispatch] { return dispatch.toInlineString(); };
  args.x = values.get(dispatch.x()).toTensor();
  args.topk_idx = values.get(dispatch.topkIdx()).toTensor();
  args.topk_weights = optionalTensor(values, dispatch.topkWeights());
  args.num_experts = dispatch.numExperts();
  args.capacity = dispatch.capacity();
  args.quantize = dispatch.quantize();
  const MoeDispatchOutput out = namingNode(
      dispatch, [&] { return runtime(dispatch.backend()).dispatch(args); });
  bindTensor(values, dispatch.recvX(), out.recv_x);
  bindTensor(values, dispatch.recvSrcRank(), out.layout.src_rank);
  bindTensor(values, dispatch.recvSrcToken(), out.layout.src_token);
  bindTensor(values, dispatch.recvSrcK(), out.layout.src_k);
  if (dispatch.hasWeights()) {
    bindTensor(values, dispatch.recvWeights(), out.recv_weights);
  }
  bindTensor(values, dispatch.recvExpertCounts(), out.layout.expert_counts);
  bindTensor(values, dispatch.nTokensToRank(), out.layout.n_tokens_to_rank);
  bindTensor(values, dispatch.nTokensFromRank(), out.layout.n_tokens_from_rank);
  bindTensor(values, dispatch.recvLayoutId(), out.layout.id);
  if (dispatch.recvScales() != nullptr) {
    bindTensor(values, dispatch.recvScales(), out.recv_scales);
  }
}

void MoeEvaluator::run(const MoeCombine& combine, ValueMap& values) {
  MoeCombineArgs args;
  args.dispatch_site = combine.dispatch();
  args.expert_out = values.get(combine.expertOut()).toTensor();
  args.layout.src_rank = values.get(combine.recvSrcRank()).toTensor();
  args.layout.src_token = values.get(combine.recvSrcToken()).toTensor();
  args.layout.src_k = values.get(combine.recvSrcK()).toTensor();
  args.layout.expert_counts = values.get(combine.recvExpertCounts()).toTensor();
  args.layout.n_tokens_to_rank = values.get(combine.nTokensToRank()).toTensor();
  args.layout.n_tokens_from_rank =
      values.get(combine.nTokensFromRank()).toTensor();
  args.layout.id = values.get(combine.recvLayoutId()).toTensor();
  args.reduce = combine.reduce();
  args.topk_weights = optionalTensor(values, combine.topkWeights());
  args.recv_weights = optionalTensor(values, combine.recvWeights());
  args.num_tokens = values.get(combine.numTokens()).toInt();
  args.num_experts = combine.numExperts();
  const at::Tensor combined = namingNode(
      combine, [&] { return runtime(combine.backend()).combine(args); });
  bindTensor(values, combine.combined(), combined);
}

}  // namespace hostfuse
