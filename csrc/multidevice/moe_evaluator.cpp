#include "multidevice/moe_evaluator.h"

#include <c10/util/Exception.h>

#include "multidevice/dispatch_combine.h"

namespace hostfuse {

namespace {

void checkImplemented(const Expr& expr, MoeBackend backend) {
  HF_CHECK(backend == MoeBackend::Collective, expr.opName(),
           ": backend=", toString(backend),
           " is not implemented yet; build the node with "
           "MoeBackend::Collective: ",
           expr.toInlineString());
}

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

// ATen errors inside the runtime become hostfuse errors naming the node.
template <typename Fn>
auto namingNode(const Expr& expr, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    HF_THROW("ATen failed while running ", expr.toInlineString(), ": ",
             e.what_without_backtrace());
  }
}

}  // namespace

void evaluateMoeDispatch(const MoeDispatch& dispatch, ValueMap& values,
                         Communicator& communicator) {
  checkImplemented(dispatch, dispatch.backend());
  const MoeDispatchOutput out = namingNode(dispatch, [&] {
    return dispatchCollective(values.get(dispatch.x()).toTensor(),
                              values.get(dispatch.topkIdx()).toTensor(),
                              optionalTensor(values, dispatch.topkWeights()),
                              dispatch.numExperts(), communicator);
  });
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
}

void evaluateMoeCombine(const MoeCombine& combine, ValueMap& values,
                        Communicator& communicator) {
  checkImplemented(combine, combine.backend());
  MoeLayout layout;
  layout.src_rank = values.get(combine.recvSrcRank()).toTensor();
  layout.src_token = values.get(combine.recvSrcToken()).toTensor();
  layout.src_k = values.get(combine.recvSrcK()).toTensor();
  layout.expert_counts = values.get(combine.recvExpertCounts()).toTensor();
  layout.n_tokens_to_rank = values.get(combine.nTokensToRank()).toTensor();
  layout.n_tokens_from_rank = values.get(combine.nTokensFromRank()).toTensor();
  const at::Tensor combined = namingNode(combine, [&] {
    return combineCollective(values.get(combine.expertOut()).toTensor(), layout,
                             optionalTensor(values, combine.topkWeights()),
                             values.get(combine.numTokens()).toInt(),
                             combine.numExperts(), communicator);
  });
  bindTensor(values, combine.combined(), combined);
}

}  // namespace hostfuse
