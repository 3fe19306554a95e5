#include "multidevice/comm/communicator.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>
#include <optional>

#include "multidevice/comm/c10d_backends.h"
#include "utils/cuda_utils.h"
#include "utils/exceptions.h"
#include "utils/options.h"
#include "utils/torch_cuda.h"

namespace hostfuse {

namespace {

std::optional<std::string> getEnv(const char* name) {
  return options::environment(name);
}

// The integer value of `name`, nullopt when unset. A value that is not an
// integer is an error naming the variable.
std::optional<int64_t> getEnvInt(const char* name) {
  const std::optional<std::string> text = getEnv(name);
  if (!text.has_value()) {
    return std::nullopt;
  }
  return options::parseInteger(name, *text);
}

int64_t requireEnvInt(const char* name, const char* because) {
  const std::optional<int64_t> value = getEnvInt(name);
  HF_CHECK(value.has_value(), "environment variable ", name,
           " is not set, but ", because, " is");
  return *value;
}

void checkPlace(const CommunicatorConfig& config, const char* rank_var,
                const char* size_var, const char* local_rank_var,
                const char* local_size_var) {
  HF_CHECK(config.size >= 1, size_var, " must be >= 1, got ", config.size);
  HF_CHECK(config.rank >= 0 && config.rank < config.size, rank_var,
           " must be in [0, ", size_var, " = ", config.size, "), got ",
           config.rank);
  HF_CHECK(config.local_size >= 1 && config.local_size <= config.size,
           local_size_var, " must be in [1, ", size_var, " = ", config.size,
           "], got ", config.local_size);
  HF_CHECK(config.local_rank >= 0 && config.local_rank < config.local_size,
           local_rank_var, " must be in [0, ", local_size_var, " = ",
           config.local_size, "), got ", config.local_rank);
}

// Runs `fn`, turning c10d's errors into hostfuse::Error that say what the
// communicator was doing.
template <typename Fn>
auto rethrowing(const std::string& what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    HF_THROW("Communicator: ", what, " failed: ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    // Gloo's own exceptions (timeouts, closed connections).
    HF_THROW("Communicator: ", what, " failed: ", e.what());
  }
}

}  // namespace

const char* toString(Launcher launcher) {
  switch (launcher) {
    case Launcher::None:
      return "none";
    case Launcher::Torchrun:
      return "torchrun";
    case Launcher::OpenMpi:
      return "openmpi";
  }
  return "unknown";
}

CommunicatorConfig CommunicatorConfig::fromEnvironment() {
  CommunicatorConfig config;
  if (getEnv("RANK").has_value()) {
    config.launcher = Launcher::Torchrun;
    config.rank = *getEnvInt("RANK");
    config.size = requireEnvInt("WORLD_SIZE", "RANK");
    // Without the local variables, assume every rank runs on this host.
    config.local_rank = getEnvInt("LOCAL_RANK").value_or(config.rank);
    config.local_size = getEnvInt("LOCAL_WORLD_SIZE").value_or(config.size);
    config.store_is_external =
        getEnv("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    checkPlace(config, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
  } else if (getEnv("OMPI_COMM_WORLD_RANK").has_value()) {
    config.launcher = Launcher::OpenMpi;
    config.rank = *getEnvInt("OMPI_COMM_WORLD_RANK");
    config.size = requireEnvInt("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK");
    config.local_rank =
        getEnvInt("OMPI_COMM_WORLD_LOCAL_RANK").value_or(config.rank);
    config.local_size =
        getEnvInt("OMPI_COMM_WORLD_LOCAL_SIZE").value_or(config.size);
    checkPlace(config, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE");
  }
  if (config.launcher != Launcher::None) {
    config.master_addr = getEnv("MASTER_ADDR").value_or(config.master_addr);
    const int64_t port = getEnvInt("MASTER_PORT").value_or(kDefaultMasterPort);
    HF_CHECK(port > 0 && port < 65536,
             "MASTER_PORT must be a port number in [1, 65535], got ", port);
    config.master_port = static_cast<int>(port);
  }
  config.timeout = std::chrono::milliseconds(
      static_cast<int64_t>(options::numberOr(Option::CommTimeoutS) * 1000.0));
  return config;
}

Communicator::Communicator(CommunicatorConfig config)
    : config_(std::move(config)) {
  if (cuda::isAvailable()) {
    const int device =
        static_cast<int>(config_.local_rank % cuda::deviceCount());
    HF_CUDA_CHECK(cudaSetDevice(device));
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  }
  store_ = createStore();
}

Communicator::~Communicator() {
  // No barrier here: a destructor must not wait for peers that may be gone.
  for (auto& [type, backend] : backends_) {
    try {
      backend->shutdown();
    } catch (const std::exception&) {
      // Nothing sensible to do while tearing down.
    }
  }
}

Communicator& Communicator::getInstance() {
  // Never destroyed: backends must not be torn down by static destructors,
  // whose order relative to libtorch's is unknown. shutdown() releases them.
  static Communicator* instance =
      new Communicator(CommunicatorConfig::fromEnvironment());
  return *instance;
}

c10::intrusive_ptr<c10d::Store> Communicator::createStore() const {
  if (config_.launcher == Launcher::None) {
    return c10::make_intrusive<c10d::HashStore>();
  }
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(config_.master_port);
  options.isServer = config_.rank == 0 && !config_.store_is_external;
  options.timeout = config_.timeout;
  if (!config_.store_is_external) {
    // Every rank waits in the constructor until all have connected.
    options.numWorkers = static_cast<size_t>(config_.size);
    options.waitWorkers = true;
  }
  return rethrowing(
      toString("connecting to the store at ", config_.master_addr, ":",
               config_.master_port, " (rank ", config_.rank, " of ",
               config_.size, ", launcher ",
               hostfuse::toString(config_.launcher), ")"),
      [&] {
        return c10::intrusive_ptr<c10d::Store>(
            c10::make_intrusive<c10d::TCPStore>(config_.master_addr, options));
      });
}

c10d::Backend& Communicator::backend(c10::DeviceType device_type) {
  std::lock_guard<std::mutex> lock(mutex_);
  HF_CHECK(!shut_down_,
           "Communicator: the communicator is shut down; no collective can "
           "run after shutdown()");
  auto it = backends_.find(device_type);
  if (it != backends_.end()) {
    return *it->second;
  }
  const int rank = static_cast<int>(config_.rank);
  const int size = static_cast<int>(config_.size);
  c10::intrusive_ptr<c10d::Backend> created;
  if (device_type == c10::DeviceType::CPU) {
    // All ranks on one host: Gloo's loopback transport needs no interface
    // to be guessed.
    const bool loopback = config_.local_size == config_.size &&
                          !options::environment("GLOO_SOCKET_IFNAME");
    created = rethrowing("creating the Gloo backend", [&] {
      return createGlooBackend(
          c10::make_intrusive<c10d::PrefixStore>("hostfuse/gloo", store_), rank,
          size, config_.timeout, loopback);
    });
  } else if (device_type == c10::DeviceType::CUDA) {
    HF_CHECK(cuda::isAvailable(),
             "Communicator: CUDA tensors need a GPU, but none is visible");
    HF_CHECK(config_.local_size <= cuda::deviceCount(),
             "Communicator: NCCL needs one GPU per rank, but ",
             config_.local_size, " ranks run on this host, which has ",
             cuda::deviceCount(), " GPUs");
    created = rethrowing("creating the NCCL backend", [&] {
      return createNcclBackend(
          c10::make_intrusive<c10d::PrefixStore>("hostfuse/nccl", store_), rank,
          size, config_.timeout, device_);
    });
  } else {
    HF_THROW("Communicator: no backend communicates tensors on ",
             c10::DeviceTypeName(device_type),
             "; use CPU (Gloo) or CUDA (NCCL) tensors");
  }
  backends_.emplace(device_type, created);
  return *created;
}

c10::intrusive_ptr<c10d::Store> Communicator::store() const {
  HF_CHECK(!shut_down_ && store_,
           "Communicator: the communicator is shut down; its store is gone");
  return store_;
}

void Communicator::barrier() {
  c10d::Backend& b = backend(device_.type());
  rethrowing("barrier", [&] {
    b.barrier()->wait();
    return 0;
  });
}

void Communicator::shutdown() {
  if (shut_down_) {
    return;
  }
  if (config_.size > 1) {
    // Rank 0 may serve the store: nobody leaves while a peer still uses it.
    barrier();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [type, backend] : backends_) {
    rethrowing("shutting down a backend", [&] {
      backend->shutdown();
      return 0;
    });
  }
  backends_.clear();
  store_.reset();
  shut_down_ = true;
}

}  // namespace hostfuse
