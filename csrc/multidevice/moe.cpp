#include "multidevice/moe.h"

#include <ATen/ATen.h>

#include <sstream>

#include "ir/container.h"
#include "ir/ops.h"
#include "utils/torch_cuda.h"

namespace hostfuse {

namespace {

// Checks that `tv` is a tensor of rank `rank` whose dtype passes `ok`;
// `expected` describes the allowed dtypes in the message.
template <typename Pred>
void checkTensor(const Expr* expr, const char* what, const TensorView* tv,
                 int64_t rank, Pred ok, const char* expected) {
  HF_CHECK(tv != nullptr, expr->opName(), ": ", what, " is null");
  HF_CHECK(tv->rank() == rank, expr->opName(), ": ", what, " ",
           tv->toDeclString(), " must have rank ", rank, ", got rank ",
           tv->rank());
  HF_CHECK(ok(tv->dtype()), expr->opName(), ": ", what, " ", tv->toDeclString(),
           " must be ", expected, ", got ", tv->dtype());
}

void checkFloating(const Expr* expr, const char* what, const TensorView* tv,
                   int64_t rank) {
  checkTensor(expr, what, tv, rank, isFloatingPoint, "floating point");
}

void checkInt64(const Expr* expr, const char* what, const TensorView* tv,
                int64_t rank) {
  checkTensor(
      expr, what, tv, rank, [](DataType d) { return d == DataType::Int64; },
      "i64");
}

// Two extents that must be equal: an error when both are known and differ.
void checkSameExtent(const Expr* expr, const Scalar* a, const char* a_what,
                     const Scalar* b, const char* b_what) {
  const std::optional<int64_t> size_a = a->constantInt();
  const std::optional<int64_t> size_b = b->constantInt();
  HF_CHECK(a == b || !size_a.has_value() || !size_b.has_value() ||
               *size_a == *size_b,
           expr->opName(), ": ", b_what, " (", b->toString(), ") must equal ",
           a_what, " (", a->toString(), ")");
}

void checkNumExperts(const Expr* expr, int64_t num_experts) {
  HF_CHECK(num_experts > 0, expr->opName(), ": num_experts must be > 0, got ",
           num_experts);
}

}  // namespace

const char* toString(MoeBackend backend) {
  return backend == MoeBackend::Collective ? "collective" : "cuda";
}

// ---------------------------------------------------------------------------

MoeDispatch::MoeDispatch(TensorView* recv_x, TensorView* recv_src_rank,
                         TensorView* recv_src_token, TensorView* recv_src_k,
                         TensorView* recv_weights,
                         TensorView* recv_expert_counts,
                         TensorView* n_tokens_to_rank,
                         TensorView* n_tokens_from_rank, TensorView* x,
                         TensorView* topk_idx, TensorView* topk_weights,
                         int64_t num_experts, MoeBackend backend,
                         int64_t capacity) {
  HF_CHECK((recv_weights == nullptr) == (topk_weights == nullptr),
           "MoeDispatch: recv_weights must be given exactly when "
           "topk_weights is");
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
  addInput(x);
  addInput(topk_idx);
  if (topk_weights != nullptr) {
    addInput(topk_weights);
  }
  addDataAttribute(num_experts);
  addDataAttribute(static_cast<int64_t>(backend));
  addDataAttribute(topk_weights != nullptr);
  addDataAttribute(capacity);
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
  ss << ") -> (" << joinValues(outputs()) << ")";
  return ss.str();
}

void MoeDispatch::validate() const {
  const size_t num_inputs = hasWeights() ? 3 : 2;
  HF_ERROR(inputs().size() == num_inputs && outputs().size() == num_inputs + 5,
           "MoeDispatch built with ", inputs().size(), " inputs and ",
           outputs().size(), " outputs");
  checkNumExperts(this, numExperts());
  HF_CHECK(capacity() >= 0,
           "MoeDispatch: capacity must be >= 0 (0: the worst case), got ",
           capacity());
  HF_CHECK(capacity() == 0 || backend() == MoeBackend::Cuda,
           "MoeDispatch: capacity (", capacity(),
           ") applies to backend=cuda only; the collective backend returns "
           "exactly the rows received");
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

  checkFloating(this, "recv_x", recvX(), 2);
  HF_CHECK(recvX()->dtype() == x()->dtype(), "MoeDispatch: recv_x ",
           recvX()->toDeclString(), " must have x's dtype ", x()->dtype());
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
}

// ---------------------------------------------------------------------------

MoeCombine::MoeCombine(TensorView* combined, TensorView* expert_out,
                       TensorView* recv_src_rank, TensorView* recv_src_token,
                       TensorView* recv_src_k, TensorView* recv_expert_counts,
                       TensorView* n_tokens_to_rank,
                       TensorView* n_tokens_from_rank, TensorView* topk_weights,
                       Scalar* num_tokens, int64_t num_experts,
                       MoeBackend backend) {
  addOutput(combined);
  addInput(expert_out);
  addInput(recv_src_rank);
  addInput(recv_src_token);
  addInput(recv_src_k);
  addInput(recv_expert_counts);
  addInput(n_tokens_to_rank);
  addInput(n_tokens_from_rank);
  if (topk_weights != nullptr) {
    addInput(topk_weights);
  }
  addInput(num_tokens);
  addDataAttribute(num_experts);
  addDataAttribute(static_cast<int64_t>(backend));
  addDataAttribute(topk_weights != nullptr);
}

std::string MoeCombine::toInlineString() const {
  std::ostringstream ss;
  ss << "MoeCombine(expert_out=" << expertOut()->toString()
     << ", src_rank=" << recvSrcRank()->toString()
     << ", src_token=" << recvSrcToken()->toString()
     << ", src_k=" << recvSrcK()->toString()
     << ", expert_counts=" << recvExpertCounts()->toString()
     << ", n_tokens_to_rank=" << nTokensToRank()->toString()
     << ", n_tokens_from_rank=" << nTokensFromRank()->toString();
  if (hasWeights()) {
    ss << ", topk_weights=" << topkWeights()->toString();
  }
  ss << ", num_tokens=" << numTokens()->toString()
     << ", num_experts=" << numExperts()
     << ", backend=" << hostfuse::toString(backend()) << ") -> ("
     << joinValues(outputs()) << ")";
  return ss.str();
}

void MoeCombine::validate() const {
  const size_t num_inputs = hasWeights() ? 9 : 8;
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
  HF_CHECK(input(num_inputs - 1)->isA<Scalar>() &&
               numTokens()->dtype() == DataType::Int64,
           "MoeCombine: num_tokens ", input(num_inputs - 1)->describe(),
           " must be an i64 scalar");
  if (hasWeights()) {
    checkFloating(this, "topk_weights", topkWeights(), 2);
    checkSameExtent(this, numTokens(), "num_tokens", topkWeights()->extent(0),
                    "the token count of topk_weights");
  }
  checkFloating(this, "combined", combined(), 2);
  HF_CHECK(combined()->dtype() == expertOut()->dtype(), "MoeCombine: combined ",
           combined()->toDeclString(), " must have expert_out's dtype ",
           expertOut()->dtype());
  checkSameExtent(this, numTokens(), "num_tokens", combined()->extent(0),
                  "the rows of combined");
  checkSameExtent(this, expertOut()->extent(1), "the width of expert_out",
                  combined()->extent(1), "the width of combined");
  if (backend() == MoeBackend::Cuda) {
    validateCudaLayout();
  }
}

const MoeDispatch* MoeCombine::dispatch() const {
  const Expr* definition = recvSrcRank()->definition();
  return definition != nullptr && definition->isA<MoeDispatch>()
             ? definition->as<MoeDispatch>()
             : nullptr;
}

// The cuda backend keeps the rows' metadata in the dispatch node's
// workspace, so combine must know that node: every layout input must be
// the matching output of one MoeDispatch with backend=cuda.
void MoeCombine::validateCudaLayout() const {
  const MoeDispatch* source = dispatch();
  HF_CHECK(
      source != nullptr && source->backend() == MoeBackend::Cuda,
      "MoeCombine: with backend=cuda, recv_src_rank ",
      recvSrcRank()->toString(),
      " must be an output of a MoeDispatch with backend=cuda, whose "
      "workspace holds the layout; it is ",
      recvSrcRank()->definition() == nullptr
          ? std::string("not computed by any expression")
          : "computed by " + recvSrcRank()->definition()->toInlineString());
  const std::pair<const TensorView*, const TensorView*> pairs[] = {
      {recvSrcToken(), source->recvSrcToken()},
      {recvSrcK(), source->recvSrcK()},
      {recvExpertCounts(), source->recvExpertCounts()},
      {nTokensToRank(), source->nTokensToRank()},
      {nTokensFromRank(), source->nTokensFromRank()}};
  for (const auto& [mine, expected] : pairs) {
    HF_CHECK(mine == expected,
             "MoeCombine: with backend=cuda, the layout "
             "must come from one MoeDispatch; got ",
             mine->toString(), " where that dispatch returned ",
             expected->toString());
  }
  HF_CHECK(numExperts() == source->numExperts(), "MoeCombine: num_experts (",
           numExperts(), ") must equal its dispatch's (", source->numExperts(),
           ")");
  HF_CHECK(expertOut()->dtype() == source->x()->dtype(),
           "MoeCombine: with backend=cuda, expert_out ",
           expertOut()->toDeclString(), " must have x's dtype ",
           source->x()->dtype(),
           " (the rows travel back through buffers sized for x)");
  checkSameExtent(this, source->x()->extent(1), "the hidden size H of x",
                  expertOut()->extent(1),
                  "the width of expert_out (backend=cuda)");
}

// ---------------------------------------------------------------------------

GroupedMatmul::GroupedMatmul(TensorView* out, TensorView* x,
                             TensorView* weights, TensorView* group_counts) {
  addOutput(out);
  addInput(x);
  addInput(weights);
  addInput(group_counts);
}

std::string GroupedMatmul::toInlineString() const {
  return out()->toString() + " = GroupedMatmul(x=" + x()->toString() +
         ", weights=" + weights()->toString() +
         ", group_counts=" + groupCounts()->toString() + ")";
}

void GroupedMatmul::validate() const {
  checkFloating(this, "x", x(), 2);
  checkFloating(this, "weights", weights(), 3);
  HF_CHECK(weights()->dtype() == x()->dtype(), "GroupedMatmul: weights ",
           weights()->toDeclString(), " must have x's dtype ", x()->dtype());
  checkSameExtent(this, x()->extent(1), "the width H of x",
                  weights()->extent(1), "dim 1 of weights");
  checkInt64(this, "group_counts", groupCounts(), 1);
  checkSameExtent(this, weights()->extent(0), "the groups of weights",
                  groupCounts()->extent(0), "the length of group_counts");
  checkFloating(this, "out", out(), 2);
  HF_CHECK(out()->dtype() == x()->dtype(), "GroupedMatmul: out ",
           out()->toDeclString(), " must have x's dtype ", x()->dtype());
}

bool groupedMatmulRunsOnDevice(at::ScalarType dtype, const at::Device& device,
                               int64_t hidden, int64_t n, int64_t groups,
                               std::string* why_not) {
  std::string reason;
  if (!device.is_cuda()) {
    reason = "it runs on " + device.str() + ", not on a GPU";
  } else if (dtype != at::kBFloat16) {
    reason = toString("its dtype is ", dtype, ", not bf16");
  } else if (hidden >= 0 && hidden % 8 != 0) {
    reason = toString("H = ", hidden, " is not a multiple of 8");
  } else if (n >= 0 && n % 8 != 0) {
    reason = toString("N = ", n, " is not a multiple of 8");
  } else if (groups >= 1024) {
    reason = toString("it has ", groups, " groups (at most 1023)");
  } else if (cuda::isAvailable()) {
    const int index =
        device.has_index() ? device.index() : cuda::currentDevice();
    const auto [major, minor] = cuda::computeCapability(index);
    if (major != 9 && major != 10) {
      reason = toString("GPU ", index, " has compute capability ", major, ".",
                        minor, " (at::_grouped_mm needs 9.x or 10.x)");
    }
  }
  if (why_not != nullptr) {
    *why_not = reason;
  }
  return reason.empty();
}

namespace {

// Makes `t` contiguous with a 16-byte aligned start (TMA loads need both).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor result = t.contiguous();
  if (reinterpret_cast<uintptr_t>(result.data_ptr()) % 16 != 0) {
    result = result.clone();
  }
  return result;
}

at::Tensor groupedMatmulOnDevice(const at::Tensor& x, const at::Tensor& weights,
                                 const at::Tensor& counts) {
  const int64_t rows = x.size(0);
  if (rows == 0) {
    return at::empty({0, weights.size(2)}, x.options());
  }
  // Group ends on the device, made monotone and cut at x's rows so that no
  // count can make the kernel read or write past x or out.
  const at::Tensor ends =
      counts.clamp_min(0).cumsum(0).clamp_max(rows).to(at::kInt);
  return at::_grouped_mm(aligned(x), aligned(weights), ends);
}

}  // namespace

std::vector<c10::IValue> GroupedMatmul::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  const at::Tensor x = inputs.at(0).toTensor();
  const at::Tensor weights = inputs.at(1).toTensor();
  const at::Tensor counts = inputs.at(2).toTensor();
  HF_CHECK(counts.dim() == 1 && counts.size(0) == weights.size(0),
           "GroupedMatmul: group_counts has ", counts.numel(),
           " entries but weights has ", weights.size(0), " groups");
  HF_CHECK(weights.size(1) == x.size(1), "GroupedMatmul: weights ",
           weights.sizes(), " do not fit the width ", x.size(1), " of x");
  std::string why_not;
  if (counts.device() == x.device() && weights.device() == x.device() &&
      groupedMatmulRunsOnDevice(x.scalar_type(), x.device(), x.size(1),
                                weights.size(2), weights.size(0), &why_not)) {
    return {groupedMatmulOnDevice(x, weights, counts)};
  }
  if (counts.is_cuda()) {
    HF_CHECK(
        !cuda::isCapturing(counts.device().index()), toInlineString(),
        " cannot run inside a CUDA graph capture: it would read "
        "group_counts on the host, because ",
        why_not.empty() ? "its operands are on different devices" : why_not);
  }
  const at::Tensor host_counts = counts.to(at::kCPU);
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, weights.size(2)}, x.options());
  int64_t offset = 0;
  for (int64_t g = 0; g < host_counts.size(0); ++g) {
    const int64_t group_rows = host_counts[g].item<int64_t>();
    HF_CHECK(group_rows >= 0 && offset + group_rows <= rows,
             "GroupedMatmul: group_counts ", host_counts.sizes(),
             " does not fit the ", rows, " rows of x (group ", g, " has ",
             group_rows, " rows at offset ", offset, ")");
    if (group_rows > 0) {
      at::Tensor group_out = out.narrow(0, offset, group_rows);
      at::matmul_out(group_out, x.narrow(0, offset, group_rows), weights[g]);
    }
    offset += group_rows;
  }
  if (offset < rows) {
    out.narrow(0, offset, rows - offset).zero_();
  }
  return {out};
}

// ---------------------------------------------------------------------------

MoeDispatchResult moeDispatch(TensorView* x, TensorView* topk_idx,
                              TensorView* topk_weights, int64_t num_experts,
                              MoeBackend backend, int64_t capacity) {
  HF_CHECK(x != nullptr && topk_idx != nullptr,
           "moeDispatch: x and topk_idx must not be null");
  HF_CHECK(x->rank() == 2, "moeDispatch: x ", x->toDeclString(),
           " must have rank 2 ([T, H]), got rank ", x->rank());
  // Known only when the program runs: rows received, L and R.
  Scalar* rows = makeSymbolicScalar(DataType::Int64);
  Scalar* local_experts = makeSymbolicScalar(DataType::Int64);
  Scalar* ranks = makeSymbolicScalar(DataType::Int64);
  MoeDispatchResult result;
  result.recv_x = makeTensor({rows, x->extent(1)}, x->dtype());
  result.recv_src_rank = makeTensor({rows}, DataType::Int64);
  result.recv_src_token = makeTensor({rows}, DataType::Int64);
  result.recv_src_k = makeTensor({rows}, DataType::Int64);
  if (topk_weights != nullptr) {
    result.recv_weights = makeTensor({rows}, topk_weights->dtype());
  }
  result.recv_expert_counts = makeTensor({local_experts}, DataType::Int64);
  result.n_tokens_to_rank = makeTensor({ranks}, DataType::Int64);
  result.n_tokens_from_rank = makeTensor({ranks}, DataType::Int64);
  IrBuilder::create<MoeDispatch>(
      result.recv_x, result.recv_src_rank, result.recv_src_token,
      result.recv_src_k, result.recv_weights, result.recv_expert_counts,
      result.n_tokens_to_rank, result.n_tokens_from_rank, x, topk_idx,
      topk_weights, num_experts, backend, capacity);
  return result;
}

TensorView* moeCombine(TensorView* expert_out, const MoeDispatchResult& layout,
                       TensorView* topk_weights, Scalar* num_tokens) {
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
  TensorView* combined =
      makeTensor({num_tokens, expert_out->extent(1)}, expert_out->dtype());
  IrBuilder::create<MoeCombine>(
      combined, expert_out, layout.recv_src_rank, layout.recv_src_token,
      layout.recv_src_k, layout.recv_expert_counts, layout.n_tokens_to_rank,
      layout.n_tokens_from_rank, topk_weights, num_tokens,
      dispatch->numExperts(), dispatch->backend());
  return combined;
}

TensorView* groupedMatmul(TensorView* x, TensorView* weights,
                          TensorView* group_counts) {
  HF_CHECK(x != nullptr && weights != nullptr && group_counts != nullptr,
           "groupedMatmul: an operand is null");
  HF_CHECK(x->rank() == 2, "groupedMatmul: x ", x->toDeclString(),
           " must have rank 2, got rank ", x->rank());
  HF_CHECK(weights->rank() == 3, "groupedMatmul: weights ",
           weights->toDeclString(), " must have rank 3 ([L, H, N]), got rank ",
           weights->rank());
  TensorView* out = makeTensor({x->extent(0), weights->extent(2)}, x->dtype());
  IrBuilder::create<GroupedMatmul>(out, x, weights, group_counts);
  return out;
}

HF_DEFINE_EXPR(MoeDispatch)
HF_DEFINE_EXPR(MoeCombine)
HF_DEFINE_EXPR(GroupedMatmul)

}  // namespace hostfuse
