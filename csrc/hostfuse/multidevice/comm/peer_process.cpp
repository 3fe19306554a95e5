#include <hostfuse/multidevice/comm/peer_process.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include <hostfuse/utils/exceptions.h>

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

namespace hostfuse {

namespace {

// Closes a descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() {
    if (fd_ >= 0) {
      close(fd_);
    }
  }
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// The fields of /proc/<pid>/stat after the command name, which may itself
// hold spaces and parentheses: they start after its last ')'. Entry 0 is
// field 3 (the state).
bool readStatFields(int pid, std::string* after_name) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) {
    return false;
  }
  const size_t end_of_name = line.rfind(')');
  if (end_of_name == std::string::npos) {
    return false;
  }
  *after_name = line.substr(end_of_name + 1);
  return true;
}

// The "Uid:" line of /proc/<pid>/status: real, effective, saved, fs.
bool readUids(int pid, uint32_t* real_uid, uint32_t* effective_uid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Uid:", 0) == 0) {
      std::istringstream fields(line.substr(4));
      return static_cast<bool>(fields >> *real_uid >> *effective_uid);
    }
  }
  return false;
}

// Signal 0 only checks: ESRCH once the process has exited (EPERM, for a
// process we may not signal, still means alive).
bool pidfdIsAlive(int pidfd) {
  return syscall(SYS_pidfd_send_signal, pidfd, 0, nullptr, 0) == 0 ||
         errno != ESRCH;
}

const char* kindName(uint32_t type) {
  switch (type) {
    case S_IFREG:
      return "regular file";
    case S_IFDIR:
      return "directory";
    case S_IFCHR:
      return "character device";
    case S_IFBLK:
      return "block device";
    case S_IFIFO:
      return "pipe";
    case S_IFSOCK:
      return "socket";
    case S_IFLNK:
      return "link";
    default:
      return "anonymous or unknown file";
  }
}

}  // namespace

std::optional<ProcessIdentity> readProcessIdentity(int pid) {
  if (pid <= 0) {
    return std::nullopt;
  }
  std::string fields_text;
  if (!readStatFields(pid, &fields_text)) {
    return std::nullopt;
  }
  std::istringstream fields(fields_text);
  // Fields 3 (state) to 22 (start time); 4 is the parent.
  std::string field;
  ProcessIdentity identity;
  identity.pid = pid;
  for (int number = 3; number <= 22; ++number) {
    if (!(fields >> field)) {
      return std::nullopt;
    }
    if (number == 4) {
      identity.parent = std::stoi(field);
    } else if (number == 22) {
      identity.start_time = std::stoull(field);
    }
  }
  if (!readUids(pid, &identity.real_uid, &identity.effective_uid)) {
    return std::nullopt;
  }
  return identity;
}

ProcessIdentity ownProcessIdentity() {
  const std::optional<ProcessIdentity> identity =
      readProcessIdentity(static_cast<int>(getpid()));
  HF_CHECK(identity.has_value(),
           "cannot read this process's /proc entry (is /proc mounted?)");
  return *identity;
}

DescriptorKind descriptorKind(int fd) {
  struct stat info = {};
  HF_CHECK(fstat(fd, &info) == 0, "fstat of descriptor ", fd,
           " failed: ", std::strerror(errno));
  DescriptorKind kind;
  kind.type = static_cast<uint32_t>(info.st_mode & S_IFMT);
  kind.filesystem = static_cast<uint64_t>(info.st_dev);
  if (S_ISCHR(info.st_mode) || S_ISBLK(info.st_mode)) {
    kind.device = static_cast<uint64_t>(info.st_rdev);
  }
  return kind;
}

int takePeerDescriptor(const PeerDescriptor& claim, const ProcessIdentity& self,
                       const DescriptorKind& expected_kind, int peer) {
  const std::string what = toString(
      "symmetric memory: the handle record of "
      "rank ",
      peer, " (pid ", claim.pid, ", fd ", claim.fd, ")");
  // 0, 1 and 2 are a process's standard streams, never an exported handle.
  HF_CHECK(claim.fd > 2, what, " names no exported descriptor");
  HF_CHECK(claim.pid > 0 && claim.pid != self.pid, what,
           " names no peer process",
           claim.pid == self.pid ? " (it names this process)" : "");

  const ScopedFd pidfd(static_cast<int>(syscall(SYS_pidfd_open, claim.pid, 0)));
  HF_CHECK(pidfd.get() >= 0, what, ": there is no process ", claim.pid,
           " on this host (pidfd_open: ", std::strerror(errno),
           "; needs Linux >= 5.6)");
  const std::optional<ProcessIdentity> named = readProcessIdentity(claim.pid);
  // Alive after the reads: what /proc said is about the process the pidfd
  // holds, not about a later owner of its pid.
  HF_CHECK(named.has_value() && pidfdIsAlive(pidfd.get()), what, ": process ",
           claim.pid, " exited");
  HF_CHECK(named->start_time == claim.start_time, what, ": process ", claim.pid,
           " started at tick ", named->start_time,
           ", not at the published tick ", claim.start_time,
           " (a recycled pid or a forged record)");
  HF_CHECK(named->real_uid == self.real_uid &&
               named->effective_uid == self.effective_uid,
           what, ": process ", claim.pid, " runs as uid ", named->real_uid, "/",
           named->effective_uid, ", this rank as ", self.real_uid, "/",
           self.effective_uid, "; every rank must run as the same user");
  HF_CHECK(named->parent == self.parent, what, ": process ", claim.pid,
           " is a child of process ", named->parent, ", this rank of ",
           self.parent,
           "; the ranks of a node must be children of one launcher "
           "(torchrun, mpirun, srun: wrap the launcher in a tool such as "
           "nsys, not each rank)");

  ScopedFd taken(
      static_cast<int>(syscall(SYS_pidfd_getfd, pidfd.get(), claim.fd, 0)));
  HF_CHECK(taken.get() >= 0, what,
           ": pidfd_getfd failed: ", std::strerror(errno),
           ". Taking a descriptor from another process needs ptrace "
           "permission over it: run as root or with CAP_SYS_PTRACE, or as the "
           "same user with kernel.yama.ptrace_scope = 0");
  const DescriptorKind kind = descriptorKind(taken.get());
  HF_CHECK(kind == expected_kind, what, ": the descriptor is a ",
           kindName(kind.type), " (filesystem ", kind.filesystem, ", device ",
           kind.device, "), not the kind this rank exports (",
           kindName(expected_kind.type), ", filesystem ",
           expected_kind.filesystem, ", device ", expected_kind.device, ")");
  return taken.release();
}

}  // namespace hostfuse
