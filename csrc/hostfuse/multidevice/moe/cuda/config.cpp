#include <hostfuse/multidevice/moe/cuda/config.h>

#include <c10/core/ScalarType.h>
#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/options.h>
#include <hostfuse/utils/torch_cuda.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

void validateConfig(const CudaMoeConfig& c) {
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
  HF_CHECK(
      c.dtype == at::kFloat || c.dtype == at::kBFloat16 || c.dtype == at::kHalf,
      "the cuda MoE backend moves Float, BFloat16 or Half rows; got ", c.dtype);
  HF_CHECK(!c.fp8_dispatch || c.hidden % moe::kFp8Block == 0,
           "fp8 dispatch needs a hidden size that is a multiple of ",
           moe::kFp8Block, " (one scale per ", moe::kFp8Block,
           " channels); got ", c.hidden);
  HF_CHECK(!c.tag.empty(), "a workspace needs a tag unique per MoE node");
  HF_CHECK_GE(c.capacity, 0, "capacity must be 0 (worst case) or positive");
  HF_CHECK(c.blocks >= 0 && c.push_blocks >= 0 && c.grid_route_min_tokens >= 0,
           "blocks, push_blocks and grid_route_min_tokens must be >= 0 (0: "
           "the option or the default)");
}

CudaMoeLaunch resolveLaunch(const CudaMoeConfig& c, int max_blocks) {
  HF_CHECK(max_blocks >= c.world_size,
           "the cuda MoE kernels need at least R = ", c.world_size,
           " co-resident blocks (one per peer and a local one); device ",
           c.device, " fits ", max_blocks);
  CudaMoeLaunch l;
  l.local_experts = c.num_experts / c.world_size;
  l.row_bytes = c.hidden * static_cast<int64_t>(c10::elementSize(c.dtype));
  l.dispatch_row_bytes =
      c.fp8_dispatch ? moe::fp8PackedRowBytes(c.hidden) : l.row_bytes;
  const int64_t worst =
      c.world_size * c.max_tokens * std::min(c.topk, l.local_experts);
  l.capacity = c.capacity > 0 ? c.capacity : worst;
  constexpr int64_t kIndexLimit = std::numeric_limits<int32_t>::max();
  HF_CHECK(l.capacity < kIndexLimit, "capacity ", l.capacity,
           " rows does not fit the 32-bit row indices; lower max_tokens or "
           "request a smaller capacity");
  HF_CHECK(c.max_tokens * c.topk < kIndexLimit,
           "max_tokens * topk = ", c.max_tokens * c.topk,
           " does not fit 32-bit pick indices");

  const int wanted =
      c.blocks > 0
          ? c.blocks
          : static_cast<int>(
                options::getInt(Option::MoeBlocks).value_or(max_blocks));
  l.blocks = std::clamp(wanted, c.world_size, max_blocks);
  const int peers = c.world_size - 1;
  if (peers > 0) {
    const int64_t wanted_push =
        c.push_blocks > 0
            ? c.push_blocks
            : options::getInt(Option::MoePushBlocks).value_or(32 * peers);
    const int per_peer = static_cast<int>(
        std::clamp<int64_t>(wanted_push / peers, 1, (l.blocks - 1) / peers));
    l.push_blocks = per_peer * peers;
  }
  // 0: no limit, only T * K decides.
  const int64_t min_tokens =
      c.grid_route_min_tokens > 0
          ? c.grid_route_min_tokens
          : options::intOr(Option::MoeGridRouteMinTokens);
  l.grid_route_min_tokens =
      min_tokens > 0 ? min_tokens : std::numeric_limits<int64_t>::max();
  // 0: the option, checked as it is read; else the field, in its range.
  if (c.timeout_s != 0) {
    options::checkTimeout("CudaMoeConfig::timeout_s", c.timeout_s);
  }
  l.timeout_s =
      c.timeout_s != 0 ? c.timeout_s : options::numberOr(Option::MoeTimeoutS);
  l.timeout_ns = static_cast<uint64_t>(l.timeout_s * 1e9);
  l.debug = options::boolOr(Option::MoeDebug);
  l.cooperative = options::boolOr(Option::MoeCooperative);
  l.profile = c.profile || options::boolOr(Option::MoeProfile);
  l.staged_push = c.staged_push || options::boolOr(Option::MoeStagedPush);
  return l;
}

std::string describeShape(const CudaMoeConfig& c, const CudaMoeLaunch& l) {
  return fmt::format("R={} E={} T_max={} H={} K={} dtype={} C={}{}{}",
                     c.world_size, c.num_experts, c.max_tokens, c.hidden,
                     c.topk, c10::toString(c.dtype), l.capacity,
                     c.fp8_dispatch ? " fp8" : "",
                     l.staged_push ? " staged-push" : "");
}

}  // namespace hostfuse
