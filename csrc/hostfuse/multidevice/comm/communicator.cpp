#include <hostfuse/multidevice/comm/communicator.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include <hostfuse/multidevice/comm/c10d_backends.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/options.h>
#include <hostfuse/utils/torch_cuda.h>

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

std::chrono::milliseconds timeoutFromOptions() {
  return std::chrono::milliseconds(
      static_cast<int64_t>(options::numberOr(Option::CommTimeoutS) * 1000.0));
}

CommunicatorConfig configOfGroup(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  HF_CHECK(group, "Communicator: the process group given is null");
  CommunicatorConfig config;
  config.launcher = Launcher::ProcessGroup;
  config.rank = group->getRank();
  config.size = group->getSize();
  config.timeout = timeoutFromOptions();
  return config;
}

// The name every rank of `group` knows it by (torch.distributed names its
// groups; newGroup() names its own).
std::string nameOfGroup(c10d::ProcessGroup& group) {
  try {
    const std::string& name = group.getGroupName();
    if (!name.empty()) {
      return name;
    }
  } catch (const c10::Error&) {
    // A group without backends has no name.
  }
  return "unnamed-group";
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
    case Launcher::ProcessGroup:
      return "process group";
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
  config.timeout = timeoutFromOptions();
  config.share_gpus = options::boolOr(Option::ShareGpus);
  return config;
}

namespace {

// A write to a socket whose peer died raises SIGPIPE, which by default ends
// the process: a rank would die with its peer instead of raising (Gloo and
// the store write to sockets without MSG_NOSIGNAL). Python ignores it from
// the start; a C++ program may not. A handler the program installed stays.
void ignoreBrokenPipes() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 &&
      current.sa_handler == SIG_DFL) {
    std::signal(SIGPIPE, SIG_IGN);
  }
}

}  // namespace

Communicator::Communicator(CommunicatorConfig config)
    : config_(std::move(config)) {
  options::checkTimeout("CommunicatorConfig::timeout",
                        std::chrono::duration<double>(config_.timeout).count());
  // One GPU per rank, or none: ranks that would share a GPU compute on the
  // CPU (NCCL cannot run two ranks on one GPU), unless asked to share.
  const int gpus = cuda::isAvailable() ? cuda::deviceCount() : 0;
  shares_gpus_ = config_.share_gpus && config_.local_size > gpus && gpus > 0;
  if (gpus > 0 && (config_.local_size <= gpus || shares_gpus_)) {
    const int device = static_cast<int>(config_.local_rank % gpus);
    HF_CUDA_CHECK(cudaSetDevice(device));
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  }
  loopback_ = useLoopback();
  ignoreBrokenPipes();
  store_ = createStore();
}

Communicator::Communicator(c10::intrusive_ptr<c10d::ProcessGroup> group)
    : config_(configOfGroup(group)), group_(std::move(group)) {
  name_ = nameOfGroup(*group_);
  if (const std::optional<at::Device> bound = group_->getBoundDeviceId()) {
    device_ = *bound;
  } else if (cuda::isAvailable()) {
    int current = 0;
    HF_CUDA_CHECK(cudaGetDevice(&current));
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(current));
  }
  if (c10::intrusive_ptr<c10d::Store> store = group_->getStore()) {
    store_ = c10::make_intrusive<c10d::PrefixStore>("hostfuse", store);
  }
}

Communicator::Communicator(Communicator& failed, std::vector<int64_t> members)
    : config_([&] {
        CommunicatorConfig config = failed.config_;
        const auto me = std::find(members.begin(), members.end(), config.rank);
        config.rank = me - members.begin();
        config.size = static_cast<int64_t>(members.size());
        // Only the ranks' count and order change; the device stays (so
        // localRank() no longer names it: use device()).
        config.local_rank = config.rank;
        config.local_size = failed.loopback_ ? config.size : 1;
        return config;
      }()),
      name_(fmt::format("{}~{}", failed.name_, ++failed.recoveries_)),
      device_(failed.device_),
      shares_gpus_(failed.shares_gpus_),
      store_(failed.store_),
      former_ranks_(std::move(members)),
      original_size_(failed.originalSize()),
      loopback_(failed.loopback_) {
  const std::vector<int64_t> failed_original = failed.originalRanks();
  for (const int64_t former : former_ranks_) {
    original_ranks_.push_back(failed_original.at(former));
  }
}

std::vector<int64_t> Communicator::originalRanks() const {
  if (!original_ranks_.empty()) {
    return original_ranks_;
  }
  std::vector<int64_t> ranks(size());
  std::iota(ranks.begin(), ranks.end(), 0);
  return ranks;
}

int64_t Communicator::originalSize() const {
  return original_ranks_.empty() ? size() : original_size_;
}

Communicator::~Communicator() {
  // No barrier here: a destructor must not wait for peers that may be gone.
  // A process group's backends are its owner's to shut down.
  if (group_) {
    return;
  }
  if (!failed_because_.empty()) {
    abort();
    return;
  }
  for (auto& [type, backend] : backends_) {
    try {
      backend->shutdown();
    } catch (const std::exception&) {
      // Nothing sensible to do while tearing down.
    }
  }
}

namespace {

// The process-wide communicator. Never destroyed: backends must not be torn
// down by static destructors, whose order relative to libtorch's is
// unknown. shutdown() releases them; recoverInstance() replaces it and
// keeps the failed one.
std::atomic<Communicator*>& instanceSlot() {
  static std::atomic<Communicator*> slot{nullptr};
  return slot;
}

std::mutex& instanceMutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace

Communicator& Communicator::getInstance() {
  if (Communicator* instance = instanceSlot().load()) {
    return *instance;
  }
  std::lock_guard<std::mutex> lock(instanceMutex());
  if (instanceSlot().load() == nullptr) {
    instanceSlot().store(
        new Communicator(CommunicatorConfig::fromEnvironment()));
  }
  return *instanceSlot().load();
}

Communicator& Communicator::recoverInstance() {
  Communicator& failed = getInstance();
  std::unique_ptr<Communicator> recovered = failed.recover();
  std::lock_guard<std::mutex> lock(instanceMutex());
  // Kept, and reachable from a static (references to it stay valid and
  // raise when used); the list itself is never destroyed either, so that
  // nothing of it is freed before the leak check at exit.
  static auto* const retired = new std::vector<Communicator*>();
  retired->push_back(&failed);
  instanceSlot().store(recovered.release());
  return *instanceSlot().load();
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

std::string Communicator::storePrefix() const {
  // The launcher's first communicator keeps the keys it always had.
  return former_ranks_.empty() ? std::string("hostfuse") : "hostfuse/" + name_;
}

bool Communicator::useLoopback() const {
  // All ranks on one host: Gloo's loopback transport needs no interface to be
  // guessed.
  return config_.launcher != Launcher::ProcessGroup &&
         config_.local_size == config_.size &&
         !options::environment("GLOO_SOCKET_IFNAME");
}

c10d::Backend& Communicator::backend(c10::DeviceType device_type) {
  std::lock_guard<std::mutex> lock(mutex_);
  HF_CHECK(!shut_down_,
           "Communicator: the communicator is shut down; no collective can "
           "run after shutdown()");
  HF_CHECK(failed_because_.empty(), "Communicator '", name_,
           "' failed earlier and runs no more collectives (", failed_because_,
           "); call recover() on every survivor to go on with them");
  auto it = backends_.find(device_type);
  if (it != backends_.end()) {
    return *it->second;
  }
  const int rank = static_cast<int>(config_.rank);
  const int size = static_cast<int>(config_.size);
  c10::intrusive_ptr<c10d::Backend> created;
  if (group_) {
    try {
      created = group_->getBackend(device_type);
    } catch (const c10::Error& e) {
      HF_THROW("Communicator: the process group '", name_, "' (",
               group_->getBackendName(), ") has no backend for ",
               c10::DeviceTypeName(device_type, /*lower_case=*/true),
               " tensors: ", e.what_without_backtrace());
    }
  } else if (device_type == c10::DeviceType::CPU) {
    created = rethrowing("creating the Gloo backend", [&] {
      return createGlooBackend(c10::make_intrusive<c10d::PrefixStore>(
                                   storePrefix() + "/gloo", store_),
                               rank, size, config_.timeout, loopback_);
    });
  } else if (device_type == c10::DeviceType::CUDA) {
    HF_CHECK(cuda::isAvailable(),
             "Communicator: CUDA tensors need a GPU, but none is visible");
    HF_CHECK(config_.local_size <= cuda::deviceCount(),
             "Communicator: NCCL needs one GPU per rank, but ",
             config_.local_size, " ranks run on this host, which has ",
             cuda::deviceCount(), " GPUs",
             shares_gpus_ ? " (they share them: HOSTFUSE_SHARE_GPUS=1)" : "");
    created = rethrowing("creating the NCCL backend", [&] {
      return createNcclBackend(c10::make_intrusive<c10d::PrefixStore>(
                                   storePrefix() + "/nccl", store_),
                               rank, size, config_.timeout, device_);
    });
  } else {
    HF_THROW("Communicator: no backend communicates tensors on ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true),
             "; use CPU (Gloo) or CUDA (NCCL) tensors");
  }
  backends_.emplace(device_type, created);
  return *created;
}

c10::intrusive_ptr<c10d::Store> Communicator::store() const {
  HF_CHECK(!shut_down_,
           "Communicator: the communicator is shut down; its store is gone");
  HF_CHECK(store_, "Communicator: the process group '", name_,
           "' has no store, which this needs (e.g. the cuda MoE backend, "
           "newGroup())");
  return store_;
}

std::string Communicator::nextTag(const std::string& kind) {
  return fmt::format("{}/{}/{}", kind, name_, nextCount(kind));
}

int64_t Communicator::nextCount(const std::string& kind) {
  std::lock_guard<std::mutex> lock(mutex_);
  return tags_[kind]++;
}

c10::intrusive_ptr<c10d::ProcessGroup> Communicator::newGroup(
    const std::vector<int64_t>& ranks) {
  const std::string listed = fmt::format("[{}]", fmt::join(ranks, ", "));
  HF_CHECK(!ranks.empty(), "Communicator::newGroup: ranks is empty");
  std::vector<int64_t> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  HF_CHECK(sorted.front() >= 0 && sorted.back() < config_.size,
           "Communicator::newGroup: ranks ", listed,
           " must be ranks of this communicator, in [0, ", config_.size, ")");
  HF_CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
           "Communicator::newGroup: ranks ", listed, " names a rank twice");
  const auto mine = std::find(ranks.begin(), ranks.end(), config_.rank);
  HF_CHECK(mine != ranks.end(), "Communicator::newGroup: this rank (",
           config_.rank, ") is not in ranks ", listed,
           "; only the ranks of the new group call newGroup");
  const int rank = static_cast<int>(mine - ranks.begin());
  const int size = static_cast<int>(ranks.size());

  int64_t made = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    made = groups_made_[ranks]++;
  }
  const std::string name =
      fmt::format("{}/group[{}]#{}", name_, fmt::join(ranks, ","), made);
  const c10::intrusive_ptr<c10d::Store> group_store =
      c10::make_intrusive<c10d::PrefixStore>("hostfuse/" + name, store());
  auto group = c10::make_intrusive<c10d::ProcessGroup>(group_store, rank, size);
  using BackendType = c10d::ProcessGroup::BackendType;
  BackendType default_type = BackendType::GLOO;
  if (device_.is_cuda() && isNcclBuilt()) {
    group->setBoundDeviceId(device_);
    c10::intrusive_ptr<c10d::Backend> nccl =
        rethrowing("creating the NCCL backend of group " + name, [&] {
          return createNcclBackend(
              c10::make_intrusive<c10d::PrefixStore>("nccl", group_store), rank,
              size, config_.timeout, device_);
        });
    group->setBackend(c10::DeviceType::CUDA, BackendType::NCCL, nccl);
    default_type = BackendType::NCCL;
  }
  c10::intrusive_ptr<c10d::Backend> gloo =
      rethrowing("creating the Gloo backend of group " + name, [&] {
        return createGlooBackend(
            c10::make_intrusive<c10d::PrefixStore>("gloo", group_store), rank,
            size, config_.timeout, loopback_);
      });
  group->setBackend(c10::DeviceType::CPU, BackendType::GLOO, gloo);
  group->setDefaultBackend(default_type);
  group->setGroupName(name);
  return group;
}

void Communicator::barrier() {
  // A process group's barrier runs on its default backend, which may be
  // Gloo on a GPU machine; ranks that share GPUs have Gloo only.
  c10d::Backend& b =
      group_ ? *rethrowing("finding the group's default backend",
                           [&] { return group_->getDefaultBackend(); })
             : backend(shares_gpus_ ? c10::DeviceType::CPU : device_.type());
  rethrowing("barrier", [&] {
    b.barrier()->wait();
    return 0;
  });
}

void Communicator::shutdown() {
  if (shut_down_) {
    return;
  }
  if (hasFailed()) {
    // The peers may be gone: nothing to wait for.
    abort();
    std::lock_guard<std::mutex> lock(mutex_);
    store_.reset();
    shut_down_ = true;
    return;
  }
  if (config_.size > 1) {
    // Rank 0 may serve the store: nobody leaves while a peer still uses it.
    barrier();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  if (!group_) {
    for (auto& [type, backend] : backends_) {
      rethrowing("shutting down a backend", [&] {
        backend->shutdown();
        return 0;
      });
    }
  }
  backends_.clear();
  store_.reset();
  group_.reset();
  shut_down_ = true;
}

// ---------------------------------------------------------------------------
// After a failure.

bool Communicator::hasFailed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return !failed_because_.empty();
}

std::chrono::milliseconds Communicator::rollCallWindow() const {
  return std::min<std::chrono::milliseconds>(config_.timeout,
                                             std::chrono::seconds(3));
}

void Communicator::runOrFail(const std::function<void()>& collective,
                             const std::string& context) {
  std::string error;
  try {
    collective();
    return;
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    // Gloo's own exceptions (timeouts, closed connections).
    error = e.what();
  }
  HF_THROW(context, failure(error));
}

std::string Communicator::failure(const std::string& error) noexcept {
  try {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (failed_because_.empty()) {
        failed_because_ = error;
      }
    }
    if (config_.size == 1 || !store_) {
      return error;
    }
    const std::vector<int64_t> alive = survivors();
    std::vector<int64_t> silent;
    for (int64_t r = 0; r < config_.size; ++r) {
      if (std::find(alive.begin(), alive.end(), r) == alive.end()) {
        silent.push_back(r);
      }
    }
    const std::string own = name_ == "world" ? "" : " (of " + name_ + ")";
    if (silent.empty()) {
      return fmt::format(
          "{}; every rank{} answered the roll call after it, so none died: "
          "call recover() on every rank to go on",
          error, own);
    }
    return fmt::format(
        "{}; rank{} {}{} did not answer the roll call within {} ms after it "
        "(dead, or stopped): ranks {} are alive and can go on with "
        "recover()",
        error, silent.size() == 1 ? "" : "s", fmt::join(silent, ", "), own,
        rollCallWindow().count(), fmt::join(alive, ", "));
  } catch (const std::exception& e) {
    try {
      return error +
             "; the roll call of the ranks still alive failed too: " + e.what();
    } catch (...) {
      return error;  // out of memory: the transport's error alone
    }
  } catch (...) {
    return error;
  }
}

void Communicator::abort() noexcept {
  std::map<c10::DeviceType, c10::intrusive_ptr<c10d::Backend>> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (failed_because_.empty()) {
      failed_because_ = "aborted";
    }
    dropped.swap(backends_);
  }
  // Destroying a Gloo backend closes its connections without waiting for
  // the peers; c10d's abort() also tears down an NCCL communicator without
  // waiting (a process group's backends are its owner's: only let go).
  if (!group_) {
    for (auto& [type, backend] : dropped) {
      try {
        backend->abort();
      } catch (const std::exception&) {
        // Let go of it all the same.
      }
    }
  }
  dropped.clear();
}

std::vector<int64_t> Communicator::survivors() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (survivors_.has_value()) {
      return *survivors_;
    }
  }
  if (config_.size == 1) {
    return {0};
  }
  const c10::intrusive_ptr<c10d::Store> store = this->store();
  const std::string prefix = storePrefix() + "/roll-call/";
  const auto key = [&](int64_t r) { return prefix + std::to_string(r); };
  std::vector<int64_t> seen;
  rethrowing("the roll call in the store", [&] {
    store->set(key(config_.rank), std::vector<uint8_t>{'1'});
    const auto deadline = std::chrono::steady_clock::now() + rollCallWindow();
    while (true) {
      seen.clear();
      for (int64_t r = 0; r < config_.size; ++r) {
        if (r == config_.rank || store->check({key(r)})) {
          seen.push_back(r);
        }
      }
      if (static_cast<int64_t>(seen.size()) == config_.size ||
          std::chrono::steady_clock::now() >= deadline) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    // The first rank to finish decides for all.
    const std::string proposal = fmt::format("{}", fmt::join(seen, ","));
    const std::string decided =
        store->compareSet(prefix + "survivors", "", proposal);
    seen.clear();
    std::istringstream items(decided);
    std::string item;
    while (std::getline(items, item, ',')) {
      seen.push_back(std::stoll(item));
    }
    return 0;
  });
  HF_CHECK(std::find(seen.begin(), seen.end(), config_.rank) != seen.end(),
           "Communicator '", name_, "': rank ", config_.rank,
           " answered the roll call after the survivors ",
           fmt::format("{}", fmt::join(seen, ", ")),
           " had closed it; they went on without this rank");
  std::lock_guard<std::mutex> lock(mutex_);
  survivors_ = seen;
  return seen;
}

std::unique_ptr<Communicator> Communicator::recover() {
  HF_CHECK(!shut_down_, "Communicator::recover: '", name_,
           "' is shut down; its store is gone");
  abort();
  std::vector<int64_t> members = survivors();
  return std::unique_ptr<Communicator>(
      new Communicator(*this, std::move(members)));
}

}  // namespace hostfuse
