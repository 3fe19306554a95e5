// The per-phase profile of the cuda MoE kernels (CudaMoeConfig::profile):
// what the kernels' timestamps mean, and the report built from them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hostfuse {

// Per-phase timing of a workspace's latest dispatch and combine (see
// CudaMoeConfig::profile). Times in microseconds from the kernel's first
// block entry (the smallest entry time over its blocks), on this rank's
// GPU clock; -1 where no block recorded the phase.
struct CudaMoePhase {
  std::string name;
  double block0_us = -1;  // block 0's time
  double first_us = -1;   // earliest over the blocks that recorded it
  double last_us = -1;    // latest over them
  int blocks = 0;         // blocks that recorded it
};

struct CudaMoeOpProfile {
  uint64_t epoch = 0;  // 0: the op never ran with profiling on
  std::vector<CudaMoePhase> phases;
  // Absolute %globaltimer ns of this GPU: first block entry, last block
  // exit; span_us = (exit - entry) / 1000.
  uint64_t entry_ns = 0;
  uint64_t exit_ns = 0;
  double span_us = -1;
};

struct CudaMoeProfile {
  int rank = 0;
  CudaMoeOpProfile dispatch;
  CudaMoeOpProfile combine;
  // Compact table, one line per phase of each op.
  std::string format() const;
};

// Reduces the profile buffer of a workspace, [2 ops][blocks][kProfileSlots]
// uint64 as the kernels left it (dispatch first), to the phases of the
// latest dispatch and the latest combine.
CudaMoeProfile reduceProfile(const std::vector<uint64_t>& slots, int blocks,
                             int rank);

}  // namespace hostfuse
