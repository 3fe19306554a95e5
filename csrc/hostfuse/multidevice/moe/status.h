// The one status vocabulary of MoE dispatch and combine, shared by both
// backends and by the cuda backend's kernels (this header compiles in host
// and device code and includes neither torch nor the CUDA runtime).
//
// A status is kStatusWords int64 words: a StatusCode, then four details
// whose meaning the code's comment gives. The collective backend exchanges
// them with the row counts; the cuda backend's kernels put the same codes
// into their count rows and their status record. describeStatus() is the
// one function that turns a status into a message, so the same bad input
// gives the same text on both backends.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hostfuse::moe {

enum StatusCode : int32_t {
  kStatusOk = 0,
  // MoeDispatch inputs, checked on the host (from shapes and dtypes).
  kStatusXRank,         // d0: the rank (number of dims) of x
  kStatusXDtype,        // d0: x's dtype (at::ScalarType)
  kStatusXHidden,       // d0, d1: x's sizes T, H (H <= 0)
  kStatusIdxRank,       // d0: the rank of topk_idx
  kStatusIdxDtype,      // d0: topk_idx's dtype
  kStatusIdxTokens,     // d0: rows of topk_idx, d1: tokens of x
  kStatusIdxPicks,      // d0: K, the columns of topk_idx
  kStatusWeightsRank,   // d0: the rank of topk_weights
  kStatusWeightsDtype,  // d0: topk_weights' dtype
  kStatusWeightsShape,  // d0, d1: topk_weights' sizes; d2, d3: topk_idx's
  kStatusDevice,        // d0: the TensorArg on another device
  kStatusNumExperts,    // d0: E, d1: R
  kStatusUnsupported,   // d0: the BackendLimit, d1: the value, d2: the limit
  // MoeDispatch inputs, checked from values (on the device). Both backends
  // report the first bad (token, pick) in row-major order.
  kStatusBadExpertId,      // d0: token, d1: pick, d2: the id
  kStatusDuplicateExpert,  // d0: token, d1: pick, d2: the expert
  // MoeCombine inputs, checked on the host.
  kStatusOutRank,        // d0: the rank of expert_out
  kStatusOutDtype,       // d0: expert_out's dtype
  kStatusOutHidden,      // d0, d1: expert_out's sizes rows, H' (H' <= 0)
  kStatusLayoutTensor,   // d0: TensorArg, d1: its rank, d2: its dtype
  kStatusLayoutLength,   // d0: TensorArg, d1: its length, d2: the expected
  kStatusWeightsTokens,  // d0: rows of topk_weights, d1: num_tokens
  kStatusNumTokens,      // d0: num_tokens
  // reduce=per_rank: d0 the rank of recv_weights, d1 its dtype, d2 its
  // length, d3 the rows of expert_out
  kStatusRecvWeights,
  // d0: the combine mode (MoeCombineReduce) given weights of the other
  // mode (topk_weights with per_rank, recv_weights with per_pick)
  kStatusWeightsForMode,
  // d0: this rank's combine mode (MoeCombineReduce), d1: the mode of peer
  // d2, which differs
  kStatusCombineModes,
  // MoeCombine inputs, checked from values.
  kStatusCountRange,          // d0: local expert, d1: its count, d2: rows
  kStatusCountsSum,           // d0: sum(recv_expert_counts), d1: rows
  kStatusFromSum,             // d0: sum(n_tokens_from_rank), d1: rows
  kStatusSrcRankRange,        // d0: row, d1: its recv_src_rank
  kStatusSrcRankCounts,       // d0: rank, d1: its rows, d2: n_tokens_from
  kStatusProvenanceNegative,  // d0: row, d1: its token, d2: its pick
  // d0: row, d1: its rank, d2: its token, d3: its pick, which an earlier
  // row names too
  kStatusProvenanceRepeated,
  // d0: row, d1: its local expert, d2: its rank, d3: its token, which do
  // not come after the row before it in that expert's segment (by source
  // rank, then source token)
  kStatusLayoutOutOfOrder,
  // Found by the cuda backend's kernels while they run.
  kStatusCapacityOverflow,  // rank: the receiver; d0: its rows, d1: C
  // rank: the peer whose count row is out of bounds; d0: the expert (-1:
  // the peer's token count), d1: the value, d2: the bound (T_max)
  kStatusBadCountRow,
  // rank: the rank given the layout; d0: the dispatch epoch in the layout's
  // id, d1: the epoch of the site's last dispatch
  kStatusStaleLayout,
  kStatusTimeout,   // rank: the peer; d0: WaitPurpose, d1: the call's epoch
  kStatusPoisoned,  // an earlier timeout left the protocol unusable
  // rank: a peer that failed and told us (cuda backend); d0: the
  // WaitPurpose of our wait it stopped (0: at the start of the call), d1:
  // the peer's FailureReason, d2: the rank it waited for in vain (-1:
  // none), d3: the WaitPurpose of that wait
  kStatusPeerFailed,
  kStatusInternal,  // d0..d2: detail
};

constexpr int kStatusWords = 5;

// The tensor a status is about (kStatusDevice, kStatusLayoutTensor,
// kStatusLayoutLength).
enum TensorArg : int32_t {
  kArgSrcRank,
  kArgSrcToken,
  kArgSrcK,
  kArgExpertCounts,
  kArgTokensToRank,
  kArgTokensFromRank,
  kArgTopkIdx,
  kArgTopkWeights,
  kArgX,
  kArgExpertOut,
  kArgLayoutId,
  kArgRecvWeights,
};

// What a backend cannot do (kStatusUnsupported).
enum BackendLimit : int32_t {
  kLimitRowDtype,     // d1: the dtype; the backend does not move it
  kLimitNumExperts,   // d1: E, d2: the largest E
  kLimitTopK,         // d1: K, d2: the largest K
  kLimitWorldSize,    // d1: R, d2: the largest R
  kLimitNotOnDevice,  // d1: kArgX, d2: its GPU's index (-1: on the host);
                      // the backend needs the rank's own GPU
  // fp8 dispatch: d1 H (a multiple of 128 needed), d2 x's dtype (Float,
  // BFloat16 or Half needed)
  kLimitFp8,
};

// What a timed-out wait of the cuda kernels was polling (kStatusTimeout).
enum WaitPurpose : int32_t {
  kWaitCounts = 1,        // dispatch: the peer's count row
  kWaitDispatchData = 2,  // dispatch: a row the peer sends us
  kWaitCombineData = 3,   // combine: the peer's rows of one of our tokens
  kWaitCombineFree = 4,   // combine: the peer's slots free again
  kWaitGrid = 5,  // this GPU's other blocks at a grid barrier (rank: ours)
};

// Why a rank published a failure to its peers (kStatusPeerFailed).
enum FailureReason : int32_t {
  kFailedTimeout = 1,       // a wait of its kernels timed out
  kFailedOnHost = 2,        // its host raised an error (inputs refused, or an
                            // error outside MoE in a program that uses it)
  kFailedStaleLayout = 3,   // its combine was given a stale layout
  kFailedCombineModes = 4,  // a peer combined in another mode than it
};

// Everything describeStatus needs besides the words.
struct StatusContext {
  const char* op = "";       // "MoeDispatch" or "MoeCombine"
  const char* backend = "";  // its name, for kStatusUnsupported
  // The rank the status is about (the rank with bad input, the receiver
  // that overflows, the peer that timed out), and the world size.
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t num_experts = 0;  // E as that rank gave it
  // Every rank whose input is bad, when several are (else empty).
  std::vector<int64_t> bad_ranks;
  // The cuda backend's timeout, for kStatusTimeout.
  double timeout_s = 0;
};

// The message of `words` (kStatusWords of them). Input errors read
// "<op>: bad input on rank <r> of <R>: <argument, index, value>".
std::string describeStatus(const StatusContext& context, const int64_t* words);

// Names for messages: a dtype by its at::ScalarType code ("BFloat16"; "not
// given" for -1, an absent tensor; "an unknown dtype" for another code that
// is none), a tensor, a wait.
std::string describeDtype(int64_t code);
const char* toString(TensorArg arg);
const char* toString(WaitPurpose purpose);

}  // namespace hostfuse::moe
