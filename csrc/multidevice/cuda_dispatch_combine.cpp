#include "multidevice/cuda_dispatch_combine.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <mutex>
#include <set>

#include "multidevice/kernels/dispatch_combine.cuh"
#include "multidevice/symmetric_memory.h"
#include "utils/cuda_utils.h"
#include "utils/torch_cuda.h"

namespace hostfuse {

namespace {

constexpr uint8_t kGuardPattern = 0xA5;

size_t roundUp(size_t value, size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Tags of live workspaces: two MoE nodes must not share one by mistake.
std::mutex& tagMutex() {
  static std::mutex mutex;
  return mutex;
}
std::set<std::string>& liveTags() {
  static std::set<std::string> tags;
  return tags;
}

std::optional<std::string> environment(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return std::nullopt;
  }
  return std::string(value);
}

double environmentNumber(const char* name, double fallback) {
  const std::optional<std::string> text = environment(name);
  if (!text) {
    return fallback;
  }
  char* end = nullptr;
  const double value = std::strtod(text->c_str(), &end);
  HF_CHECK(end != text->c_str() && *end == '\0' && value >= 0,
           "environment variable ", name, "=", *text,
           " is not a non-negative number");
  return value;
}

moe::ElementType elementType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return moe::ElementType::kFloat32;
    case at::kBFloat16:
      return moe::ElementType::kBFloat16;
    case at::kHalf:
      return moe::ElementType::kFloat16;
    default:
      HF_THROW("the cuda MoE backend moves fp32, bf16 or fp16 rows; got ",
               dtype);
  }
}

// The widest copy unit (16, 8, 4 or 2 bytes) that divides the row size and
// every address involved, so that vector accesses stay aligned.
int64_t copyUnit(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (const int64_t unit : {16, 8, 4, 2}) {
    bool fits = row_bytes % unit == 0;
    for (const void* ptr : ptrs) {
      fits = fits && reinterpret_cast<uintptr_t>(ptr) % unit == 0;
    }
    if (fits) {
      return unit;
    }
  }
  HF_THROW("MoE rows must be 2-byte aligned (row of ", row_bytes, " bytes)");
}

// Makes `device` current while alive.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    HF_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      HF_CUDA_CHECK(cudaSetDevice(device));
    }
  }
  ~DeviceScope() { cudaSetDevice(previous_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

// `topk_weights` of a dispatch or combine (`op`), checked to be a floating
// [tokens, topk] tensor on `device`, as contiguous fp32; undefined without.
at::Tensor floatWeights(const char* op,
                        const std::optional<at::Tensor>& topk_weights,
                        const at::Device& device, int64_t tokens,
                        int64_t topk) {
  if (!topk_weights.has_value()) {
    return at::Tensor();
  }
  HF_CHECK(topk_weights->device() == device &&
               at::isFloatingType(topk_weights->scalar_type()) &&
               topk_weights->dim() == 2 && topk_weights->size(0) == tokens &&
               topk_weights->size(1) == topk,
           "MoE ", op, ": topk_weights must be a floating [", tokens, ", ",
           topk, "] tensor on ", device, "; got ", topk_weights->scalar_type(),
           " ", topk_weights->sizes(), " on ", topk_weights->device());
  return topk_weights->to(at::kFloat).contiguous();
}

bool isCapturing(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  HF_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  return capture != cudaStreamCaptureStatusNone;
}

const char* purposeName(int32_t purpose) {
  switch (purpose) {
    case moe::kWaitCounts:
      return "count row";
    case moe::kWaitDispatchData:
      return "dispatched rows";
    case moe::kWaitCombineData:
      return "rows of our tokens in the combine";
    case moe::kWaitCombineFree:
      return "end of its previous combine";
    case moe::kWaitGrid:
      return "this GPU's other blocks (grid barrier)";
    default:
      return "signal";
  }
}

}  // namespace

// Device-side resources of a workspace.
struct CudaMoeWorkspace::Buffers {
  std::shared_ptr<SymmetricMemory> control;
  std::shared_ptr<SymmetricMemory> recv;
  std::shared_ptr<SymmetricMemory> slots;
  moe::ControlLayout layout = {};
  // recv: [C rows][guard][C metadata][guard]; slots: [T_max K rows][guard].
  size_t meta_offset = 0;
  size_t guard_bytes = 0;
  size_t slots_guard_offset = 0;
  void* local = nullptr;  // DeviceState, then the scratch arrays
  moe::DeviceState* state = nullptr;
  int32_t* pick_pos = nullptr;
  int32_t* block_counts = nullptr;
  unsigned long long* block_errors = nullptr;
  int32_t* segment_claims = nullptr;
  int32_t* pick_row = nullptr;
  int32_t* pick_rank = nullptr;
  int64_t* recv_start = nullptr;
  int32_t* recv_count = nullptr;
  int64_t* source_tokens = nullptr;
  moe::RouteEntry* routes = nullptr;
  moe::Status* status_host = nullptr;
  moe::Status* status_device = nullptr;
  // Profiling only: [2 ops][blocks][kProfileSlots] uint64 (dispatch first).
  uint64_t* profile = nullptr;
  cudaEvent_t done = nullptr;
  int device = 0;
  std::string tag;

  ~Buffers() {
    int previous = 0;
    const bool have_device = cudaGetDevice(&previous) == cudaSuccess;
    if (have_device) {
      cudaSetDevice(device);
      cudaDeviceSynchronize();
    }
    if (done != nullptr) {
      cudaEventDestroy(done);
    }
    if (local != nullptr) {
      cudaFree(local);
    }
    if (profile != nullptr) {
      cudaFree(profile);
    }
    if (status_host != nullptr) {
      cudaFreeHost(status_host);
    }
    if (have_device) {
      cudaSetDevice(previous);
    }
    std::lock_guard<std::mutex> lock(tagMutex());
    liveTags().erase(tag);
  }
};

CudaMoeWorkspace::CudaMoeWorkspace(c10::intrusive_ptr<c10d::Store> store,
                                   CudaMoeConfig config)
    : config_(std::move(config)) {
  const CudaMoeConfig& c = config_;
  HF_CHECK(cuda::isAvailable(),
           "the cuda MoE backend needs a GPU, and none is visible");
  HF_CHECK(c.world_size >= 1 && c.world_size <= moe::kMaxRanks,
           "the cuda MoE backend supports 1 to ", moe::kMaxRanks,
           " ranks on one node; world_size = ", c.world_size);
  HF_CHECK(c.rank >= 0 && c.rank < c.world_size, "rank ", c.rank,
           " is outside [0, ", c.world_size, ")");
  HF_CHECK(c.device >= 0 && c.device < cuda::deviceCount(), "device ", c.device,
           " is not one of the ", cuda::deviceCount(), " visible GPUs");
  HF_CHECK(c.num_experts >= 1 && c.num_experts <= moe::kMaxExperts,
           "num_experts must be in [1, ", moe::kMaxExperts, "]; got ",
           c.num_experts);
  HF_CHECK(c.num_experts % c.world_size == 0, "num_experts (", c.num_experts,
           ") must be a multiple of world_size (", c.world_size, ")");
  HF_CHECK(c.topk >= 1 && c.topk <= moe::kMaxTopK, "topk must be in [1, ",
           moe::kMaxTopK, "]; got ", c.topk);
  HF_CHECK_GE(c.max_tokens, 1, "max_tokens (T_max) must be positive");
  HF_CHECK_GE(c.hidden, 1, "hidden size must be positive");
  HF_CHECK(!c.tag.empty(), "a workspace needs a tag unique per MoE node");
  HF_CHECK_GE(c.capacity, 0, "capacity must be 0 (worst case) or positive");
  const moe::ElementType element = elementType(c.dtype);

  local_experts_ = c.num_experts / c.world_size;
  row_bytes_ = c.hidden * static_cast<int64_t>(at::elementSize(c.dtype));
  const int64_t worst =
      c.world_size * c.max_tokens * std::min(c.topk, local_experts_);
  capacity_ = c.capacity > 0 ? c.capacity : worst;
  constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();
  HF_CHECK(capacity_ < kIndexLimit, "capacity ", capacity_,
           " rows does not fit the 32-bit row indices; lower max_tokens or "
           "request a smaller capacity");
  HF_CHECK(c.max_tokens * c.topk < kIndexLimit,
           "max_tokens * topk = ", c.max_tokens * c.topk,
           " does not fit 32-bit pick indices");

  {
    std::lock_guard<std::mutex> lock(tagMutex());
    HF_CHECK(liveTags().insert(c.tag).second,
             "another live MoE workspace "
             "already uses the tag '",
             c.tag, "'; every MoE node needs its own");
  }
  buffers_ = std::make_unique<Buffers>();
  Buffers& b = *buffers_;
  b.tag = c.tag;
  b.device = c.device;
  DeviceScope device_scope(c.device);

  timeout_ns_ = static_cast<uint64_t>(
      (c.timeout_s > 0 ? c.timeout_s
                       : environmentNumber("HOSTFUSE_MOE_TIMEOUT_S", 30.0)) *
      1e9);
  debug_ = environmentNumber("HOSTFUSE_MOE_DEBUG", 0) != 0;
  cooperative_ = environmentNumber("HOSTFUSE_MOE_COOPERATIVE", 1) != 0;
  profile_ = c.profile || environmentNumber("HOSTFUSE_MOE_PROFILE", 0) != 0;

  int max_blocks = 0;
  HF_CUDA_CHECK(moe::prepareKernels(c.device, static_cast<int>(c.num_experts),
                                    element, &max_blocks));
  HF_CHECK(max_blocks >= c.world_size,
           "the cuda MoE kernels need at least R = ", c.world_size,
           " co-resident blocks (one per peer and a local one); "
           "device ",
           c.device, " fits ", max_blocks);
  const int wanted = c.blocks > 0 ? c.blocks
                                  : static_cast<int>(environmentNumber(
                                        "HOSTFUSE_MOE_BLOCKS", max_blocks));
  blocks_ = std::clamp(wanted, c.world_size, max_blocks);
  const int peers = c.world_size - 1;
  if (peers > 0) {
    const int wanted_push = c.push_blocks > 0
                                ? c.push_blocks
                                : static_cast<int>(environmentNumber(
                                      "HOSTFUSE_MOE_PUSH_BLOCKS", 32 * peers));
    const int per_peer =
        std::clamp(wanted_push / peers, 1, (blocks_ - 1) / peers);
    push_blocks_ = per_peer * peers;
  }
  // 0 (or an unset variable): no limit, only T * K decides.
  const double grid_route_min_tokens =
      c.grid_route_min_tokens > 0
          ? static_cast<double>(c.grid_route_min_tokens)
          : environmentNumber("HOSTFUSE_MOE_GRID_ROUTE_MIN_TOKENS", 0);
  grid_route_min_tokens_ =
      grid_route_min_tokens >= 1 && grid_route_min_tokens < 1e18
          ? static_cast<int64_t>(grid_route_min_tokens)
          : std::numeric_limits<int64_t>::max();

  // Every rank must describe the same node: compare through the store.
  {
    const std::string mine = toString(
        "R=", c.world_size, " E=", c.num_experts, " T_max=", c.max_tokens,
        " H=", c.hidden, " K=", c.topk, " dtype=", c.dtype, " C=", capacity_);
    const std::string prefix = uniqueStorePrefix(c.tag + "/config");
    store->set(prefix + "/" + std::to_string(c.rank),
               std::vector<uint8_t>(mine.begin(), mine.end()));
    for (int peer = 0; peer < c.world_size; ++peer) {
      const std::vector<uint8_t> bytes =
          store->get(prefix + "/" + std::to_string(peer));
      const std::string theirs(bytes.begin(), bytes.end());
      HF_CHECK(theirs == mine, "MoE workspace '", c.tag, "': rank ", peer,
               " was created with ", theirs, ", rank ", c.rank, " with ", mine,
               "; every rank needs the same configuration");
    }
  }

  // Symmetric buffers (the collective part).
  b.layout = moe::controlLayout(c.world_size, static_cast<int>(c.num_experts),
                                c.max_tokens);
  b.guard_bytes = roundUp(std::max<size_t>(row_bytes_, 256), 256);
  const size_t rows_bytes = roundUp(capacity_ * row_bytes_, 256);
  b.meta_offset = rows_bytes + b.guard_bytes;
  const size_t recv_bytes =
      b.meta_offset + roundUp(capacity_ * moe::kMetaBytes, 256) + b.guard_bytes;
  b.slots_guard_offset =
      roundUp(static_cast<size_t>(c.max_tokens * c.topk * row_bytes_), 256);
  const size_t slots_bytes = b.slots_guard_offset + b.guard_bytes;
  b.control =
      SymmetricMemory::allocate(store, c.rank, c.world_size, c.device,
                                b.layout.total_bytes, c.tag + "/control");
  b.recv = SymmetricMemory::allocate(store, c.rank, c.world_size, c.device,
                                     recv_bytes, c.tag + "/recv");
  b.slots = SymmetricMemory::allocate(store, c.rank, c.world_size, c.device,
                                      slots_bytes, c.tag + "/slots");
  // Guards: fill patterns behind every region a peer writes into. Peers
  // write only after this rank's first count row, so no race.
  auto* recv_local = static_cast<char*>(b.recv->localPtr());
  HF_CUDA_CHECK(
      cudaMemset(recv_local + rows_bytes, kGuardPattern, b.guard_bytes));
  HF_CUDA_CHECK(cudaMemset(recv_local + recv_bytes - b.guard_bytes,
                           kGuardPattern, b.guard_bytes));
  HF_CUDA_CHECK(
      cudaMemset(static_cast<char*>(b.slots->localPtr()) + b.slots_guard_offset,
                 kGuardPattern, b.guard_bytes));

  // Local state and scratch, 256-byte aligned pieces of one allocation.
  const size_t picks = static_cast<size_t>(c.max_tokens * c.topk);
  const size_t experts = static_cast<size_t>(c.num_experts);
  const size_t ranks = static_cast<size_t>(c.world_size);
  size_t local_bytes = 0;
  auto carve = [&](size_t bytes) {
    const size_t offset = local_bytes;
    local_bytes += roundUp(bytes, 256);
    return offset;
  };
  const size_t state_at = carve(sizeof(moe::DeviceState));
  const size_t pick_pos_at = carve(sizeof(int32_t) * picks);
  const size_t pick_row_at = carve(sizeof(int32_t) * picks);
  const size_t pick_rank_at = carve(sizeof(int32_t) * picks);
  const size_t block_counts_at = carve(sizeof(int32_t) * blocks_ * experts);
  const size_t block_errors_at = carve(sizeof(unsigned long long) * blocks_);
  const size_t claims_at = carve(sizeof(int32_t) * 2 * experts);
  const size_t start_at = carve(sizeof(int64_t) * experts);
  const size_t count_at = carve(sizeof(int32_t) * experts);
  const size_t tokens_at = carve(sizeof(int64_t) * ranks);
  const size_t routes_at = carve(sizeof(moe::RouteEntry) * ranks * picks);
  HF_CUDA_CHECK(cudaMalloc(&b.local, local_bytes));
  HF_CUDA_CHECK(cudaMemset(b.local, 0, local_bytes));
  char* local = static_cast<char*>(b.local);
  b.state = reinterpret_cast<moe::DeviceState*>(local + state_at);
  b.pick_pos = reinterpret_cast<int32_t*>(local + pick_pos_at);
  b.pick_row = reinterpret_cast<int32_t*>(local + pick_row_at);
  b.pick_rank = reinterpret_cast<int32_t*>(local + pick_rank_at);
  b.block_counts = reinterpret_cast<int32_t*>(local + block_counts_at);
  b.block_errors =
      reinterpret_cast<unsigned long long*>(local + block_errors_at);
  b.segment_claims = reinterpret_cast<int32_t*>(local + claims_at);
  b.recv_start = reinterpret_cast<int64_t*>(local + start_at);
  b.recv_count = reinterpret_cast<int32_t*>(local + count_at);
  b.source_tokens = reinterpret_cast<int64_t*>(local + tokens_at);
  b.routes = reinterpret_cast<moe::RouteEntry*>(local + routes_at);
  HF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&b.status_host),
                              sizeof(moe::Status), cudaHostAllocMapped));
  std::memset(b.status_host, 0, sizeof(moe::Status));
  HF_CUDA_CHECK(cudaHostGetDevicePointer(
      reinterpret_cast<void**>(&b.status_device), b.status_host, 0));
  if (profile_) {
    const size_t profile_bytes =
        sizeof(uint64_t) * 2 * blocks_ * moe::kProfileSlots;
    HF_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&b.profile), profile_bytes));
    HF_CUDA_CHECK(cudaMemset(b.profile, 0, profile_bytes));
  }
  HF_CUDA_CHECK(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming));
  HF_CUDA_CHECK(cudaDeviceSynchronize());

  if (debug_) {
    std::cerr << "[hostfuse moe rank " << c.rank << "] workspace " << c.tag
              << ": C = " << capacity_ << " rows, " << row_bytes_
              << " bytes a row, " << blocks_ << " blocks, " << push_blocks_
              << " pushing (at most " << max_blocks << "), timeout "
              << timeout_ns_ / 1e9 << " s\n";
  }
}

CudaMoeWorkspace::~CudaMoeWorkspace() = default;

void CudaMoeWorkspace::checkUsable(const char* op) const {
  HF_CHECK(!broken_, "MoE ", op, " (cuda backend): workspace '", config_.tag,
           "' is unusable after an earlier failure: ", broken_reason_);
}

CudaDispatchResult CudaMoeWorkspace::dispatch(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights) {
  checkUsable("dispatch");
  const CudaMoeConfig& c = config_;
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(c.device));
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
  HF_CHECK(
      topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
      "MoE dispatch: topk_idx must be int64 or int32; got ",
      topk_idx.scalar_type());
  HF_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == tokens &&
               topk_idx.size(1) == c.topk,
           "MoE dispatch: topk_idx must be [", tokens, ", ", c.topk, "]; got ",
           topk_idx.sizes());
  const at::Tensor weights =
      floatWeights("dispatch", topk_weights, device, tokens, c.topk);
  const at::Tensor input = x.contiguous();
  const at::Tensor idx = topk_idx.contiguous();

  Buffers& b = *buffers_;
  DeviceScope device_scope(c.device);
  const cudaStream_t stream = cuda::currentStream(c.device);
  const auto options = at::TensorOptions().device(device);
  CudaDispatchResult result;
  std::shared_ptr<SymmetricMemory> keep_alive = b.recv;
  result.recv_x = at::from_blob(
      b.recv->localPtr(), {capacity_, c.hidden}, [keep_alive](void*) {},
      options.dtype(c.dtype));
  result.recv_src_rank = at::empty({capacity_}, options.dtype(at::kLong));
  result.recv_src_token = at::empty({capacity_}, options.dtype(at::kLong));
  result.recv_src_k = at::empty({capacity_}, options.dtype(at::kLong));
  if (weights.defined()) {
    result.recv_weights = at::empty({capacity_}, options.dtype(at::kFloat));
  }
  result.recv_expert_counts =
      at::empty({local_experts_}, options.dtype(at::kLong));
  result.n_rows_to_rank = at::empty({c.world_size}, options.dtype(at::kLong));
  result.n_rows_from_rank = at::empty({c.world_size}, options.dtype(at::kLong));

  moe::DispatchParams p = {};
  p.common = commonParams(
      copyUnit(row_bytes_, {input.data_ptr(), b.recv->localPtr()}), b.profile);
  p.x = input.data_ptr();
  p.topk_idx = idx.data_ptr();
  p.topk_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  p.tokens = tokens;
  p.num_experts = static_cast<int>(c.num_experts);
  p.capacity = capacity_;
  p.local_route = tokens * c.topk <= moe::kLocalRoutePicks &&
                          tokens < grid_route_min_tokens_
                      ? 1
                      : 0;
  p.pick_pos = b.pick_pos;
  p.block_counts = b.block_counts;
  p.block_errors = b.block_errors;
  p.segment_claims = b.segment_claims;
  p.recv_src_rank = result.recv_src_rank.data_ptr<int64_t>();
  p.recv_src_token = result.recv_src_token.data_ptr<int64_t>();
  p.recv_src_k = result.recv_src_k.data_ptr<int64_t>();
  p.recv_weights =
      weights.defined() ? result.recv_weights.data_ptr<float>() : nullptr;
  p.recv_expert_counts = result.recv_expert_counts.data_ptr<int64_t>();
  p.rows_to_rank = result.n_rows_to_rank.data_ptr<int64_t>();
  p.rows_from_rank = result.n_rows_from_rank.data_ptr<int64_t>();
  HF_CUDA_CHECK(moe::launchDispatch(p, idx.scalar_type() == at::kLong, blocks_,
                                    cooperative_, stream));
  result.num_tokens = tokens;
  result.call = ++dispatch_calls_;
  result.workspace = this;
  afterCall("dispatch");
  return result;
}

at::Tensor CudaMoeWorkspace::combine(
    const at::Tensor& expert_out, const CudaDispatchResult& handle,
    const std::optional<at::Tensor>& topk_weights, int64_t num_tokens) {
  checkUsable("combine");
  const CudaMoeConfig& c = config_;
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(c.device));
  HF_CHECK(handle.workspace == this,
           "MoE combine: the handle comes from "
           "another workspace (another MoE node?) than '",
           c.tag, "'");
  HF_CHECK(handle.call == dispatch_calls_,
           "MoE combine: the handle is from "
           "dispatch call ",
           handle.call, " of workspace '", c.tag,
           "', but its latest dispatch is call ", dispatch_calls_,
           "; combine needs the latest one");
  const int64_t tokens = handle.num_tokens;
  HF_CHECK(num_tokens < 0 || num_tokens == tokens, "MoE combine: num_tokens ",
           num_tokens, " differs from the dispatch's T = ", tokens);
  HF_CHECK(expert_out.device() == device,
           "MoE combine: expert_out must be "
           "on ",
           device, "; it is on ", expert_out.device());
  HF_CHECK(expert_out.scalar_type() == c.dtype,
           "MoE combine: expert_out "
           "must be ",
           c.dtype, " like the workspace; got ", expert_out.scalar_type());
  HF_CHECK(expert_out.dim() == 2 && expert_out.size(0) == capacity_ &&
               expert_out.size(1) == c.hidden,
           "MoE combine: expert_out must be [C, H] = [", capacity_, ", ",
           c.hidden, "] in the dispatch layout; got ", expert_out.sizes());
  const at::Tensor weights =
      floatWeights("combine", topk_weights, device, tokens, c.topk);
  const at::Tensor rows = expert_out.contiguous();

  Buffers& b = *buffers_;
  DeviceScope device_scope(c.device);
  const cudaStream_t stream = cuda::currentStream(c.device);
  at::Tensor out = at::empty({tokens, c.hidden},
                             at::TensorOptions().device(device).dtype(c.dtype));
  moe::CombineParams p = {};
  p.common = commonParams(
      copyUnit(row_bytes_, {rows.data_ptr(), out.data_ptr()}),
      b.profile != nullptr
          ? b.profile + static_cast<size_t>(blocks_) * moe::kProfileSlots
          : nullptr);
  p.expert_out = rows.data_ptr();
  p.topk_weights = weights.defined() ? weights.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.tokens = tokens;
  HF_CUDA_CHECK(moe::launchCombine(p, elementType(c.dtype), blocks_,
                                   cooperative_, stream));
  afterCall("combine");
  return out;
}

moe::CommonParams CudaMoeWorkspace::commonParams(int64_t unit_bytes,
                                                 uint64_t* profile) const {
  const CudaMoeConfig& c = config_;
  const Buffers& b = *buffers_;
  moe::CommonParams p = {};
  p.rank = c.rank;
  p.world_size = c.world_size;
  p.local_experts = static_cast<int>(local_experts_);
  p.topk = static_cast<int>(c.topk);
  p.max_tokens = c.max_tokens;
  p.row_bytes = row_bytes_;
  p.unit_bytes = unit_bytes;
  p.push_blocks = push_blocks_;
  p.control = b.control->devicePeerPtrs();
  p.recv = b.recv->devicePeerPtrs();
  p.slots = b.slots->devicePeerPtrs();
  p.layout = b.layout;
  p.meta_offset = b.meta_offset;
  p.state = b.state;
  p.status = b.status_device;
  p.pick_row = b.pick_row;
  p.pick_rank = b.pick_rank;
  p.recv_start = b.recv_start;
  p.recv_count = b.recv_count;
  p.source_tokens = b.source_tokens;
  p.routes = b.routes;
  p.timeout_ns = timeout_ns_;
  p.debug = debug_ ? 1 : 0;
  p.profile = profile;
  return p;
}

void CudaMoeWorkspace::afterCall(const char* op) {
  const cudaStream_t stream = cuda::currentStream(config_.device);
  if (!config_.check_each_call || isCapturing(stream)) {
    return;
  }
  Buffers& b = *buffers_;
  HF_CUDA_CHECK(cudaEventRecord(b.done, stream));
  HF_CUDA_CHECK(cudaEventSynchronize(b.done));
  if (debug_) {
    std::cerr << "[hostfuse moe rank " << config_.rank << "] " << op
              << " done, status " << b.status_host->code << "\n";
  }
  raiseStatus();
}

void CudaMoeWorkspace::checkStatus() {
  checkUsable("checkStatus");
  DeviceScope device_scope(config_.device);
  HF_CHECK(!isCapturing(cuda::currentStream(config_.device)),
           "MoE checkStatus: cannot wait for the device while the stream is "
           "being captured; call it after replaying the graph");
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  raiseStatus();
}

void CudaMoeWorkspace::raiseStatus() {
  Buffers& b = *buffers_;
  moe::Status status;
  std::memcpy(&status, const_cast<const moe::Status*>(b.status_host),
              sizeof(status));
  if (status.code == moe::kStatusOk) {
    return;
  }
  // Clear for the next call: the claim word on the device, then the record.
  const cudaStream_t stream = cuda::currentStream(config_.device);
  HF_CUDA_CHECK(
      cudaMemsetAsync(&b.state->status_claim, 0, sizeof(int32_t), stream));
  HF_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::memset(b.status_host, 0, sizeof(moe::Status));

  const CudaMoeConfig& c = config_;
  const std::string op =
      toString("MoE ", status.op == 1 ? "dispatch" : "combine",
               " (cuda backend, workspace '", c.tag, "', rank ", c.rank, ")");
  switch (status.code) {
    case moe::kStatusBadExpertId:
      HF_THROW(op, ": rank ", status.rank, " passed topk_idx[", status.token,
               ", ", status.pick, "] = ", status.value,
               ", which is not an expert id (expected -1 to mask the pick, "
               "or 0 <= id < ",
               c.num_experts,
               "); nothing was dispatched, the next call can proceed");
    case moe::kStatusDuplicateExpert:
      HF_THROW(op, ": rank ", status.rank, " names expert ", status.value,
               " twice in token ", status.token, " (pick ", status.pick,
               " repeats an earlier pick); nothing was dispatched, the next "
               "call can proceed");
    case moe::kStatusCapacityOverflow:
      HF_THROW(op, ": capacity overflow: rank ", status.rank, " receives ",
               status.value, " rows but the capacity is ", capacity_,
               " rows; create the workspace with capacity >= ", status.value,
               " (0 selects the worst case R * T_max * min(K, L)). Rows past "
               "the capacity were dropped; nothing was written out of "
               "bounds");
    case moe::kStatusTimeout: {
      broken_ = true;
      broken_reason_ =
          toString("rank ", status.rank, " did not answer within ",
                   timeout_ns_ / 1e9, " s (waiting for its ",
                   purposeName(status.purpose), ", call ", status.epoch, ")");
      HF_THROW(op, ": ", broken_reason_, ". Did rank ", status.rank,
               " skip this call, fail or hang? HOSTFUSE_MOE_TIMEOUT_S sets "
               "the timeout. The workspace is unusable now; recreate it on "
               "every rank");
    }
    case moe::kStatusPoisoned:
      broken_ = true;
      broken_reason_ = "an earlier timeout";
      HF_THROW(op, ": the workspace is unusable after an earlier timeout");
    default:
      HF_ERROR(false, op, ": internal error code ", status.code, " (rank ",
               status.rank, ", token ", status.token, ", pick ", status.pick,
               ", value ", status.value, ")");
  }
}

namespace {

// Phase names, indexed by moe::DispatchPhase / moe::CombinePhase (slot 0,
// the epoch, has none).
const char* const kDispatchPhaseNames[moe::kDispatchPhases] = {
    "",
    "entry",
    "validated",
    "counted",
    "count rows published",
    "peers' counts in",
    "offsets",
    "rows pushed (push)",
    "own rows written (local)",
    "expanded",
    "exit"};
const char* const kCombinePhaseNames[moe::kCombinePhases] = {
    "",        "entry", "peer's slots free (push)", "rows pushed (push)",
    "reduced", "exit"};

// Reduces one op's [blocks][kProfileSlots] slots: the blocks of the latest
// epoch only (a block that returned early keeps an older call's stamps).
CudaMoeOpProfile reduceProfile(const uint64_t* slots, int blocks, int phases,
                               const char* const* names, int exit_phase) {
  CudaMoeOpProfile op;
  for (int block = 0; block < blocks; ++block) {
    op.epoch = std::max(op.epoch, slots[block * moe::kProfileSlots]);
  }
  if (op.epoch == 0) {
    return op;
  }
  auto current = [&](int block) {
    return slots[block * moe::kProfileSlots] == op.epoch;
  };
  uint64_t entry = std::numeric_limits<uint64_t>::max();
  for (int block = 0; block < blocks; ++block) {
    const uint64_t t = slots[block * moe::kProfileSlots + 1];
    if (current(block) && t != 0) {
      entry = std::min(entry, t);
    }
  }
  op.entry_ns = entry;
  auto relative = [&](uint64_t t) {
    return (static_cast<double>(t) - static_cast<double>(entry)) / 1e3;
  };
  for (int phase = 1; phase < phases; ++phase) {
    CudaMoePhase row;
    row.name = names[phase];
    uint64_t first = std::numeric_limits<uint64_t>::max();
    uint64_t last = 0;
    for (int block = 0; block < blocks; ++block) {
      const uint64_t t = slots[block * moe::kProfileSlots + phase];
      if (!current(block) || t == 0) {
        continue;
      }
      first = std::min(first, t);
      last = std::max(last, t);
      ++row.blocks;
      if (block == 0) {
        row.block0_us = relative(t);
      }
    }
    if (row.blocks > 0) {
      row.first_us = relative(first);
      row.last_us = relative(last);
      if (phase == exit_phase) {
        op.exit_ns = last;
        op.span_us = relative(last);
      }
    }
    op.phases.push_back(row);
  }
  return op;
}

void formatOp(std::string& text, const char* op_name,
              const CudaMoeOpProfile& op) {
  char line[160];
  if (op.epoch == 0) {
    std::snprintf(line, sizeof(line), "  %s: not profiled yet\n", op_name);
    text += line;
    return;
  }
  std::snprintf(line, sizeof(line), "  %-8s %-24s %8s %8s %8s %6s\n", op_name,
                "phase (call end)", "block0", "first", "last", "blocks");
  text += line;
  auto us = [](double value, char* out, size_t size) {
    if (value < 0) {
      std::snprintf(out, size, "%8s", "-");
    } else {
      std::snprintf(out, size, "%8.1f", value);
    }
  };
  for (const CudaMoePhase& phase : op.phases) {
    char block0[16];
    char first[16];
    char last[16];
    us(phase.block0_us, block0, sizeof(block0));
    us(phase.first_us, first, sizeof(first));
    us(phase.last_us, last, sizeof(last));
    std::snprintf(line, sizeof(line), "  %-8s %-24s %s %s %s %6d\n", "",
                  phase.name.c_str(), block0, first, last, phase.blocks);
    text += line;
  }
}

}  // namespace

std::string CudaMoeProfile::format() const {
  std::string text = toString(
      "  rank ", rank,
      ": us from the kernel's first block entry; block0 / first / last over "
      "the blocks that recorded the phase\n");
  formatOp(text, "dispatch", dispatch);
  formatOp(text, "combine", combine);
  return text;
}

CudaMoeProfile CudaMoeWorkspace::profileReport() const {
  HF_CHECK(profile_, "MoE profileReport: workspace '", config_.tag,
           "' was created without profiling (CudaMoeConfig::profile or "
           "HOSTFUSE_MOE_PROFILE=1)");
  const Buffers& b = *buffers_;
  DeviceScope device_scope(config_.device);
  HF_CHECK(!isCapturing(cuda::currentStream(config_.device)),
           "MoE profileReport: cannot wait for the device while the stream "
           "is being captured");
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  const size_t per_op = static_cast<size_t>(blocks_) * moe::kProfileSlots;
  std::vector<uint64_t> host(2 * per_op);
  HF_CUDA_CHECK(cudaMemcpy(host.data(), b.profile,
                           sizeof(uint64_t) * host.size(),
                           cudaMemcpyDeviceToHost));
  CudaMoeProfile report;
  report.rank = config_.rank;
  report.dispatch = reduceProfile(host.data(), blocks_, moe::kDispatchPhases,
                                  kDispatchPhaseNames, moe::kDispatchExit);
  report.combine =
      reduceProfile(host.data() + per_op, blocks_, moe::kCombinePhases,
                    kCombinePhaseNames, moe::kCombineExit);
  return report;
}

int64_t CudaMoeWorkspace::damagedGuardBytes() const {
  const Buffers& b = *buffers_;
  DeviceScope device_scope(config_.device);
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint8_t> host(b.guard_bytes);
  int64_t damaged = 0;
  auto count = [&](const void* device_ptr) {
    HF_CUDA_CHECK(cudaMemcpy(host.data(), device_ptr, b.guard_bytes,
                             cudaMemcpyDeviceToHost));
    damaged += std::count_if(host.begin(), host.end(),
                             [](uint8_t v) { return v != kGuardPattern; });
  };
  const auto* recv = static_cast<const char*>(b.recv->localPtr());
  count(recv + b.meta_offset - b.guard_bytes);
  count(recv + b.recv->size() - b.guard_bytes);
  count(static_cast<const char*>(b.slots->localPtr()) + b.slots_guard_offset);
  return damaged;
}

}  // namespace hostfuse
