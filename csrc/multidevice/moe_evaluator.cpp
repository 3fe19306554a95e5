#include "multidevice/moe_evaluator.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <algorithm>
#include <atomic>

#include "multidevice/cuda_dispatch_combine.h"
#include "multidevice/dispatch_combine.h"

namespace hostfuse {

namespace {

// Binds `tensor` to `tv` and each symbolic extent of `tv` that has no value
// yet to the matching size, so later expressions can use them.
void bindTensor(ValueMap& values, const TensorView* tv,
                const at::Tensor& tensor) {
  HF_ERROR(tensor.dim() == tv->rank(), "a tensor of rank ", tensor.dim(),
           " for ", tv->toDeclString());
  values.bind(tv, tensor);
  for (int64_t d = 0; d < tv->rank(); ++d) {
    const Scalar* extent = tv->extent(d);
    if (!values.has(extent)) {
      values.bind(extent, tensor.size(d));
      continue;
    }
    HF_ERROR(values.get(extent).toInt() == tensor.size(d), "size ",
             tensor.size(d), " in dim ", d, " of ", tv->toDeclString(),
             " disagrees with its extent ", extent->toString(), " = ",
             values.get(extent).toInt());
  }
}

std::optional<at::Tensor> optionalTensor(const ValueMap& values,
                                         const TensorView* tv) {
  if (tv == nullptr) {
    return std::nullopt;
  }
  return values.get(tv).toTensor();
}

// ATen errors inside the collective runtime become hostfuse errors naming
// the node.
template <typename Fn>
auto namingNode(const Expr& expr, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    HF_THROW("ATen failed while running ", expr.toInlineString(), ": ",
             e.what_without_backtrace());
  }
}

// Every error of the cuda runtime, prefixed with the node: its own
// messages name the workspace, not the IR.
template <typename Fn>
auto inCudaNode(const Expr& expr, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error& e) {
    HF_THROW("while running ", expr.toInlineString(), ": ", e.what());
  } catch (const c10::Error& e) {
    HF_THROW("ATen failed while running ", expr.toInlineString(), ": ",
             e.what_without_backtrace());
  }
}

// ---------------------------------------------------------------------------
// The cuda backend's first run of a dispatch node.

// What every rank contributes to the first-run exchange, after its
// moe::kStatusWords status words.
enum FirstRunWord : int64_t {
  kTokensWord = moe::kStatusWords,
  kPicksWord,
  kHiddenWord,
  kDtypeWord,
  kWeightsDtypeWord,  // -1 without weights
  kFirstRunWords,
};

int64_t dtypeCode(const at::Tensor& t) {
  return static_cast<int64_t>(t.scalar_type());
}

std::string dtypeName(int64_t code) {
  if (code < 0) {
    return "not given";
  }
  if (code >= static_cast<int64_t>(at::ScalarType::NumOptions)) {
    return "an unknown dtype";
  }
  return c10::toString(static_cast<at::ScalarType>(code));
}

// All-gathers `row` [W] i64 from every rank: [R, W] on the host. The one
// host synchronization of a cuda node, at its first run only.
at::Tensor allGather(Communicator& communicator, const at::Tensor& row,
                     const MoeDispatch& node) {
  c10d::Backend& backend = communicator.backend(row.device().type());
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < communicator.size(); ++r) {
    outputs[0].push_back(at::empty_like(row));
  }
  std::vector<at::Tensor> inputs = {row};
  const char* const what =
      ": the all-gather of the first run with the other ranks failed (did a "
      "rank die, time out, or run another collective?): ";
  try {
    backend.allgather(outputs, inputs)->wait();
  } catch (const c10::Error& e) {
    HF_THROW(node.toInlineString(), what, e.what_without_backtrace());
  } catch (const std::exception& e) {
    HF_THROW(node.toInlineString(), what, e.what());
  }
  return at::stack(outputs[0]).cpu();
}

// Throws, on every rank alike, when a rank's inputs are bad or the ranks
// disagree on what the workspace is made of.
void checkFirstRunTable(const at::Tensor& table, const MoeDispatch& node) {
  const int64_t world_size = table.size(0);
  const int64_t* words = table.data_ptr<int64_t>();
  auto word = [&](int64_t rank, int64_t w) {
    return words[rank * kFirstRunWords + w];
  };
  for (int64_t r = 0; r < world_size; ++r) {
    if (word(r, 0) != 0) {
      HF_THROW(
          "while running ", node.toInlineString(), ": ",
          moe::describeStatus("MoeDispatch", r, world_size,
                              words + r * kFirstRunWords, node.numExperts()));
    }
  }
  const std::pair<int64_t, const char*> agreed[] = {
      {kPicksWord, "K (the columns of topk_idx)"},
      {kHiddenWord, "the hidden size H of x"},
      {kDtypeWord, "the dtype of x"},
      {kWeightsDtypeWord, "the dtype of topk_weights"}};
  for (const auto& [w, what] : agreed) {
    const bool is_dtype = w == kDtypeWord || w == kWeightsDtypeWord;
    for (int64_t r = 1; r < world_size; ++r) {
      HF_CHECK(word(r, w) == word(0, w), "while running ",
               node.toInlineString(), ": ", what,
               " must be the same on every rank (the cuda backend's buffers "
               "are symmetric), but it is ",
               is_dtype ? dtypeName(word(0, w)) : std::to_string(word(0, w)),
               " on rank 0 and ",
               is_dtype ? dtypeName(word(r, w)) : std::to_string(word(r, w)),
               " on rank ", r);
    }
  }
}

// Workspaces created by this process, for unique tags: every rank creates
// its workspaces in the same order (creation is a collective), so the n-th
// is the same node everywhere.
std::atomic<int64_t>& workspaceCounter() {
  static std::atomic<int64_t> counter{0};
  return counter;
}

}  // namespace

// The cuda backend's state of one MoeDispatch node.
struct MoeEvaluator::CudaNode {
  std::unique_ptr<CudaMoeWorkspace> workspace;
  // The latest dispatch's handle, without its tensors (they belong to the
  // run's values).
  CudaDispatchResult handle;
  bool dispatched = false;
};

MoeEvaluator::MoeEvaluator(Communicator& communicator)
    : communicator_(communicator) {}

MoeEvaluator::~MoeEvaluator() = default;

void MoeEvaluator::checkStatus() {
  for (const auto& [dispatch, node] : cuda_nodes_) {
    try {
      if (node->workspace != nullptr) {
        node->workspace->checkStatus();
      }
    } catch (const Error& e) {
      HF_THROW(dispatch->toInlineString(), ": ", e.what());
    }
  }
}

void MoeEvaluator::run(const MoeDispatch& dispatch, ValueMap& values) {
  if (dispatch.backend() == MoeBackend::Cuda) {
    runCuda(dispatch, values);
    return;
  }
  const MoeDispatchOutput out = namingNode(dispatch, [&] {
    return dispatchCollective(values.get(dispatch.x()).toTensor(),
                              values.get(dispatch.topkIdx()).toTensor(),
                              optionalTensor(values, dispatch.topkWeights()),
                              dispatch.numExperts(), communicator_);
  });
  bindTensor(values, dispatch.recvX(), out.recv_x);
  bindTensor(values, dispatch.recvSrcRank(), out.layout.src_rank);
  bindTensor(values, dispatch.recvSrcToken(), out.layout.src_token);
  bindTensor(values, dispatch.recvSrcK(), out.layout.src_k);
  if (dispatch.hasWeights()) {
    bindTensor(values, dispatch.recvWeights(), out.recv_weights);
  }
  bindTensor(values, dispatch.recvExpertCounts(), out.layout.expert_counts);
  bindTensor(values, dispatch.nTokensToRank(), out.layout.n_tokens_to_rank);
  bindTensor(values, dispatch.nTokensFromRank(), out.layout.n_tokens_from_rank);
}

void MoeEvaluator::run(const MoeCombine& combine, ValueMap& values) {
  if (combine.backend() == MoeBackend::Cuda) {
    runCuda(combine, values);
    return;
  }
  MoeLayout layout;
  layout.src_rank = values.get(combine.recvSrcRank()).toTensor();
  layout.src_token = values.get(combine.recvSrcToken()).toTensor();
  layout.src_k = values.get(combine.recvSrcK()).toTensor();
  layout.expert_counts = values.get(combine.recvExpertCounts()).toTensor();
  layout.n_tokens_to_rank = values.get(combine.nTokensToRank()).toTensor();
  layout.n_tokens_from_rank = values.get(combine.nTokensFromRank()).toTensor();
  const at::Tensor combined = namingNode(combine, [&] {
    return combineCollective(values.get(combine.expertOut()).toTensor(), layout,
                             optionalTensor(values, combine.topkWeights()),
                             values.get(combine.numTokens()).toInt(),
                             combine.numExperts(), communicator_);
  });
  bindTensor(values, combine.combined(), combined);
}

// ---------------------------------------------------------------------------

void MoeEvaluator::runCuda(const MoeDispatch& dispatch, ValueMap& values) {
  const at::Tensor x = values.get(dispatch.x()).toTensor();
  const at::Tensor idx = values.get(dispatch.topkIdx()).toTensor();
  const std::optional<at::Tensor> weights =
      optionalTensor(values, dispatch.topkWeights());
  const at::Device device = communicator_.device();
  HF_CHECK(x.is_cuda() && idx.is_cuda() && (!weights || weights->is_cuda()),
           dispatch.toInlineString(),
           ": backend=cuda needs CUDA tensors on this rank's GPU (", device,
           "), but x is on ", x.device(), ", topk_idx on ", idx.device(),
           weights ? ", topk_weights on " + weights->device().str() : "",
           "; run the program on the GPU, or build the node with "
           "MoeBackend::Collective");
  HF_CHECK(device.is_cuda() && x.device() == device, dispatch.toInlineString(),
           ": backend=cuda runs on this rank's GPU ", device,
           " (the communicator's device), but x is on ", x.device());

  std::unique_ptr<CudaNode>& node = cuda_nodes_[&dispatch];
  if (node == nullptr) {
    // The first run: agree on the inputs, then the rendezvous.
    const moe::HostStatus status = checkDispatchInputs(
        x, idx, weights, dispatch.numExperts(), communicator_.size(), device);
    const bool ok = status.ok();
    const at::Tensor info = at::tensor(
        {ok ? x.size(0) : 0, ok ? idx.size(1) : 0, ok ? x.size(1) : 0,
         dtypeCode(x), weights ? dtypeCode(*weights) : int64_t{-1}},
        at::kLong);
    const at::Tensor table = allGather(
        communicator_, at::cat({status.toDevice(at::kCPU), info}).to(device),
        dispatch);
    checkFirstRunTable(table, dispatch);
    CudaMoeConfig config;
    config.rank = static_cast<int>(communicator_.rank());
    config.world_size = static_cast<int>(communicator_.size());
    config.device = device.index();
    config.num_experts = dispatch.numExperts();
    config.max_tokens = std::max<int64_t>(
        1, table.select(1, kTokensWord).max().item<int64_t>());
    config.hidden = x.size(1);
    config.topk = idx.size(1);
    config.dtype = x.scalar_type();
    config.capacity = dispatch.capacity();
    config.tag = toString("moe/", workspaceCounter()++, "/",
                          dispatch.recvX()->toString());
    auto created = std::make_unique<CudaNode>();
    created->workspace = inCudaNode(dispatch, [&] {
      return std::make_unique<CudaMoeWorkspace>(
          c10::make_intrusive<c10d::PrefixStore>("hostfuse/moe",
                                                 communicator_.store()),
          config);
    });
    node = std::move(created);
  }
  CudaMoeWorkspace& workspace = *node->workspace;
  const CudaMoeConfig& config = workspace.config();
  HF_CHECK(x.dim() != 2 || x.size(0) <= config.max_tokens, "while running ",
           dispatch.toInlineString(), ": x has ", x.size(0),
           " tokens, but the node's cuda workspace was sized at its first run "
           "for T_max = ",
           config.max_tokens,
           " tokens (the largest T of any rank then); a later run may not "
           "have more tokens. Make the first run the largest, or use a new "
           "evaluator");

  CudaDispatchResult result =
      inCudaNode(dispatch, [&] { return workspace.dispatch(x, idx, weights); });
  node->handle = CudaDispatchResult{};
  node->handle.num_tokens = result.num_tokens;
  node->handle.call = result.call;
  node->handle.workspace = result.workspace;
  node->dispatched = true;

  bindTensor(values, dispatch.recvX(), result.recv_x);
  bindTensor(values, dispatch.recvSrcRank(), result.recv_src_rank);
  bindTensor(values, dispatch.recvSrcToken(), result.recv_src_token);
  bindTensor(values, dispatch.recvSrcK(), result.recv_src_k);
  if (dispatch.hasWeights()) {
    // The kernels carry weights in fp32; the IR declares topk_weights'
    // dtype (exact for fp32, bf16 and fp16 weights).
    bindTensor(
        values, dispatch.recvWeights(),
        result.recv_weights.to(toScalarType(dispatch.recvWeights()->dtype())));
  }
  bindTensor(values, dispatch.recvExpertCounts(), result.recv_expert_counts);
  bindTensor(values, dispatch.nTokensToRank(), result.n_rows_to_rank);
  bindTensor(values, dispatch.nTokensFromRank(), result.n_rows_from_rank);
}

void MoeEvaluator::runCuda(const MoeCombine& combine, ValueMap& values) {
  const MoeDispatch* dispatch = combine.dispatch();
  HF_ERROR(dispatch != nullptr, "a validated cuda MoeCombine without its ",
           "MoeDispatch: ", combine.toInlineString());
  const auto it = cuda_nodes_.find(dispatch);
  HF_CHECK(it != cuda_nodes_.end() && it->second != nullptr &&
               it->second->dispatched,
           "while running ", combine.toInlineString(), ": its ",
           dispatch->toInlineString(), " has not run in this evaluator");
  CudaNode& node = *it->second;
  const at::Tensor expert_out = values.get(combine.expertOut()).toTensor();
  const std::optional<at::Tensor> weights =
      optionalTensor(values, combine.topkWeights());
  HF_CHECK(expert_out.is_cuda() && (!weights || weights->is_cuda()),
           combine.toInlineString(),
           ": backend=cuda needs CUDA tensors, but expert_out is on ",
           expert_out.device(),
           weights ? ", topk_weights on " + weights->device().str() : "");
  HF_CHECK(
      expert_out.dim() == 2 && expert_out.size(0) == node.workspace->capacity(),
      "while running ", combine.toInlineString(), ": expert_out has ",
      expert_out.dim() == 2 ? expert_out.size(0) : -1,
      " rows, but its dispatch (backend=cuda) returned C = ",
      node.workspace->capacity(),
      " rows; expert_out must be in that layout, all C rows of it");
  const int64_t num_tokens = values.get(combine.numTokens()).toInt();
  const at::Tensor combined = inCudaNode(combine, [&] {
    return node.workspace->combine(expert_out, node.handle, weights,
                                   num_tokens);
  });
  bindTensor(values, combine.combined(), combined);
}

}  // namespace hostfuse
