#include <hostfuse/multidevice/moe/nodes.h>

#include <ATen/ATen.h>

#include <sstream>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/operand_checks.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/fp8.h>

namespace hostfuse {

namespace {

void checkNumExperts(const Expr* expr, int64_t num_experts) {
  HF_CHECK(num_experts > 0, expr->opName(), ": num_experts must be > 0, got ",
           num_experts);
}

}  // namespace

// ---------------------------------------------------------------------------

MoeDispatch::MoeDispatch(
    TensorView* recv_x, TensorView* recv_src_rank, TensorView* recv_src_token,
    TensorView* recv_src_k, TensorView* recv_weights,
    TensorView* recv_expert_counts, TensorView* n_tokens_to_rank,
    TensorView* n_tokens_from_rank, TensorView* recv_layout_id, TensorView* x,
    TensorView* topk_idx, TensorView* topk_weights, int64_t num_experts,
    MoeBackend backend, int64_t capacity, MoeDispatchQuant quantize,
    TensorView* recv_scales) {
  HF_CHECK((recv_weights == nullptr) == (topk_weights == nullptr),
           "MoeDispatch: recv_weights must be given exactly when "
           "topk_weights is");
  HF_CHECK((recv_scales != nullptr) == (quantize != MoeDispatchQuant::None),
           "MoeDispatch: recv_scales must be given exactly when the rows are "
           "quantized");
  addOutput(recv_x);
  addOutput(recv_src_rank);
  addOutput(recv_src_token);
  addOutput(recv_src_k);
  if (recv_weights != nullptr) {
    addOutput(recv_weights);
  }
  addOutput(recv_expert_counts);
  addOutput(n_tokens_to_rank);
  addOutput(n_tokens_from_rank);
  addOutput(recv_layout_id);
  if (recv_scales != nullptr) {
    addOutput(recv_scales);
  }
  addInput(x);
  addInput(topk_idx);
  if (topk_weights != nullptr) {
    addInput(topk_weights);
  }
  addDataAttribute(num_experts);
  addDataAttribute(static_cast<int64_t>(backend));
  addDataAttribute(topk_weights != nullptr);
  addDataAttribute(capacity);
  addDataAttribute(static_cast<int64_t>(quantize));
}

std::string MoeDispatch::toInlineString() const {
  std::ostringstream ss;
  ss << "MoeDispatch(x=" << x()->toString()
     << ", topk_idx=" << topkIdx()->toString();
  if (hasWeights()) {
    ss << ", topk_weights=" << topkWeights()->toString();
  }
  ss << ", num_experts=" << numExperts()
     << ", backend=" << hostfuse::toString(backend());
  if (capacity() != 0) {
    ss << ", capacity=" << capacity();
  }
  if (quantize() != MoeDispatchQuant::None) {
    ss << ", quantize=" << hostfuse::toString(quantize());
  }
  ss << ") -> (recv_x=" << recvX()->toString()
     << ", recv_src_rank=" << recvSrcRank()->toString()
     << ", recv_src_token=" << recvSrcToken()->toString()
     << ", recv_src_k=" << recvSrcK()->toString();
  if (hasWeights()) {
    ss << ", recv_weights=" << recvWeights()->toString();
  }
  ss << ", recv_expert_counts=" << recvExpertCounts()->toString()
     << ", n_tokens_to_rank=" << nTokensToRank()->toString()
     << ", n_tokens_from_rank=" << nTokensFromRank()->toString()
     << ", recv_layout_id=" << recvLayoutId()->toString();
  if (recvScales() != nullptr) {
    ss << ", recv_scales=" << recvScales()->toString();
  }
  ss << ")";
  return ss.str();
}

void MoeDispatch::validate() const {
  const size_t num_inputs = hasWeights() ? 3 : 2;
  const int64_t mode = attribute<int64_t>(4);
  HF_CHECK(mode == static_cast<int64_t>(MoeDispatchQuant::None) ||
               mode == static_cast<int64_t>(MoeDispatchQuant::Fp8E4M3),
           "MoeDispatch: quantize ", mode, " is neither none nor fp8_e4m3");
  const size_t scales = quantize() != MoeDispatchQuant::None ? 1 : 0;
  HF_ERROR(inputs().size() == num_inputs &&
               outputs().size() == num_inputs + 6 + scales,
           "MoeDispatch built with ", inputs().size(), " inputs and ",
           outputs().size(), " outputs");
  checkNumExperts(this, numExperts());
  HF_CHECK(capacity() >= 0,
           "MoeDispatch: capacity must be >= 0 (0: the worst case), got ",
           capacity());
  HF_CHECK(capacity() == 0 || moeBackendInfo(backend()).fixed_capacity,
           "MoeDispatch: capacity (", capacity(),
           ") does not apply to backend=", hostfuse::toString(backend()),
           ", which returns exactly the rows received");
  checkFloating(this, "x", x(), 2);
  checkTensor(
      this, "topk_idx", topkIdx(), 2,
      [](DataType d) { return d == DataType::Int64 || d == DataType::Int32; },
      "i64 or i32");
  checkSameExtent(this, x()->extent(0), "the token count T of x",
                  topkIdx()->extent(0), "the token count of topk_idx");
  if (hasWeights()) {
    checkFloating(this, "topk_weights", topkWeights(), 2);
    checkSameExtent(this, topkIdx()->extent(0), "the token count of topk_idx",
                    topkWeights()->extent(0),
                    "the token count of topk_weights");
    checkSameExtent(this, topkIdx()->extent(1), "K of topk_idx",
                    topkWeights()->extent(1), "K of topk_weights");
  }

  if (quantize() == MoeDispatchQuant::Fp8E4M3) {
    HF_CHECK(x()->dtype() != DataType::Double,
             "MoeDispatch: quantize=fp8_e4m3 takes x of f32, bf16 or f16; x ",
             x()->toDeclString(), " is f64");
    const std::optional<int64_t> hidden = x()->extent(1)->constantInt();
    HF_CHECK(!hidden.has_value() || *hidden % moe::kFp8Block == 0,
             "MoeDispatch: quantize=fp8_e4m3 needs H a multiple of ",
             moe::kFp8Block, " (one scale per ", moe::kFp8Block,
             " channels); x ", x()->toDeclString(),
             " has H = ", hidden.value_or(0));
    checkTensor(
        this, "recv_x", recvX(), 2,
        [](DataType d) { return d == DataType::Float8E4M3; }, "f8e4m3");
    checkTensor(
        this, "recv_scales", recvScales(), 2,
        [](DataType d) { return d == DataType::Float; }, "f32");
    checkSameExtent(this, recvX()->extent(0), "the rows of recv_x",
                    recvScales()->extent(0), "the rows of recv_scales");
  } else {
    checkFloating(this, "recv_x", recvX(), 2);
    HF_CHECK(recvX()->dtype() == x()->dtype(), "MoeDispatch: recv_x ",
             recvX()->toDeclString(), " must have x's dtype ", x()->dtype());
  }
  checkSameExtent(this, x()->extent(1), "the hidden size H of x",
                  recvX()->extent(1), "the hidden size of recv_x");
  checkInt64(this, "recv_src_rank", recvSrcRank(), 1);
  checkInt64(this, "recv_src_token", recvSrcToken(), 1);
  checkInt64(this, "recv_src_k", recvSrcK(), 1);
  for (const TensorView* row_tensor :
       {recvSrcRank(), recvSrcToken(), recvSrcK()}) {
    checkSameExtent(this, recvX()->extent(0), "the rows of recv_x",
                    row_tensor->extent(0), "the rows of a provenance output");
  }
  if (hasWeights()) {
    checkTensor(
        this, "recv_weights", recvWeights(), 1,
        [this](DataType d) { return d == topkWeights()->dtype(); },
        "of topk_weights' dtype");
    checkSameExtent(this, recvX()->extent(0), "the rows of recv_x",
                    recvWeights()->extent(0), "the rows of recv_weights");
  }
  checkInt64(this, "recv_expert_counts", recvExpertCounts(), 1);
  checkInt64(this, "n_tokens_to_rank", nTokensToRank(), 1);
  checkInt64(this, "n_tokens_from_rank", nTokensFromRank(), 1);
  checkInt64(this, "recv_layout_id", recvLayoutId(), 1);
}

// ---------------------------------------------------------------------------

MoeCombine::MoeCombine(TensorView* combined, TensorView* expert_out,
                       TensorView* recv_src_rank, TensorView* recv_src_token,
                       TensorView* recv_src_k, TensorView* recv_expert_counts,
                       TensorView* n_tokens_to_rank,
                       TensorView* n_tokens_from_rank,
                       TensorView* recv_layout_id, TensorView* weights,
                       Scalar* num_tokens, int64_t num_experts,
                       MoeBackend backend, MoeCombineReduce reduce) {
  addOutput(combined);
  addInput(expert_out);
  addInput(recv_src_rank);
  addInput(recv_src_token);
  addInput(recv_src_k);
  addInput(recv_expert_counts);
  addInput(n_tokens_to_rank);
  addInput(n_tokens_from_rank);
  addInput(recv_layout_id);
  if (weights != nullptr) {
    addInput(weights);
  }
  addInput(num_tokens);
  addDataAttribute(num_experts);
  addDataAttribute(static_cast<int64_t>(backend));
  addDataAttribute(weights != nullptr);
  addDataAttribute(static_cast<int64_t>(reduce));
}

std::string MoeCombine::toInlineString() const {
  std::ostringstream ss;
  ss << "MoeCombine(expert_out=" << expertOut()->toString()
     << ", recv_src_rank=" << recvSrcRank()->toString()
     << ", recv_src_token=" << recvSrcToken()->toString()
     << ", recv_src_k=" << recvSrcK()->toString()
     << ", recv_expert_counts=" << recvExpertCounts()->toString()
     << ", n_tokens_to_rank=" << nTokensToRank()->toString()
     << ", n_tokens_from_rank=" << nTokensFromRank()->toString()
     << ", recv_layout_id=" << recvLayoutId()->toString();
  if (topkWeights() != nullptr) {
    ss << ", topk_weights=" << topkWeights()->toString();
  }
  if (recvWeights() != nullptr) {
    ss << ", recv_weights=" << recvWeights()->toString();
  }
  ss << ", num_tokens=" << numTokens()->toString()
     << ", num_experts=" << numExperts()
     << ", backend=" << hostfuse::toString(backend());
  if (reduce() != MoeCombineReduce::PerPick) {
    ss << ", reduce=" << hostfuse::toString(reduce());
  }
  ss << ") -> (" << joinValues(outputs()) << ")";
  return ss.str();
}

void MoeCombine::validate() const {
  const size_t num_inputs = hasWeights() ? 10 : 9;
  HF_ERROR(inputs().size() == num_inputs && outputs().size() == 1,
           "MoeCombine built with ", inputs().size(), " inputs and ",
           outputs().size(), " outputs");
  checkNumExperts(this, numExperts());
  checkFloating(this, "expert_out", expertOut(), 2);
  checkInt64(this, "recv_src_rank", recvSrcRank(), 1);
  checkInt64(this, "recv_src_token", recvSrcToken(), 1);
  checkInt64(this, "recv_src_k", recvSrcK(), 1);
  for (const TensorView* row_tensor :
       {recvSrcRank(), recvSrcToken(), recvSrcK()}) {
    checkSameExtent(this, expertOut()->extent(0), "the rows of expert_out",
                    row_tensor->extent(0), "the rows of a provenance input");
  }
  checkInt64(this, "recv_expert_counts", recvExpertCounts(), 1);
  checkInt64(this, "n_tokens_to_rank", nTokensToRank(), 1);
  checkInt64(this, "n_tokens_from_rank", nTokensFromRank(), 1);
  checkInt64(this, "recv_layout_id", recvLayoutId(), 1);
  HF_CHECK(input(num_inputs - 1)->isA<Scalar>() &&
               numTokens()->dtype() == DataType::Int64,
           "MoeCombine: num_tokens ", input(num_inputs - 1)->describe(),
           " must be an i64 scalar");
  const int64_t mode = attribute<int64_t>(3);
  HF_CHECK(mode == static_cast<int64_t>(MoeCombineReduce::PerPick) ||
               mode == static_cast<int64_t>(MoeCombineReduce::PerRank),
           "MoeCombine: reduce ", mode, " is neither per_pick nor per_rank");
  if (topkWeights() != nullptr) {
    checkFloating(this, "topk_weights", topkWeights(), 2);
    checkSameExtent(this, numTokens(), "num_tokens", topkWeights()->extent(0),
                    "the token count of topk_weights");
  }
  if (recvWeights() != nullptr) {
    checkFloating(this, "recv_weights", recvWeights(), 1);
    checkSameExtent(this, expertOut()->extent(0), "the rows of expert_out",
                    recvWeights()->extent(0), "the rows of recv_weights");
  }
  checkFloating(this, "combined", combined(), 2);
  HF_CHECK(combined()->dtype() == expertOut()->dtype(), "MoeCombine: combined ",
           combined()->toDeclString(), " must have expert_out's dtype ",
           expertOut()->dtype());
  checkSameExtent(this, numTokens(), "num_tokens", combined()->extent(0),
                  "the rows of combined");
  checkSameExtent(this, expertOut()->extent(1), "the width of expert_out",
                  combined()->extent(1), "the width of combined");
  if (moeBackendInfo(backend()).combine_needs_its_dispatch) {
    validateLayoutFromDispatch();
  }
}

const MoeDispatch* MoeCombine::dispatch() const {
  const Expr* definition = recvSrcRank()->definition();
  return definition != nullptr && definition->isA<MoeDispatch>()
             ? definition->as<MoeDispatch>()
             : nullptr;
}

// A backend that keeps the rows' metadata with the dispatch node (cuda)
// must know that node: every layout input must be the matching output of
// one MoeDispatch of the same backend.
void MoeCombine::validateLayoutFromDispatch() const {
  const MoeDispatch* source = dispatch();
  const std::string name = hostfuse::toString(backend());
  HF_CHECK(
      source != nullptr && source->backend() == backend(),
      "MoeCombine: with backend=", name, ", recv_src_rank ",
      recvSrcRank()->toString(),
      " must be an output of a MoeDispatch with backend=", name,
      ", which holds the layout; it is ",
      recvSrcRank()->definition() == nullptr
          ? std::string("not computed by any expression")
          : "computed by " + recvSrcRank()->definition()->toInlineString());
  const std::pair<const TensorView*, const TensorView*> pairs[] = {
      {recvSrcToken(), source->recvSrcToken()},
      {recvSrcK(), source->recvSrcK()},
      {recvExpertCounts(), source->recvExpertCounts()},
      {nTokensToRank(), source->nTokensToRank()},
      {nTokensFromRank(), source->nTokensFromRank()},
      {recvLayoutId(), source->recvLayoutId()}};
  for (const auto& [mine, expected] : pairs) {
    HF_CHECK(mine == expected, "MoeCombine: with backend=", name,
             ", the layout must come from one MoeDispatch; got ",
             mine->toString(), " where that dispatch returned ",
             expected->toString());
  }
  HF_CHECK(numExperts() == source->numExperts(), "MoeCombine: num_experts (",
           numExperts(), ") must equal its dispatch's (", source->numExperts(),
           ")");
  HF_CHECK(expertOut()->dtype() == source->x()->dtype(),
           "MoeCombine: with backend=", name, ", expert_out ",
           expertOut()->toDeclString(), " must have x's dtype ",
           source->x()->dtype(),
           " (the rows travel back through buffers sized for x)");
  checkSameExtent(this, source->x()->extent(1), "the hidden size H of x",
                  expertOut()->extent(1),
                  ("the width of expert_out (backend=" + name + ")").c_str());
}

// ---------------------------------------------------------------------------

MoeDispatchResult moeDispatch(TensorView* x, TensorView* topk_idx,
                              TensorView* topk_weights, int64_t num_experts,
                              MoeBackend backend, int64_t capacity,
                              MoeDispatchQuant quantize) {
  HF_CHECK(x != nullptr && topk_idx != nullptr,
           "moeDispatch: x and topk_idx must not be null");
  HF_CHECK(x->rank() == 2, "moeDispatch: x ", x->toDeclString(),
           " must have rank 2 ([T, H]), got rank ", x->rank());
  // Known only when the program runs: rows received, L and R.
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
  Scalar* local_experts = makeSymbolicScalar(DataType::Int64, "local_experts");
  Scalar* ranks = makeSymbolicScalar(DataType::Int64, "ranks");
  // R + 1 (layout_id.h).
  Scalar* id_words = makeSymbolicScalar(DataType::Int64, "id_words");
  MoeDispatchResult result;
  const bool fp8 = quantize == MoeDispatchQuant::Fp8E4M3;
  result.recv_x =
      makeTensor({rows, x->extent(1)}, fp8 ? DataType::Float8E4M3 : x->dtype());
  if (fp8) {
    // H / kFp8Block scales per row.
    Scalar* blocks = makeSymbolicScalar(DataType::Int64, "scale_blocks");
    result.recv_scales = makeTensor({rows, blocks}, DataType::Float);
  }
  result.recv_src_rank = makeTensor({rows}, DataType::Int64);
  result.recv_src_token = makeTensor({rows}, DataType::Int64);
  result.recv_src_k = makeTensor({rows}, DataType::Int64);
  if (topk_weights != nullptr) {
    result.recv_weights = makeTensor({rows}, topk_weights->dtype());
  }
  result.recv_expert_counts = makeTensor({local_experts}, DataType::Int64);
  result.n_tokens_to_rank = makeTensor({ranks}, DataType::Int64);
  result.n_tokens_from_rank = makeTensor({ranks}, DataType::Int64);
  result.recv_layout_id = makeTensor({id_words}, DataType::Int64);
  IrBuilder::create<MoeDispatch>(
      result.recv_x, result.recv_src_rank, result.recv_src_token,
      result.recv_src_k, result.recv_weights, result.recv_expert_counts,
      result.n_tokens_to_rank, result.n_tokens_from_rank, result.recv_layout_id,
      x, topk_idx, topk_weights, num_experts, backend, capacity, quantize,
      result.recv_scales);
  return result;
}

TensorView* moeCombine(TensorView* expert_out, const MoeDispatchResult& layout,
                       TensorView* topk_weights, Scalar* num_tokens,
                       MoeCombineReduce reduce) {
  HF_CHECK(expert_out != nullptr && num_tokens != nullptr,
           "moeCombine: expert_out and num_tokens must not be null");
  HF_CHECK(layout.recv_x != nullptr && layout.recv_x->definition() != nullptr &&
               layout.recv_x->definition()->isA<MoeDispatch>(),
           "moeCombine: the layout must be one that moeDispatch returned");
  HF_CHECK(expert_out->rank() == 2, "moeCombine: expert_out ",
           expert_out->toDeclString(), " must have rank 2, got rank ",
           expert_out->rank());
  HF_CHECK(num_tokens->dtype() == DataType::Int64, "moeCombine: num_tokens ",
           num_tokens->describe(), " must be an i64 scalar, got ",
           num_tokens->dtype());
  const auto* dispatch = layout.recv_x->definition()->as<MoeDispatch>();
  TensorView* weights = topk_weights;
  if (reduce == MoeCombineReduce::PerRank && topk_weights != nullptr) {
    HF_CHECK(topk_weights == dispatch->topkWeights(),
             "moeCombine: with reduce=per_rank the experts' ranks weight the "
             "rows with the weights dispatch carried, so topk_weights must "
             "be the dispatch's own (",
             dispatch->topkWeights() == nullptr
                 ? std::string("it had none")
                 : dispatch->topkWeights()->toString(),
             ") or null; got ", topk_weights->toString());
    weights = layout.recv_weights;
  }
  TensorView* combined =
      makeTensor({num_tokens, expert_out->extent(1)}, expert_out->dtype());
  IrBuilder::create<MoeCombine>(
      combined, expert_out, layout.recv_src_rank, layout.recv_src_token,
      layout.recv_src_k, layout.recv_expert_counts, layout.n_tokens_to_rank,
      layout.n_tokens_from_rank, layout.recv_layout_id, weights, num_tokens,
      dispatch->numExperts(), dispatch->backend(), reduce);
  return combined;
}

namespace {

std::vector<std::string> backendCaptureProblems(MoeBackend backend) {
  const char* problem = moeBackendInfo(backend).capture_problem;
  if (problem == nullptr) {
    return {};
  }
  return {problem};
}

}  // namespace

std::vector<std::string> MoeDispatch::captureProblems(
    const at::Device& /*device*/) const {
  return backendCaptureProblems(backend());
}

std::vector<std::string> MoeCombine::captureProblems(
    const at::Device& /*device*/) const {
  return backendCaptureProblems(backend());
}

HF_DEFINE_EXPR(MoeDispatch)
HF_DEFINE_EXPR(MoeCombine)

}  // namespace hostfuse
