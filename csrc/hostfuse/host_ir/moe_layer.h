// A Mixture-of-Experts layer as a host program, built with the IR API, and
// its plain-ATen reference. The example (examples/moe_layer_example.cpp),
// the benchmark (benchmarks/bench_moe_layer.cpp) and the multi-rank graph
// tests build it from here.
//
// Notation: R ranks, T tokens on this rank, H hidden size, I intermediate
// size of an expert, E experts in all, L = E / R local experts, K picks per
// token.
//
//   logits   = linear(cast(x, f32), cast(router_w, f32))   [T, E]
//   scores   = softmax(logits, -1)                         [T, E]
//   (top, topk_idx) = topk(scores, K)                      [T, K]
//   topk_weights = top / sum(top, -1)    (renormalize)     [T, K] f32
//   d        = MoeDispatch(x, topk_idx, topk_weights, E, backend, quantize)
//   rows     = d.recv_x, or with fp8 dispatch
//              DequantizeFp8(d.recv_x, d.recv_scales) in dtype  (once)
//   gate     = GroupedMatmul(rows, w_gate, d.recv_expert_counts)
//   up       = GroupedMatmul(rows, w_up, d.recv_expert_counts)
//              (fused_gate_up: gate_up = GroupedMatmul(rows, w_gate_up,
//              counts) [rows, 2I], gate and up its two halves, as views)
//   act      = RunFusion(silu(gate) * up, row_counts =
//                        d.recv_expert_counts)              [rows, I]
//              (fused_activation: act = GroupedMatmul(rows, w_gate_up,
//              counts, epilogue=silu_mul), the same values from one op)
//   down     = GroupedMatmul(act, w_down, d.recv_expert_counts)
//   out      = MoeCombine(down, d, topk_weights, T, reduce)  [T, H]
//
// Inputs, in order: x [T, H], router_w [E, H], w_gate [L, H, I],
// w_up [L, H, I], w_down [L, I, H] (all of `dtype`; router_w is the same on
// every rank, the expert weights are this rank's L experts). With
// fused_gate_up, w_gate_up [L, H, 2I] (= cat(w_gate, w_up, 2), the layout
// of fused MoE kernels' w13) takes the place of w_gate and w_up. Outputs, in
// order: out [T, H] (dtype), topk_idx [T, K] i64, topk_weights [T, K] f32.
//
// With the cuda backend, dispatch returns C capacity rows; the rows past
// each rank's valid count are padding that the grouped matmuls and the
// activation (row-limited by the counts) do not compute and combine never
// reads.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/ir/data_type.h>
#include <hostfuse/multidevice/moe/nodes.h>

namespace hostfuse {

struct MoeLayerConfig {
  int64_t hidden = 0;         // H
  int64_t intermediate = 0;   // I
  int64_t num_experts = 0;    // E
  int64_t local_experts = 0;  // L = E / R
  int64_t topk = 0;           // K
  DataType dtype = DataType::BFloat16;
  MoeBackend backend = MoeBackend::Collective;
  // Divide the top-k scores of a token by their sum.
  bool renormalize = true;
  // Rows per receiving rank with backend=cuda; 0 is the worst case.
  int64_t capacity = 0;
  // The dispatch's rows (fp8_e4m3: quantized, docs/moe.md) and the
  // combine's mode.
  MoeDispatchQuant quantize = MoeDispatchQuant::None;
  MoeCombineReduce reduce = MoeCombineReduce::PerPick;
  // Gate and up projections as one grouped matmul of [L, H, 2I] weights
  // (one input, w_gate_up, instead of w_gate and w_up).
  bool fused_gate_up = false;
  // silu(gate) * up as that grouped matmul's epilogue
  // (GroupedMatmulEpilogue::SiluMul: in hostfuse's sm_90a grouped GEMM
  // where it runs) instead of a fusion after it. Needs fused_gate_up.
  bool fused_activation = false;
};

std::unique_ptr<HostIrContainer> makeMoeLayerProgram(
    const MoeLayerConfig& config);

// Sets the modes of `config` to those a layer runs fastest in, for a layer
// on GPUs or not (`on_gpu`) over `ranks` ranks (docs/performance.md, "The
// whole layer"):
// - fused_gate_up: one grouped matmul of twice the width over the same
//   weight bytes instead of two (one H200, T = 128: 292.3 us per step
//   against 299.0);
// - fused_activation on GPUs: silu(gate) * up in that GEMM's epilogue (one
//   H100, 2026-12-06: 329.4 against 342.0 us per step at T = 128; 4691.4
//   against 4744.3 at T = 4096, within what runs of the same code vary);
// - reduce: per_rank on GPUs with more than one rank, where it sends one
//   row per (token, rank) over the links instead of one per pick (chosen
//   for the bytes; not yet measured on more than one GPU); per_pick
//   otherwise (on one GPU per_rank adds a rounding per token, about 1 us
//   at T = 128; the collective backend's per_rank is 1.4x its per_pick).
// quantize is left as it is: fp8 dispatch changes the layer's numbers, and
// on one GPU it is slower (docs/perf_log.md, 2026-12-04).
void useFastestModes(MoeLayerConfig& config, bool on_gpu, int64_t ranks);

// The layer's modes as the words of the example's and the benchmark's
// --reduce, --gate-up and --activation flags; "auto" leaves a mode to
// useFastestModes.
struct MoeLayerModeWords {
  std::string reduce = "auto";      // one of kReduceWords
  std::string gate_up = "fused";    // one of kGateUpWords
  std::string activation = "auto";  // one of kActivationWords

  // The words each field takes (the flags' choices).
  inline static const std::vector<std::string> kReduceWords = {
      "auto", "per_pick", "per_rank"};
  inline static const std::vector<std::string> kGateUpWords = {"fused",
                                                               "separate"};
  inline static const std::vector<std::string> kActivationWords = {
      "auto", "fusion", "epilogue"};
};

// Why `words` make no layer, in the flags' terms ("--activation epilogue
// needs --gate-up fused", or a word that is not one of its flag's); empty
// when they make one.
std::string moeLayerModeWordsProblem(const MoeLayerModeWords& words);

// useFastestModes(config, on_gpu, ranks), then every mode that `words`
// name: reduce, fused_gate_up, and fused_activation (with activation
// "auto", off when gate and up are two GEMMs: the epilogue needs the fused
// one). Throws with moeLayerModeWordsProblem's text for words that make no
// layer.
void useMoeLayerModes(MoeLayerConfig& config, bool on_gpu, int64_t ranks,
                      const MoeLayerModeWords& words);

// The expert weights as the program of `config` takes them, after x and
// router_w: {w_gate, w_up, w_down}, or with fused_gate_up {w_gate_up =
// cat(w_gate, w_up, 2), w_down} (concatenated here, once: keep the result
// for every step). On a GPU of compute capability 9.0 each is stored
// K-major (the memory of [L, N, H], as nn.Linear keeps its weights, seen as
// [L, H, N]): the layout hostfuse's sm_90a grouped GEMM reads
// (GroupedMatmul, ir/grouped_matmul.h); elsewhere they keep their layout.
std::vector<at::Tensor> moeLayerExpertWeights(const MoeLayerConfig& config,
                                              const at::Tensor& w_gate,
                                              const at::Tensor& w_up,
                                              const at::Tensor& w_down);

// The program's inputs that stay the same from step to step (router_w and
// the expert weights), for GraphRunnerOptions::persistent_inputs.
std::vector<size_t> moeLayerPersistentInputs(const MoeLayerConfig& config);

// The fusion of the activation: act = silu(gate) * up, computed in fp32 and
// rounded to `dtype`; inputs gate, up [rows, I].
std::shared_ptr<Fusion> makeSiluMulFusion(int64_t intermediate, DataType dtype);

// The layer's output for this rank's tokens, from plain ATen token by token:
// out[t] = sum_k topk_weights[t, k] * expert(topk_idx[t, k], x[t]) with
// expert(e, v) = ((silu(v W_gate[e]) * (v W_up[e])) W_down[e]), computed in
// fp32 from the inputs' values and rounded to x's dtype. `w_gate`, `w_up`,
// `w_down` hold every expert's weights ([E, ...], all ranks' in rank
// order); topk_idx/topk_weights are the routing to follow (what the
// program returned; moeRoutingError checks the router itself). A pick of
// -1 contributes nothing. Runs on x's device.
at::Tensor moeLayerReference(const at::Tensor& x, const at::Tensor& topk_idx,
                             const at::Tensor& topk_weights,
                             const at::Tensor& w_gate, const at::Tensor& w_up,
                             const at::Tensor& w_down);

// How far the routing the program returned is from the router recomputed
// with ATen (at::linear and at::softmax in fp32): the largest of (a) an
// unpicked expert's score minus the smallest picked score of its token (a
// pick that is not top-k; ties are fine) and (b) the difference between a
// weight and its (renormalized) picked score. 0 when exact; compare with a
// tolerance that fits the dtype.
double moeRoutingError(const at::Tensor& x, const at::Tensor& router_w,
                       const at::Tensor& topk_idx,
                       const at::Tensor& topk_weights, bool renormalize);

}  // namespace hostfuse
