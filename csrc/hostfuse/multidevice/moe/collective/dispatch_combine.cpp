#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <array>
#include <exception>
#include <iterator>
#include <limits>
#include <sstream>
#include <vector>

#include <hostfuse/multidevice/moe/collective/kernels/collective_kernels.h>
#include <hostfuse/multidevice/moe/fp8_packing.h>
#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/multidevice/moe/layout_id.h>
#include <hostfuse/multidevice/moe/status.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

namespace {

namespace collective = moe::collective;
using moe::DeviceStatus;
using moe::HostStatus;
using moe::kStatusWords;

using moe::dtypeCode;
using moe::kDtypeWord;
using moe::kHeaderWords;
using moe::kHiddenWord;
using moe::kNumExpertsWord;
using moe::kPicksWord;
using moe::kTokensWord;

constexpr int64_t kNoDtype = -1;
// Every table row starts with the status and header words of
// input_checks.h, then the op and the number of the call among this
// communicator's collective MoE calls: ranks whose calls do not pair up
// (one calls combine where the others dispatch, or skipped a dispatch) find
// out from the table, before any payload moves. Both ops' tables have the
// same width, so such a pair of calls exchanges tables of one size. A rank
// that failed before a call sends a row whose op is kCallFailed instead
// (publishCollectiveFailure).
enum CallWord : int64_t { kOpWord = kHeaderWords, kCallWord, kCallHeaderWords };
// The op word names the call's mode too (a combine's reduce, a dispatch's
// quantize), so that ranks in different modes find out before any row
// moves.
enum CallOp : int64_t {
  kCallDispatch = 1,  // quantize=none
  kCallCombine = 2,   // reduce=per_pick
  kCallFailed = 3,
  kCallCombinePerRank = 4,
  kCallDispatchFp8 = 5,
};

bool isCombine(int64_t op) {
  return op == kCallCombine || op == kCallCombinePerRank;
}

bool isDispatch(int64_t op) {
  return op == kCallDispatch || op == kCallDispatchFp8;
}
static_assert(collective::kTableHeaderWords == kCallHeaderWords);

using collective::tableWidth;

const char* opName(int64_t op) {
  return isDispatch(op)  ? "MoeDispatch"
         : isCombine(op) ? "MoeCombine"
                         : "an unknown op";
}

// Throws, with the same text on every rank, if a rank failed before this
// call (it sent kCallFailed rows), or unless every rank makes the same op
// with the same call number.
void checkCallsMatch(const at::Tensor& table) {
  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  std::vector<int64_t> failed;
  for (int64_t r = 0; r < table.size(0); ++r) {
    if (words[r * width + kOpWord] == kCallFailed) {
      failed.push_back(r);
    }
  }
  if (!failed.empty()) {
    const int64_t first = failed.front();
    HF_THROW(failed.size() == 1 ? "rank " : "ranks ",
             fmt::format("{}", fmt::join(failed, ", ")), " of ", table.size(0),
             failed.size() == 1 ? " failed" : " failed each",
             " outside a MoE call, before collective MoE call #",
             words[first * width + kCallWord],
             " of the communicator (an error of its own, raised there); "
             "every rank abandons this call");
  }
  for (int64_t r = 1; r < table.size(0); ++r) {
    const int64_t* theirs = words + r * width;
    if (theirs[kOpWord] == words[kOpWord] &&
        theirs[kCallWord] == words[kCallWord]) {
      continue;
    }
    if (isCombine(theirs[kOpWord]) && isCombine(words[kOpWord]) &&
        theirs[kCallWord] == words[kCallWord]) {
      auto mode = [](int64_t op) {
        return toString(op == kCallCombinePerRank ? MoeCombineReduce::PerRank
                                                  : MoeCombineReduce::PerPick);
      };
      HF_THROW("MoeCombine: rank 0 combines with reduce=", mode(words[kOpWord]),
               " but rank ", r, " with reduce=", mode(theirs[kOpWord]),
               "; every rank must use the same mode in a combine");
    }
    if (isDispatch(theirs[kOpWord]) && isDispatch(words[kOpWord]) &&
        theirs[kCallWord] == words[kCallWord]) {
      auto mode = [](int64_t op) {
        return toString(op == kCallDispatchFp8 ? MoeDispatchQuant::Fp8E4M3
                                               : MoeDispatchQuant::None);
      };
      HF_THROW(
          "MoeDispatch: rank 0 dispatches with quantize=", mode(words[kOpWord]),
          " but rank ", r, " with quantize=", mode(theirs[kOpWord]),
          "; every rank must send its rows the same way");
    }
    HF_THROW("the ranks' MoE calls do not pair up: rank 0 called ",
             opName(words[kOpWord]), " (collective MoE call #",
             words[kCallWord], " of its communicator) while rank ", r,
             " called ", opName(theirs[kOpWord]), " (#", theirs[kCallWord],
             "); every rank must make the same MoE calls in the same order. "
             "Did a rank skip a call, or stop at an error before it?");
  }
}

// alltoall_base and its wait, on the communicator's backend for the
// tensors' device. With NCCL, wait() only orders the current stream after
// the collective; with Gloo it blocks until the data is here. A failure (a
// peer died, or stayed silent past the timeout) goes through
// Communicator::failure, which names the ranks that are gone and leaves the
// communicator failed.
void allToAll(Communicator& communicator, at::Tensor& output, at::Tensor& input,
              std::vector<int64_t> output_splits,
              std::vector<int64_t> input_splits, const char* op) {
  c10d::Backend& backend = communicator.backend(input.device().type());
  communicator.runOrFail(
      [&] {
        backend.alltoall_base(output, input, output_splits, input_splits)
            ->wait();
      },
      std::string(op) +
          ": the all-to-all with the other ranks failed (did a rank die, "
          "time out, or call another collective?): ");
}

// The rows of `input` [N, W] to the ranks `send_splits` says, and `rows`
// rows from the ranks as `recv_splits` says, in a new tensor. With one rank
// nothing moves: `input` itself is the result.
at::Tensor exchangeRows(Communicator& communicator, const at::Tensor& input,
                        int64_t rows, const std::vector<int64_t>& recv_splits,
                        const std::vector<int64_t>& send_splits,
                        const char* op) {
  if (send_splits.size() == 1) {
    return input;
  }
  at::Tensor output = at::empty({rows, input.size(1)}, input.options());
  at::Tensor sent = input;
  allToAll(communicator, output, sent, recv_splits, send_splits, op);
  return output;
}

// Sends row r of `send` [R, W] to rank r. Returns [R, W] on the device: row
// i is what rank i sent (with one rank, `send` itself).
at::Tensor exchangeTable(Communicator& communicator, at::Tensor send,
                         const char* op) {
  if (send.size(0) == 1) {
    return send;  // one rank: its own row
  }
  at::Tensor recv = at::empty_like(send);
  const std::vector<int64_t> ones(send.size(0), 1);
  allToAll(communicator, recv, send, ones, ones, op);
  return recv;
}

// The header of a rank-table row: the status words, then E, H, dtype,
// weights dtype, T, K, the op and the call number.
using TableHeader = std::array<int64_t, kCallHeaderWords>;

TableHeader tableHeader(const HostStatus& status, int64_t num_experts,
                        int64_t hidden, int64_t dtype, int64_t weights_dtype,
                        int64_t tokens, int64_t picks, CallOp op,
                        int64_t call) {
  TableHeader words{};
  std::copy(status.words(), status.words() + kStatusWords, words.begin());
  const int64_t info[] = {num_experts, hidden, dtype, weights_dtype,
                          tokens,      picks,  op,    call};
  std::copy(std::begin(info), std::end(info), words.begin() + kStatusWords);
  return words;
}

at::Tensor headerTensor(const TableHeader& words, const at::Device& device) {
  // From pageable memory a non-blocking copy is staged before it returns.
  return at::tensor(at::ArrayRef<int64_t>(words.data(), words.size()),
                    at::kLong)
      .to(device, /*non_blocking=*/true);
}

// [R, W]: `row` [W] for every one of the R ranks.
at::Tensor sameRowForEveryRank(const at::Tensor& row, int64_t world_size) {
  return row.unsqueeze(0).expand({world_size, -1}).contiguous();
}

// The CPU path's table: the status words as the value checks left them,
// the rest of `header` and the per-rank `vectors`, the same row for every
// one of the R ranks.
at::Tensor tableOnEveryRank(const DeviceStatus& status,
                            const at::Tensor& header,
                            std::vector<at::Tensor> vectors,
                            int64_t world_size) {
  vectors.insert(
      vectors.begin(),
      {status.words(),
       header.narrow(0, kStatusWords, kCallHeaderWords - kStatusWords)});
  return sameRowForEveryRank(at::cat(vectors), world_size);
}

int deviceIndex(const at::Device& device) {
  return device.has_index() ? device.index() : cuda::currentDevice();
}

cudaStream_t streamOf(const at::Device& device) {
  return cuda::currentStream(deviceIndex(device));
}

// On CUDA tensors the kernels go to the tensors' device, whichever is
// current; the world size must fit the check kernels.
std::optional<cuda::DeviceScope> deviceScope(const at::Device& device,
                                             int64_t world_size) {
  if (!device.is_cuda()) {
    return std::nullopt;
  }
  HF_CHECK(world_size <= collective::kMaxWorldSize,
           "the collective MoE backend on CUDA tensors takes at most ",
           collective::kMaxWorldSize, " ranks; this communicator has ",
           world_size);
  return std::optional<cuda::DeviceScope>(std::in_place, deviceIndex(device));
}

// Takes part in collective MoE call `call` with kCallFailed rows (see
// publishCollectiveFailure). Never throws: the error to report is the
// caller's.
void exchangeFailure(Communicator& communicator, const at::Device& device,
                     int64_t call) noexcept {
  try {
    const int64_t world_size = communicator.size();
    if (world_size == 1) {
      return;
    }
    const std::optional<cuda::DeviceScope> on_device =
        deviceScope(device, world_size);
    at::Tensor row = at::zeros({tableWidth(world_size)}, at::kLong);
    row[kOpWord] = kCallFailed;
    row[kCallWord] = call;
    exchangeTable(communicator, sameRowForEveryRank(row, world_size).to(device),
                  "the report of this rank's failure")
        .cpu();
  } catch (...) {
    // The peers find out at their timeout instead.
  }
}

// Armed from the moment a call has its number until its table exchange:
// an exception that leaves the scope before then (a host-side failure of
// this rank alone) is reported to the peers waiting in that exchange.
class ReportFailureUntilExchange {
 public:
  ReportFailureUntilExchange(Communicator& communicator, at::Device device,
                             int64_t call)
      : communicator_(communicator),
        device_(device),
        call_(call),
        exceptions_(std::uncaught_exceptions()) {}
  ~ReportFailureUntilExchange() {
    if (armed_ && std::uncaught_exceptions() > exceptions_) {
      exchangeFailure(communicator_, device_, call_);
    }
  }
  ReportFailureUntilExchange(const ReportFailureUntilExchange&) = delete;
  ReportFailureUntilExchange& operator=(const ReportFailureUntilExchange&) =
      delete;
  void exchanging() { armed_ = false; }

 private:
  Communicator& communicator_;
  at::Device device_;
  int64_t call_;
  int exceptions_;
  bool armed_ = true;
};

collective::RowType rowType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return collective::RowType::kFloat64;
    case at::kBFloat16:
      return collective::RowType::kBFloat16;
    case at::kHalf:
      return collective::RowType::kFloat16;
    default:
      HF_ERROR(dtype == at::kFloat, "no collective row type for ", dtype);
      return collective::RowType::kFloat32;
  }
}

// Payload travels as bytes: one all-to-all carries rows of several dtypes,
// and every backend moves bytes bit for bit.
at::Tensor asBytes(const at::Tensor& rows) {
  return rows.contiguous().view(at::kByte);
}

at::Tensor fromBytes(const at::Tensor& bytes, int64_t& offset, int64_t columns,
                     at::ScalarType dtype) {
  const int64_t width = columns * static_cast<int64_t>(c10::elementSize(dtype));
  // A fresh tensor: a slice can count as contiguous (one row, or none)
  // while keeping strides that view(dtype) rejects.
  at::Tensor part = at::empty({bytes.size(0), width}, bytes.options());
  part.copy_(bytes.narrow(1, offset, width));
  offset += width;
  return part.view(dtype);
}

}  // namespace

// ---------------------------------------------------------------------------
// Dispatch

namespace {

// ---------------------------------------------------------------------------
// Combine

// Per-rank vectors of the combine table, after kCallHeaderWords; then the
// layout's id (layout_id.h).
enum CombineVector : int64_t {
  kToRank,
  kFromRank,
  kMaxToken,
  kMaxPick,
  kHeldFingerprint,
  kLayoutId,
};
static_assert(kLayoutId == collective::kTableVectors);

// Throws, on every rank alike, unless every rank combines a layout of the
// same dispatch and holds, from each rank, the rows that rank sent it in
// that dispatch (by their fingerprints, layout_id.h).
void checkLayoutIds(const at::Tensor& table) {
  const int64_t world_size = table.size(0);
  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  auto id = [&](int64_t rank, int64_t word) {
    return words[rank * width + kCallHeaderWords + kLayoutId * world_size +
                 word];
  };
  for (int64_t r = 1; r < world_size; ++r) {
    HF_CHECK(id(r, moe::kLayoutIdCallWord) == id(0, moe::kLayoutIdCallWord),
             "MoeCombine: the ranks combine the layouts of different "
             "dispatches: rank ",
             r, " of ", world_size,
             " was given the layout of collective MoE call #",
             id(r, moe::kLayoutIdCallWord), " while rank 0 was given that of #",
             id(0, moe::kLayoutIdCallWord),
             " (recv_layout_id); every rank must give combine the layout its "
             "own part of one MoeDispatch returned");
  }
  for (int64_t i = 0; i < world_size; ++i) {
    for (int64_t j = 0; j < world_size; ++j) {
      const int64_t held = words[i * width + kCallHeaderWords +
                                 kHeldFingerprint * world_size + j];
      HF_CHECK(held == id(j, moe::kLayoutIdFirstFingerprint + i),
               "MoeCombine: the layout on rank ", i, " of ", world_size,
               " names rows from rank ", j,
               " (recv_src_rank, recv_src_token, recv_src_k and the experts of "
               "recv_expert_counts) that rank ",
               j,
               " did not send it in the dispatch that made the layout "
               "(collective MoE call #",
               id(j, moe::kLayoutIdCallWord),
               "); the rows do not match their dispatch");
    }
  }
}

void checkCombineTable(const at::Tensor& table) {
  moe::throwIfAnyStatusBad(table, "MoeCombine", "collective", kNumExpertsWord);
  moe::checkAgreed(table, kNumExpertsWord, "MoeCombine", "num_experts", false);
  moe::checkAgreed(table, kHiddenWord, "MoeCombine", "the width of expert_out",
                   false);
  moe::checkAgreed(table, kDtypeWord, "MoeCombine", "the dtype of expert_out",
                   true);
  const int64_t world_size = table.size(0);
  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  auto vector = [&](int64_t rank, CombineVector which, int64_t peer) {
    return words[rank * width + kCallHeaderWords + which * world_size + peer];
  };
  for (int64_t i = 0; i < world_size; ++i) {
    for (int64_t j = 0; j < world_size; ++j) {
      HF_CHECK(vector(i, kFromRank, j) == vector(j, kToRank, i),
               "MoeCombine: the rows do not match their dispatch: rank ", i,
               " holds ", vector(i, kFromRank, j), " rows from rank ", j,
               " (n_tokens_from_rank), but rank ", j, " sent ",
               vector(j, kToRank, i), " rows to rank ", i,
               " (n_tokens_to_rank)");
      const int64_t tokens = words[j * width + kTokensWord];
      HF_CHECK(vector(i, kMaxToken, j) < tokens,
               "MoeCombine: recv_src_token on rank ", i, " names token ",
               vector(i, kMaxToken, j), " of rank ", j, ", which has ", tokens,
               " tokens (num_tokens); the rows do not match their "
               "dispatch");
      const int64_t picks = words[j * width + kPicksWord];
      HF_CHECK(picks < 0 || vector(i, kMaxPick, j) < picks,
               "MoeCombine: topk_weights on rank ", j, " has K = ", picks,
               " columns, but rank ", i, " holds a row of its pick ",
               vector(i, kMaxPick, j),
               " (recv_src_k); give combine the topk_weights [T, K] of the "
               "dispatch that made the layout");
    }
  }
  checkLayoutIds(table);
}

// The rows returned to this rank in (token, pick) order, and where each
// token's rows start: token t's are order[token_start[t] ..
// token_start[t + 1]). A dense list, [N] and [T + 1], sized by the rows
// that came back and T, never by a pick a peer names. Tokens are in
// [0, T) (checked from the combine table); picks are any non-negative
// numbers. Two stable sorts and a search, on the rows' device, without a
// host synchronization.
struct TokenOrder {
  at::Tensor order;
  at::Tensor token_start;
};

TokenOrder orderByTokenThenPick(const at::Tensor& token, const at::Tensor& pick,
                                int64_t num_tokens) {
  const at::Tensor by_pick =
      std::get<1>(at::sort(pick, /*stable=*/true, 0, /*descending=*/false));
  const at::Tensor order = by_pick.index_select(
      0, std::get<1>(at::sort(token.index_select(0, by_pick), /*stable=*/true,
                              0, /*descending=*/false)));
  const at::Tensor sorted_token = token.index_select(0, order);
  return {order, at::searchsorted(sorted_token,
                                  at::arange(num_tokens + 1, token.options()))};
}

// combined [T, H'] from the rows returned to this rank: row i belongs to
// (token[i], pick[i]). The sum must equal the cuda backend's bit for bit,
// so it follows the kernel's order exactly: per token, acc = +0 in fp32
// (fp64 for fp64 rows), then for its rows in ascending pick order: acc =
// acc + w[t, k] * float(row of (t, k)), each product and each sum rounded
// on its own (one ATen op each: nothing fuses them into a fused
// multiply-add), then one rounding to the rows' dtype. Masked picks have
// no row and add nothing (the kernel skips them too; adding +0 would not
// change acc's bits either), and their weights are never read.
//
// The j-th row of every token is added in one step j: the tokens of one
// step are distinct, so each element gets exactly one rounded addition.
// index_add_ is not used for it: its order is unspecified on CUDA.
at::Tensor combineInOrder(const at::Tensor& rows, const at::Tensor& token,
                          const at::Tensor& pick,
                          const std::optional<at::Tensor>& topk_weights,
                          int64_t num_tokens) {
  const int64_t hidden = rows.size(1);
  const int64_t count = rows.size(0);
  const at::ScalarType accumulate =
      at::promote_types(at::kFloat, rows.scalar_type());
  const TokenOrder sorted = orderByTokenThenPick(token, pick, num_tokens);
  const at::Tensor sorted_token = token.index_select(0, sorted.order);
  // Which of its token's rows each row is (0 for its smallest pick), and
  // the rows grouped by that step, each step in token order.
  const at::Tensor step = at::arange(count, token.options()) -
                          sorted.token_start.index_select(0, sorted_token);
  const at::Tensor by_step =
      std::get<1>(at::sort(step, /*stable=*/true, 0, /*descending=*/false));
  const at::Tensor step_rows =
      count > 0 ? at::bincount(step) : at::zeros({0}, token.options());
  const int64_t* per_step = step_rows.const_data_ptr<int64_t>();
  at::Tensor weights;
  if (topk_weights.has_value()) {
    weights = topk_weights->to(accumulate).reshape({-1});
  }
  at::Tensor acc =
      at::zeros({num_tokens, hidden}, rows.options().dtype(accumulate));
  int64_t first = 0;
  for (int64_t j = 0; j < step_rows.numel(); ++j) {
    const at::Tensor in_step =
        sorted.order.index_select(0, by_step.narrow(0, first, per_step[j]));
    first += per_step[j];
    const at::Tensor tokens = token.index_select(0, in_step);
    at::Tensor terms = rows.index_select(0, in_step).to(accumulate);
    if (weights.defined()) {
      const int64_t picks = topk_weights->size(1);
      const at::Tensor flat = tokens * picks + pick.index_select(0, in_step);
      terms.mul_(weights.index_select(0, flat).unsqueeze(1));
    }
    acc.index_copy_(0, tokens, acc.index_select(0, tokens).add_(terms));
  }
  return acc.to(rows.scalar_type());
}

// The CombineSum kernel: group g sums rows order[starts[g] ..
// starts[g + 1]) in that order, each weighted by row_weights[i] or by
// nothing; or, with `slots` [G, K] (launchCombineSlots; order and starts
// undefined), the rows slots[g, 0 .. K), row (g, k) weighted by
// topk_weights[g, k]. Weights in the accumulation dtype, undefined when
// absent. [G, H] in rows' dtype.
at::Tensor sumSortedRows(const at::Tensor& rows, const at::Tensor& order,
                         const at::Tensor& starts,
                         const at::Tensor& row_weights,
                         const at::Tensor& topk_weights = at::Tensor(),
                         const at::Tensor& slots = at::Tensor()) {
  HF_CHECK(!topk_weights.defined() || slots.defined(),
           "MoeCombine: internal error: topk_weights without slots");
  // The kernel reads rows [N, H] densely (expert_out may be a view).
  const at::Tensor dense = rows.contiguous();
  auto denseOrNone = [](const at::Tensor& t) {
    return t.defined() ? t.contiguous() : at::Tensor();
  };
  const at::Tensor own_weights = denseOrNone(row_weights);
  const at::Tensor pick_weights = denseOrNone(topk_weights);
  const int64_t groups = slots.defined() ? slots.size(0) : starts.size(0) - 1;
  at::Tensor out = at::empty({groups, rows.size(1)}, dense.options());
  collective::CombineSumArgs args;
  args.rows = dense.const_data_ptr();
  args.count = dense.size(0);
  args.hidden = dense.size(1);
  args.type = rowType(dense.scalar_type());
  args.topk_weights =
      pick_weights.defined() ? pick_weights.const_data_ptr() : nullptr;
  args.picks = pick_weights.defined() ? pick_weights.size(1) : 0;
  args.row_weights =
      own_weights.defined() ? own_weights.const_data_ptr() : nullptr;
  args.tokens = groups;
  if (slots.defined()) {
    args.slots = slots.const_data_ptr<int64_t>();
  } else {
    args.order = order.const_data_ptr<int64_t>();
    args.token_start = starts.const_data_ptr<int64_t>();
  }
  args.out = out.mutable_data_ptr();
  HF_CUDA_CHECK(collective::launchCombineSum(args, streamOf(rows.device())));
  return out;
}

// On GPUs, the permutation of a stable sort of the layout's rows by
// src_rank, from the kernels of launchSourceOrder: the layout has passed
// the combine's checks, so each expert's rows are in (rank, token) order.
at::Tensor sourceOrder(const MoeLayout& layout, const at::Tensor& row_expert,
                       int64_t world_size) {
  const int64_t rows = layout.src_rank.numel();
  const int64_t local_experts = layout.expert_counts.numel();
  const at::TensorOptions longs = layout.src_rank.options();
  const at::Tensor src_rank = layout.src_rank.contiguous();
  const at::Tensor counts = layout.expert_counts.contiguous();
  const at::Tensor from_rank = layout.n_tokens_from_rank.contiguous();
  const at::Tensor expert = row_expert.contiguous();
  at::Tensor runs = at::empty({2, local_experts, world_size}, longs);
  at::Tensor order = at::empty({rows}, longs);
  collective::SourceOrderArgs args;
  args.src_rank = src_rank.const_data_ptr<int64_t>();
  args.expert_counts = counts.const_data_ptr<int64_t>();
  args.from_rank = from_rank.const_data_ptr<int64_t>();
  args.row_expert = expert.const_data_ptr<int64_t>();
  args.rows = rows;
  args.local_experts = local_experts;
  args.world_size = world_size;
  args.runs = runs.mutable_data_ptr<int64_t>();
  args.order = order.mutable_data_ptr<int64_t>();
  HF_CUDA_CHECK(
      collective::launchSourceOrder(args, streamOf(layout.src_rank.device())));
  return order;
}

// combineInOrder on either device: the CombineSum kernel on GPUs. `token`
// and `pick` [N] i64 (any stride): each row's (token, pick). `weights`
// [tokens, picks] in the accumulation dtype, or undefined (weight 1).
at::Tensor sumInOrder(const at::Tensor& rows, const at::Tensor& token,
                      const at::Tensor& pick, const at::Tensor& weights,
                      int64_t num_tokens) {
  if (!rows.is_cuda()) {
    return combineInOrder(
        rows, token, pick,
        weights.defined() ? std::optional<at::Tensor>(weights) : std::nullopt,
        num_tokens);
  }
  if (!weights.defined() || weights.numel() == 0) {
    // (Weights [T, 0] or [0, K]: no row can name a pick, or a token, of
    // them; the table checks refuse any that does.)
    const TokenOrder sorted = orderByTokenThenPick(token, pick, num_tokens);
    return sumSortedRows(rows, sorted.order, sorted.token_start, at::Tensor());
  }
  // Every pick is < K (checked from the combine table): token t's rows sit
  // in slots [T, K], the size of topk_weights, found without a sort.
  at::Tensor slots = at::full({num_tokens, weights.size(1)}, -1,
                              token.options().dtype(at::kLong));
  HF_CUDA_CHECK(collective::launchCombineSlots(
      token.const_data_ptr<int64_t>(), token.stride(0),
      pick.const_data_ptr<int64_t>(), pick.stride(0), token.numel(),
      weights.size(1), slots.mutable_data_ptr<int64_t>(),
      streamOf(rows.device())));
  return sumSortedRows(rows, at::Tensor(), at::Tensor(), at::Tensor(), weights,
                       slots);
}

// reduce=per_rank on the experts' rank: one partial row per (source rank,
// source token) among the rows held here: the weighted rows of the token's
// picks here, in pick order, in the accumulation dtype with one rounding
// per product and per sum, rounded once to expert_out's dtype. Partials are
// in (rank, token) order, so each source rank's are contiguous.
struct RankPartials {
  at::Tensor rows;     // [G, H'] expert_out's dtype
  at::Tensor token;    // [G] i64: the source token of each
  at::Tensor to_rank;  // [R] i64 on the CPU: partials for each source rank
};

// Bounds of the rows held here: every src_token < tokens and src_k < picks
// (from the combine table, checked there), so that (rank, token, pick) is
// one number.
struct HeldBounds {
  int64_t tokens = 1;
  int64_t picks = 1;
};

RankPartials partialsPerRank(const at::Tensor& expert_out,
                             const MoeLayout& layout,
                             const std::optional<at::Tensor>& recv_weights,
                             int64_t world_size, const HeldBounds& bounds) {
  const at::ScalarType accumulate =
      at::promote_types(at::kFloat, expert_out.scalar_type());
  const int64_t count = expert_out.size(0);
  HF_CHECK(bounds.tokens > 0 && bounds.picks > 0 &&
               bounds.tokens <= std::numeric_limits<int64_t>::max() /
                                    bounds.picks / world_size,
           "MoeCombine: internal error: ", world_size, " ranks x ",
           bounds.tokens, " tokens x ", bounds.picks,
           " picks overflow a 64-bit key");
  // Rows by (rank, token, pick): one sort of a key that is unique per row
  // (a source's pick has one row).
  const at::Tensor group_key =
      layout.src_rank * bounds.tokens + layout.src_token;
  const at::Tensor order = std::get<1>(
      at::sort(group_key * bounds.picks + layout.src_k, /*stable=*/true, 0,
               /*descending=*/false));
  const at::Tensor sorted_key = group_key.index_select(0, order);
  // Where a new (rank, token) starts among the sorted rows.
  at::Tensor starts = at::ones({count}, sorted_key.options().dtype(at::kBool));
  if (count > 1) {
    at::Tensor later = starts.narrow(0, 1, count - 1);
    at::ne_out(later, sorted_key.narrow(0, 1, count - 1),
               sorted_key.narrow(0, 0, count - 1));
  }
  const at::Tensor heads = starts.nonzero().reshape({-1});
  const int64_t groups = heads.size(0);
  const at::Tensor head_key = sorted_key.index_select(0, heads);

  RankPartials partials;
  partials.token = head_key.remainder(bounds.tokens);
  partials.to_rank =
      at::bincount(head_key.div(bounds.tokens, "floor").cpu(), {}, world_size);
  if (expert_out.is_cuda()) {
    // No fp32 copy of expert_out and no second sort: the sum kernel reads
    // the rows in this order, each with its own weight.
    partials.rows = sumSortedRows(
        expert_out, order,
        at::cat({heads, at::full({1}, count, heads.options())}),
        recv_weights.has_value() ? recv_weights->to(accumulate) : at::Tensor());
    return partials;
  }
  // The same sums in ATen (combineInOrder's order): each product rounded,
  // then the sums in pick order.
  at::Tensor terms = expert_out.to(accumulate);
  if (recv_weights.has_value()) {
    terms = terms * recv_weights->to(accumulate).unsqueeze(1);
  }
  const at::Tensor group =
      at::empty_like(order).index_copy_(0, order, starts.cumsum(0) - 1);
  partials.rows =
      combineInOrder(terms, group, layout.src_k, std::nullopt, groups)
          .to(expert_out.scalar_type());
  return partials;
}

// recv_x (and recv_scales) of `out` from the received rows, packed with
// fp8.
void setRecvRows(MoeDispatchOutput& out, const at::Tensor& rows, bool fp8,
                 int64_t hidden) {
  if (!fp8) {
    out.recv_x = rows;
    return;
  }
  std::tie(out.recv_x, out.recv_scales) = moe::unpackFp8(rows, hidden);
}

// reduce=per_rank after the checks: the partials of the rows held here go
// to their source ranks (their counts first, which no table holds), and
// each token's partials are summed in rank order, rounded once more.
at::Tensor combinePerRank(const MoeCombineArgs& args,
                          Communicator& communicator,
                          const HeldBounds& bounds) {
  const int64_t world_size = communicator.size();
  const RankPartials partials = partialsPerRank(
      args.expert_out, args.layout, args.recv_weights, world_size, bounds);
  const at::Device device = args.expert_out.device();
  const at::Tensor counts = exchangeTable(
      communicator, partials.to_rank.to(device).unsqueeze(1), "MoeCombine");
  const at::Tensor from_rank = counts.reshape({-1}).cpu();
  const std::vector<int64_t> send_splits(
      partials.to_rank.data_ptr<int64_t>(),
      partials.to_rank.data_ptr<int64_t>() + world_size);
  const std::vector<int64_t> recv_splits(
      from_rank.data_ptr<int64_t>(),
      from_rank.data_ptr<int64_t>() + world_size);
  const int64_t num_recv = from_rank.sum().item<int64_t>();
  const at::Tensor returned =
      exchangeRows(communicator, partials.rows, num_recv, recv_splits,
                   send_splits, "MoeCombine");
  const at::Tensor token =
      exchangeRows(communicator, partials.token.unsqueeze(1), num_recv,
                   recv_splits, send_splits, "MoeCombine")
          .reshape({-1});
  if (device.is_cuda()) {
    // The partials came in (rank, token) order: one stable sort by token
    // leaves each token's in rank order.
    const at::Tensor order =
        std::get<1>(at::sort(token, /*stable=*/true, 0, /*descending=*/false));
    return sumSortedRows(
        returned, order,
        at::searchsorted(token.index_select(0, order),
                         at::arange(args.num_tokens + 1, token.options())),
        at::Tensor());
  }
  const at::Tensor rank =
      at::repeat_interleave(at::arange(world_size, token.options()),
                            from_rank.to(device), 0, num_recv);
  return sumInOrder(returned, token, rank, at::Tensor(), args.num_tokens);
}

}  // namespace

// ---------------------------------------------------------------------------

void publishCollectiveFailure(Communicator& communicator,
                              const at::Device& device) noexcept {
  int64_t call = 0;
  try {
    call = communicator.nextCount("moe/collective");
  } catch (...) {
    return;
  }
  exchangeFailure(communicator, device, call);
}

MoeDispatchOutput dispatchCollective(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights, int64_t num_experts,
    Communicator& communicator, MoeDispatchQuant quantize) {
  at::NoGradGuard no_grad;
  const bool fp8 = quantize == MoeDispatchQuant::Fp8E4M3;
  const int64_t world_size = communicator.size();
  const int64_t me = communicator.rank();
  const at::Device device = x.defined() ? x.device() : communicator.device();
  const at::TensorOptions longs = at::TensorOptions(at::kLong).device(device);
  // Creating the backend is a rendezvous: every rank reaches it here.
  communicator.backend(device.type());
  // CUDA tensors take the kernels of collective_kernels.h for the steps
  // around the all-to-alls; CPU tensors the ATen operations that compute
  // the same values.
  const bool gpu = device.is_cuda();
  const std::optional<cuda::DeviceScope> on_device =
      deviceScope(device, world_size);

  // 1. Check the inputs and count rows per destination, on the device.
  const HostStatus host_status = moe::checkDispatchInputs(
      x, topk_idx, topk_weights, num_experts, world_size, device, quantize);
  const bool valid = host_status.ok();
  const int64_t tokens = valid ? x.size(0) : -1;
  const int64_t hidden = valid ? x.size(1) : -1;
  const int64_t picks = valid ? topk_idx.size(1) : -1;
  const int64_t local_experts = valid ? num_experts / world_size : 1;
  const int64_t call = communicator.nextCount("moe/collective");
  ReportFailureUntilExchange report(communicator, device, call);
  const TableHeader header =
      tableHeader(host_status, num_experts, hidden, dtypeCode(x),
                  topk_weights ? dtypeCode(*topk_weights) : kNoDtype, tokens,
                  picks, fp8 ? kCallDispatchFp8 : kCallDispatch, call);
  // [T * K]: i32 or i64 as given on the GPU, i64 on the CPU.
  const at::Tensor idx =
      valid
          ? (gpu ? topk_idx.contiguous() : topk_idx.to(at::kLong)).reshape({-1})
          : at::Tensor();
  at::Tensor send_table;  // [R, tableWidth(R)]
  at::Tensor key;         // [T * K]: the expert of each pair, E if masked
  if (gpu) {
    send_table = at::empty({world_size, tableWidth(world_size)}, longs);
    key = at::empty({valid ? tokens * picks : 0}, longs);
    collective::DispatchCheckArgs args;
    args.valid = valid;
    args.topk_idx = valid ? idx.const_data_ptr() : nullptr;
    args.idx_is_int64 = valid && idx.scalar_type() == at::kLong;
    args.tokens = valid ? tokens : 0;
    args.picks = picks;
    args.num_experts = num_experts;
    args.local_experts = local_experts;
    args.world_size = world_size;
    std::copy(header.begin(), header.end(), args.header);
    args.table_row = send_table.mutable_data_ptr<int64_t>();
    args.sort_key = key.mutable_data_ptr<int64_t>();
    HF_CUDA_CHECK(collective::launchDispatchCheck(args, streamOf(device)));
  } else {
    const at::Tensor header_words = headerTensor(header, device);
    DeviceStatus status(header_words.narrow(0, 0, kStatusWords));
    at::Tensor rows_to_rank = at::zeros({world_size}, longs);
    if (valid) {
      moe::checkExpertIds(status, idx.view({tokens, picks}), num_experts);
      const at::Tensor sent = at::logical_and(idx >= 0, idx < num_experts);
      // Masked and invalid picks count in an extra bucket, never sent.
      const at::Tensor dst =
          at::where(sent, at::div(idx, local_experts, "floor"), world_size);
      rows_to_rank = at::zeros({world_size + 1}, longs)
                         .index_add_(0, dst, at::ones_like(dst))
                         .narrow(0, 0, world_size);
      key = at::where(idx >= 0, idx, num_experts);
    }
    send_table = tableOnEveryRank(
        status, header_words,
        {rows_to_rank,
         at::zeros({tableWidth(world_size) - kCallHeaderWords - world_size},
                   longs)},
        world_size);
  }

  // 2. Exchange statuses and counts; the one copy to the host.
  report.exchanging();
  const at::Tensor table_on_device =
      exchangeTable(communicator, send_table, "MoeDispatch");
  const at::Tensor table = table_on_device.cpu();
  checkCallsMatch(table);
  moe::checkDispatchTable(table, "collective");

  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  std::vector<int64_t> send_splits(world_size);
  std::vector<int64_t> recv_splits(world_size);
  int64_t num_send = 0;
  int64_t num_recv = 0;
  for (int64_t r = 0; r < world_size; ++r) {
    send_splits[r] = words[me * width + kCallHeaderWords + r];
    recv_splits[r] = words[r * width + kCallHeaderWords + me];
    num_send += send_splits[r];
    num_recv += recv_splits[r];
  }

  // 3. Unmasked pairs sorted by expert, then token: a stable sort of the
  // (token, pick)-ordered ids, masked ones (key E) last. Rows travel on
  // their own, in x's dtype, straight into recv_x's storage; their (token,
  // pick, expert) and weight travel beside them.
  const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, 0, false))
                               .narrow(0, 0, num_send);
  const at::Tensor token = at::div(order, picks, "floor");
  // fp8: the rows travel quantized and packed with their scales.
  const at::Tensor rows = fp8 ? moe::quantizeFp8Packed(x) : x;
  const at::Tensor recv_x =
      exchangeRows(communicator, rows.index_select(0, token), num_recv,
                   recv_splits, send_splits, "MoeDispatch");
  const int weight_bytes =
      topk_weights.has_value()
          ? static_cast<int>(c10::elementSize(topk_weights->scalar_type()))
          : 0;
  const at::Tensor weights =
      topk_weights.has_value() ? topk_weights->contiguous() : at::Tensor();
  at::Tensor send_meta;
  // The identity of this dispatch: its call number, and the fingerprint of
  // what it sends to each rank.
  at::Tensor layout_id = moe::newLayoutId(call, world_size, device);
  if (gpu) {
    // [N, 4] i64: token, pick, expert, the weight's bits.
    send_meta = at::empty({num_send, 4}, longs);
    collective::DispatchMetaArgs args;
    args.order = order.const_data_ptr<int64_t>();
    args.count = num_send;
    args.topk_idx = idx.const_data_ptr();
    args.idx_is_int64 = idx.scalar_type() == at::kLong;
    args.picks = picks;
    args.topk_weights = weights.defined() ? weights.const_data_ptr() : nullptr;
    args.weight_bytes = weight_bytes;
    args.local_experts = local_experts;
    args.meta = send_meta.mutable_data_ptr<int64_t>();
    args.fingerprints =
        layout_id.mutable_data_ptr<int64_t>() + moe::kLayoutIdFirstFingerprint;
    HF_CUDA_CHECK(collective::launchDispatchMeta(args, streamOf(device)));
  } else {
    const at::Tensor pick = order.remainder(picks);
    const at::Tensor expert = idx.index_select(0, order);
    at::Tensor fingerprints =
        layout_id.narrow(0, moe::kLayoutIdFirstFingerprint, world_size);
    moe::addFingerprints(fingerprints, at::div(expert, local_experts, "floor"),
                         expert, token, pick);
    // Bytes: (token, pick, expert) as i64, then the weight.
    std::vector<at::Tensor> parts = {
        asBytes(at::stack({token, pick, expert}, 1))};
    if (weights.defined()) {
      parts.push_back(
          asBytes(weights.reshape({-1}).index_select(0, order).unsqueeze(1)));
    }
    send_meta = at::cat(parts, 1);
  }
  const at::Tensor recv_meta =
      exchangeRows(communicator, send_meta, num_recv, recv_splits, send_splits,
                   "MoeDispatch");

  // 4. Expert-major on the receiver. Each sender's rows are sorted by
  // expert, so with one rank, or one expert per rank, they already are.
  const bool expert_major = world_size == 1 || local_experts == 1;
  MoeDispatchOutput out;
  MoeLayout& layout = out.layout;
  layout.id = layout_id;
  layout.n_tokens_to_rank = table_on_device.select(0, me)
                                .narrow(0, kCallHeaderWords, world_size)
                                .clone(at::MemoryFormat::Contiguous);
  layout.n_tokens_from_rank = table_on_device.select(1, kCallHeaderWords + me)
                                  .clone(at::MemoryFormat::Contiguous);
  if (gpu) {
    const at::Tensor perm =
        expert_major ? at::Tensor()
                     : std::get<1>(at::sort(recv_meta.select(1, 2),
                                            /*stable=*/true, 0, false));
    setRecvRows(out, expert_major ? recv_x : recv_x.index_select(0, perm), fp8,
                hidden);
    layout.src_rank = at::empty({num_recv}, longs);
    layout.src_token = at::empty({num_recv}, longs);
    layout.src_k = at::empty({num_recv}, longs);
    layout.expert_counts = at::zeros({local_experts}, longs);
    if (weights.defined()) {
      out.recv_weights = at::empty({num_recv}, weights.options());
    }
    collective::DispatchLayoutArgs args;
    args.meta = recv_meta.const_data_ptr<int64_t>();
    args.perm = perm.defined() ? perm.const_data_ptr<int64_t>() : nullptr;
    args.count = num_recv;
    args.from_rank = layout.n_tokens_from_rank.const_data_ptr<int64_t>();
    args.world_size = world_size;
    args.first_expert = me * local_experts;
    args.local_experts = local_experts;
    args.weight_bytes = weight_bytes;
    args.src_rank = layout.src_rank.mutable_data_ptr<int64_t>();
    args.src_token = layout.src_token.mutable_data_ptr<int64_t>();
    args.src_k = layout.src_k.mutable_data_ptr<int64_t>();
    args.weights =
        weights.defined() ? out.recv_weights.mutable_data_ptr() : nullptr;
    args.expert_counts = layout.expert_counts.mutable_data_ptr<int64_t>();
    HF_CUDA_CHECK(collective::launchDispatchLayout(args, streamOf(device)));
    return out;
  }
  int64_t offset = 0;
  const at::Tensor meta = fromBytes(recv_meta, offset, 3, at::kLong);
  const at::Tensor local_expert = meta.select(1, 2) - me * local_experts;
  const at::Tensor perm =
      expert_major
          ? at::Tensor()
          : std::get<1>(at::sort(local_expert, /*stable=*/true, 0, false));
  auto arrange = [&](const at::Tensor& t) {
    return expert_major ? t.contiguous() : t.index_select(0, perm);
  };
  setRecvRows(out, arrange(recv_x), fp8, hidden);
  if (weights.defined()) {
    out.recv_weights = arrange(
        fromBytes(recv_meta, offset, 1, weights.scalar_type()).reshape({-1}));
  }
  layout.src_rank = arrange(at::repeat_interleave(
      at::arange(world_size, longs), layout.n_tokens_from_rank, 0, num_recv));
  layout.src_token = arrange(meta.select(1, 0));
  layout.src_k = arrange(meta.select(1, 1));
  layout.expert_counts =
      at::zeros({local_experts}, longs)
          .index_add_(0, local_expert, at::ones_like(local_expert));
  return out;
}

at::Tensor combineCollective(const at::Tensor& expert_out,
                             const MoeLayout& layout,
                             const std::optional<at::Tensor>& topk_weights,
                             int64_t num_tokens, int64_t num_experts,
                             Communicator& communicator) {
  MoeCombineArgs args;
  args.expert_out = expert_out;
  args.layout = layout;
  args.topk_weights = topk_weights;
  args.num_tokens = num_tokens;
  args.num_experts = num_experts;
  return combineCollective(args, communicator);
}

at::Tensor combineCollective(const MoeCombineArgs& args,
                             Communicator& communicator) {
  at::NoGradGuard no_grad;
  const at::Tensor& expert_out = args.expert_out;
  const MoeLayout& layout = args.layout;
  const std::optional<at::Tensor>& topk_weights = args.topk_weights;
  const std::optional<at::Tensor>& weights_given =
      topk_weights.has_value() ? topk_weights : args.recv_weights;
  const int64_t num_tokens = args.num_tokens;
  const int64_t num_experts = args.num_experts;
  const bool per_rank = args.reduce == MoeCombineReduce::PerRank;
  const int64_t world_size = communicator.size();
  const int64_t me = communicator.rank();
  const at::Device device =
      expert_out.defined() ? expert_out.device() : communicator.device();
  const at::TensorOptions longs = at::TensorOptions(at::kLong).device(device);
  // Creating the backend is a rendezvous: every rank reaches it here.
  communicator.backend(device.type());
  const bool gpu = device.is_cuda();
  const std::optional<cuda::DeviceScope> on_device =
      deviceScope(device, world_size);

  // 1. Check expert_out and the layout.
  const HostStatus host_status =
      moe::checkCombineInputs(args, world_size, device);
  const bool valid = host_status.ok();
  const int64_t rows = valid ? expert_out.size(0) : 0;
  const int64_t hidden = valid ? expert_out.size(1) : -1;
  const int64_t picks =
      valid && topk_weights.has_value() ? topk_weights->size(1) : -1;
  const int64_t call = communicator.nextCount("moe/collective");
  ReportFailureUntilExchange report(communicator, device, call);
  const TableHeader header = tableHeader(
      host_status, num_experts, hidden, dtypeCode(expert_out),
      weights_given ? dtypeCode(*weights_given) : kNoDtype, num_tokens, picks,
      per_rank ? kCallCombinePerRank : kCallCombine, call);
  at::Tensor send_table;  // [R, tableWidth(R)]
  at::Tensor row_expert;  // GPUs: each row's local expert, for step 3 too
  if (gpu) {
    send_table = at::empty({world_size, tableWidth(world_size)}, longs);
    std::array<at::Tensor, 7> vectors;
    at::Tensor seen;
    at::Tensor fingerprints;
    collective::CombineCheckArgs args;
    args.valid = valid;
    if (valid) {
      vectors = {layout.src_rank.contiguous(),
                 layout.src_token.contiguous(),
                 layout.src_k.contiguous(),
                 layout.expert_counts.contiguous(),
                 layout.n_tokens_to_rank.contiguous(),
                 layout.n_tokens_from_rank.contiguous(),
                 layout.id.contiguous()};
      args.src_rank = vectors[0].const_data_ptr<int64_t>();
      args.src_token = vectors[1].const_data_ptr<int64_t>();
      args.src_k = vectors[2].const_data_ptr<int64_t>();
      args.expert_counts = vectors[3].const_data_ptr<int64_t>();
      args.to_rank = vectors[4].const_data_ptr<int64_t>();
      args.from_rank = vectors[5].const_data_ptr<int64_t>();
      const int64_t slots = collective::repeatSlots(rows);
      seen = at::full({slots + 1}, -1, longs);
      HF_CUDA_CHECK(collective::launchFirstRepeatedRow(
          args.src_rank, args.src_token, args.src_k, rows,
          seen.mutable_data_ptr<int64_t>(), streamOf(device)));
      args.first_repeated_row = seen.const_data_ptr<int64_t>() + slots;
      row_expert = moe::rowLocalExperts(layout);
      args.row_expert = row_expert.const_data_ptr<int64_t>();
      args.layout_id = vectors[6].const_data_ptr<int64_t>();
      fingerprints = at::zeros({world_size}, longs);
      args.fingerprints = fingerprints.mutable_data_ptr<int64_t>();
    }
    args.rows = rows;
    args.local_experts = valid ? num_experts / world_size : 0;
    args.first_expert = me * args.local_experts;
    args.world_size = world_size;
    std::copy(header.begin(), header.end(), args.header);
    args.table_row = send_table.mutable_data_ptr<int64_t>();
    HF_CUDA_CHECK(collective::launchCombineCheck(args, streamOf(device)));
  } else {
    const at::Tensor header_words = headerTensor(header, device);
    DeviceStatus status(header_words.narrow(0, 0, kStatusWords));
    at::Tensor to_rank = at::zeros({world_size}, longs);
    at::Tensor from_rank = at::zeros({world_size}, longs);
    at::Tensor max_token = at::full({world_size}, -1, longs);
    at::Tensor max_pick = at::full({world_size}, -1, longs);
    at::Tensor held = at::zeros({world_size}, longs);
    at::Tensor layout_id = at::zeros({world_size + 1}, longs);
    if (valid) {
      const at::Tensor expert =
          moe::checkLayoutValues(status, layout, rows, world_size);
      to_rank = layout.n_tokens_to_rank;
      from_rank = layout.n_tokens_from_rank;
      const at::Tensor src = layout.src_rank.clamp(0, world_size - 1);
      max_token = max_token.scatter_reduce(0, src, layout.src_token, "amax");
      max_pick = max_pick.scatter_reduce(0, src, layout.src_k, "amax");
      const int64_t local_experts = num_experts / world_size;
      moe::addFingerprints(held, layout.src_rank, expert + me * local_experts,
                           layout.src_token, layout.src_k);
      layout_id = layout.id;
    }
    send_table = tableOnEveryRank(
        status, header_words,
        {to_rank, from_rank, max_token, max_pick, held, layout_id}, world_size);
  }

  // 2. Exchange statuses and the layout's counts; the one copy to the host.
  report.exchanging();
  const at::Tensor table =
      exchangeTable(communicator, send_table, "MoeCombine").cpu();
  checkCallsMatch(table);
  checkCombineTable(table);

  const int64_t* words = table.data_ptr<int64_t>() + me * table.size(1);
  if (per_rank) {
    HeldBounds bounds;
    for (int64_t r = 0; r < world_size; ++r) {
      bounds.tokens =
          std::max(bounds.tokens,
                   words[kCallHeaderWords + kMaxToken * world_size + r] + 1);
      bounds.picks =
          std::max(bounds.picks,
                   words[kCallHeaderWords + kMaxPick * world_size + r] + 1);
    }
    return combinePerRank(args, communicator, bounds);
  }
  std::vector<int64_t> send_splits(world_size);
  std::vector<int64_t> recv_splits(world_size);
  int64_t num_recv = 0;
  for (int64_t r = 0; r < world_size; ++r) {
    send_splits[r] = words[kCallHeaderWords + kFromRank * world_size + r];
    recv_splits[r] = words[kCallHeaderWords + kToRank * world_size + r];
    num_recv += recv_splits[r];
  }

  // 3. Every row back to its source rank, in x's dtype on its own, its
  // (token, pick) beside it. Sorted by source rank, unless there is one.
  const bool one_source = world_size == 1;
  const at::Tensor perm =
      one_source ? at::Tensor()
      : gpu      ? sourceOrder(layout, row_expert, world_size)
                 : std::get<1>(at::sort(layout.src_rank, /*stable=*/true, 0,
                                        /*descending=*/false));
  auto bySource = [&](const at::Tensor& t) {
    return one_source ? t.contiguous() : t.index_select(0, perm);
  };
  const at::Tensor returned =
      exchangeRows(communicator, bySource(expert_out), num_recv, recv_splits,
                   send_splits, "MoeCombine");
  const at::Tensor meta =
      one_source ? at::Tensor()
                 : exchangeRows(
                       communicator,
                       bySource(at::stack({layout.src_token, layout.src_k}, 1)),
                       num_recv, recv_splits, send_splits, "MoeCombine");

  // 4. Per token, the sum of its picks in pick order (see combineInOrder).
  const at::ScalarType accumulate =
      at::promote_types(at::kFloat, returned.scalar_type());
  const at::Tensor weights = topk_weights.has_value()
                                 ? topk_weights->to(accumulate).contiguous()
                                 : at::Tensor();
  return sumInOrder(returned, one_source ? layout.src_token : meta.select(1, 0),
                    one_source ? layout.src_k : meta.select(1, 1), weights,
                    num_tokens);
}

}  // namespace hostfuse
