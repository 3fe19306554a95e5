// The collective backend's algorithm: eager, exact row counts, payload moved
// with c10d alltoall_base (Gloo for CPU tensors, NCCL for CUDA tensors). No
// IR here; CollectiveMoeRuntime (runtime.h beside this file) calls these.
//
// Notation: R ranks, T tokens on this rank, H hidden size, K picks per
// token, E experts (E % R == 0), L = E / R local experts; expert e lives on
// rank e / L. A (token, pick) pair with topk_idx == -1 is masked: it is not
// sent and adds nothing to the combine.
//
// Dispatch, on every rank:
//  1. check the inputs (status words, multidevice/moe/input_checks.h) and
//     count the rows for each destination rank, on the device;
//  2. exchange [status, E, H, dtype, T, K, rows to each rank] with every
//     rank: one all-to-all of a small i64 tensor, then one copy to the host
//     (the only host synchronization, needed for alltoall_base's split
//     sizes); every rank raises the same error if any rank's input is bad;
//  3. sort the unmasked pairs by expert (hence by destination rank), then
//     by token, and send each pair's row of x in x's dtype with one
//     alltoall_base, its (token, pick, expert) and weight with another;
//     sum the fingerprint of what goes to each rank into the layout's id
//     (multidevice/moe/layout_id.h), after the call's number;
//  4. on the receiver, order the rows expert-major: by local expert, then
//     source rank, then source token (a stable sort by local expert of rows
//     that arrive grouped by source rank in (expert, token) order).
// Combine, on every rank:
//  1. check the expert outputs against the layout dispatch returned;
//  2. exchange [status, T, K, H', rows to/from each rank, largest token and
//     pick index and the fingerprint of the rows held per source rank, the
//     layout's id] with every rank, copy it to the host once; every rank
//     checks that the layout matches across ranks (what rank i holds from
//     rank j is what j sent to i, by count and by fingerprint, in a layout
//     of the same dispatch) and that every row names a token and pick its
//     source rank has;
//  3. send every row back to its source rank with its (token, pick);
//  4. put every returned row into its (token, pick) slot, then per token
//     acc = +0; for k = 0..K-1: acc = acc + w[t, k] * row(t, k), in fp32,
//     each product and sum rounded on its own; cast to expert_out's dtype.
//     This is the cuda backend's order, so both give the same bits.
// On CUDA tensors the device steps around the all-to-alls are the kernels
// of kernels/collective_kernels.h; on CPU tensors, ATen operations with the
// same results. With one rank the payload is not exchanged.
// Dispatch and combine are collectives: every rank calls them in the same
// order, with tensors of one device type.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/runtime.h>

namespace hostfuse {

// Sends every unmasked (token, pick) of this rank to the rank of its expert.
// x [T, H] floating; topk_idx [T, K] i64 or i32; topk_weights [T, K]
// floating or nullopt. Errors (on every rank alike) name the argument and
// the rank whose input is bad.
// With fp8_e4m3, the rows travel quantized (moe/fp8.h) and recv_scales is
// set.
MoeDispatchOutput dispatchCollective(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights, int64_t num_experts,
    Communicator& communicator,
    MoeDispatchQuant quantize = MoeDispatchQuant::None);

// The combine of MoeRuntime::combine, in either mode (backend.h,
// MoeCombineReduce).
at::Tensor combineCollective(const MoeCombineArgs& args,
                             Communicator& communicator);

// reduce=per_pick. Returns combined [num_tokens, H'] in expert_out's dtype,
// where combined[t] = sum over unmasked k of w[t, k] * expert_out row of (t,
// k), w = topk_weights (1 without), accumulated in fp32 in pick order k = 0, 1,
// ... without fused multiply-adds (fp64 for fp64 rows). expert_out [rows, H']
// must be in the layout `layout` describes.
at::Tensor combineCollective(const at::Tensor& expert_out,
                             const MoeLayout& layout,
                             const std::optional<at::Tensor>& topk_weights,
                             int64_t num_tokens, int64_t num_experts,
                             Communicator& communicator);

// For a rank that failed outside a MoE call while its peers make, or will
// make, their next collective MoE call of `communicator` (on tensors of
// `device`'s type): takes part in that call's table exchange with rows that
// say so, and the peers raise at once, naming this rank, instead of waiting
// for it until their timeout. Blocks until they are there. Never throws:
// the caller goes on to raise its own error. Does nothing with one rank.
void publishCollectiveFailure(Communicator& communicator,
                              const at::Device& device) noexcept;

}  // namespace hostfuse
