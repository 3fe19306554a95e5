// The checks on a peer's handle record before its descriptor is taken
// (peer_process.h): forged, stale and foreign records are refused, on CPU,
// as root (CI) or not. The "peer ranks" are processes forked here: two
// children of this test are siblings, as two ranks under one launcher are;
// one plays the rank that takes (its identity is `self`), the other the
// peer, and this process does the taking (it may, being their parent).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <optional>
#include <string>

#include <hostfuse/multidevice/comm/peer_process.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::expectErrorContains;

// A forked child that waits until it is killed; `setup` runs in it first.
class Child {
 public:
  template <typename Setup>
  explicit Child(Setup setup) {
    int ready[2];
    EXPECT_EQ(pipe(ready), 0);
    pid_ = fork();
    if (pid_ == 0) {
      close(ready[0]);
      setup();
      const char byte = 1;
      if (write(ready[1], &byte, 1) != 1) {
        _exit(1);
      }
      while (true) {
        pause();
      }
    }
    close(ready[1]);
    char byte = 0;
    EXPECT_EQ(read(ready[0], &byte, 1), 1) << "the child did not start";
    close(ready[0]);
  }
  Child() : Child([] {}) {}
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  int pid() const { return pid_; }
  ProcessIdentity identity() const {
    const std::optional<ProcessIdentity> identity = readProcessIdentity(pid_);
    EXPECT_TRUE(identity.has_value());
    return identity.value_or(ProcessIdentity{});
  }

 private:
  int pid_ = -1;
};

class PeerProcess : public testing::Test {
 protected:
  void SetUp() override {
    // Opened before the children are forked, so they hold the same
    // descriptors at the same numbers. The memfd stands for the exported
    // handle (the expected kind); the pipe is a descriptor of another kind,
    // /dev/null a device file.
    handle_fd_ = memfd_create("hostfuse-test-handle", 0);
    ASSERT_GE(handle_fd_, 3);
    ASSERT_EQ(pipe(pipe_fds_), 0);
    null_fd_ = open("/dev/null", O_RDONLY);
    ASSERT_GE(null_fd_, 3);
    expected_kind_ = descriptorKind(handle_fd_);
    self_ = std::make_unique<Child>();
    peer_ = std::make_unique<Child>();
  }
  void TearDown() override {
    peer_.reset();
    self_.reset();
    close(handle_fd_);
    close(null_fd_);
    close(pipe_fds_[0]);
    close(pipe_fds_[1]);
  }

  // Takes the descriptor as the rank `self_` would, and closes it.
  void take(const PeerDescriptor& claim) { take(claim, expected_kind_); }
  void take(const PeerDescriptor& claim, const DescriptorKind& expected) {
    const int fd =
        takePeerDescriptor(claim, self_->identity(), expected, /*peer=*/1);
    EXPECT_EQ(descriptorKind(fd), expected);
    close(fd);
  }
  PeerDescriptor peerHandle() const {
    return {peer_->pid(), peer_->identity().start_time, handle_fd_};
  }

  int handle_fd_ = -1;
  int null_fd_ = -1;
  int pipe_fds_[2] = {-1, -1};
  DescriptorKind expected_kind_;
  std::unique_ptr<Child> self_;
  std::unique_ptr<Child> peer_;
};

TEST_F(PeerProcess, ReadsItsOwnIdentity) {
  const ProcessIdentity own = ownProcessIdentity();
  EXPECT_EQ(own.pid, getpid());
  EXPECT_EQ(own.parent, getppid());
  EXPECT_EQ(own.real_uid, getuid());
  EXPECT_EQ(own.effective_uid, geteuid());
  EXPECT_GT(own.start_time, 0u);
  EXPECT_EQ(self_->identity().parent, getpid());
  EXPECT_GE(self_->identity().start_time, own.start_time);
}

TEST_F(PeerProcess, TakesASiblingsHandle) { take(peerHandle()); }

TEST_F(PeerProcess, RefusesARecordNamingTheTakingRank) {
  const PeerDescriptor own = {self_->pid(), self_->identity().start_time,
                              handle_fd_};
  expectErrorContains([&] { take(own); }, {"rank 1", "names this process"});
}

TEST_F(PeerProcess, RefusesAStartTimeThatDoesNotMatch) {
  // A recycled pid, or a record naming a process with a guessed start time.
  PeerDescriptor claim = peerHandle();
  claim.start_time += 1;
  expectErrorContains([&] { take(claim); },
                      {"not at the published tick", "forged"});
}

TEST_F(PeerProcess, RefusesAPidWithNoProcess) {
  int pid = fork();
  if (pid == 0) {
    _exit(0);
  }
  ASSERT_EQ(waitpid(pid, nullptr, 0), pid);
  const PeerDescriptor gone = {pid, 1, handle_fd_};
  expectErrorContains([&] { take(gone); }, {"there is no process"});
}

TEST_F(PeerProcess, RefusesAProcessOutsideTheJob) {
  // init: alive, its start time is public, and as root (CI) pidfd_getfd
  // could take any of its descriptors.
  const std::optional<ProcessIdentity> init = readProcessIdentity(1);
  ASSERT_TRUE(init.has_value());
  const PeerDescriptor claim = {1, init->start_time, 3};
  if (init->real_uid == self_->identity().real_uid) {
    expectErrorContains([&] { take(claim); }, {"children of one launcher"});
  } else {
    expectErrorContains([&] { take(claim); }, {"runs as uid"});
  }
}

TEST_F(PeerProcess, RefusesASiblingOfAnotherUser) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root, to fork a process of another user";
  }
  // The sibling a root rank could otherwise take from: another user's.
  const Child other([] {
    if (setgid(65534) != 0 || setuid(65534) != 0) {
      _exit(1);
    }
  });
  const PeerDescriptor claim = {other.pid(), other.identity().start_time,
                                handle_fd_};
  expectErrorContains([&] { take(claim); }, {"runs as uid 65534", "same user"});
}

TEST_F(PeerProcess, RefusesADescriptorOfAnotherKind) {
  PeerDescriptor claim = peerHandle();
  claim.fd = pipe_fds_[0];
  expectErrorContains([&] { take(claim); },
                      {"is a pipe", "not the kind this rank exports"});
}

TEST_F(PeerProcess, RefusesADescriptorOfAnotherDevice) {
  // As if this rank exported /dev/zero: the peer's /dev/null is a character
  // device on the same filesystem, but another device.
  const int zero = open("/dev/zero", O_RDONLY);
  ASSERT_GE(zero, 0);
  const DescriptorKind zero_kind = descriptorKind(zero);
  close(zero);
  PeerDescriptor claim = peerHandle();
  claim.fd = null_fd_;
  take(claim, descriptorKind(null_fd_));
  expectErrorContains([&] { take(claim, zero_kind); },
                      {"is a character device", "not the kind"});
}

TEST_F(PeerProcess, RefusesAStandardStreamOrNegativeDescriptor) {
  for (int fd : {-1, 0, 2}) {
    PeerDescriptor claim = peerHandle();
    claim.fd = fd;
    expectErrorContains([&] { take(claim); }, {"names no exported"});
  }
}

}  // namespace
}  // namespace hostfuse
