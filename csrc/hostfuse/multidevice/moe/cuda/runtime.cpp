#include <hostfuse/multidevice/moe/cuda/runtime.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <algorithm>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/utils/exceptions.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

namespace {

moe::StatusContext dispatchContext(int64_t rank, int64_t world_size,
                                   int64_t num_experts) {
  moe::StatusContext context;
  context.op = "MoeDispatch";
  context.backend = "cuda";
  context.rank = rank;
  context.world_size = world_size;
  context.num_experts = num_experts;
  return context;
}

// The shared input checks, then what this backend cannot do.
moe::HostStatus checkInputs(const MoeDispatchArgs& args, int64_t world_size,
                            const at::Device& device) {
  // The shared checks see whether the call's tensors are on one device;
  // whether that is this rank's GPU is this backend's own check.
  moe::HostStatus status = moe::checkDispatchInputs(
      args.x, args.topk_idx, args.topk_weights, args.num_experts, world_size,
      args.x.defined() ? args.x.device() : device, args.quantize);
  if (!status.ok()) {
    return status;
  }
  const at::ScalarType dtype = args.x.scalar_type();
  if (!args.x.is_cuda() || args.x.device() != device) {
    // Where x is: -1 for the host, else its GPU's index.
    status.fail(moe::kStatusUnsupported, moe::kLimitNotOnDevice, moe::kArgX,
                args.x.is_cuda() ? args.x.device().index() : -1);
  } else if (dtype != at::kFloat && dtype != at::kBFloat16 &&
             dtype != at::kHalf) {
    status.fail(moe::kStatusUnsupported, moe::kLimitRowDtype,
                static_cast<int64_t>(dtype));
  } else if (args.num_experts > moe::kMaxExperts) {
    status.fail(moe::kStatusUnsupported, moe::kLimitNumExperts,
                args.num_experts, moe::kMaxExperts);
  } else if (args.topk_idx.size(1) > moe::kMaxTopK) {
    status.fail(moe::kStatusUnsupported, moe::kLimitTopK, args.topk_idx.size(1),
                moe::kMaxTopK);
  } else if (world_size > moe::kMaxRanks) {
    status.fail(moe::kStatusUnsupported, moe::kLimitWorldSize, world_size,
                moe::kMaxRanks);
  }
  return status;
}

// All-gathers `row` [W] i64 from every rank: [R, W] on the host. The one
// host synchronization of a site, at its first call only.
at::Tensor allGather(Communicator& communicator, const at::Tensor& row) {
  c10d::Backend& backend = communicator.backend(row.device().type());
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < communicator.size(); ++r) {
    outputs[0].push_back(at::empty_like(row));
  }
  std::vector<at::Tensor> inputs = {row};
  communicator.runOrFail(
      [&] { backend.allgather(outputs, inputs)->wait(); },
      "MoeDispatch: the all-gather of the first call with the other ranks "
      "failed (did a rank die, time out, or run another collective?): ");
  return at::stack(outputs[0]).cpu();
}

}  // namespace

// The cuda backend's state of one dispatch site.
struct CudaMoeRuntime::Site {
  std::string name;  // for errors found by checkStatus
  std::unique_ptr<CudaMoeWorkspace> workspace;
  // The latest dispatch's handle, without its tensors (they belong to the
  // caller).
  CudaDispatchResult handle;
  bool dispatched = false;
};

CudaMoeRuntime::CudaMoeRuntime(Communicator& communicator)
    : communicator_(communicator) {}

CudaMoeRuntime::~CudaMoeRuntime() = default;

CudaMoeRuntime::Site& CudaMoeRuntime::siteFor(const MoeDispatchArgs& args) {
  std::unique_ptr<Site>& site = sites_[args.site];
  if (site != nullptr) {
    // After a failure the workspace refuses every call. It is not
    // recreated here: a rank whose call did not wait for the failed one
    // (a combine that needed none of its rows) learns of the failure only
    // at its next call, so the ranks would recreate at different calls and
    // pair different iterations. The caller recreates on every rank.
    return *site;
  }
  // The first call: agree on the inputs, then the rendezvous.
  const at::Device device = communicator_.device();
  const moe::HostStatus status =
      checkInputs(args, communicator_.size(), device);
  const bool ok = status.ok();
  const at::Tensor info = moe::headerWords(
      args.num_experts, ok ? args.x.size(1) : 0,
      ok ? moe::dtypeCode(args.x) : -1,
      ok && args.topk_weights ? moe::dtypeCode(*args.topk_weights) : -1,
      ok ? args.x.size(0) : 0, ok ? args.topk_idx.size(1) : 0);
  const at::Tensor mine = at::cat({status.toDevice(at::kCPU), info});
  // Over NCCL on GPUs, unless the ranks share them (then NCCL cannot run,
  // and Gloo does: the table is small and needed on the host anyway).
  const bool through_gpu = device.is_cuda() && !communicator_.sharesGpus();
  const at::Tensor table =
      allGather(communicator_, through_gpu ? mine.to(device) : mine);
  moe::checkDispatchTable(table, "cuda");

  CudaMoeConfig config;
  config.rank = static_cast<int>(communicator_.rank());
  config.world_size = static_cast<int>(communicator_.size());
  config.device = device.index();
  config.num_experts = args.num_experts;
  config.max_tokens = std::max<int64_t>(
      1, table.select(1, moe::kTokensWord).max().item<int64_t>());
  config.hidden = args.x.size(1);
  config.topk = args.topk_idx.size(1);
  config.dtype = args.x.scalar_type();
  config.capacity = args.capacity;
  config.fp8_dispatch = args.quantize == MoeDispatchQuant::Fp8E4M3;
  // Workspace creation is a collective: every rank of the communicator
  // creates its workspaces in the same order, so the n-th tag names the
  // same site everywhere.
  config.tag = communicator_.nextTag("moe");
  auto created = std::make_unique<Site>();
  created->name =
      args.describe_site ? args.describe_site() : "a MoeDispatch site";
  created->workspace = std::make_unique<CudaMoeWorkspace>(
      c10::make_intrusive<c10d::PrefixStore>("hostfuse/moe",
                                             communicator_.store()),
      config);
  site = std::move(created);
  return *site;
}

MoeDispatchOutput CudaMoeRuntime::dispatch(const MoeDispatchArgs& args) {
  Site& site = siteFor(args);
  CudaMoeWorkspace& workspace = *site.workspace;
  const moe::HostStatus status =
      checkInputs(args, communicator_.size(), communicator_.device());
  if (!status.ok()) {
    workspace.publishFailure();
    HF_THROW(moe::describeStatus(
        dispatchContext(communicator_.rank(), communicator_.size(),
                        args.num_experts),
        status.words()));
  }
  const CudaMoeConfig& config = workspace.config();
  if (config.fp8_dispatch != (args.quantize == MoeDispatchQuant::Fp8E4M3)) {
    workspace.publishFailure();
    HF_THROW("MoeDispatch: quantize=", toString(args.quantize),
             ", but the site's cuda workspace was made at its first call "
             "with quantize=",
             toString(config.fp8_dispatch ? MoeDispatchQuant::Fp8E4M3
                                          : MoeDispatchQuant::None),
             "; a site keeps its quantization (from Python, a call with "
             "another quantize is another site)");
  }
  // The workspace refuses it too, with a message that cannot name the
  // node or the way out; this one can.
  if (args.x.size(0) > config.max_tokens) {
    workspace.publishFailure();
    HF_THROW("MoeDispatch: x has ", args.x.size(0),
             " tokens, but the node's cuda workspace was sized at its first "
             "run for T_max = ",
             config.max_tokens,
             " tokens (the largest T of any rank then); a later run may not "
             "have more tokens. Make the first run the largest, or start over "
             "on every rank with a new evaluator (from Python: "
             "hostfuse.moe.release(), then call again)");
  }

  CudaDispatchResult result =
      workspace.dispatch(args.x, args.topk_idx, args.topk_weights);
  site.handle = CudaDispatchResult{};
  site.handle.num_tokens = result.num_tokens;
  site.handle.call = result.call;
  site.handle.workspace = result.workspace;
  site.dispatched = true;

  MoeDispatchOutput out;
  out.recv_x = result.recv_x;
  out.recv_scales = result.recv_scales;
  if (args.topk_weights.has_value()) {
    // The kernels carry weights in fp32: exact for fp32, bf16 and fp16
    // weights, which go back to their own dtype here.
    out.recv_weights = result.recv_weights.to(args.topk_weights->scalar_type());
  }
  out.layout.src_rank = result.recv_src_rank;
  out.layout.src_token = result.recv_src_token;
  out.layout.src_k = result.recv_src_k;
  out.layout.expert_counts = result.recv_expert_counts;
  out.layout.n_tokens_to_rank = result.n_rows_to_rank;
  out.layout.n_tokens_from_rank = result.n_rows_from_rank;
  out.layout.id = result.recv_layout_id;
  return out;
}

at::Tensor CudaMoeRuntime::combine(const MoeCombineArgs& args) {
  const auto it = sites_.find(args.dispatch_site);
  HF_CHECK(
      it != sites_.end() && it->second != nullptr && it->second->dispatched,
      "MoeCombine: its MoeDispatch has not run on this runtime (the "
      "cuda backend keeps the layout with the dispatch)");
  Site& site = *it->second;
  const moe::HostStatus status = moe::checkCombineInputs(
      args, communicator_.size(), communicator_.device());
  if (!status.ok()) {
    site.workspace->publishFailure();
    moe::StatusContext context = dispatchContext(
        communicator_.rank(), communicator_.size(), args.num_experts);
    context.op = "MoeCombine";
    HF_THROW(moe::describeStatus(context, status.words()));
  }
  const bool per_rank = args.reduce == MoeCombineReduce::PerRank;
  return site.workspace->combine(
      args.expert_out, site.handle,
      per_rank ? args.recv_weights : args.topk_weights, args.num_tokens,
      args.layout.id, args.reduce);
}

void CudaMoeRuntime::publishFailure(const at::Device& /*device*/) noexcept {
  for (const auto& [key, site] : sites_) {
    if (site != nullptr) {
      site->workspace->publishFailure();
    }
  }
}

void CudaMoeRuntime::checkStatus() {
  for (const auto& [key, site] : sites_) {
    if (site == nullptr) {
      continue;
    }
    try {
      site->workspace->checkStatus();
    } catch (const Error& e) {
      HF_THROW(site->name, ": ", e.what());
    }
  }
}

namespace {

std::unique_ptr<MoeRuntime> createRuntime(Communicator& communicator) {
  return std::make_unique<CudaMoeRuntime>(communicator);
}

}  // namespace

const MoeBackendInfo& cudaMoeBackendInfo() {
  static const MoeBackendInfo info{MoeBackend::Cuda,
                                   "cuda",
                                   /*capture_problem=*/nullptr,
                                   /*fixed_capacity=*/true,
                                   /*combine_needs_its_dispatch=*/true,
                                   createRuntime};
  return info;
}

}  // namespace hostfuse
