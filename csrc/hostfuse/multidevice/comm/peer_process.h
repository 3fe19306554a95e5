// Taking a file descriptor from a peer process, for the symmetric-memory
// handle exchange (symmetric_memory.cpp), with the checks that make a record
// read from the store safe to act on.
//
// A peer publishes (pid, start time, fd) in the c10d store. The store is not
// authenticated (torchrun serves it on every interface), so a record may be
// forged; and the rank that reads it may run as root, for whom
// pidfd_getfd(2) can take a descriptor from any process on the host. Before
// a descriptor is taken, the named process must be
//   - another process than ours, alive, started at the published time (a
//     pid that was recycled, or a record that names some other process
//     with a guessed start time, is refused),
//   - of our user (real and effective uid), and
//   - a sibling of ours: a child of the same launcher process (torchrun's
//     agent, mpirun's daemon, srun's step daemon), which no process outside
//     the job can become;
// and these facts are read through a pidfd opened first and checked to be
// alive after the reads, so the pid cannot change hands between the check
// and the take. After the take, the descriptor must be of the kind that we
// export ourselves (same file type on the same filesystem, same device for
// a device file), or it is closed unused. docs/moe_cuda.md, "Threat model",
// says what this buys.
#pragma once

#include <cstdint>
#include <optional>

namespace hostfuse {

// What /proc says about a live process.
struct ProcessIdentity {
  int pid = 0;
  int parent = 0;
  // Clock ticks after boot (field 22 of /proc/<pid>/stat): with the pid,
  // it names one process for the life of the host.
  uint64_t start_time = 0;
  uint32_t real_uid = 0;
  uint32_t effective_uid = 0;
};

// std::nullopt when there is no process `pid` (or /proc cannot say).
std::optional<ProcessIdentity> readProcessIdentity(int pid);
ProcessIdentity ownProcessIdentity();

// A file's type (S_IFMT bits), the filesystem holding it (st_dev) and, for
// a device file, the device it opens (st_rdev; 0 otherwise). A CUDA VMM
// handle exported as a POSIX fd is an open of /dev/nvidiactl (seen with
// CUDA 13 on H200: character device 195:255 on devtmpfs), the same for every
// GPU of the host, so every rank's export has the same kind.
struct DescriptorKind {
  uint32_t type = 0;
  uint64_t filesystem = 0;
  uint64_t device = 0;
  bool operator==(const DescriptorKind& other) const {
    return type == other.type && filesystem == other.filesystem &&
           device == other.device;
  }
};

// Throws hostfuse::Error when `fd` is not an open descriptor.
DescriptorKind descriptorKind(int fd);

// What a peer rank publishes about the descriptor it lets its peers take.
struct PeerDescriptor {
  int pid = 0;
  uint64_t start_time = 0;
  int fd = -1;
};

// Takes `claim.fd` from process `claim.pid` (pidfd_open + pidfd_getfd) after
// checking the claim against `self` (the identity of the rank taking it:
// ownProcessIdentity() outside tests) as the header comment says, and
// returns the new descriptor, which the caller closes. Throws
// hostfuse::Error naming rank `peer` and the check that failed; nothing is
// left open then.
int takePeerDescriptor(const PeerDescriptor& claim, const ProcessIdentity& self,
                       const DescriptorKind& expected_kind, int peer);

}  // namespace hostfuse
