// Communicator: this process's place among the ranks of a multi-process run,
// and the c10d backends that move tensors between them.
//
//   Communicator& comm = Communicator::getInstance();
//   c10d::Backend& backend = comm.backend(x.device().type());
//   ...
//   comm.shutdown();  // once, at the end of the program
//
// A communicator comes from one of two places:
//
// * The launcher's environment (getInstance(), or a CommunicatorConfig):
//     torchrun  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//               MASTER_PORT (and TORCHELASTIC_USE_AGENT_STORE: torchrun's
//               agent already serves the store at MASTER_ADDR:MASTER_PORT)
//     OpenMPI   OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
//               OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE; rank
//               0 serves the store at MASTER_ADDR (default 127.0.0.1) and
//               MASTER_PORT (default kDefaultMasterPort)
//     neither   a world of one rank, with an in-process store.
//   Ranks rendezvous through a c10d TCPStore. A backend per device type is
//   created on first use, by every rank at the same point of the program:
//   Gloo for CPU tensors, NCCL for CUDA tensors. On machines with a GPU per
//   local rank the constructor makes GPU `local rank` the current CUDA
//   device; with fewer GPUs the ranks compute on the CPU, unless
//   HOSTFUSE_SHARE_GPUS=1 (share_gpus) puts local rank i on GPU i mod the
//   GPU count: NCCL cannot run there, but the cuda MoE backend (symmetric
//   memory, its set-up over Gloo) can.
//
// * A c10d process group the program already has: one of torch.distributed's
//   (the default group, or a subgroup such as the expert-parallel group of a
//   2-D mesh), or one that newGroup() made. Rank and size are the group's,
//   the backends are the group's own (hostfuse creates none and shuts none
//   down), the store is the group's, and the device is the group's bound
//   device, else the current CUDA device, else the CPU.
//
// HOSTFUSE_COMM_TIMEOUT_S (default 60) bounds every collective of the
// backends hostfuse creates, so a rank whose peer died fails instead of
// waiting forever. A communicator from the launcher's environment ignores
// SIGPIPE (unless the program set a handler), so that a write to a dead
// peer's socket raises instead of ending the process.
//
// When a rank dies or stops (docs/moe.md, "When a rank fails"): the
// collective that fails on the survivors goes through failure(), which holds
// a roll call in the store and names the ranks that did not answer; the
// communicator is then failed for good. Each survivor calls recover() (or
// recoverInstance() for the process-wide one), which aborts the failed
// backends and returns a communicator over the ranks that answered,
// renumbered in their old order. The store must survive: under torchrun it
// lives in the launcher's agent; otherwise in rank 0, which must not be the
// rank that dies.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace hostfuse {

// Where a communicator's ranks come from: a launcher's environment (None: a
// world of one), or a process group given to the constructor.
enum class Launcher { None, Torchrun, OpenMpi, ProcessGroup };

const char* toString(Launcher launcher);

struct CommunicatorConfig {
  // c10d's default port; what an OpenMPI run uses without MASTER_PORT.
  static constexpr int kDefaultMasterPort = 29500;
  static constexpr int64_t kDefaultTimeoutSeconds = 60;

  Launcher launcher = Launcher::None;
  int64_t rank = 0;
  int64_t size = 1;
  int64_t local_rank = 0;
  int64_t local_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = kDefaultMasterPort;
  // True when the store already runs elsewhere (torchrun's agent), so rank 0
  // connects to it instead of serving it.
  bool store_is_external = false;
  // In [0.001, 86400] s like HOSTFUSE_COMM_TIMEOUT_S (the constructor
  // checks it).
  std::chrono::milliseconds timeout =
      std::chrono::seconds(kDefaultTimeoutSeconds);
  // HOSTFUSE_SHARE_GPUS: ranks may share a GPU (see the top of this file).
  bool share_gpus = false;

  // Reads the variables listed at the top of this file. A variable that is
  // set but malformed, or a launcher's set that is incomplete, is an error
  // naming the variable.
  static CommunicatorConfig fromEnvironment();
};

class Communicator {
 public:
  explicit Communicator(CommunicatorConfig config);
  // Over the ranks of `group` (not null), through its own backends and store.
  // From Python, a torch.distributed group converts to this type.
  explicit Communicator(c10::intrusive_ptr<c10d::ProcessGroup> group);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // The process-wide communicator, made from the environment on the first
  // call. It lives until the process exits; call shutdown() before that.
  static Communicator& getInstance();

  int64_t rank() const { return config_.rank; }
  int64_t size() const { return config_.size; }
  // This process's place among the ranks on its host, from the launcher's
  // environment; a process group's communicator does not know them and
  // says 0 and 1.
  int64_t localRank() const { return config_.local_rank; }
  int64_t localSize() const { return config_.local_size; }
  Launcher launcher() const { return config_.launcher; }
  const CommunicatorConfig& config() const { return config_; }

  // The device this rank computes on: GPU `local rank` on machines with a
  // GPU per local rank, else the CPU.
  at::Device device() const { return device_; }
  // Whether this host's ranks share GPUs (share_gpus and fewer GPUs than
  // local ranks): CUDA tensors then have no backend.
  bool sharesGpus() const { return shares_gpus_; }

  // A name every rank of this communicator agrees on, and that differs
  // between communicators that share a store: "world" for the launcher's,
  // the group's name for a process group's.
  const std::string& name() const { return name_; }

  // The backend that communicates tensors of `device_type` (Gloo for CPU,
  // NCCL for CUDA): for the launcher's communicator, created on first use,
  // and every rank must ask for it at the same point of the program
  // (creating it is a rendezvous); for a process group's, the group's.
  c10d::Backend& backend(c10::DeviceType device_type);

  // The key-value store all ranks rendezvous through (the cuda MoE backend
  // exchanges its memory handles over it). An error after shutdown(), or
  // when the process group given has none.
  c10::intrusive_ptr<c10d::Store> store() const;

  // "<kind>/<name()>/<n>", n counting this communicator's earlier calls with
  // `kind`: a tag that every rank computes alike when they create things in
  // the same order, and that no other communicator produces.
  std::string nextTag(const std::string& kind);
  // The n of the next nextTag(kind): 0, 1, 2, ... per kind.
  int64_t nextCount(const std::string& kind);

  // A process group over `ranks` (ranks of this communicator, distinct, in
  // the order that sets the new group's ranks), like torch.distributed's
  // new_group: Gloo for CPU tensors and, on machines with GPUs, NCCL for
  // CUDA tensors, bound to device(). Every rank in `ranks` must call it with
  // the same list at the same point of the program (creating it is a
  // rendezvous); ranks outside it need not call it. Pass the result to the
  // Communicator constructor to run MoE programs over the subgroup.
  c10::intrusive_ptr<c10d::ProcessGroup> newGroup(
      const std::vector<int64_t>& ranks);

  // Waits until every rank has arrived, on the backend of device() (Gloo
  // when ranks share GPUs).
  void barrier();

  // Waits for every rank, then releases the backends and the store (a
  // process group's backends are only let go of, not shut down: they are
  // the group owner's). Later calls of backend() fail. Calling it again does
  // nothing. After a failure it waits for nobody and never throws: it
  // aborts (see below).
  void shutdown();
  bool isShutDown() const { return shut_down_; }

  // ---- After a failure (docs/moe.md, "When a rank fails") ----

  // For a collective of this communicator that raised `error` (a peer
  // closed its connection or stayed silent past the timeout): marks the
  // communicator failed, holds the roll call (survivors()) and returns the
  // message to raise, `error` followed by the ranks that did not answer.
  // Takes rollCallWindow() more, plus the store's own timeout if the store
  // does not answer. Never throws.
  std::string failure(const std::string& error) noexcept;
  // Runs `collective` (a call on one of this communicator's backends and
  // its wait). If it throws, goes through failure() and raises `context`
  // followed by failure()'s message.
  void runOrFail(const std::function<void()>& collective,
                 const std::string& context);
  // Whether failure() or abort() ran: backend() then raises at once.
  bool hasFailed() const;

  // Drops the backends hostfuse created without a barrier and without
  // shutting them down (a process group's are only let go of), so that no
  // peer is waited on; their sockets close, and peers still blocked on this
  // rank fail at once. Keeps the store. Never throws; call it when no
  // collective of this communicator is in flight (one in flight on another
  // thread is waited for until its timeout).
  void abort() noexcept;

  // The ranks of this communicator that are alive after a failure, the
  // same list on every one of them: each rank that calls it writes its
  // name in the store and waits until every rank has, or rollCallWindow()
  // has passed; the first rank to finish writes the list it saw, and every
  // rank returns that list. Held once per communicator (failure() holds
  // it); a rank that answers after the list was written raises, as does a
  // store that cannot be reached.
  std::vector<int64_t> survivors();
  // How long the roll call waits for silent ranks: the timeout, at most 3 s.
  std::chrono::milliseconds rollCallWindow() const;

  // Aborts this communicator and returns one over survivors(), ranks
  // renumbered in their old order, on the same device and store, with a
  // fresh name (name() + "~1", "~2", ...) so no store key collides with the
  // failed one's. Every survivor calls it. Rank 0 of the new communicator
  // is the lowest surviving rank; nothing is shut down here.
  std::unique_ptr<Communicator> recover();
  // The same for the process-wide communicator: getInstance() returns the
  // new one from now on. The failed one is aborted and kept (never
  // destroyed), so references to it stay valid and raise when used.
  static Communicator& recoverInstance();

  // For a communicator made by recover(): formerRanks()[r] is the rank that
  // new rank r had in the failed communicator. Empty otherwise.
  const std::vector<int64_t>& formerRanks() const { return former_ranks_; }
  // The same across every recover() since the communicator that no
  // recover() made (the launcher's, or a process group's): originalRanks()[r]
  // is the rank that rank r had there, and originalSize() that one's size.
  // For a communicator no recover() made: 0 .. size() - 1, and size(). MoE
  // rank masking (docs/moe.md, "Rank masking") keeps that world's expert
  // placement.
  std::vector<int64_t> originalRanks() const;
  int64_t originalSize() const;

 private:
  // The survivors' communicator of recover().
  Communicator(Communicator& failed, std::vector<int64_t> members);
  // The prefix of this communicator's own store keys.
  std::string storePrefix() const;
  c10::intrusive_ptr<c10d::Store> createStore() const;
  // Whether Gloo backends hostfuse creates bind to 127.0.0.1.
  bool useLoopback() const;

  const CommunicatorConfig config_;
  // Set when the communicator is a process group's.
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::string name_ = "world";
  at::Device device_ = at::kCPU;
  bool shares_gpus_ = false;
  mutable std::mutex mutex_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::map<c10::DeviceType, c10::intrusive_ptr<c10d::Backend>> backends_;
  std::map<std::string, int64_t> tags_;
  // newGroup()'s calls per rank list, for distinct store prefixes.
  std::map<std::vector<int64_t>, int64_t> groups_made_;
  bool shut_down_ = false;
  // Set by recover(): which old ranks this one's ranks were.
  std::vector<int64_t> former_ranks_;
  // Set by recover(): originalRanks() and originalSize().
  std::vector<int64_t> original_ranks_;
  int64_t original_size_ = 0;
  // Counts recover() calls, for the survivors' names.
  int64_t recoveries_ = 0;
  // Whether the Gloo backends bind to 127.0.0.1 (all ranks on one host).
  bool loopback_ = false;
  // The first failure() or abort(), and the roll call's result.
  std::string failed_because_;
  std::optional<std::vector<int64_t>> survivors_;
};

}  // namespace hostfuse
