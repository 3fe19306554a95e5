// An independent reference for MoE dispatch/combine, for the multi-rank
// tests: every rank all-gathers every rank's inputs and computes what it
// should receive and what combine should return with plain loops and ATen on
// the CPU. Shares no code with
// csrc/hostfuse/multidevice/moe/collective/dispatch_combine.cpp.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

#include <hostfuse/multidevice/comm/communicator.h>

namespace hostfuse::test {

Communicator& communicator();
// This process's rank and the number of ranks, from communicator().
int64_t worldSize();
int64_t myRank();

// True unless every rank on this host has a GPU of its own (CUDA tests of
// the multi-rank binaries skip then).
bool lacksGpuPerRank();
// True unless every rank has a GPU, of its own or shared with other ranks
// (HOSTFUSE_SHARE_GPUS=1): enough for the cuda MoE backend alone, whose
// set-up goes over Gloo when GPUs are shared, not for NCCL.
bool lacksGpuForCudaBackend();

// Gathers `tensor` [n_r, ...] from every rank r, whose n_r may differ;
// result[r] is rank r's, on the CPU. A collective: every rank calls it.
std::vector<at::Tensor> allGatherRows(const at::Tensor& tensor);

// What rank `rank` should get from MoeDispatch, given every rank's inputs
// (index r holds rank r's). `weights` is empty without weights. CPU tensors.
struct ExpectedDispatch {
  at::Tensor recv_x;
  at::Tensor src_rank;
  at::Tensor src_token;
  at::Tensor src_k;
  at::Tensor recv_weights;  // undefined without weights
  at::Tensor expert_counts;
  at::Tensor n_tokens_to_rank;
  at::Tensor n_tokens_from_rank;
};
ExpectedDispatch referenceDispatch(const std::vector<at::Tensor>& xs,
                                   const std::vector<at::Tensor>& idxs,
                                   const std::vector<at::Tensor>& weights,
                                   int64_t num_experts, int64_t rank);

// The expert computation of the tests: rows of expert `expert` -> outputs.
using ExpertFn =
    std::function<at::Tensor(int64_t expert, const at::Tensor& rows)>;

// rows * (1 + expert / 4), computed in fp32 and rounded to the rows' dtype:
// different for every expert, so a row sent to the wrong expert shows.
at::Tensor scaleByExpert(int64_t expert, const at::Tensor& rows);

// Applies `fn` to expert-major rows: the first counts[0] rows are local
// expert 0 (global first_expert), and so on.
at::Tensor applyExperts(const at::Tensor& rows, const at::Tensor& counts,
                        int64_t first_expert, const ExpertFn& fn);

// combined[t] = sum over unmasked k of w[t, k] * fn(idx[t, k], x[t]),
// summed in double, in x's dtype. `weights` may be undefined (w = 1).
at::Tensor referenceCombine(const at::Tensor& x, const at::Tensor& idx,
                            const at::Tensor& weights, const ExpertFn& fn);

// combined in the order both backends promise, for exact comparison: per
// token acc = +0 in fp32; for k = 0..K-1 with idx[t, k] >= 0: acc = acc +
// w[t, k] * fn(idx[t, k], x[t]) (w = 1 without weights), one rounding per
// product and per sum; then rounded to x's dtype. CPU result.
at::Tensor referenceCombineInPickOrder(const at::Tensor& x,
                                       const at::Tensor& idx,
                                       const at::Tensor& weights,
                                       const ExpertFn& fn);

// combined with reduce=per_rank (docs/moe.md), for exact comparison: per
// token and per rank r in rank order that holds picks of the token, a
// partial = +0 in fp32, then for its picks k on r in pick order partial =
// partial + w[t, k] * fn(idx[t, k], x[t]), rounded to x's dtype; acc = +0
// in fp32 plus each partial in rank order; then rounded to x's dtype.
// Expert e lives on rank e / (num_experts / world_size). CPU result.
at::Tensor referenceCombinePerRank(const at::Tensor& x, const at::Tensor& idx,
                                   const at::Tensor& weights,
                                   const ExpertFn& fn, int64_t num_experts,
                                   int64_t world_size);

// fp8 dispatch's quantization (docs/moe.md, "fp8 dispatch") with plain
// loops, without ATen's fp8 conversion: per row and block of 128 channels,
// scale = max(amax, 1e-4) / 448 and q = the e4m3 value nearest to
// clamp(x / scale, -448, 448) (ties to the even code), found among every
// e4m3 value decoded from its bits. x [N, H] floating (CPU), finite.
// Returns q's bytes [N, H] u8 and scales [N, H / 128] fp32.
struct Fp8Rows {
  at::Tensor bytes;
  at::Tensor scales;
};
Fp8Rows referenceQuantizeFp8(const at::Tensor& x);

// topk_weights [T, K]: positive weights in [0.1, 1.1) from a fixed seed.
at::Tensor randomWeights(int64_t tokens, int64_t picks, at::ScalarType dtype,
                         const at::Device& device, uint64_t seed);

// How tokens pick experts in a test case.
enum class Routing {
  Uniform,        // distinct random experts per token
  Skewed,         // every token's first pick is the same expert
  IdleRank,       // no token picks an expert of the last rank
  EmptyRank,      // rank 0 has no tokens
  Masked,         // about 40% of the picks are -1
  VaryingTokens,  // T differs on every rank
};
std::string toString(Routing routing);

// T of `rank` for a routing (some give ranks different T).
int64_t tokensFor(Routing routing, int64_t rank);

// topk_idx [T, K] i64 on the CPU, from a fixed seed. Picks of one token
// name distinct experts; when K exceeds the experts a routing allows, the
// extra picks are -1.
at::Tensor makeRouting(Routing routing, int64_t tokens, int64_t picks,
                       int64_t num_experts, int64_t world_size, int64_t rank,
                       uint64_t seed);

}  // namespace hostfuse::test
