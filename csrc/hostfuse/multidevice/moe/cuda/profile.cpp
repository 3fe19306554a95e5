#include <hostfuse/multidevice/moe/cuda/profile.h>

#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

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
CudaMoeOpProfile reduceOp(const uint64_t* slots, int blocks, int phases,
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
  if (op.epoch == 0) {
    text += fmt::format("  {}: not profiled yet\n", op_name);
    return;
  }
  text += fmt::format("  {:<8} {:<24} {:>8} {:>8} {:>8} {:>6}\n", op_name,
                      "phase (call end)", "block0", "first", "last", "blocks");
  auto us = [](double value) {
    return value < 0 ? fmt::format("{:>8}", "-")
                     : fmt::format("{:>8.1f}", value);
  };
  for (const CudaMoePhase& phase : op.phases) {
    text += fmt::format("  {:<8} {:<24} {} {} {} {:>6}\n", "", phase.name,
                        us(phase.block0_us), us(phase.first_us),
                        us(phase.last_us), phase.blocks);
  }
}

}  // namespace

std::string CudaMoeProfile::format() const {
  std::string text = fmt::format(
      "  rank {}: us from the kernel's first block entry; block0 / first / "
      "last over the blocks that recorded the phase\n",
      rank);
  formatOp(text, "dispatch", dispatch);
  formatOp(text, "combine", combine);
  return text;
}

CudaMoeProfile reduceProfile(const std::vector<uint64_t>& slots, int blocks,
                             int rank) {
  const size_t per_op = static_cast<size_t>(blocks) * moe::kProfileSlots;
  CudaMoeProfile report;
  report.rank = rank;
  report.dispatch = reduceOp(slots.data(), blocks, moe::kDispatchPhases,
                             kDispatchPhaseNames, moe::kDispatchExit);
  report.combine = reduceOp(slots.data() + per_op, blocks, moe::kCombinePhases,
                            kCombinePhaseNames, moe::kCombineExit);
  return report;
}

}  // namespace hostfuse
