#include <hostfuse/multidevice/moe/status.h>

#include <c10/core/ScalarType.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

namespace hostfuse::moe {

namespace {

std::string argName(int64_t code) {
  if (code < kArgSrcRank || code > kArgRecvWeights) {
    return "a tensor";
  }
  return toString(static_cast<TensorArg>(code));
}

// What a backend cannot do (kStatusUnsupported): d0 the limit, d1, d2.
std::string describeUnsupported(const char* backend, int64_t d0, int64_t d1,
                                int64_t d2) {
  switch (static_cast<BackendLimit>(d0)) {
    case kLimitRowDtype:
      return fmt::format(
          "rows of {} are not supported by backend={} (docs/moe.md, \"What "
          "each backend accepts\")",
          describeDtype(d1), backend);
    case kLimitNumExperts:
      return fmt::format(
          "num_experts = {} is more than backend={} supports ({})", d1, backend,
          d2);
    case kLimitTopK:
      return fmt::format(
          "K = {} picks per token is more than backend={} supports ({})", d1,
          backend, d2);
    case kLimitWorldSize:
      return fmt::format("{} ranks are more than backend={} supports ({})", d1,
                         backend, d2);
    case kLimitNotOnDevice:
      return fmt::format(
          "{} is on {}, but backend={} needs it on that rank's own GPU (its "
          "communicator's device)",
          argName(d1),
          d2 < 0 ? std::string("the CPU") : fmt::format("cuda:{}", d2),
          backend);
    case kLimitFp8:
      return fmt::format(
          "quantize=fp8_e4m3 needs x of Float, BFloat16 or Half with H a "
          "multiple of 128 (one scale per 128 channels); got H = {} and {}",
          d1, describeDtype(d2));
  }
  return fmt::format("unsupported input (limit {})", d0);
}

// The text after "bad input on rank r of R: " for MoeDispatch's inputs, or
// "" when `w` is not one of them.
std::string describeDispatchInput(const StatusContext& c, const int64_t* w) {
  const int64_t d0 = w[1];
  const int64_t d1 = w[2];
  const int64_t d2 = w[3];
  const int64_t d3 = w[4];
  switch (static_cast<StatusCode>(w[0])) {
    case kStatusXRank:
      return fmt::format("x must be a 2-D tensor [T, H], got rank {}", d0);
    case kStatusXDtype:
      return fmt::format("x must be Float, Double, BFloat16 or Half, got {}",
                         describeDtype(d0));
    case kStatusXHidden:
      return fmt::format("x has shape [{}, {}]; H, its columns, must be > 0",
                         d0, d1);
    case kStatusIdxRank:
      return fmt::format("topk_idx must be a 2-D tensor [T, K], got rank {}",
                         d0);
    case kStatusIdxDtype:
      return fmt::format("topk_idx must be Long (i64) or Int (i32), got {}",
                         describeDtype(d0));
    case kStatusIdxTokens:
      return fmt::format(
          "topk_idx has {} rows but x has {} tokens; they must match", d0, d1);
    case kStatusIdxPicks:
      return fmt::format("topk_idx has K = {} columns; K must be > 0", d0);
    case kStatusWeightsRank:
      return fmt::format(
          "topk_weights must be a 2-D tensor [T, K], got rank {}", d0);
    case kStatusWeightsDtype:
      return fmt::format(
          "topk_weights must be Float, Double, BFloat16, Half or a Float8 "
          "type, got {}",
          describeDtype(d0));
    case kStatusWeightsShape:
      return fmt::format(
          "topk_weights has shape [{}, {}] but topk_idx has shape [{}, {}]; "
          "they must match",
          d0, d1, d2, d3);
    case kStatusDevice:
      return fmt::format(
          "{} is on another device than {}; all tensors of one call must be "
          "on one device",
          argName(d0), std::string(c.op) == "MoeDispatch" ? "x" : "expert_out");
    case kStatusNumExperts:
      return fmt::format(
          "num_experts ({}) must be a positive multiple of the world size "
          "({})",
          d0, d1);
    case kStatusUnsupported:
      return describeUnsupported(c.backend, d0, d1, d2);
    case kStatusBadExpertId:
      return fmt::format(
          "topk_idx holds expert id {} at token {}, pick {}, which is out of "
          "range: expert ids must be in [0, num_experts = {}) or -1 (a "
          "masked pick)",
          d2, d0, d1, c.num_experts);
    case kStatusDuplicateExpert:
      return fmt::format(
          "topk_idx names expert {} twice in token {} (pick {} repeats an "
          "earlier pick); the picks of a token must name distinct experts",
          d2, d0, d1);
    default:
      return "";
  }
}

// The same for MoeCombine's inputs.
std::string describeCombineInput(const StatusContext& c, const int64_t* w) {
  const int64_t d0 = w[1];
  const int64_t d1 = w[2];
  const int64_t d2 = w[3];
  const int64_t d3 = w[4];
  switch (static_cast<StatusCode>(w[0])) {
    case kStatusOutRank:
      return fmt::format(
          "expert_out must be a 2-D tensor [rows, H], got rank {}", d0);
    case kStatusOutDtype:
      return fmt::format(
          "expert_out must be Float, Double, BFloat16 or Half, got {}",
          describeDtype(d0));
    case kStatusOutHidden:
      return fmt::format(
          "expert_out has shape [{}, {}]; H', its columns, must be > 0", d0,
          d1);
    case kStatusLayoutTensor:
      return fmt::format(
          "{} must be a 1-D Long (i64) tensor, got rank {} of {}", argName(d0),
          d1, describeDtype(d2));
    case kStatusLayoutLength: {
      const char* expected =
          d0 == kArgExpertCounts ? "must have num_experts / world size ="
          : d0 == kArgTokensToRank || d0 == kArgTokensFromRank
              ? "must have world size ="
          : d0 == kArgLayoutId ? "must have world size + 1 ="
                               : "expert_out has";
      return fmt::format(
          "{} has {} entries but {} {}{}; the rows do not match their "
          "dispatch",
          argName(d0), d1, expected, d2, d0 <= kArgSrcK ? " rows" : "");
    }
    case kStatusWeightsTokens:
      return fmt::format(
          "topk_weights has {} rows but num_tokens is {}; they must match", d0,
          d1);
    case kStatusNumTokens:
      return fmt::format("num_tokens must be >= 0, got {}", d0);
    case kStatusRecvWeights:
      return fmt::format(
          "with reduce=per_rank, recv_weights must be a 1-D floating tensor "
          "with one weight per row of expert_out ({} rows), as dispatch "
          "returned it; got rank {} of {} with {} entries",
          d3, d0, describeDtype(d1), d2);
    case kStatusWeightsForMode:
      return d0 == 1 ? std::string(
                           "with reduce=per_rank the weights are recv_weights "
                           "(dispatch's, on the experts' ranks), not "
                           "topk_weights")
                     : std::string(
                           "with reduce=per_pick the weights are topk_weights, "
                           "not recv_weights");
    case kStatusCombineModes:
      return fmt::format(
          "this rank combines with reduce={} but rank {} with reduce={}; "
          "every rank must use the same mode in a combine",
          d0 == 1 ? "per_rank" : "per_pick", d2,
          d1 == 1 ? "per_rank" : "per_pick");
    case kStatusCountRange:
      return fmt::format(
          "recv_expert_counts holds {} for local expert {}; a count is in "
          "[0, {}], the rows of expert_out",
          d1, d0, d2);
    case kStatusCountsSum:
      return fmt::format(
          "recv_expert_counts sums to {} but expert_out has {} rows; the rows "
          "do not match their dispatch",
          d0, d1);
    case kStatusFromSum:
      return fmt::format(
          "n_tokens_from_rank sums to {} but expert_out has {} rows; the rows "
          "do not match their dispatch",
          d0, d1);
    case kStatusSrcRankRange:
      return fmt::format(
          "recv_src_rank holds rank {} at row {}; ranks are in "
          "[0, {})",
          d1, d0, c.world_size);
    case kStatusSrcRankCounts:
      return fmt::format(
          "recv_src_rank has {} rows from rank {} but n_tokens_from_rank[{}] "
          "is {}; the rows do not match their dispatch",
          d1, d0, d0, d2);
    case kStatusProvenanceNegative:
      return fmt::format(
          "recv_src_token or recv_src_k is negative at row {} (token {}, pick "
          "{})",
          d0, d1, d2);
    case kStatusProvenanceRepeated:
      return fmt::format(
          "row {} of the layout names rank {}, token {}, pick {} "
          "(recv_src_rank, recv_src_token, recv_src_k) like an earlier row; "
          "a (rank, token, pick) comes back at most once, so the rows do not "
          "match their dispatch",
          d0, d1, d2, d3);
    case kStatusLayoutOutOfOrder:
      return fmt::format(
          "row {} of the layout (local expert {}, rank {}, token {}) does not "
          "come after the row before it; inside an expert the rows are "
          "ordered by source rank, then source token (recv_src_rank, "
          "recv_src_token), so the rows do not match their dispatch",
          d0, d1, d2, d3);
    case kStatusStaleLayout:
      return fmt::format(
          "the layout (recv_layout_id) is the one of dispatch #{} of this "
          "MoeDispatch site, but its latest dispatch is #{}; combine takes "
          "the layout of the latest dispatch (a dispatch captured in a CUDA "
          "graph writes its outputs only when the graph replays)",
          d0, d1);
    default:
      return "";
  }
}

// The text after "bad input on rank r of R: " for input errors.
std::string describeInput(const StatusContext& c, const int64_t* w) {
  std::string text = describeDispatchInput(c, w);
  if (text.empty()) {
    text = describeCombineInput(c, w);
  }
  return text.empty() ? fmt::format("unknown status {}", w[0]) : text;
}

std::string badRanksSuffix(const StatusContext& c) {
  if (c.bad_ranks.size() < 2) {
    return "";
  }
  return fmt::format(" (bad input on ranks {})", fmt::join(c.bad_ranks, " "));
}

}  // namespace

std::string describeDtype(int64_t code) {
  if (code == -1) {
    return "not given";
  }
  if (code < 0 || code >= static_cast<int64_t>(c10::ScalarType::NumOptions)) {
    return "an unknown dtype";
  }
  return c10::toString(static_cast<c10::ScalarType>(code));
}

const char* toString(TensorArg arg) {
  switch (arg) {
    case kArgSrcRank:
      return "recv_src_rank";
    case kArgSrcToken:
      return "recv_src_token";
    case kArgSrcK:
      return "recv_src_k";
    case kArgExpertCounts:
      return "recv_expert_counts";
    case kArgTokensToRank:
      return "n_tokens_to_rank";
    case kArgTokensFromRank:
      return "n_tokens_from_rank";
    case kArgTopkIdx:
      return "topk_idx";
    case kArgTopkWeights:
      return "topk_weights";
    case kArgX:
      return "x";
    case kArgExpertOut:
      return "expert_out";
    case kArgLayoutId:
      return "recv_layout_id";
    case kArgRecvWeights:
      return "recv_weights";
  }
  return "a tensor";
}

const char* toString(WaitPurpose purpose) {
  switch (purpose) {
    case kWaitCounts:
      return "count row";
    case kWaitDispatchData:
      return "dispatched rows";
    case kWaitCombineData:
      return "rows of our tokens in the combine";
    case kWaitCombineFree:
      return "end of its previous combine";
    case kWaitGrid:
      return "this GPU's other blocks (grid barrier)";
  }
  return "signal";
}

std::string describeStatus(const StatusContext& c, const int64_t* w) {
  switch (static_cast<StatusCode>(w[0])) {
    case kStatusOk:
      return fmt::format("{}: no error", c.op);
    case kStatusCapacityOverflow:
      return fmt::format(
          "{}: capacity overflow: rank {} of {} receives {} rows but the "
          "capacity is {} rows; build the MoeDispatch with capacity >= {} (0 "
          "selects the worst case R x max(T_max, 1) x min(K, L)). Rows past "
          "the "
          "capacity were dropped; nothing was written out of bounds",
          c.op, c.rank, c.world_size, w[1], w[2], w[1]);
    case kStatusBadCountRow: {
      // w[3] is T_max, or -1 for a token count that disagrees with the
      // same row's expert counts (staged push).
      const std::string what =
          w[1] == -1 ? std::string("its token count")
          : w[1] < -1
              ? fmt::format("its count of tokens for rank {}", -2 - w[1])
              : fmt::format("the rows of expert {}", w[1]);
      const std::string why =
          w[3] < 0 ? std::string(
                         "which disagrees with its counts of that "
                         "rank's experts")
                   : fmt::format("outside [0, {}] (T_max)", w[3]);
      return fmt::format(
          "{}: rank {} of {} wrote {} = {} into its count row, {}; the ranks' "
          "workspaces do not match (a different build or configuration on "
          "that rank?) or its memory was overwritten. Nothing was read past "
          "the bound",
          c.op, c.rank, c.world_size, what, w[2], why);
    }
    case kStatusTimeout:
      return fmt::format(
          "{}: rank {} of {} did not answer within {} s (waiting for its {}, "
          "call {}). Did rank {} skip this call, fail or hang? "
          "HOSTFUSE_MOE_TIMEOUT_S sets the timeout. The workspace is unusable "
          "now; recreate it on every rank",
          c.op, c.rank, c.world_size, c.timeout_s,
          toString(static_cast<WaitPurpose>(w[1])), w[2], c.rank);
    case kStatusPoisoned:
      return fmt::format(
          "{}: the workspace is unusable after an earlier failure", c.op);
    case kStatusPeerFailed:
      return fmt::format(
          "{}: rank {} of {} {} and told every rank; this rank stopped {}. "
          "The workspace is unusable now; recreate it on every rank (a new "
          "HostIrEvaluator; from Python, hostfuse.moe.release())",
          c.op, c.rank, c.world_size,
          w[2] == kFailedTimeout
              ? fmt::format("timed out waiting for rank {}'s {}", w[3],
                            toString(static_cast<WaitPurpose>(w[4])))
          : w[2] == kFailedStaleLayout
              ? std::string("was given a stale layout in its combine (its "
                            "own error says which)")
          : w[2] == kFailedCombineModes
              ? std::string("combined in another mode (reduce=) than a peer "
                            "(its own error says which)")
              : std::string("raised an error on its host (its own error "
                            "says why)"),
          w[1] == 0 ? std::string("at the start of the call")
                    : fmt::format("in its wait for the {}",
                                  toString(static_cast<WaitPurpose>(w[1]))));
    case kStatusInternal:
      return fmt::format(
          "{}: internal error on rank {} of {} (detail {}, {}, {}); please "
          "report it",
          c.op, c.rank, c.world_size, w[1], w[2], w[3]);
    default:
      return fmt::format("{}: bad input on rank {} of {}: {}{}", c.op, c.rank,
                         c.world_size, describeInput(c, w), badRanksSuffix(c));
  }
}

}  // namespace hostfuse::moe
