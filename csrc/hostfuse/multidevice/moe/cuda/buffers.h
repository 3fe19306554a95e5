// The device memory of one cuda-backend MoE workspace: the symmetric
// buffers that peers write into (control, receive rows, combine slots), the
// fill patterns that guard them, this rank's scratch arrays, the
// host-mapped status record and the optional profile slots.
// docs/moe_cuda.md, "Buffers", describes what each holds.
#pragma once

#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <memory>
#include <string>

#include <hostfuse/multidevice/moe/cuda/config.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse {

class SymmetricMemory;

struct CudaMoeBuffers {
  // Collective over the config's ranks: allocates and maps the symmetric
  // buffers through `store`, then this rank's own memory, all zeroed, with
  // the guard patterns in place.
  static std::unique_ptr<CudaMoeBuffers> allocate(
      const c10::intrusive_ptr<c10d::Store>& store, const CudaMoeConfig& config,
      const CudaMoeLaunch& launch);
  // Waits for the device, then releases what this rank holds.
  ~CudaMoeBuffers();

  // Bytes of the guard regions behind the receive rows, the metadata and
  // the slots that lost their fill pattern (0 when nothing was written out
  // of bounds). Synchronizes.
  int64_t damagedGuardBytes() const;

  std::shared_ptr<SymmetricMemory> control;
  std::shared_ptr<SymmetricMemory> recv;
  std::shared_ptr<SymmetricMemory> slots;
  // Staged push only (else null): [2][R][T_max] rows of the dispatch's row
  // size, guard, their descriptions (moe::stageMetaBytes(stage_picks)
  // each), guard.
  std::shared_ptr<SymmetricMemory> stage;
  moe::ControlLayout layout = {};
  // recv: [C rows][guard][C metadata][guard]; slots: [T_max K rows][guard].
  size_t meta_offset = 0;
  size_t guard_bytes = 0;
  size_t slots_guard_offset = 0;
  size_t stage_meta_offset = 0;
  int stage_picks = 0;    // min(K, L)
  void* local = nullptr;  // DeviceState, then the scratch arrays
  moe::DeviceState* state = nullptr;
  int32_t* pick_pos = nullptr;
  int32_t* slot_pos = nullptr;
  int32_t* block_counts = nullptr;
  unsigned long long* block_errors = nullptr;
  int32_t* segment_claims = nullptr;
  int32_t* pick_row = nullptr;
  int32_t* pick_rank = nullptr;
  int64_t* recv_start = nullptr;
  int32_t* recv_count = nullptr;
  int64_t* source_tokens = nullptr;
  moe::RouteEntry* routes = nullptr;
  moe::StatusRecord* status_host = nullptr;
  moe::StatusRecord* status_device = nullptr;
  // Profiling only: [2 ops][blocks][kProfileSlots] uint64 (dispatch first).
  uint64_t* profile = nullptr;
  cudaEvent_t done = nullptr;
  int device = 0;

 private:
  CudaMoeBuffers() = default;
  void allocateSymmetric(const c10::intrusive_ptr<c10d::Store>& store,
                         const CudaMoeConfig& config,
                         const CudaMoeLaunch& launch);
  void allocateLocal(const CudaMoeConfig& config, const CudaMoeLaunch& launch);
};

}  // namespace hostfuse
