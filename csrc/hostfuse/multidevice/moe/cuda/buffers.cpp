#include <hostfuse/multidevice/moe/cuda/buffers.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <hostfuse/multidevice/comm/symmetric_memory.h>
#include <hostfuse/utils/cuda_utils.h>

namespace hostfuse {

namespace {

constexpr uint8_t kGuardPattern = 0xA5;
constexpr size_t kAlignment = 256;

// Carves 256-byte aligned pieces out of one allocation: offsets first, the
// allocation once their sum is known.
class Carver {
 public:
  size_t take(size_t bytes) {
    const size_t offset = total_;
    total_ += roundUp(bytes, kAlignment);
    return offset;
  }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};

template <typename T>
T* pieceAt(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace

std::unique_ptr<CudaMoeBuffers> CudaMoeBuffers::allocate(
    const c10::intrusive_ptr<c10d::Store>& store, const CudaMoeConfig& config,
    const CudaMoeLaunch& launch) {
  std::unique_ptr<CudaMoeBuffers> b(new CudaMoeBuffers());
  b->device = config.device;
  cuda::DeviceScope device_scope(config.device);
  b->allocateSymmetric(store, config, launch);
  b->allocateLocal(config, launch);
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  return b;
}

// The collective part. Guards are fill patterns behind every region a peer
// writes into. A peer may write into the stage (staged push) as soon as
// its own workspace is made, before this rank's first count row, but
// never into a guard: filling them here does not race. Every buffer is
// zeroed before its handle is shared (SymmetricMemory::allocate).
void CudaMoeBuffers::allocateSymmetric(
    const c10::intrusive_ptr<c10d::Store>& store, const CudaMoeConfig& c,
    const CudaMoeLaunch& l) {
  layout = moe::controlLayout(c.world_size, static_cast<int>(c.num_experts),
                              c.max_tokens);
  guard_bytes = roundUp(
      std::max<size_t>(std::max(l.row_bytes, l.dispatch_row_bytes), kAlignment),
      kAlignment);
  const size_t rows_bytes =
      roundUp(l.capacity * l.dispatch_row_bytes, kAlignment);
  meta_offset = rows_bytes + guard_bytes;
  const size_t recv_bytes = meta_offset +
                            roundUp(l.capacity * moe::kMetaBytes, kAlignment) +
                            guard_bytes;
  slots_guard_offset = roundUp(
      static_cast<size_t>(c.max_tokens * c.topk * l.row_bytes), kAlignment);
  const size_t slots_bytes = slots_guard_offset + guard_bytes;
  auto symmetric = [&](size_t bytes, const char* name) {
    return SymmetricMemory::allocate(store, c.rank, c.world_size, c.device,
                                     bytes, c.tag + "/" + name);
  };
  control = symmetric(layout.total_bytes, "control");
  recv = symmetric(recv_bytes, "recv");
  slots = symmetric(slots_bytes, "slots");
  if (l.staged_push && c.world_size > 1) {
    stage_picks = static_cast<int>(std::min(c.topk, l.local_experts));
    const size_t stage_slots = 2 * static_cast<size_t>(c.world_size) *
                               static_cast<size_t>(c.max_tokens);
    stage_meta_offset =
        roundUp(stage_slots * l.dispatch_row_bytes, kAlignment) + guard_bytes;
    const size_t stage_bytes =
        stage_meta_offset +
        roundUp(stage_slots * moe::stageMetaBytes(stage_picks), kAlignment) +
        guard_bytes;
    stage = symmetric(stage_bytes, "stage");
    auto* stage_local = static_cast<char*>(stage->localPtr());
    HF_CUDA_CHECK(cudaMemset(stage_local + stage_meta_offset - guard_bytes,
                             kGuardPattern, guard_bytes));
    HF_CUDA_CHECK(cudaMemset(stage_local + stage_bytes - guard_bytes,
                             kGuardPattern, guard_bytes));
  }
  auto* recv_local = static_cast<char*>(recv->localPtr());
  HF_CUDA_CHECK(
      cudaMemset(recv_local + rows_bytes, kGuardPattern, guard_bytes));
  HF_CUDA_CHECK(cudaMemset(recv_local + recv_bytes - guard_bytes, kGuardPattern,
                           guard_bytes));
  HF_CUDA_CHECK(
      cudaMemset(static_cast<char*>(slots->localPtr()) + slots_guard_offset,
                 kGuardPattern, guard_bytes));
}

// This rank's state and scratch: pieces of one zeroed allocation.
void CudaMoeBuffers::allocateLocal(const CudaMoeConfig& c,
                                   const CudaMoeLaunch& l) {
  const size_t picks = static_cast<size_t>(c.max_tokens * c.topk);
  const size_t experts = static_cast<size_t>(c.num_experts);
  const size_t ranks = static_cast<size_t>(c.world_size);
  const size_t blocks = static_cast<size_t>(l.blocks);
  Carver carve;
  const size_t state_at = carve.take(sizeof(moe::DeviceState));
  const size_t pick_pos_at = carve.take(sizeof(int32_t) * picks);
  const size_t slot_pos_at = carve.take(sizeof(int32_t) * picks);
  const size_t pick_row_at = carve.take(sizeof(int32_t) * picks);
  const size_t pick_rank_at = carve.take(sizeof(int32_t) * picks);
  // Per block: picks per expert, then tokens per rank (the route's columns).
  const size_t block_counts_at =
      carve.take(sizeof(int32_t) * blocks * (experts + ranks));
  const size_t block_errors_at =
      carve.take(sizeof(unsigned long long) * blocks);
  const size_t claims_at = carve.take(sizeof(int32_t) * 2 * experts);
  const size_t start_at = carve.take(sizeof(int64_t) * experts);
  const size_t count_at = carve.take(sizeof(int32_t) * experts);
  const size_t tokens_at = carve.take(sizeof(int64_t) * ranks);
  const size_t routes_at = carve.take(sizeof(moe::RouteEntry) * ranks * picks);
  HF_CUDA_CHECK(cudaMalloc(&local, carve.total()));
  HF_CUDA_CHECK(cudaMemset(local, 0, carve.total()));
  state = pieceAt<moe::DeviceState>(local, state_at);
  pick_pos = pieceAt<int32_t>(local, pick_pos_at);
  slot_pos = pieceAt<int32_t>(local, slot_pos_at);
  pick_row = pieceAt<int32_t>(local, pick_row_at);
  pick_rank = pieceAt<int32_t>(local, pick_rank_at);
  block_counts = pieceAt<int32_t>(local, block_counts_at);
  block_errors = pieceAt<unsigned long long>(local, block_errors_at);
  segment_claims = pieceAt<int32_t>(local, claims_at);
  recv_start = pieceAt<int64_t>(local, start_at);
  recv_count = pieceAt<int32_t>(local, count_at);
  source_tokens = pieceAt<int64_t>(local, tokens_at);
  routes = pieceAt<moe::RouteEntry>(local, routes_at);

  HF_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&status_host),
                              sizeof(moe::StatusRecord), cudaHostAllocMapped));
  std::memset(status_host, 0, sizeof(moe::StatusRecord));
  HF_CUDA_CHECK(cudaHostGetDevicePointer(
      reinterpret_cast<void**>(&status_device), status_host, 0));
  if (l.profile) {
    const size_t profile_bytes =
        sizeof(uint64_t) * 2 * blocks * moe::kProfileSlots;
    HF_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&profile), profile_bytes));
    HF_CUDA_CHECK(cudaMemset(profile, 0, profile_bytes));
  }
  HF_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
}

CudaMoeBuffers::~CudaMoeBuffers() {
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
}

int64_t CudaMoeBuffers::damagedGuardBytes() const {
  cuda::DeviceScope device_scope(device);
  HF_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<uint8_t> host(guard_bytes);
  int64_t damaged = 0;
  auto count = [&](const void* device_ptr) {
    HF_CUDA_CHECK(cudaMemcpy(host.data(), device_ptr, guard_bytes,
                             cudaMemcpyDeviceToHost));
    damaged += std::count_if(host.begin(), host.end(),
                             [](uint8_t v) { return v != kGuardPattern; });
  };
  const auto* recv_local = static_cast<const char*>(recv->localPtr());
  count(recv_local + meta_offset - guard_bytes);
  count(recv_local + recv->size() - guard_bytes);
  count(static_cast<const char*>(slots->localPtr()) + slots_guard_offset);
  if (stage != nullptr) {
    const auto* stage_local = static_cast<const char*>(stage->localPtr());
    count(stage_local + stage_meta_offset - guard_bytes);
    count(stage_local + stage->size() - guard_bytes);
  }
  return damaged;
}

}  // namespace hostfuse
