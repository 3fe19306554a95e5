#include <hostfuse/multidevice/moe/cuda/params.h>

#include <cstdint>
#include <initializer_list>

#include <hostfuse/multidevice/comm/symmetric_memory.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse {

namespace {

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

// The fields both kernels share.
moe::CommonParams commonParams(const CudaMoeConfig& c, const CudaMoeLaunch& l,
                               const CudaMoeBuffers& b, int64_t unit_bytes,
                               uint64_t* profile) {
  moe::CommonParams p = {};
  p.rank = c.rank;
  p.world_size = c.world_size;
  p.local_experts = static_cast<int>(l.local_experts);
  p.topk = static_cast<int>(c.topk);
  p.max_tokens = c.max_tokens;
  p.row_bytes = l.row_bytes;
  p.unit_bytes = unit_bytes;
  p.push_blocks = l.push_blocks;
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
  p.timeout_ns = l.timeout_ns;
  p.debug = l.debug ? 1 : 0;
  p.profile = profile;
  return p;
}

template <typename T>
T* dataOrNull(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

moe::ElementType elementType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return moe::ElementType::kFloat32;
    case at::kBFloat16:
      return moe::ElementType::kBFloat16;
    case at::kHalf:
      return moe::ElementType::kFloat16;
    default:
      HF_THROW("the cuda MoE backend moves Float, BFloat16 or Half rows; got ",
               dtype);
  }
}

moe::CommonParams failureParams(const CudaMoeConfig& c, const CudaMoeLaunch& l,
                                const CudaMoeBuffers& b) {
  return commonParams(c, l, b, /*unit_bytes=*/2, /*profile=*/nullptr);
}

moe::DispatchParams dispatchParams(const CudaMoeConfig& c,
                                   const CudaMoeLaunch& l,
                                   const CudaMoeBuffers& b, const at::Tensor& x,
                                   const at::Tensor& idx,
                                   const at::Tensor& weights,
                                   const CudaDispatchResult& out) {
  const int64_t tokens = x.size(0);
  moe::DispatchParams p = {};
  p.common = commonParams(
      c, l, b,
      copyUnit(l.dispatch_row_bytes, {x.data_ptr(), b.recv->localPtr()}),
      b.profile);
  p.common.row_bytes = l.dispatch_row_bytes;
  p.x = x.data_ptr();
  p.topk_idx = idx.data_ptr();
  p.topk_weights = dataOrNull<float>(weights);
  p.tokens = tokens;
  p.num_experts = static_cast<int>(c.num_experts);
  p.capacity = l.capacity;
  p.local_route = tokens * c.topk <= moe::kLocalRoutePicks &&
                          tokens < l.grid_route_min_tokens
                      ? 1
                      : 0;
  p.pick_pos = b.pick_pos;
  if (l.staged_push && c.world_size > 1) {
    p.staged = 1;
    p.stage = b.stage->devicePeerPtrs();
    p.stage_meta_offset = b.stage_meta_offset;
    p.stage_picks = b.stage_picks;
    p.slot_pos = b.slot_pos;
  }
  p.block_counts = b.block_counts;
  p.block_errors = b.block_errors;
  p.segment_claims = b.segment_claims;
  p.recv_src_rank = out.recv_src_rank.data_ptr<int64_t>();
  p.recv_src_token = out.recv_src_token.data_ptr<int64_t>();
  p.recv_src_k = out.recv_src_k.data_ptr<int64_t>();
  p.recv_weights = dataOrNull<float>(out.recv_weights);
  p.recv_expert_counts = out.recv_expert_counts.data_ptr<int64_t>();
  p.rows_to_rank = out.n_rows_to_rank.data_ptr<int64_t>();
  p.rows_from_rank = out.n_rows_from_rank.data_ptr<int64_t>();
  p.layout_id = out.recv_layout_id.data_ptr<int64_t>();
  return p;
}

moe::CombineParams combineParams(const CudaMoeConfig& c, const CudaMoeLaunch& l,
                                 const CudaMoeBuffers& b,
                                 const at::Tensor& rows,
                                 const at::Tensor& weights,
                                 const at::Tensor& out, bool per_rank) {
  moe::CombineParams p = {};
  uint64_t* profile =
      b.profile != nullptr
          ? b.profile + static_cast<size_t>(l.blocks) * moe::kProfileSlots
          : nullptr;
  p.common = commonParams(
      c, l, b, copyUnit(l.row_bytes, {rows.data_ptr(), out.data_ptr()}),
      profile);
  p.expert_out = rows.data_ptr();
  p.per_rank = per_rank ? 1 : 0;
  (per_rank ? p.recv_weights : p.topk_weights) = dataOrNull<float>(weights);
  p.out = out.data_ptr();
  p.tokens = out.size(0);
  return p;
}

}  // namespace hostfuse
