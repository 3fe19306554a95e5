// Symmetric memory: one buffer of the same size on every rank of a node,
// mapped into every rank's address space, so that a kernel on one GPU can
// load from and store to its peers' buffers over NVLink.
//
// How it is built (collective over the node's ranks, once):
//   1. each rank allocates its buffer with the CUDA virtual memory API
//      (cuMemCreate, exportable as a POSIX file descriptor) and publishes
//      (pid, start time, fd, host) in the c10d store under `tag`;
//   2. each rank checks every peer's record and duplicates the peer's
//      descriptor into itself with pidfd_open + pidfd_getfd
//      (peer_process.h: the named process must be a sibling rank of the
//      same user, and the descriptor of the kind we export; Linux >= 5.6;
//      needs ptrace-level permission over the peer process: same user with
//      kernel.yama.ptrace_scope = 0, or root / CAP_SYS_PTRACE, as on the GPU
//      machines), imports it, reserves an address range, maps it and grants
//      the local GPU access;
//   3. a store barrier, after which the exported descriptors are closed.
// Buffers start zeroed.
//
// Release is local: each rank unmaps its mappings and releases its handles.
// The physical memory of a buffer lives until the last rank that maps it has
// unmapped it, so a peer that is still running can never write into memory
// that was handed back; no barrier is needed (a barrier at exit would hang
// whenever ranks tear down in different orders or one rank already died).
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace hostfuse {

class SymmetricMemory {
 public:
  // Collective: every rank of the node calls it with the same `bytes` and
  // `tag` (e.g. "moe/<node id>/<buffer>"). A tag may be reused after the
  // buffer that used it is gone: each use gets its own store keys.
  static std::shared_ptr<SymmetricMemory> allocate(
      c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
      int device, size_t bytes, const std::string& tag);

  SymmetricMemory(const SymmetricMemory&) = delete;
  SymmetricMemory& operator=(const SymmetricMemory&) = delete;
  ~SymmetricMemory();

  int rank() const { return rank_; }
  int worldSize() const { return world_size_; }
  int device() const { return device_; }
  // The size that was asked for; the mapping may be larger (granularity).
  size_t size() const { return bytes_; }
  const std::string& tag() const { return tag_; }

  // This rank's buffer, as mapped here.
  void* localPtr() const { return peer_ptrs_[rank_]; }
  // Rank `rank`'s buffer, as mapped here (valid in kernels on `device()`).
  void* peerPtr(int rank) const;
  // Device array of worldSize() pointers: entry r is peerPtr(r).
  void* const* devicePeerPtrs() const { return device_peer_ptrs_; }

 private:
  SymmetricMemory(int rank, int world_size, int device, size_t bytes,
                  std::string tag);
  void release() noexcept;

  int rank_;
  int world_size_;
  int device_;
  size_t bytes_;
  size_t mapped_bytes_ = 0;
  std::string tag_;
  // Handles and mappings, one per rank (ours at index rank_); 0 = none.
  std::vector<unsigned long long> handles_;
  std::vector<void*> peer_ptrs_;
  void** device_peer_ptrs_ = nullptr;
};

// Store barrier over `world_size` ranks under `key`; throws hostfuse::Error
// naming the key when the store times out.
void storeBarrier(c10d::Store& store, const std::string& key, int world_size);

// "<tag>#<n>", where n counts this process's earlier calls with `tag`: ranks
// that make the same calls in the same order agree on it without talking,
// and stale keys of an earlier use of the tag are never read.
std::string uniqueStorePrefix(const std::string& tag);

}  // namespace hostfuse
