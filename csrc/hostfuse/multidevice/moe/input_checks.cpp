#include <hostfuse/multidevice/moe/input_checks.h>

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/multidevice/moe/layout_id.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse::moe {

namespace {

int64_t rankOf(const at::Tensor& t) { return t.defined() ? t.dim() : -1; }

// 0-dim: the first index where `mask` [n] holds, n - 1 if none (so it can
// always index), for error details.
at::Tensor firstIndex(const at::Tensor& mask) {
  const int64_t n = mask.numel();
  return at::where(mask, at::arange(n, mask.options().dtype(at::kLong)), n)
      .min()
      .clamp_max(n - 1);
}

at::Tensor element(const at::Tensor& values, const at::Tensor& index) {
  return values.index_select(0, index.reshape({1})).reshape({});
}

// topk_weights is a 2-D tensor of a weight dtype on `device`; false (with
// the failure recorded) when it is not.
bool checkWeightsKind(HostStatus& status, const at::Tensor& w,
                      const at::Device& device) {
  if (rankOf(w) != 2) {
    status.fail(kStatusWeightsRank, rankOf(w));
  } else if (!isWeightDtype(w.scalar_type())) {
    status.fail(kStatusWeightsDtype, dtypeCode(w));
  } else if (w.device() != device) {
    status.fail(kStatusDevice, kArgTopkWeights);
  } else {
    return true;
  }
  return false;
}

at::Tensor codeOf(StatusCode code, const at::Tensor& like) {
  return at::full({}, static_cast<int64_t>(code), like.options());
}

}  // namespace

void HostStatus::fail(StatusCode code, int64_t d0, int64_t d1, int64_t d2,
                      int64_t d3) {
  if (!ok()) {
    return;
  }
  words_[0] = code;
  words_[1] = d0;
  words_[2] = d1;
  words_[3] = d2;
  words_[4] = d3;
}

at::Tensor HostStatus::toDevice(const at::Device& device) const {
  const at::Tensor words =
      at::tensor(at::ArrayRef<int64_t>(words_, kStatusWords), at::kLong);
  // From pageable memory, a non-blocking copy is staged before it returns,
  // so `words` may go away, and the device is not synchronized.
  return words.to(device, /*non_blocking=*/true);
}

void DeviceStatus::failIf(const at::Tensor& bad, const at::Tensor& code,
                          const at::Tensor& d0, const at::Tensor& d1,
                          const at::Tensor& d2, const at::Tensor& d3) {
  const at::Tensor candidate =
      at::stack({code, d0, d1, d2, d3.defined() ? d3 : at::zeros_like(d0)});
  const at::Tensor take = at::logical_and(words_[0] == kStatusOk, bad);
  words_ = at::where(take, candidate, words_);
}

bool isRowDtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble ||
         dtype == at::kBFloat16 || dtype == at::kHalf;
}

bool isWeightDtype(at::ScalarType dtype) {
  return isRowDtype(dtype) || c10::isFloat8Type(dtype);
}

HostStatus checkDispatchInputs(const at::Tensor& x, const at::Tensor& topk_idx,
                               const std::optional<at::Tensor>& topk_weights,
                               int64_t num_experts, int64_t world_size,
                               const at::Device& device,
                               MoeDispatchQuant quantize) {
  HostStatus status;
  if (rankOf(x) != 2) {
    status.fail(kStatusXRank, rankOf(x));
  } else if (!isRowDtype(x.scalar_type())) {
    status.fail(kStatusXDtype, dtypeCode(x));
  } else if (x.size(1) <= 0) {
    status.fail(kStatusXHidden, x.size(0), x.size(1));
  } else if (quantize == MoeDispatchQuant::Fp8E4M3 &&
             (x.size(1) % kFp8Block != 0 || x.scalar_type() == at::kDouble)) {
    status.fail(kStatusUnsupported, kLimitFp8, x.size(1), dtypeCode(x));
  }
  if (rankOf(topk_idx) != 2) {
    status.fail(kStatusIdxRank, rankOf(topk_idx));
  } else if (topk_idx.scalar_type() != at::kLong &&
             topk_idx.scalar_type() != at::kInt) {
    status.fail(kStatusIdxDtype, dtypeCode(topk_idx));
  } else if (topk_idx.device() != device) {
    status.fail(kStatusDevice, kArgTopkIdx);
  } else if (rankOf(x) == 2 && topk_idx.size(0) != x.size(0)) {
    status.fail(kStatusIdxTokens, topk_idx.size(0), x.size(0));
  } else if (topk_idx.size(1) <= 0) {
    status.fail(kStatusIdxPicks, topk_idx.size(1));
  }
  if (topk_weights.has_value()) {
    const at::Tensor& w = *topk_weights;
    if (checkWeightsKind(status, w, device) && rankOf(topk_idx) == 2 &&
        w.sizes() != topk_idx.sizes()) {
      status.fail(kStatusWeightsShape, w.size(0), w.size(1), topk_idx.size(0),
                  topk_idx.size(1));
    }
  }
  if (num_experts <= 0 || num_experts % world_size != 0) {
    status.fail(kStatusNumExperts, num_experts, world_size);
  }
  return status;
}
void checkExpertIds(DeviceStatus& status, const at::Tensor& idx,
                    int64_t num_experts) {
  const int64_t picks = idx.size(1);
  if (idx.numel() == 0) {
    return;
  }
  const at::Tensor out_of_range = at::logical_or(idx < -1, idx >= num_experts);
  // repeats[t, k]: pick k names a valid expert that an earlier pick j < k of
  // token t names too.
  const at::Tensor same = idx.unsqueeze(2) == idx.unsqueeze(1);  // [T, K, K]
  const at::Tensor earlier =
      at::ones({picks, picks}, idx.options().dtype(at::kBool)).tril(-1);
  const at::Tensor valid = at::logical_and(idx >= 0, idx < num_experts);
  const at::Tensor repeats =
      at::logical_and(at::logical_and(same, earlier).any(2), valid);
  const at::Tensor bad = at::logical_or(out_of_range, repeats).reshape({-1});
  const at::Tensor first = firstIndex(bad);
  const at::Tensor code = at::where(element(out_of_range.reshape({-1}), first),
                                    codeOf(kStatusBadExpertId, first),
                                    codeOf(kStatusDuplicateExpert, first));
  status.failIf(bad.any(), code, at::div(first, picks, "floor"),
                first.remainder(picks), element(idx.reshape({-1}), first));
}

HostStatus checkCombineInputs(const MoeCombineArgs& args, int64_t world_size,
                              const at::Device& device) {
  const at::Tensor& expert_out = args.expert_out;
  const MoeLayout& layout = args.layout;
  const std::optional<at::Tensor>& topk_weights = args.topk_weights;
  const int64_t num_tokens = args.num_tokens;
  const int64_t num_experts = args.num_experts;
  HostStatus status;
  const bool per_rank = args.reduce == MoeCombineReduce::PerRank;
  if (per_rank ? topk_weights.has_value() : args.recv_weights.has_value()) {
    status.fail(kStatusWeightsForMode, per_rank ? 1 : 0);
  }
  if (rankOf(expert_out) != 2) {
    status.fail(kStatusOutRank, rankOf(expert_out));
  } else if (!isRowDtype(expert_out.scalar_type())) {
    status.fail(kStatusOutDtype, dtypeCode(expert_out));
  } else if (expert_out.size(1) <= 0) {
    status.fail(kStatusOutHidden, expert_out.size(0), expert_out.size(1));
  }
  if (num_experts <= 0 || num_experts % world_size != 0) {
    status.fail(kStatusNumExperts, num_experts, world_size);
  }
  const int64_t rows = rankOf(expert_out) == 2 ? expert_out.size(0) : -1;
  const int64_t local_experts = num_experts > 0 ? num_experts / world_size : -1;
  const std::pair<TensorArg, const at::Tensor*> layout_args[] = {
      {kArgSrcRank, &layout.src_rank},
      {kArgSrcToken, &layout.src_token},
      {kArgSrcK, &layout.src_k},
      {kArgExpertCounts, &layout.expert_counts},
      {kArgTokensToRank, &layout.n_tokens_to_rank},
      {kArgTokensFromRank, &layout.n_tokens_from_rank},
      {kArgLayoutId, &layout.id}};
  for (const auto& [arg, tensor] : layout_args) {
    const auto code = static_cast<int64_t>(arg);
    if (rankOf(*tensor) != 1 || tensor->scalar_type() != at::kLong) {
      status.fail(kStatusLayoutTensor, code, rankOf(*tensor),
                  dtypeCode(*tensor));
      continue;
    }
    if (tensor->device() != device) {
      status.fail(kStatusDevice, code);
    }
    const int64_t expected =
        arg == kArgExpertCounts                                ? local_experts
        : arg == kArgTokensToRank || arg == kArgTokensFromRank ? world_size
        : arg == kArgLayoutId                                  ? world_size + 1
                                                               : rows;
    if (expected >= 0 && tensor->numel() != expected) {
      status.fail(kStatusLayoutLength, code, tensor->numel(), expected);
    }
  }
  if (num_tokens < 0) {
    status.fail(kStatusNumTokens, num_tokens);
  }
  if (topk_weights.has_value()) {
    const at::Tensor& w = *topk_weights;
    if (checkWeightsKind(status, w, device) && w.size(0) != num_tokens) {
      status.fail(kStatusWeightsTokens, w.size(0), num_tokens);
    }
  }
  if (args.recv_weights.has_value()) {
    const at::Tensor& w = *args.recv_weights;
    if (rankOf(w) != 1 || !isWeightDtype(w.scalar_type()) ||
        (rows >= 0 && w.size(0) != rows)) {
      status.fail(kStatusRecvWeights, rankOf(w), dtypeCode(w),
                  rankOf(w) == 1 ? w.size(0) : -1, rows);
    } else if (w.device() != device) {
      status.fail(kStatusDevice, kArgRecvWeights);
    }
  }
  return status;
}

// The layout's values agree with each other and with expert_out's rows.
at::Tensor checkLayoutValues(DeviceStatus& status, const MoeLayout& layout,
                             int64_t rows, int64_t world_size) {
  const at::Tensor zero = at::zeros({}, layout.src_rank.options());
  const at::Tensor rows_t = at::full({}, rows, layout.src_rank.options());
  const at::Tensor& counts = layout.expert_counts;
  if (counts.numel() > 0) {
    const at::Tensor bad = at::logical_or(counts.lt(0), counts.gt(rows));
    const at::Tensor expert = firstIndex(bad);
    status.failIf(bad.any(), codeOf(kStatusCountRange, zero), expert,
                  element(counts, expert), rows_t);
  }
  const at::Tensor counts_sum = counts.sum();
  status.failIf(counts_sum != rows, codeOf(kStatusCountsSum, zero), counts_sum,
                rows_t, zero);
  const at::Tensor from_sum = layout.n_tokens_from_rank.sum();
  status.failIf(from_sum != rows, codeOf(kStatusFromSum, zero), from_sum,
                rows_t, zero);
  const at::Tensor& src_rank = layout.src_rank;
  if (rows > 0) {
    const at::Tensor bad = at::logical_or(src_rank < 0, src_rank >= world_size);
    const at::Tensor row = firstIndex(bad);
    status.failIf(bad.any(), codeOf(kStatusSrcRankRange, zero), row,
                  element(src_rank, row), zero);
  }
  const at::Tensor per_rank =
      at::zeros({world_size}, src_rank.options())
          .index_add_(0, src_rank.clamp(0, world_size - 1),
                      at::ones_like(src_rank));
  const at::Tensor mismatch = per_rank != layout.n_tokens_from_rank;
  const at::Tensor rank = firstIndex(mismatch);
  status.failIf(mismatch.any(), codeOf(kStatusSrcRankCounts, zero), rank,
                element(per_rank, rank),
                element(layout.n_tokens_from_rank, rank));
  const at::Tensor expert = rowLocalExperts(layout);
  if (rows > 0) {
    const at::Tensor bad =
        at::logical_or(layout.src_token < 0, layout.src_k < 0);
    const at::Tensor row = firstIndex(bad);
    status.failIf(bad.any(), codeOf(kStatusProvenanceNegative, zero), row,
                  element(layout.src_token, row), element(layout.src_k, row));
    const at::Tensor repeated = firstRepeatedRow(layout);
    const at::Tensor at_row = repeated.clamp_max(rows - 1);
    status.failIf(repeated < rows, codeOf(kStatusProvenanceRepeated, zero),
                  at_row, element(src_rank, at_row),
                  element(layout.src_token, at_row),
                  element(layout.src_k, at_row));
    const at::Tensor unordered = firstUnorderedRow(layout, expert);
    const at::Tensor bad_row = unordered.clamp_max(rows - 1);
    status.failIf(unordered < rows, codeOf(kStatusLayoutOutOfOrder, zero),
                  bad_row, element(expert, bad_row), element(src_rank, bad_row),
                  element(layout.src_token, bad_row));
  }
  return expert;
}

at::Tensor rowLocalExperts(const MoeLayout& layout) {
  const at::Tensor ends = layout.expert_counts.cumsum(0);
  return at::searchsorted(
      ends, at::arange(layout.src_rank.numel(), layout.src_rank.options()),
      /*out_int32=*/false, /*right=*/true);
}

at::Tensor firstUnorderedRow(const MoeLayout& layout,
                             const at::Tensor& expert) {
  const int64_t rows = layout.src_rank.numel();
  const at::Tensor none = at::full({}, rows, layout.src_rank.options());
  if (rows < 2) {
    return none;
  }
  auto before = [&](const at::Tensor& t) { return t.narrow(0, 0, rows - 1); };
  auto after = [&](const at::Tensor& t) { return t.narrow(0, 1, rows - 1); };
  const at::Tensor& rank = layout.src_rank;
  const at::Tensor& token = layout.src_token;
  const at::Tensor follows =
      at::logical_or(after(rank) > before(rank),
                     at::logical_and(after(rank) == before(rank),
                                     after(token) > before(token)));
  const at::Tensor bad =
      at::logical_and(after(expert) == before(expert), follows.logical_not());
  return at::where(bad, at::arange(1, rows, none.options()), none).min();
}

void addFingerprints(at::Tensor& fingerprints, const at::Tensor& rank,
                     const at::Tensor& expert, const at::Tensor& token,
                     const at::Tensor& pick) {
  HF_ERROR(fingerprints.is_cpu() && fingerprints.is_contiguous(),
           "fingerprints are summed on the host");
  const at::Tensor columns[] = {
      rank.to(at::kLong).contiguous(), expert.to(at::kLong).contiguous(),
      token.to(at::kLong).contiguous(), pick.to(at::kLong).contiguous()};
  const int64_t* r = columns[0].const_data_ptr<int64_t>();
  const int64_t* e = columns[1].const_data_ptr<int64_t>();
  const int64_t* t = columns[2].const_data_ptr<int64_t>();
  const int64_t* k = columns[3].const_data_ptr<int64_t>();
  const int64_t world_size = fingerprints.numel();
  int64_t* sums = fingerprints.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < columns[0].numel(); ++i) {
    if (r[i] >= 0 && r[i] < world_size) {
      sums[r[i]] += layoutRowHash(e[i], t[i], k[i]);
    }
  }
}

at::Tensor newLayoutId(int64_t call, int64_t world_size,
                       const at::Device& device) {
  std::vector<int64_t> words(world_size + 1, 0);
  words[kLayoutIdCallWord] = call;
  // From pageable memory a non-blocking copy is staged before it returns.
  return at::tensor(words, at::kLong).to(device, /*non_blocking=*/true);
}

at::Tensor firstRepeatedRow(const MoeLayout& layout) {
  const int64_t rows = layout.src_rank.numel();
  const at::Tensor none = at::full({}, rows, layout.src_rank.options());
  if (rows < 2) {
    return none;
  }
  // Rows in (rank, token, pick) order, each key's rows in row order (the
  // sorts are stable): a row equal to the one before it in this order
  // repeats an earlier row, and the first such row is the smallest of
  // those.
  at::Tensor order = at::arange(rows, layout.src_rank.options());
  for (const at::Tensor* key :
       {&layout.src_k, &layout.src_token, &layout.src_rank}) {
    order = order.index_select(
        0, std::get<1>(at::sort(key->index_select(0, order), /*stable=*/true, 0,
                                /*descending=*/false)));
  }
  at::Tensor same = at::ones({rows - 1}, order.options().dtype(at::kBool));
  for (const at::Tensor* key :
       {&layout.src_rank, &layout.src_token, &layout.src_k}) {
    const at::Tensor sorted = key->index_select(0, order);
    same.logical_and_(sorted.narrow(0, 1, rows - 1) ==
                      sorted.narrow(0, 0, rows - 1));
  }
  return at::where(same, order.narrow(0, 1, rows - 1), none).min();
}

int64_t dtypeCode(const at::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.scalar_type()) : -1;
}

at::Tensor headerWords(int64_t num_experts, int64_t hidden, int64_t dtype,
                       int64_t weights_dtype, int64_t tokens, int64_t picks) {
  return at::tensor({num_experts, hidden, dtype, weights_dtype, tokens, picks},
                    at::kLong);
}

void checkDispatchTable(const at::Tensor& table, const char* backend) {
  throwIfAnyStatusBad(table, "MoeDispatch", backend, kNumExpertsWord);
  checkAgreed(table, kNumExpertsWord, "MoeDispatch", "num_experts", false);
  checkAgreed(table, kHiddenWord, "MoeDispatch", "the hidden size H of x",
              false);
  checkAgreed(table, kDtypeWord, "MoeDispatch", "the dtype of x", true);
  checkAgreed(table, kPicksWord, "MoeDispatch", "K (the columns of topk_idx)",
              false);
  checkAgreed(table, kWeightsDtypeWord, "MoeDispatch",
              "topk_weights (given or not, and its dtype)", true);
}

void throwIfAnyStatusBad(const at::Tensor& table, const char* op,
                         const char* backend, int64_t num_experts_word) {
  const int64_t world_size = table.size(0);
  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  std::vector<int64_t> bad_ranks;
  for (int64_t r = 0; r < world_size; ++r) {
    if (words[r * width] != kStatusOk) {
      bad_ranks.push_back(r);
    }
  }
  if (bad_ranks.empty()) {
    return;
  }
  const int64_t* first = words + bad_ranks[0] * width;
  StatusContext context;
  context.op = op;
  context.backend = backend;
  context.rank = bad_ranks[0];
  context.world_size = world_size;
  context.num_experts = first[num_experts_word];
  context.bad_ranks = bad_ranks;
  HF_THROW(describeStatus(context, first));
}

void checkAgreed(const at::Tensor& table, int64_t word, const char* op,
                 const char* what, bool is_dtype) {
  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  auto text = [&](int64_t value) {
    return is_dtype ? describeDtype(value) : std::to_string(value);
  };
  for (int64_t r = 1; r < table.size(0); ++r) {
    const int64_t theirs = words[r * width + word];
    const int64_t first = words[word];
    HF_CHECK(theirs == first, op, ": ", what,
             " must be the same on every rank, but it is ", text(first),
             " on rank 0 and ", text(theirs), " on rank ", r);
  }
}

}  // namespace hostfuse::moe
