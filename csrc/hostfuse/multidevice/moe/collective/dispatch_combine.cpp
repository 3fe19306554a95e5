#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <limits>
#include <sstream>
#include <vector>

#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/multidevice/moe/status.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse {

namespace {

using moe::DeviceStatus;
using moe::HostStatus;

using moe::dtypeCode;
using moe::kDtypeWord;
using moe::kHeaderWords;
using moe::kHiddenWord;
using moe::kNumExpertsWord;
using moe::kPicksWord;
using moe::kTokensWord;

constexpr int64_t kNoDtype = -1;

// alltoall_base and its wait. With NCCL, wait() only orders the current
// stream after the collective; with Gloo it blocks until the data is here.
void allToAll(c10d::Backend& backend, at::Tensor& output, at::Tensor& input,
              std::vector<int64_t> output_splits,
              std::vector<int64_t> input_splits, const char* op) {
  const char* const what =
      ": the all-to-all with the other ranks failed (did a rank die, time "
      "out, or call another collective?): ";
  try {
    backend.alltoall_base(output, input, output_splits, input_splits)->wait();
  } catch (const c10::Error& e) {
    HF_THROW(op, what, e.what_without_backtrace());
  } catch (const std::exception& e) {
    // Gloo's own exceptions (timeouts, closed connections).
    HF_THROW(op, what, e.what());
  }
}

// Sends `row` [W] to every rank. Returns [R, W] on the device: row i is
// what rank i sent.
at::Tensor exchangeHeaders(c10d::Backend& backend, const at::Tensor& row,
                           int64_t world_size, const char* op) {
  at::Tensor send =
      row.unsqueeze(0).expand({world_size, row.numel()}).contiguous();
  at::Tensor recv = at::empty_like(send);
  const std::vector<int64_t> ones(world_size, 1);
  allToAll(backend, recv, send, ones, ones, op);
  return recv;
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

// Per-rank vectors of the combine header, after kHeaderWords.
enum CombineVector : int64_t { kToRank, kFromRank, kMaxToken, kMaxPick };

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
    return words[rank * width + kHeaderWords + which * world_size + peer];
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
               "MoeCombine: recv_src_k on rank ", i, " names pick ",
               vector(i, kMaxPick, j), " of rank ", j,
               ", whose topk_weights has ", picks,
               " picks; the rows do not match their dispatch");
    }
  }
}

// combined [T, H'] from the rows returned to this rank: row i belongs to
// (token[i], pick[i]). The sum must equal the cuda backend's bit for bit,
// so it follows the kernel's order exactly: per token, acc = +0 in fp32
// (fp64 for fp64 rows), then for k = 0, 1, ...: acc = acc + w[t, k] *
// float(row of (t, k)), each product and each sum rounded on its own (one
// ATen op each: nothing fuses them into a fused multiply-add), then one
// rounding to the rows' dtype. index_add_ cannot do this: its order is
// unspecified on CUDA (atomics). Everything stays on the device.
//
// Masked picks have no row: their slot stays +0 and their weight 0, so
// they add +0 * 0 = +0 (without weights, +0). That never changes the bits
// of acc: in round-to-nearest a sum is -0 only when both addends are -0, so
// acc, which starts at +0, is never -0; and x + (+0) == x for every x other
// than -0 (NaN aside). The kernel skips those picks; the result is the same.
// The weight of a masked pick is never read (a NaN or inf there must not
// leak into the sum), hence the weights go into slots too.
at::Tensor combineInOrder(const at::Tensor& rows, const at::Tensor& token,
                          const at::Tensor& pick,
                          const std::optional<at::Tensor>& topk_weights,
                          int64_t num_tokens, int64_t slot_picks) {
  const int64_t hidden = rows.size(1);
  const at::ScalarType accumulate =
      at::promote_types(at::kFloat, rows.scalar_type());
  const at::Tensor slot = token * slot_picks + pick;
  const at::Tensor slots =
      at::zeros({num_tokens * slot_picks, hidden}, rows.options())
          .index_copy_(0, slot, rows)
          .view({num_tokens, slot_picks, hidden});
  at::Tensor weight_slots;
  if (topk_weights.has_value()) {
    const int64_t picks = topk_weights->size(1);
    weight_slots =
        at::zeros({num_tokens * slot_picks}, rows.options().dtype(accumulate))
            .index_copy_(0, slot,
                         topk_weights->to(accumulate)
                             .reshape({-1})
                             .index_select(0, token * picks + pick))
            .view({num_tokens, slot_picks});
  }
  at::Tensor acc =
      at::zeros({num_tokens, hidden}, rows.options().dtype(accumulate));
  // A chunk of tokens at a time: its weighted terms in one go ([chunk,
  // slot_picks, H] in the accumulation type, two kernels), then their sum
  // in pick order (one in-place add per pick). The chunk bounds that
  // temporary to kTermElements.
  constexpr int64_t kTermElements = int64_t{1} << 26;
  const int64_t chunk = std::max<int64_t>(
      1, kTermElements / std::max<int64_t>(1, slot_picks * hidden));
  for (int64_t first = 0; first < num_tokens; first += chunk) {
    const int64_t n = std::min(chunk, num_tokens - first);
    at::Tensor terms = slots.narrow(0, first, n).to(accumulate);
    if (weight_slots.defined()) {
      terms.mul_(weight_slots.narrow(0, first, n).unsqueeze(2));
    }
    at::Tensor sum = acc.narrow(0, first, n);
    for (int64_t k = 0; k < slot_picks; ++k) {
      sum.add_(terms.select(1, k));
    }
  }
  return acc.to(rows.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------------------

MoeDispatchOutput dispatchCollective(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights, int64_t num_experts,
    Communicator& communicator) {
  at::NoGradGuard no_grad;
  const int64_t world_size = communicator.size();
  const int64_t me = communicator.rank();
  const at::Device device = x.defined() ? x.device() : communicator.device();
  const at::TensorOptions longs = at::TensorOptions(at::kLong).device(device);
  c10d::Backend& backend = communicator.backend(device.type());

  // 1. Check the inputs and count rows per destination, on the device.
  const HostStatus host_status = moe::checkDispatchInputs(
      x, topk_idx, topk_weights, num_experts, world_size, device);
  const bool valid = host_status.ok();
  DeviceStatus status(host_status.toDevice(device));
  const int64_t tokens = valid ? x.size(0) : -1;
  const int64_t hidden = valid ? x.size(1) : -1;
  const int64_t picks = valid ? topk_idx.size(1) : -1;
  const int64_t local_experts = valid ? num_experts / world_size : 1;
  at::Tensor idx;  // [T * K] i64 expert ids
  at::Tensor rows_to_rank = at::zeros({world_size}, longs);
  if (valid) {
    const at::Tensor idx_2d = topk_idx.to(at::kLong);
    moe::checkExpertIds(status, idx_2d, num_experts);
    idx = idx_2d.reshape({-1});
    const at::Tensor sent = at::logical_and(idx >= 0, idx < num_experts);
    // Masked and invalid picks count in an extra bucket, never sent.
    const at::Tensor dst =
        at::where(sent, at::div(idx, local_experts, "floor"), world_size);
    rows_to_rank = at::zeros({world_size + 1}, longs)
                       .index_add_(0, dst, at::ones_like(dst))
                       .narrow(0, 0, world_size);
  }

  // 2. Exchange statuses and counts; the one copy to the host.
  const at::Tensor info =
      moe::headerWords(num_experts, hidden, dtypeCode(x),
                       topk_weights ? dtypeCode(*topk_weights) : kNoDtype,
                       tokens, picks)
          .to(device, /*non_blocking=*/true);
  const at::Tensor table_on_device =
      exchangeHeaders(backend, at::cat({status.words(), info, rows_to_rank}),
                      world_size, "MoeDispatch");
  const at::Tensor table = table_on_device.cpu();
  moe::checkDispatchTable(table, "collective");

  const int64_t width = table.size(1);
  const int64_t* words = table.data_ptr<int64_t>();
  std::vector<int64_t> send_splits(world_size);
  std::vector<int64_t> recv_splits(world_size);
  int64_t num_send = 0;
  int64_t num_recv = 0;
  for (int64_t r = 0; r < world_size; ++r) {
    send_splits[r] = words[me * width + kHeaderWords + r];
    recv_splits[r] = words[r * width + kHeaderWords + me];
    num_send += send_splits[r];
    num_recv += recv_splits[r];
  }

  // 3. Unmasked pairs sorted by expert, then token: a stable sort of the
  // (token, pick)-ordered ids, masked ones (key E) last.
  const at::Tensor key = at::where(idx >= 0, idx, num_experts);
  const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, 0, false))
                               .narrow(0, 0, num_send);
  const at::Tensor token = at::div(order, picks, "floor");
  const at::Tensor pick = order.remainder(picks);
  // Rows travel on their own, in x's dtype, straight into recv_x's storage;
  // their (token, pick, expert) and weight travel as bytes beside them.
  at::Tensor send_x = x.index_select(0, token);
  at::Tensor recv_x = at::empty({num_recv, hidden}, x.options());
  allToAll(backend, recv_x, send_x, recv_splits, send_splits, "MoeDispatch");
  std::vector<at::Tensor> parts = {
      asBytes(at::stack({token, pick, idx.index_select(0, order)}, 1))};
  if (topk_weights.has_value()) {
    parts.push_back(asBytes(
        topk_weights->reshape({-1}).index_select(0, order).unsqueeze(1)));
  }
  at::Tensor send_meta = at::cat(parts, 1);
  at::Tensor recv_meta =
      at::empty({num_recv, send_meta.size(1)}, send_meta.options());
  allToAll(backend, recv_meta, send_meta, recv_splits, send_splits,
           "MoeDispatch");

  // 4. Expert-major on the receiver. Each sender's rows are sorted by
  // expert, so with one rank, or one expert per rank, they already are.
  int64_t offset = 0;
  const at::Tensor meta = fromBytes(recv_meta, offset, 3, at::kLong);
  const at::Tensor local_expert = meta.select(1, 2) - me * local_experts;
  const bool expert_major = world_size == 1 || local_experts == 1;
  const at::Tensor perm =
      expert_major
          ? at::Tensor()
          : std::get<1>(at::sort(local_expert, /*stable=*/true, 0, false));
  auto arrange = [&](const at::Tensor& t) {
    return expert_major ? t.contiguous() : t.index_select(0, perm);
  };

  MoeDispatchOutput out;
  out.recv_x = arrange(recv_x);
  if (topk_weights.has_value()) {
    out.recv_weights =
        arrange(fromBytes(recv_meta, offset, 1, topk_weights->scalar_type())
                    .reshape({-1}));
  }
  MoeLayout& layout = out.layout;
  layout.n_tokens_to_rank = table_on_device.select(0, me)
                                .narrow(0, kHeaderWords, world_size)
                                .clone(at::MemoryFormat::Contiguous);
  layout.n_tokens_from_rank = table_on_device.select(1, kHeaderWords + me)
                                  .clone(at::MemoryFormat::Contiguous);
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
  at::NoGradGuard no_grad;
  const int64_t world_size = communicator.size();
  const int64_t me = communicator.rank();
  const at::Device device =
      expert_out.defined() ? expert_out.device() : communicator.device();
  const at::TensorOptions longs = at::TensorOptions(at::kLong).device(device);
  c10d::Backend& backend = communicator.backend(device.type());

  // 1. Check expert_out and the layout.
  const HostStatus host_status =
      moe::checkCombineInputs(expert_out, layout, topk_weights, num_tokens,
                              num_experts, world_size, device);
  const bool valid = host_status.ok();
  DeviceStatus status(host_status.toDevice(device));
  const int64_t rows = valid ? expert_out.size(0) : 0;
  const int64_t hidden = valid ? expert_out.size(1) : -1;
  const int64_t picks =
      valid && topk_weights.has_value() ? topk_weights->size(1) : -1;
  at::Tensor to_rank = at::zeros({world_size}, longs);
  at::Tensor from_rank = at::zeros({world_size}, longs);
  at::Tensor max_token = at::full({world_size}, -1, longs);
  at::Tensor max_pick = at::full({world_size}, -1, longs);
  if (valid) {
    moe::checkLayoutValues(status, layout, rows, world_size);
    to_rank = layout.n_tokens_to_rank;
    from_rank = layout.n_tokens_from_rank;
    const at::Tensor src = layout.src_rank.clamp(0, world_size - 1);
    max_token = max_token.scatter_reduce(0, src, layout.src_token, "amax");
    max_pick = max_pick.scatter_reduce(0, src, layout.src_k, "amax");
  }

  // 2. Exchange statuses and the layout's counts; the one copy to the host.
  const at::Tensor info =
      moe::headerWords(num_experts, hidden, dtypeCode(expert_out),
                       topk_weights ? dtypeCode(*topk_weights) : kNoDtype,
                       num_tokens, picks)
          .to(device, /*non_blocking=*/true);
  const at::Tensor table =
      exchangeHeaders(backend,
                      at::cat({status.words(), info, to_rank, from_rank,
                               max_token, max_pick}),
                      world_size, "MoeCombine")
          .cpu();
  checkCombineTable(table);

  const int64_t width = table.size(1);
  const int64_t* all_words = table.data_ptr<int64_t>();
  const int64_t* words = all_words + me * width;
  std::vector<int64_t> send_splits(world_size);
  std::vector<int64_t> recv_splits(world_size);
  int64_t num_recv = 0;
  // Pick slots per token in step 4: 1 + the largest pick any rank holds
  // from this one (K is unknown here without weights).
  int64_t slot_picks = 0;
  for (int64_t r = 0; r < world_size; ++r) {
    send_splits[r] = words[kHeaderWords + kFromRank * world_size + r];
    recv_splits[r] = words[kHeaderWords + kToRank * world_size + r];
    num_recv += recv_splits[r];
    slot_picks = std::max(
        slot_picks,
        all_words[r * width + kHeaderWords + kMaxPick * world_size + me] + 1);
  }

  // 3. Every row back to its source rank, in x's dtype on its own, its
  // (token, pick) beside it. Sorted by source rank, unless there is one.
  const bool one_source = world_size == 1;
  const at::Tensor perm =
      one_source
          ? at::Tensor()
          : std::get<1>(at::sort(layout.src_rank, /*stable=*/true, 0, false));
  auto bySource = [&](const at::Tensor& t) {
    return one_source ? t.contiguous() : t.index_select(0, perm);
  };
  at::Tensor send_rows = bySource(expert_out);
  at::Tensor returned =
      at::empty({num_recv, send_rows.size(1)}, send_rows.options());
  allToAll(backend, returned, send_rows, recv_splits, send_splits,
           "MoeCombine");
  at::Tensor send_meta =
      bySource(at::stack({layout.src_token, layout.src_k}, 1));
  at::Tensor meta = at::empty({num_recv, 2}, send_meta.options());
  allToAll(backend, meta, send_meta, recv_splits, send_splits, "MoeCombine");

  // 4. Per token, the sum of its picks in pick order (see combineInOrder).
  return combineInOrder(returned, meta.select(1, 0), meta.select(1, 1),
                        topk_weights, num_tokens, slot_picks);
}

}  // namespace hostfuse
