#include <hostfuse/host_ir/moe_layer.h>

#include <algorithm>

#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/fp8_rows.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/narrow.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/ir/topk_softmax.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

namespace {

TensorView* toDtype(TensorView* x, DataType dtype) {
  return x->dtype() == dtype ? x : cast(x, dtype);
}

}  // namespace

std::shared_ptr<Fusion> makeSiluMulFusion(int64_t intermediate,
                                          DataType dtype) {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "rows");
  TensorView* gate = makeTensor({rows, intermediate}, dtype, "gate");
  TensorView* up = makeTensor({rows, intermediate}, dtype, "up");
  fusion->addInput(gate);
  fusion->addInput(up);
  TensorView* act =
      mul(silu(toDtype(gate, DataType::Float)), toDtype(up, DataType::Float));
  fusion->addOutput(toDtype(act, dtype));
  return fusion;
}

std::unique_ptr<HostIrContainer> makeMoeLayerProgram(
    const MoeLayerConfig& config) {
  HF_CHECK(
      config.hidden > 0 && config.intermediate > 0 && config.num_experts > 0 &&
          config.local_experts > 0 && config.topk > 0,
      "makeMoeLayerProgram: H = ", config.hidden, ", I = ", config.intermediate,
      ", E = ", config.num_experts, ", L = ", config.local_experts,
      " and K = ", config.topk, " must all be positive");
  HF_CHECK(config.topk <= config.num_experts,
           "makeMoeLayerProgram: K = ", config.topk,
           " exceeds the number of experts E = ", config.num_experts);
  HF_CHECK(!config.fused_activation || config.fused_gate_up,
           "makeMoeLayerProgram: fused_activation (silu(gate) * up in the "
           "grouped matmul's epilogue) needs fused_gate_up (gate and up as "
           "one grouped matmul)");
  const int64_t H = config.hidden;
  const int64_t I = config.intermediate;
  const int64_t L = config.local_experts;
  const DataType dtype = config.dtype;

  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, H}, dtype, "x");
  TensorView* router_w = makeTensor({config.num_experts, H}, dtype, "router_w");
  program->addInput(x);
  program->addInput(router_w);
  TensorView* w_gate = nullptr;
  TensorView* w_up = nullptr;
  TensorView* w_gate_up = nullptr;
  if (config.fused_gate_up) {
    w_gate_up = makeTensor({L, H, 2 * I}, dtype, "w_gate_up");
    program->addInput(w_gate_up);
  } else {
    w_gate = makeTensor({L, H, I}, dtype, "w_gate");
    w_up = makeTensor({L, H, I}, dtype, "w_up");
    program->addInput(w_gate);
    program->addInput(w_up);
  }
  TensorView* w_down = makeTensor({L, I, H}, dtype, "w_down");
  program->addInput(w_down);

  // Router in fp32 (as large models do): the top K experts of a token do
  // not hinge on bf16 rounding of its logits. The logits sum x's products
  // with router_w's in fp32 (exact products of the bf16 values, as if both
  // were cast first); softmax, top-k and the renormalization are one op.
  TensorView* logits = dtype == DataType::BFloat16 || dtype == DataType::Half
                           ? linear(x, router_w, nullptr, DataType::Float)
                           : linear(toDtype(x, DataType::Float),
                                    toDtype(router_w, DataType::Float));
  const TopKSoftmaxResult top =
      topkSoftmax(logits, config.topk, config.renormalize);
  TensorView* weights = top.weights;

  // Experts on this rank's expert-major rows.
  const MoeDispatchResult d =
      moeDispatch(x, top.indices, weights, config.num_experts, config.backend,
                  config.capacity, config.quantize);
  // fp8 rows: dequantized once for both matmuls, only those that hold
  // tokens (the cuda backend's recv_x has its capacity's rows).
  TensorView* rows =
      d.recv_scales != nullptr
          ? dequantizeFp8(d.recv_x, d.recv_scales, dtype, d.recv_expert_counts)
          : d.recv_x;
  TensorView* gate = nullptr;
  TensorView* up = nullptr;
  TensorView* act = nullptr;
  if (config.fused_activation) {
    act = groupedMatmul(rows, w_gate_up, d.recv_expert_counts, nullptr,
                        GroupedMatmulEpilogue::SiluMul);
  } else if (config.fused_gate_up) {
    // One grouped matmul of twice the width; the activation reads its
    // halves in place (strided views).
    TensorView* gate_up = groupedMatmul(rows, w_gate_up, d.recv_expert_counts);
    gate = narrow(gate_up, 1, 0, I);
    up = narrow(gate_up, 1, I, I);
  } else {
    gate = groupedMatmul(rows, w_gate, d.recv_expert_counts);
    up = groupedMatmul(rows, w_up, d.recv_expert_counts);
  }
  // Only the rows that hold tokens: with the cuda backend the GEMM outputs
  // have the dispatch's capacity rows, most of them padding with more than
  // one rank.
  if (act == nullptr) {
    act =
        runFusion(makeSiluMulFusion(I, dtype), {gate, up}, d.recv_expert_counts)
            .at(0);
  }
  TensorView* down = groupedMatmul(act, w_down, d.recv_expert_counts);

  program->addOutput(moeCombine(down, d, weights, tokens, config.reduce));
  program->addOutput(top.indices);
  program->addOutput(weights);
  return program;
}

void useFastestModes(MoeLayerConfig& config, bool on_gpu, int64_t ranks) {
  HF_CHECK(ranks >= 1, "useFastestModes: ranks must be >= 1, got ", ranks);
  config.fused_gate_up = true;
  config.fused_activation = on_gpu;
  config.reduce = on_gpu && ranks > 1 ? MoeCombineReduce::PerRank
                                      : MoeCombineReduce::PerPick;
}

namespace {

// Empty when `word` is one of `choices`, else "<flag> must be a, b or c, got
// '<word>'".
std::string notAChoice(const char* flag, const std::string& word,
                       const std::vector<std::string>& choices) {
  if (std::find(choices.begin(), choices.end(), word) != choices.end()) {
    return "";
  }
  std::string listed;
  for (size_t i = 0; i < choices.size(); ++i) {
    listed += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ");
    listed += choices[i];
  }
  return std::string(flag) + " must be " + listed + ", got '" + word + "'";
}

}  // namespace

std::string moeLayerModeWordsProblem(const MoeLayerModeWords& words) {
  for (const std::string& problem :
       {notAChoice("--reduce", words.reduce, MoeLayerModeWords::kReduceWords),
        notAChoice("--gate-up", words.gate_up, MoeLayerModeWords::kGateUpWords),
        notAChoice("--activation", words.activation,
                   MoeLayerModeWords::kActivationWords)}) {
    if (!problem.empty()) {
      return problem;
    }
  }
  if (words.activation == "epilogue" && words.gate_up != "fused") {
    return "--activation epilogue needs --gate-up fused";
  }
  return "";
}

void useMoeLayerModes(MoeLayerConfig& config, bool on_gpu, int64_t ranks,
                      const MoeLayerModeWords& words) {
  const std::string problem = moeLayerModeWordsProblem(words);
  HF_CHECK(problem.empty(), "useMoeLayerModes: ", problem);
  useFastestModes(config, on_gpu, ranks);
  if (words.reduce != "auto") {
    config.reduce = *parseMoeCombineReduce(words.reduce);
  }
  config.fused_gate_up = words.gate_up == "fused";
  if (words.activation != "auto") {
    config.fused_activation = words.activation == "epilogue";
  } else if (!config.fused_gate_up) {
    config.fused_activation = false;
  }
}

std::vector<at::Tensor> moeLayerExpertWeights(const MoeLayerConfig& config,
                                              const at::Tensor& w_gate,
                                              const at::Tensor& w_up,
                                              const at::Tensor& w_down) {
  // Same values, stored K-major (the memory of [L, N, H] seen as
  // [L, H, N]) on a GPU of compute capability 9.0, where hostfuse's grouped
  // GEMM reads them; elsewhere as given (at::_grouped_mm reads the plain
  // layout as fast or faster: docs/performance.md).
  auto k_major = [](const at::Tensor& w) {
    if (!w.is_cuda() ||
        cuda::computeCapability(w.device().index()) != std::make_pair(9, 0)) {
      return w;
    }
    return w.transpose(1, 2).contiguous().transpose(1, 2);
  };
  if (config.fused_gate_up) {
    return {k_major(at::cat({w_gate, w_up}, 2)), k_major(w_down)};
  }
  return {k_major(w_gate), k_major(w_up), k_major(w_down)};
}

std::vector<size_t> moeLayerPersistentInputs(const MoeLayerConfig& config) {
  if (config.fused_gate_up) {
    return {1, 2, 3};
  }
  return {1, 2, 3, 4};
}

at::Tensor moeLayerReference(const at::Tensor& x, const at::Tensor& topk_idx,
                             const at::Tensor& topk_weights,
                             const at::Tensor& w_gate, const at::Tensor& w_up,
                             const at::Tensor& w_down) {
  const at::Device device = x.device();
  const at::Tensor idx = topk_idx.to(device, at::kLong);
  const at::Tensor weights = topk_weights.to(device, at::kFloat);
  at::Tensor out =
      at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  for (int64_t e = 0; e < w_gate.size(0); ++e) {
    const at::Tensor hits = (idx == e).nonzero();  // (token, pick)
    if (hits.size(0) == 0) {
      continue;
    }
    const at::Tensor t = hits.select(1, 0);
    const at::Tensor k = hits.select(1, 1);
    const at::Tensor rows = x.index_select(0, t).to(at::kFloat);
    const at::Tensor gate = at::matmul(rows, w_gate[e].to(device, at::kFloat));
    const at::Tensor up = at::matmul(rows, w_up[e].to(device, at::kFloat));
    const at::Tensor y =
        at::matmul(at::silu(gate) * up, w_down[e].to(device, at::kFloat));
    out.index_add_(0, t, y * weights.index({t, k}).unsqueeze(1));
  }
  return out.to(x.scalar_type());
}

double moeRoutingError(const at::Tensor& x, const at::Tensor& router_w,
                       const at::Tensor& topk_idx,
                       const at::Tensor& topk_weights, bool renormalize) {
  const at::Tensor scores = at::softmax(
      at::linear(x.to(at::kFloat), router_w.to(x.device(), at::kFloat)), -1);
  const at::Tensor idx = topk_idx.to(x.device(), at::kLong);
  const at::Tensor picked = scores.gather(1, idx);
  // Scores of unpicked experts only.
  const at::Tensor unpicked =
      scores.scatter(1, idx, at::full_like(picked, -1.0));
  double error =
      (unpicked.amax(1) - picked.amin(1)).clamp_min(0).max().item<double>();
  const at::Tensor expected =
      renormalize ? picked / picked.sum(1, /*keepdim=*/true) : picked;
  error = std::max(error, (topk_weights.to(x.device(), at::kFloat) - expected)
                              .abs()
                              .max()
                              .item<double>());
  return error;
}

}  // namespace hostfuse
