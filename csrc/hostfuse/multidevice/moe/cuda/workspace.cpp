#include <hostfuse/multidevice/moe/cuda/workspace.h>

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <iostream>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include <hostfuse/multidevice/comm/symmetric_memory.h>
#include <hostfuse/multidevice/moe/cuda/buffers.h>
#include <hostfuse/multidevice/moe/cuda/params.h>
#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/multidevice/moe/status.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

// The tag of a live workspace: two MoE nodes must not share one by mistake,
// since the tag names their symmetric buffers' store keys.
class CudaMoeWorkspace::TagLease {
 public:
  explicit TagLease(std::string tag) : tag_(std::move(tag)) {
    std::lock_guard<std::mutex> lock(mutex());
    HF_CHECK(tags().insert(tag_).second,
             "another live MoE workspace already uses the tag '", tag_,
             "'; every MoE node needs its own");
  }
  ~TagLease() {
    std::lock_guard<std::mutex> lock(mutex());
    tags().erase(tag_);
  }
  TagLease(const TagLease&) = delete;
  TagLease& operator=(const TagLease&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<std::string>& tags() {
    static std::set<std::string> live;
    return live;
  }
  std::string tag_;
};

namespace {

// `topk_weights` of a dispatch or combine (`op`), checked to be a [tokens,
// topk] tensor of a weight dtype (moe::isWeightDtype) on `device`, as
// contiguous fp32; undefined without.
at::Tensor floatWeights(const char* op,
                        const std::optional<at::Tensor>& topk_weights,
                        const at::Device& device, int64_t tokens,
                        int64_t topk) {
  if (!topk_weights.has_value()) {
    return at::Tensor();
  }
  HF_CHECK(topk_weights->device() == device &&
               moe::isWeightDtype(topk_weights->scalar_type()) &&
               topk_weights->dim() == 2 && topk_weights->size(0) == tokens &&
               topk_weights->size(1) == topk,
           "MoE ", op, ": topk_weights must be a floating [", tokens, ", ",
           topk,
           "] tensor (Float, Double, BFloat16, Half or a Float8 type) on ",
           device, "; got ", topk_weights->scalar_type(), " ",
           topk_weights->sizes(), " on ", topk_weights->device());
  return topk_weights->to(at::kFloat).contiguous();
}

// The status words and context of the kernels' record, for describeStatus.
std::vector<int64_t> wordsOf(const moe::StatusRecord& s,
                             moe::StatusContext& context) {
  context.op = s.op == 1 ? "MoeDispatch" : "MoeCombine";
  context.rank = s.rank;
  for (int r = 0; r < 32; ++r) {
    if ((s.bad_ranks >> r) & 1u) {
      context.bad_ranks.push_back(r);
    }
  }
  switch (s.code) {
    case moe::kStatusCapacityOverflow:
      return {s.code, s.value, 0, 0, 0};  // the capacity is filled in below
    case moe::kStatusTimeout:
      return {s.code, s.purpose, static_cast<int64_t>(s.epoch), 0, 0};
    case moe::kStatusPeerFailed:
      return {s.code, s.purpose, s.value, s.token, s.pick};
    default:
      return {s.code, s.token, s.pick, s.value, 0};
  }
}

}  // namespace

CudaMoeWorkspace::CudaMoeWorkspace(c10::intrusive_ptr<c10d::Store> store,
                                   CudaMoeConfig config)
    : config_(std::move(config)) {
  const CudaMoeConfig& c = config_;
  validateConfig(c);
  tag_ = std::make_unique<TagLease>(c.tag);
  cuda::DeviceScope device_scope(c.device);
  int max_blocks = 0;
  HF_CUDA_CHECK(moe::prepareKernels(c.device, static_cast<int>(c.num_experts),
                                    elementType(c.dtype), &max_blocks));
  launch_ = resolveLaunch(c, max_blocks);
  checkAgreement(*store);
  buffers_ = CudaMoeBuffers::allocate(store, c, launch_);
  if (c.fp8_dispatch) {
    // Not in dispatch(), which may run under a graph capture.
    fp8_rows_ =
        at::empty({c.max_tokens, launch_.dispatch_row_bytes},
                  at::TensorOptions()
                      .device(at::Device(
                          at::kCUDA, static_cast<c10::DeviceIndex>(c.device)))
                      .dtype(at::kByte));
  }
  if (launch_.debug) {
    std::cerr << "[hostfuse moe rank " << c.rank << "] workspace " << c.tag
              << ": " << describeShape(c, launch_) << ", " << launch_.row_bytes
              << " bytes a row, " << launch_.blocks << " blocks, "
              << launch_.push_blocks << " pushing (at most " << max_blocks
              << "), timeout " << launch_.timeout_s << " s\n";
  }
}

CudaMoeWorkspace::~CudaMoeWorkspace() = default;

// Every rank must describe the same node: compare through the store.
void CudaMoeWorkspace::checkAgreement(c10d::Store& store) const {
  const CudaMoeConfig& c = config_;
  const std::string mine = describeShape(c, launch_);
  const std::string prefix = uniqueStorePrefix(c.tag + "/config");
  store.set(prefix + "/" + std::to_string(c.rank),
            std::vector<uint8_t>(mine.begin(), mine.end()));
  for (int peer = 0; peer < c.world_size; ++peer) {
    const std::vector<uint8_t> bytes =
        store.get(prefix + "/" + std::to_string(peer));
    const std::string theirs(bytes.begin(), bytes.end());
    HF_CHECK(theirs == mine, "MoE workspace '", c.tag, "': rank ", peer,
             " was created with ", theirs, ", rank ", c.rank, " with ", mine,
             "; every rank needs the same configuration");
  }
}

void CudaMoeWorkspace::checkUsable(const char* op) const {
  HF_CHECK(!broken_, "MoE ", op, " (cuda backend): workspace '", config_.tag,
           "' is unusable after an earlier failure: ", broken_reason_);
}

void CudaMoeWorkspace::publishFailure() noexcept {
  if (broken_ || config_.world_size < 2) {
    return;  // told already, or nobody to tell
  }
  try {
    cuda::DeviceScope device_scope(config_.device);
    if (cuda::isCapturing(config_.device)) {
      return;
    }
    const cudaStream_t stream = cuda::currentStream(config_.device);
    if (moe::launchPublishFailure(failureParams(config_, launch_, *buffers_),
                                  moe::kFailedOnHost, stream) != cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess) {
      return;
    }
    broken_ = true;
    broken_reason_ =
        "this rank raised an error in a call and told every rank; recreate "
        "the workspace on every rank (a new HostIrEvaluator; from Python, "
        "hostfuse.moe.release())";
  } catch (...) {
    // Never throws: the caller is raising an error of its own.
  }
}

template <typename Checks>
auto CudaMoeWorkspace::publishingFailure(Checks&& checks)
    -> decltype(checks()) {
  try {
    return checks();
  } catch (...) {
    publishFailure();
    throw;
  }
}

CudaDispatchResult CudaMoeWorkspace::dispatch(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights) {
  checkUsable("dispatch");
  const CudaMoeConfig& c = config_;
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(c.device));
  // The peers would wait for this rank's count row: a refusal is published.
  const auto [input, idx, weights] = publishingFailure([&] {
    HF_CHECK(x.device() == device, "MoE dispatch: x must be on ", device,
             "; it is on ", x.device());
    HF_CHECK(x.dim() == 2 && x.size(1) == c.hidden,
             "MoE dispatch: x must be [T, ", c.hidden, "]; got ", x.sizes());
    HF_CHECK(x.scalar_type() == c.dtype, "MoE dispatch: x must be ", c.dtype,
             " like the workspace; got ", x.scalar_type());
    const int64_t tokens = x.size(0);
    HF_CHECK(tokens <= c.max_tokens, "MoE dispatch: x has ", tokens,
             " tokens, more than the workspace's max_tokens ", c.max_tokens);
    HF_CHECK(topk_idx.device() == device, "MoE dispatch: topk_idx must be on ",
             device, "; it is on ", topk_idx.device());
    HF_CHECK(topk_idx.scalar_type() == at::kLong ||
                 topk_idx.scalar_type() == at::kInt,
             "MoE dispatch: topk_idx must be int64 or int32; got ",
             topk_idx.scalar_type());
    HF_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == tokens &&
                 topk_idx.size(1) == c.topk,
             "MoE dispatch: topk_idx must be [", tokens, ", ", c.topk,
             "]; got ", topk_idx.sizes());
    return std::make_tuple(
        x.contiguous(), topk_idx.contiguous(),
        floatWeights("dispatch", topk_weights, device, tokens, c.topk));
  });
  const int64_t tokens = input.size(0);

  CudaMoeBuffers& b = *buffers_;
  cuda::DeviceScope device_scope(c.device);
  const auto options = at::TensorOptions().device(device);
  const int64_t rows = launch_.capacity;
  CudaDispatchResult result;
  std::shared_ptr<SymmetricMemory> keep_alive = b.recv;
  at::Tensor sent = input;
  if (c.fp8_dispatch) {
    // The rows leave quantized, packed with their scales (moe/fp8.h).
    sent = fp8_rows_.narrow(0, 0, tokens);
    HF_CUDA_CHECK(moe::launchQuantizeFp8(input.data_ptr(), elementType(c.dtype),
                                         tokens, c.hidden, sent.data_ptr(),
                                         launch_.dispatch_row_bytes,
                                         cuda::currentStream(c.device)));
    const int64_t stride = launch_.dispatch_row_bytes;
    result.recv_x = at::from_blob(
        b.recv->localPtr(), {rows, c.hidden}, {stride, 1},
        [keep_alive](void*) {}, options.dtype(at::kFloat8_e4m3fn));
    result.recv_scales = at::from_blob(
        static_cast<char*>(b.recv->localPtr()) + c.hidden,
        {rows, c.hidden / moe::kFp8Block}, {stride / 4, 1},
        [keep_alive](void*) {}, options.dtype(at::kFloat));
  } else {
    result.recv_x = at::from_blob(
        b.recv->localPtr(), {rows, c.hidden}, [keep_alive](void*) {},
        options.dtype(c.dtype));
  }
  result.recv_src_rank = at::empty({rows}, options.dtype(at::kLong));
  result.recv_src_token = at::empty({rows}, options.dtype(at::kLong));
  result.recv_src_k = at::empty({rows}, options.dtype(at::kLong));
  if (weights.defined()) {
    result.recv_weights = at::empty({rows}, options.dtype(at::kFloat));
  }
  result.recv_expert_counts =
      at::empty({launch_.local_experts}, options.dtype(at::kLong));
  result.n_rows_to_rank = at::empty({c.world_size}, options.dtype(at::kLong));
  result.n_rows_from_rank = at::empty({c.world_size}, options.dtype(at::kLong));
  result.recv_layout_id =
      at::empty({c.world_size + 1}, options.dtype(at::kLong));

  const moe::DispatchParams params =
      dispatchParams(c, launch_, b, sent, idx, weights, result);
  HF_CUDA_CHECK(moe::launchDispatch(params, idx.scalar_type() == at::kLong,
                                    launch_.blocks, launch_.cooperative,
                                    cuda::currentStream(c.device)));
  result.num_tokens = tokens;
  result.call = ++dispatch_calls_;
  result.workspace = this;
  afterCall("dispatch");
  return result;
}

at::Tensor CudaMoeWorkspace::combine(const at::Tensor& expert_out,
                                     const CudaDispatchResult& handle,
                                     const std::optional<at::Tensor>& weights,
                                     int64_t num_tokens,
                                     const at::Tensor& layout_id,
                                     MoeCombineReduce reduce) {
  checkUsable("combine");
  const bool per_rank = reduce == MoeCombineReduce::PerRank;
  const CudaMoeConfig& c = config_;
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(c.device));
  // The peers would wait for this rank's rows: a refusal is published.
  const auto [rows, float_weights, tokens] = publishingFailure([&] {
    HF_CHECK(handle.workspace == this,
             "MoE combine: the handle comes from another workspace (another "
             "MoE node?) than '",
             c.tag, "'");
    HF_CHECK(handle.call == dispatch_calls_, "MoE combine: the handle is from ",
             "dispatch call ", handle.call, " of workspace '", c.tag,
             "', but its latest dispatch is call ", dispatch_calls_,
             "; combine needs the latest one");
    HF_CHECK(!layout_id.defined() ||
                 (layout_id.device() == device &&
                  layout_id.scalar_type() == at::kLong &&
                  layout_id.dim() == 1 && layout_id.is_contiguous() &&
                  layout_id.numel() == c.world_size + 1),
             "MoE combine: recv_layout_id must be a contiguous Long [",
             c.world_size + 1, "] tensor on ", device, "; got ",
             layout_id.scalar_type(), " ", layout_id.sizes(), " on ",
             layout_id.device());
    const int64_t tokens = handle.num_tokens;
    HF_CHECK(num_tokens < 0 || num_tokens == tokens, "MoE combine: num_tokens ",
             num_tokens, " differs from the dispatch's T = ", tokens);
    HF_CHECK(expert_out.device() == device,
             "MoE combine: expert_out must be on ", device, "; it is on ",
             expert_out.device());
    HF_CHECK(expert_out.scalar_type() == c.dtype, "MoE combine: expert_out ",
             "must be ", c.dtype, " like the workspace; got ",
             expert_out.scalar_type());
    HF_CHECK(expert_out.dim() == 2 && expert_out.size(0) == launch_.capacity &&
                 expert_out.size(1) == c.hidden,
             "MoE combine: expert_out must be [C, H] = [", launch_.capacity,
             ", ", c.hidden, "] in the dispatch layout; got ",
             expert_out.sizes());
    if (per_rank && weights.has_value()) {
      HF_CHECK(weights->device() == device &&
                   moe::isWeightDtype(weights->scalar_type()) &&
                   weights->dim() == 1 && weights->size(0) == launch_.capacity,
               "MoE combine: with reduce=per_rank the weights are the rows' "
               "(recv_weights), a floating [C] = [",
               launch_.capacity, "] tensor on ", device, "; got ",
               weights->scalar_type(), " ", weights->sizes(), " on ",
               weights->device());
    }
    return std::make_tuple(
        expert_out.contiguous(),
        per_rank ? (weights.has_value() ? weights->to(at::kFloat).contiguous()
                                        : at::Tensor())
                 : floatWeights("combine", weights, device, tokens, c.topk),
        tokens);
  });

  cuda::DeviceScope device_scope(c.device);
  at::Tensor out = at::empty({tokens, c.hidden},
                             at::TensorOptions().device(device).dtype(c.dtype));
  moe::CombineParams params =
      combineParams(c, launch_, *buffers_, rows, float_weights, out, per_rank);
  params.layout_id =
      layout_id.defined() ? layout_id.const_data_ptr<int64_t>() : nullptr;
  HF_CUDA_CHECK(moe::launchCombine(params, elementType(c.dtype), launch_.blocks,
                                   launch_.cooperative,
                                   cuda::currentStream(c.device)));
  afterCall("combine");
  return out;
}

void CudaMoeWorkspace::afterCall(const char* op) {
  if (!config_.check_each_call || cuda::isCapturing(config_.device)) {
    return;
  }
  CudaMoeBuffers& b = *buffers_;
  HF_CUDA_CHECK(cudaEventRecord(b.done, cuda::currentStream(config_.device)));
  HF_CUDA_CHECK(cudaEventSynchronize(b.done));
  if (launch_.debug) {
    std::cerr << "[hostfuse moe rank " << config_.rank << "] " << op
              << " done, status " << b.status_host->code << "\n";
  }
  raiseStatus();
}

void CudaMoeWorkspace::checkStatus() {
  checkUsable("checkStatus");
  cuda::DeviceScope device_scope(config_.device);
  HF_CHECK(!cuda::isCapturing(config_.device),
           "MoE checkStatus: cannot wait for the device while the stream is "
           "being captured; call it after replaying the graph");
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  raiseStatus();
}

void CudaMoeWorkspace::raiseStatus() {
  CudaMoeBuffers& b = *buffers_;
  moe::StatusRecord status;
  std::memcpy(&status, const_cast<const moe::StatusRecord*>(b.status_host),
              sizeof(status));
  if (status.code == moe::kStatusOk) {
    return;
  }
  // Clear for the next call: the claim word on the device, then the record.
  const cudaStream_t stream = cuda::currentStream(config_.device);
  HF_CUDA_CHECK(
      cudaMemsetAsync(&b.state->status_claim, 0, sizeof(int32_t), stream));
  HF_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::memset(b.status_host, 0, sizeof(moe::StatusRecord));

  moe::StatusContext context;
  context.world_size = config_.world_size;
  context.num_experts = config_.num_experts;
  context.timeout_s = launch_.timeout_s;
  std::vector<int64_t> words = wordsOf(status, context);
  if (status.code == moe::kStatusCapacityOverflow) {
    words[2] = launch_.capacity;
  }
  const std::string message = moe::describeStatus(context, words.data());
  if (status.code == moe::kStatusTimeout ||
      status.code == moe::kStatusPoisoned ||
      status.code == moe::kStatusPeerFailed ||
      status.code == moe::kStatusStaleLayout ||
      status.code == moe::kStatusCombineModes) {
    // Failures the kernels published to the peers: every rank's workspace
    // is unusable from here on.
    broken_ = true;
    broken_reason_ = message;
  }
  HF_ERROR(status.code != moe::kStatusInternal, message);
  HF_THROW(message);
}

CudaMoeProfile CudaMoeWorkspace::profileReport() const {
  HF_CHECK(launch_.profile, "MoE profileReport: workspace '", config_.tag,
           "' was created without profiling (CudaMoeConfig::profile or "
           "HOSTFUSE_MOE_PROFILE=1)");
  cuda::DeviceScope device_scope(config_.device);
  HF_CHECK(!cuda::isCapturing(config_.device),
           "MoE profileReport: cannot wait for the device while the stream "
           "is being captured");
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint64_t> host(2 * static_cast<size_t>(launch_.blocks) *
                             moe::kProfileSlots);
  HF_CUDA_CHECK(cudaMemcpy(host.data(), buffers_->profile,
                           sizeof(uint64_t) * host.size(),
                           cudaMemcpyDeviceToHost));
  return reduceProfile(host, launch_.blocks, config_.rank);
}

int64_t CudaMoeWorkspace::damagedGuardBytes() const {
  return buffers_->damagedGuardBytes();
}

}  // namespace hostfuse
