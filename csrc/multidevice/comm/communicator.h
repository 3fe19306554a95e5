// Communicator: this process's place among the ranks of a multi-process run,
// and the c10d backends that move tensors between them.
//
//   Communicator& comm = Communicator::getInstance();
//   c10d::Backend& backend = comm.backend(x.device().type());
//   ...
//   comm.shutdown();  // once, at the end of the program
//
// The world comes from the launcher's environment:
//   torchrun  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//             MASTER_PORT (and TORCHELASTIC_USE_AGENT_STORE: torchrun's agent
//             already serves the store at MASTER_ADDR:MASTER_PORT)
//   OpenMPI   OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
//             OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE; rank 0
//             serves the store at MASTER_ADDR (default 127.0.0.1) and
//             MASTER_PORT (default kDefaultMasterPort)
//   neither   a world of one rank, with an in-process store.
// HOSTFUSE_COMM_TIMEOUT_S (default 300) bounds every collective, so a rank
// whose peer died fails instead of waiting forever.
//
// Ranks rendezvous through a c10d TCPStore. A backend per device type is
// created on first use, by every rank at the same point of the program:
// Gloo for CPU tensors, NCCL for CUDA tensors. On machines with GPUs the
// constructor makes GPU `local rank` the current CUDA device.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace hostfuse {

enum class Launcher { None, Torchrun, OpenMpi };

const char* toString(Launcher launcher);

struct CommunicatorConfig {
  // c10d's default port; what an OpenMPI run uses without MASTER_PORT.
  static constexpr int kDefaultMasterPort = 29500;
  static constexpr int64_t kDefaultTimeoutSeconds = 300;

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
  std::chrono::milliseconds timeout =
      std::chrono::seconds(kDefaultTimeoutSeconds);

  // Reads the variables listed at the top of this file. A variable that is
  // set but malformed, or a launcher's set that is incomplete, is an error
  // naming the variable.
  static CommunicatorConfig fromEnvironment();
};

class Communicator {
 public:
  explicit Communicator(CommunicatorConfig config);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // The process-wide communicator, made from the environment on the first
  // call. It lives until the process exits; call shutdown() before that.
  static Communicator& getInstance();

  int64_t rank() const { return config_.rank; }
  int64_t size() const { return config_.size; }
  int64_t localRank() const { return config_.local_rank; }
  int64_t localSize() const { return config_.local_size; }
  Launcher launcher() const { return config_.launcher; }
  const CommunicatorConfig& config() const { return config_; }

  // The device this rank computes on: GPU `local rank` on machines with
  // GPUs, else the CPU.
  at::Device device() const { return device_; }

  // The backend that communicates tensors of `device_type` (Gloo for CPU,
  // NCCL for CUDA), created on first use. Every rank must ask for it at
  // the same point of the program: creating it is a rendezvous.
  c10d::Backend& backend(c10::DeviceType device_type);

  // The key-value store all ranks rendezvous through (the cuda MoE backend
  // exchanges its memory handles over it). An error after shutdown().
  c10::intrusive_ptr<c10d::Store> store() const;

  // Waits until every rank has arrived, on the backend of device().
  void barrier();

  // Waits for every rank, then releases the backends and the store. Later
  // calls of backend() fail. Calling it again does nothing.
  void shutdown();
  bool isShutDown() const { return shut_down_; }

 private:
  c10::intrusive_ptr<c10d::Store> createStore() const;

  const CommunicatorConfig config_;
  at::Device device_ = at::kCPU;
  std::mutex mutex_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::map<c10::DeviceType, c10::intrusive_ptr<c10d::Backend>> backends_;
  bool shut_down_ = false;
};

}  // namespace hostfuse
