// Device helpers of the MoE kernels: cross-GPU flags, bounded waits,
// status records and warp-wide row copies. CUDA toolkit only; included by
// the .cu files of this folder.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <hostfuse/utils/round_up.h>
#include <hostfuse/multidevice/moe/cuda/kernels/dispatch_combine.cuh>

namespace hostfuse::moe::device {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCopyUnroll = 8;  // units in flight per lane in a row copy

// ---------------------------------------------------------------------------
// Memory-model helpers. Flags cross GPUs, so they use system scope: the
// writer's release store orders its earlier stores (and, after a warp or
// block barrier, those of the threads that fenced before it) before the
// flag; the reader's acquire load orders the flag before its later loads
// (an acquire load, unlike a fence, does not wait for the reader's own
// earlier stores).

__device__ __forceinline__ uint64_t loadAcquireSys(const uint64_t* address) {
  uint64_t value;
  asm volatile("ld.acquire.sys.u64 %0, [%1];"
               : "=l"(value)
               : "l"(address)
               : "memory");
  return value;
}

__device__ __forceinline__ void storeReleaseSys(uint64_t* address,
                                                uint64_t value) {
  asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(address), "l"(value)
               : "memory");
}

// Orders this thread's earlier memory operations before its later ones for
// observers anywhere (peers included); with a warp or block barrier after
// it, one thread's release store then publishes the stores of all of them.
__device__ __forceinline__ void fenceAcqRelSys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ uint64_t globalTimerNs() {
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  return now;
}

// Profiling (CudaMoeConfig::profile): `slots` is this block's row of the
// op's profile buffer, or null when profiling is off.
__device__ __forceinline__ uint64_t* profileSlots(uint64_t* profile) {
  return profile != nullptr
             ? profile + static_cast<size_t>(blockIdx.x) * kProfileSlots
             : nullptr;
}

// At kernel entry (thread 0): stamps the call's epoch and entry time and
// clears the block's other slots, so phases it does not reach read 0.
__device__ __forceinline__ void profileBegin(uint64_t* slots, uint64_t epoch,
                                             uint64_t entry_ns) {
  if (slots != nullptr && threadIdx.x == 0) {
    for (int i = 2; i < kProfileSlots; ++i) {
      slots[i] = 0;
    }
    slots[0] = epoch;
    slots[1] = entry_ns;
  }
}

// Thread 0 records the end of `phase` now. Callers place it after a block
// barrier where the phase is block-wide.
__device__ __forceinline__ void profileMark(uint64_t* slots, int phase) {
  if (slots != nullptr && threadIdx.x == 0) {
    slots[phase] = globalTimerNs();
  }
}

template <typename T>
__device__ __forceinline__ T loadVolatile(const T* address) {
  return *reinterpret_cast<const volatile T*>(address);
}

__device__ __forceinline__ uint64_t* flagAt(void* control, size_t offset,
                                            int index) {
  return reinterpret_cast<uint64_t*>(static_cast<char*>(control) + offset) +
         index;
}

// ---------------------------------------------------------------------------
// Status and waits.

struct WaitContext {
  DeviceState* state;
  StatusRecord* status;
  uint64_t timeout_ns;
  int op;
  uint64_t epoch;
  // Failure publication: this rank's own `failure` word (peers write it),
  // and the peers' control buffers to write theirs.
  const uint64_t* failure;
  void* const* control;
  size_t failure_offset;
  int rank;
  int world_size;
};

// Records the first error of a call (or of a series of replays): the
// winner of the claim fills the host-mapped record, the code last.
__device__ inline void recordStatus(const WaitContext& context, int32_t code,
                                    int rank, int purpose, int64_t token,
                                    int64_t pick, int64_t value,
                                    uint32_t bad_ranks = 0) {
  if (atomicCAS(&context.state->status_claim, 0, 1) != 0) {
    return;
  }
  volatile StatusRecord* status = context.status;
  status->op = context.op;
  status->rank = rank;
  status->purpose = purpose;
  status->token = token;
  status->pick = pick;
  status->value = value;
  status->epoch = context.epoch;
  status->bad_ranks = bad_ranks;
  __threadfence_system();
  status->code = code;
  __threadfence_system();
}

// A failure as published to the peers: bits 32-63 the failed rank + 1 (so
// the word is never 0), 16-31 the rank it waited for in vain + 1 (0: none),
// 8-15 what it waited for (a WaitPurpose), 0-7 the FailureReason.
__device__ __forceinline__ uint64_t failureWord(int rank, int32_t reason,
                                                int awaited, int purpose) {
  return (static_cast<uint64_t>(rank + 1) << 32) |
         (static_cast<uint64_t>(awaited + 1) << 16) |
         (static_cast<uint64_t>(purpose & 0xff) << 8) |
         static_cast<uint64_t>(reason & 0xff);
}

// One thread: poisons this rank's workspace and writes failureWord into
// every peer's `failure` word. The word is never cleared: a failure ends
// the workspace on every rank (they are recreated together).
__device__ inline void publishFailure(const WaitContext& context,
                                      int32_t reason, int awaited = -1,
                                      int purpose = 0) {
  atomicExch(&context.state->poisoned, 1);
  __threadfence_system();
  const uint64_t word = failureWord(context.rank, reason, awaited, purpose);
  for (int peer = 0; peer < context.world_size; ++peer) {
    if (peer != context.rank) {
      storeReleaseSys(flagAt(context.control[peer], context.failure_offset, 0),
                      word);
    }
  }
}

// One thread: if a peer has published a failure, records it (naming the
// peer), poisons this workspace and returns true.
__device__ inline bool peerFailed(const WaitContext& context, int purpose) {
  const uint64_t word = loadVolatile(context.failure);
  if (word == 0) {
    return false;
  }
  // token: the rank the failed peer waited for; pick: what it waited for.
  recordStatus(context, kStatusPeerFailed, static_cast<int>(word >> 32) - 1,
               purpose, static_cast<int64_t>((word >> 16) & 0xffff) - 1,
               static_cast<int64_t>((word >> 8) & 0xff),
               static_cast<int64_t>(word & 0xff));
  atomicExch(&context.state->poisoned, 1);
  return true;
}

// The start of every dispatch and combine call. The call's epoch is the
// op's last finished epoch + 1 (`last_epoch` is advanced by the call's last
// block to exit, so all blocks agree on it); profiling stamps the block's
// entry. `usable` is false once a timeout has poisoned the workspace: the
// block must return at once, and block 0 records "poisoned" for the host.
struct CallStart {
  WaitContext context;
  uint64_t* prof;  // this block's profile slots, or null
  bool usable;
};

// The waits' context of call `epoch` of `op` (0: outside a call).
__device__ inline WaitContext waitContextOf(const CommonParams& c, int op,
                                            uint64_t epoch) {
  return WaitContext{
      c.state,      c.status,
      c.timeout_ns, op,
      epoch,        flagAt(c.control[c.rank], c.layout.failure, 0),
      c.control,    c.layout.failure,
      c.rank,       c.world_size};
}

__device__ inline CallStart beginCall(const CommonParams& c,
                                      const uint64_t* last_epoch, int op,
                                      uint64_t entry_ns) {
  CallStart call;
  const uint64_t epoch = loadVolatile(last_epoch) + 1;
  call.context = waitContextOf(c, op, epoch);
  call.prof = profileSlots(c.profile);
  profileBegin(call.prof, epoch, entry_ns);
  // A peer's failure published since the last call ends this one at once;
  // blocks that read the word before it landed stop at their first wait.
  call.usable = loadVolatile(&c.state->poisoned) == 0 &&
                loadVolatile(call.context.failure) == 0;
  if (!call.usable && blockIdx.x == 0 && threadIdx.x == 0 &&
      !peerFailed(call.context, 0)) {
    recordStatus(call.context, kStatusPoisoned, -1, 0, -1, -1, 0);
  }
  return call;
}

// One thread waits until *flag >= target. On timeout it records which peer
// did not answer, poisons the workspace and publishes the failure to the
// peers, so that every other waiter, here and on every peer, and every
// later call, stops at once; a failure a peer published stops it too. False
// when the call must stop.
__device__ inline bool waitForFlag(const uint64_t* flag, uint64_t target,
                                   int peer, const WaitContext& context,
                                   int purpose) {
  if (loadAcquireSys(flag) >= target) {
    return true;
  }
  const uint64_t start = globalTimerNs();
  unsigned sleep_ns = 32;
  while (loadAcquireSys(flag) < target) {
    // Many warps may poll at once: leave L2 bandwidth to the copies, the
    // longer the wait the more.
    __nanosleep(sleep_ns);
    sleep_ns = sleep_ns < 256 ? 2 * sleep_ns : sleep_ns;
    if (loadVolatile(&context.state->poisoned) != 0 ||
        peerFailed(context, purpose)) {
      return false;
    }
    if (globalTimerNs() - start > context.timeout_ns) {
      recordStatus(context, kStatusTimeout, peer, purpose, -1, -1,
                   static_cast<int64_t>(target));
      publishFailure(context, kFailedTimeout, peer, purpose);
      return false;
    }
  }
  return true;
}

// Block-wide: thread s < world_size waits for flags[s] (written by peer s).
// Returns the same answer in every thread.
__device__ inline bool blockWaitForPeers(const uint64_t* flags, int world_size,
                                         uint64_t target,
                                         const WaitContext& context,
                                         int purpose) {
  bool ok = true;
  if (threadIdx.x < world_size) {
    ok =
        waitForFlag(flags + threadIdx.x, target, threadIdx.x, context, purpose);
  }
  return __syncthreads_and(ok) != 0;
}

// Warp-wide: lane 0 waits for `flag` (written by `peer`); the warp barrier
// then orders the other lanes' loads after lane 0's acquire.
__device__ inline bool warpWaitForPeer(const uint64_t* flag, uint64_t target,
                                       int peer, const WaitContext& context,
                                       int purpose) {
  int ok = 1;
  if ((threadIdx.x & 31) == 0) {
    ok = waitForFlag(flag, target, peer, context, purpose) ? 1 : 0;
  }
  ok = __shfl_sync(kFullMask, ok, 0);
  __syncwarp();
  return ok != 0;
}

// Block-wide, at the end of a kernel: counts the block in `counter`, which
// only grows, by `participants` per call. True in every thread of the
// block that arrived last in this call; by then the memory operations of
// every participating block are visible to it at GPU scope (the block
// barrier, then one thread's fence before its arrival; signals to peers add
// their own system-scope fence).
__device__ inline bool arriveLast(uint64_t* counter, int participants) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long before =
        atomicAdd(reinterpret_cast<unsigned long long*>(counter), 1ULL);
    last = (before + 1) % static_cast<unsigned long long>(participants) == 0;
    __threadfence();
  }
  __syncthreads();
  return last != 0;
}

// Grid barrier, in two halves so that work can go between them. The
// counter only grows, by `participants` (the grid, the same on every call
// of a workspace) per call, so all blocks of this call have arrived once it
// reaches the next multiple of `participants` after this block's arrival:
// nothing to reset between calls or graph replays. gridArrive (block-wide,
// after this block's stores) returns that target in every thread;
// gridWait (block-wide) waits for it, bounded like the peer waits, and
// returns the same answer in every thread. Stores that other blocks made
// before arriving are then visible (read them with __ldcg).
__device__ inline uint64_t gridArrive(uint64_t* counter, int participants) {
  __shared__ unsigned long long target;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long before =
        atomicAdd(reinterpret_cast<unsigned long long*>(counter), 1ULL);
    const auto n = static_cast<unsigned long long>(participants);
    target = (before / n + 1) * n;
  }
  __syncthreads();
  const uint64_t result = target;
  __syncthreads();  // `target` may be reused by the next arrival
  return result;
}

__device__ inline bool gridWait(const uint64_t* counter, uint64_t target,
                                int rank, const WaitContext& context) {
  bool ok = true;
  if (threadIdx.x == 0) {
    ok = waitForFlag(counter, target, rank, context, kWaitGrid);
  }
  return __syncthreads_and(ok) != 0;
}

// One thread raises flag `offset`[rank] to `epoch` in `peer`'s control
// buffer.
__device__ inline void signalPeer(void* const* control, size_t offset, int rank,
                                  int peer, uint64_t epoch) {
  __threadfence_system();
  storeReleaseSys(flagAt(control[peer], offset, rank), epoch);
}

// Block-wide: raises flag `offset`[rank] on every peer.
__device__ inline void signalAllPeers(void* const* control, size_t offset,
                                      int rank, int world_size,
                                      uint64_t epoch) {
  if (threadIdx.x < world_size) {
    signalPeer(control, offset, rank, threadIdx.x, epoch);
  }
}

// ---------------------------------------------------------------------------
// Push groups: blocks [0, push_blocks) serve one peer each, push_blocks /
// (R - 1) blocks per peer; block b serves peer rank + 1 + b % (R - 1), so
// that the groups interleave over the GPU. A group's warps share the peer's
// tokens: warp i of the group takes tokens i, i + warps, ..., and
// consecutive warps are on different blocks (SMs), so that few tokens
// still spread over the whole group.
struct PushGroup {
  int peer;
  int64_t first_warp;
  int64_t warps;

  __device__ explicit PushGroup(const CommonParams& c) {
    const int groups = c.world_size - 1;
    const int b = static_cast<int>(blockIdx.x);
    const int blocks = c.push_blocks / groups;
    peer = (c.rank + 1 + b % groups) % c.world_size;
    first_warp = static_cast<int64_t>(threadIdx.x >> 5) * blocks + b / groups;
    warps = static_cast<int64_t>(blocks) * kWarpsPerBlock;
  }
};

// ---------------------------------------------------------------------------
// Row copies: a warp moves units [begin, end) of U (16, 8, 4 or 2 bytes)
// from `source` to each of `count` destinations, loading each unit once.
// kBypassL1 reads data that peers or other blocks wrote during this kernel.

template <typename U, bool kBypassL1>
__device__ __forceinline__ U loadUnit(const U* address) {
  if constexpr (kBypassL1) {
    return __ldcg(address);
  } else {
    return *address;
  }
}

template <typename U, bool kBypassL1>
__device__ __forceinline__ void copyUnits(char* const* destinations, int count,
                                          const U* source, int64_t begin,
                                          int64_t end, int lane) {
  for (int64_t base = begin + lane; base < end; base += 32 * kCopyUnroll) {
    U values[kCopyUnroll];
#pragma unroll
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t unit = base + 32 * i;
      if (unit < end) {
        values[i] = loadUnit<U, kBypassL1>(source + unit);
      }
    }
    for (int j = 0; j < count; ++j) {
      U* destination = reinterpret_cast<U*>(destinations[j]);
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t unit = base + 32 * i;
        if (unit < end) {
          destination[unit] = values[i];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// Blocks of `kernel` that fit on one SM (after allowing its shared memory).
template <typename Kernel>
cudaError_t occupancy(Kernel kernel, size_t shared_bytes, int* blocks) {
  if (shared_bytes > 48 * 1024) {
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(shared_bytes));
    if (status != cudaSuccess) {
      return status;
    }
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, kernel, kThreadsPerBlock, shared_bytes);
}

// Launches `kernel(params)` on `stream`; cooperative launches guarantee
// that all blocks are resident at once (they wait for each other).
template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, const Params& params, int blocks,
                   size_t shared_bytes, bool cooperative, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreadsPerBlock);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params);
}

}  // namespace hostfuse::moe::device

namespace hostfuse::moe {

// Smallest number of blocks per SM over the instantiations of each kernel
// (dispatch.cu, combine.cu).
cudaError_t dispatchOccupancy(size_t shared_bytes, int* per_sm);
cudaError_t combineOccupancy(ElementType dtype, int* per_sm);

}  // namespace hostfuse::moe
