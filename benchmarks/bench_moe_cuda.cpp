// Benchmark of the cuda MoE backend: dispatch and combine of bf16 rows,
// H = 7168, K = 8, 8 experts per rank, uniform random routing, eager and
// CUDA-graph replayed.
//
//   tools/run_cuda_moe_bench.sh N [T ...]      (default T: 128 4096)
// which runs build/bench_moe_cuda under
//   torchrun --no-python --standalone --nproc-per-node=N.
//
// Reported per configuration (rank 0 prints; times are the slowest rank's):
//   time        median over blocks of back-to-back calls of the mean time
//               per call (back-to-back calls keep the ranks in step, as in
//               a model; each block starts after a host barrier)
//   phys GB/s   bytes that leave each GPU / time, averaged over GPUs:
//               dispatch: one row per (token, remote rank) + 16 bytes of
//               metadata per remote pick; combine: one row per remote pick
//   logic GB/s  every delivered (token, rank) row, local ones included,
//               x H x 2 bytes / time, averaged over GPUs
// The collective (NCCL) backend joins this table when it is wired in.
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "multidevice/cuda_dispatch_combine.h"
#include "multidevice/symmetric_memory.h"
#include "utils/cuda_utils.h"
#include "utils/torch_cuda.h"

namespace hostfuse {
namespace {

constexpr int64_t kHidden = 7168;
constexpr int64_t kTopK = 8;
constexpr int64_t kExpertsPerRank = 8;
constexpr int kBlocks = 21;  // timed blocks; the median is reported

int environmentInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

// The same torchrun glue as tests/cpp/test_cuda_moe.cpp.
c10::intrusive_ptr<c10d::Store> makeStore(int rank, int world) {
  const char* address = std::getenv("MASTER_ADDR");
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  c10d::TCPStoreOptions options;
  options.port = static_cast<uint16_t>(
      environmentInt("MASTER_PORT", world == 1 ? 0 : 29500));
  options.isServer =
      !(agent != nullptr && std::string(agent) == "True") && rank == 0;
  options.waitWorkers = false;
  options.timeout = std::chrono::seconds(300);
  auto tcp = c10::make_intrusive<c10d::TCPStore>(
      address != nullptr ? address : "127.0.0.1", options);
  return c10::make_intrusive<c10d::PrefixStore>("hostfuse/bench_moe_cuda", tcp);
}

struct Traffic {
  double physical_dispatch = 0;  // bytes leaving this GPU
  double physical_combine = 0;
  double logical = 0;  // (token, rank) rows x H x 2
};

Traffic countTraffic(const at::Tensor& idx_cpu, int rank, int64_t local) {
  Traffic traffic;
  const double row = kHidden * 2.0;
  const auto idx = idx_cpu.accessor<int64_t, 2>();
  for (int64_t t = 0; t < idx.size(0); ++t) {
    std::vector<int64_t> ranks;
    for (int64_t k = 0; k < idx.size(1); ++k) {
      if (idx[t][k] < 0) {
        continue;
      }
      const int64_t dst = idx[t][k] / local;
      ranks.push_back(dst);
      if (dst != rank) {
        traffic.physical_dispatch += 16;
        traffic.physical_combine += row;
      }
    }
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    for (const int64_t dst : ranks) {
      traffic.logical += row;
      traffic.physical_dispatch += dst != rank ? row : 0;
    }
  }
  return traffic;
}

class Bench {
 public:
  Bench(int rank, int world, int device, c10::intrusive_ptr<c10d::Store> store)
      : rank_(rank), world_(world), device_(device), store_(store) {
    HF_CUDA_CHECK(cudaEventCreate(&start_));
    HF_CUDA_CHECK(cudaEventCreate(&stop_));
  }

  // Mean microseconds per call of `fn`, median over kBlocks blocks of
  // `per_block` calls, as the slowest rank saw it.
  double time(const std::string& key, int per_block,
              const std::function<void()>& fn) {
    const cudaStream_t stream = cuda::currentStream(device_);
    for (int i = 0; i < std::max(3, per_block / 4); ++i) {
      fn();
    }
    std::vector<double> means;
    for (int block = 0; block < kBlocks; ++block) {
      HF_CUDA_CHECK(cudaDeviceSynchronize());
      storeBarrier(*store_, toString(key, "/", block), world_);
      HF_CUDA_CHECK(cudaEventRecord(start_, stream));
      for (int i = 0; i < per_block; ++i) {
        fn();
      }
      HF_CUDA_CHECK(cudaEventRecord(stop_, stream));
      HF_CUDA_CHECK(cudaEventSynchronize(stop_));
      float ms = 0;
      HF_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
      means.push_back(1000.0 * ms / per_block);
    }
    std::nth_element(means.begin(), means.begin() + kBlocks / 2, means.end());
    return maxOverRanks(key, means[kBlocks / 2]);
  }

  double sumOverRanks(const std::string& key, double value) {
    double total = 0;
    for (const double v : gather(key, value)) {
      total += v;
    }
    return total;
  }

  double maxOverRanks(const std::string& key, double value) {
    const std::vector<double> all = gather(key, value);
    return *std::max_element(all.begin(), all.end());
  }

 private:
  std::vector<double> gather(const std::string& key, double value) {
    std::vector<uint8_t> bytes(sizeof(double));
    std::memcpy(bytes.data(), &value, sizeof(double));
    store_->set(toString("gather/", key, "/", rank_), bytes);
    std::vector<double> all;
    for (int r = 0; r < world_; ++r) {
      const std::vector<uint8_t> got =
          store_->get(toString("gather/", key, "/", r));
      double v = 0;
      std::memcpy(&v, got.data(), sizeof(double));
      all.push_back(v);
    }
    return all;
  }

  int rank_;
  int world_;
  int device_;
  c10::intrusive_ptr<c10d::Store> store_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

void run(int rank, int world, int device, const std::vector<int64_t>& sizes) {
  auto store = makeStore(rank, world);
  Bench bench(rank, world, device, store);
  cuda::StreamScope stream_scope(device);
  const at::Device gpu(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  const int64_t experts = kExpertsPerRank * world;
  if (rank == 0) {
    std::printf(
        "cuda MoE backend: %d ranks, H = %lld bf16, K = %lld, "
        "%lld experts per rank, uniform routing\n",
        world, static_cast<long long>(kHidden), static_cast<long long>(kTopK),
        static_cast<long long>(kExpertsPerRank));
    std::printf("%6s  %-17s %-6s %10s %11s %11s\n", "T", "op", "mode",
                "time us", "phys GB/s", "logic GB/s");
  }
  for (const int64_t tokens : sizes) {
    CudaMoeConfig config;
    config.rank = rank;
    config.world_size = world;
    config.device = device;
    config.num_experts = experts;
    config.max_tokens = tokens;
    config.hidden = kHidden;
    config.topk = kTopK;
    config.dtype = at::kBFloat16;
    config.tag = toString("bench/T", tokens);
    config.check_each_call = false;
    CudaMoeWorkspace workspace(store, config);

    at::Generator gen = at::detail::createCPUGenerator(1234 + rank);
    const at::Tensor idx_cpu = at::rand({tokens, experts}, gen)
                                   .argsort(/*dim=*/int64_t{1})
                                   .slice(1, 0, kTopK)
                                   .contiguous();
    const at::Tensor x =
        at::randn({tokens, kHidden}, gen).to(at::kBFloat16).to(gpu);
    const at::Tensor idx = idx_cpu.to(gpu);
    const at::Tensor weights = at::rand({tokens, kTopK}, gen).to(gpu);
    const Traffic traffic = countTraffic(idx_cpu, rank, experts / world);
    const std::string id = toString("T", tokens);
    const double physical_dispatch =
        bench.sumOverRanks(id + "/pd", traffic.physical_dispatch) / world;
    const double physical_combine =
        bench.sumOverRanks(id + "/pc", traffic.physical_combine) / world;
    const double logical =
        bench.sumOverRanks(id + "/l", traffic.logical) / world;

    CudaDispatchResult result = workspace.dispatch(x, idx, weights);
    workspace.checkStatus();
    const int per_block = tokens <= 512 ? 200 : 20;
    auto report = [&](const char* op, const char* mode, double us,
                      double physical) {
      if (rank == 0) {
        std::printf("%6lld  %-17s %-6s %10.1f %11.1f %11.1f\n",
                    static_cast<long long>(tokens), op, mode, us,
                    physical / (us * 1e3), logical / (us * 1e3));
        std::fflush(stdout);
      }
    };

    // Eager.
    report("dispatch", "eager",
           bench.time(id + "/de", per_block,
                      [&] { result = workspace.dispatch(x, idx, weights); }),
           physical_dispatch);
    report(
        "combine", "eager",
        bench.time(id + "/ce", per_block,
                   [&] { workspace.combine(result.recv_x, result, weights); }),
        physical_combine);
    workspace.checkStatus();

    // Graph-replayed: one graph per op (both are safe to repeat alone).
    {
      cuda::CudaGraph graph;
      graph.captureBegin();
      result = workspace.dispatch(x, idx, weights);
      graph.captureEnd();
      report("dispatch", "graph",
             bench.time(id + "/dg", per_block, [&] { graph.replay(); }),
             physical_dispatch);
    }
    {
      cuda::CudaGraph graph;
      graph.captureBegin();
      workspace.combine(result.recv_x, result, weights);
      graph.captureEnd();
      report("combine", "graph",
             bench.time(id + "/cg", per_block, [&] { graph.replay(); }),
             physical_combine);
    }
    {
      cuda::CudaGraph graph;
      graph.captureBegin();
      result = workspace.dispatch(x, idx, weights);
      workspace.combine(result.recv_x, result, weights);
      graph.captureEnd();
      report("dispatch+combine", "graph",
             bench.time(id + "/dcg", per_block, [&] { graph.replay(); }),
             physical_dispatch + physical_combine);
    }
    workspace.checkStatus();
    HF_CUDA_CHECK(cudaDeviceSynchronize());
    storeBarrier(*store, id + "/done", world);
  }
  if (rank == 0) {
    std::printf(
        "(collective/NCCL backend: not wired into this benchmark "
        "yet)\n");
  }
}

}  // namespace
}  // namespace hostfuse

int main(int argc, char** argv) {
  using namespace hostfuse;
  const int rank = environmentInt("RANK", 0);
  const int world = environmentInt("WORLD_SIZE", 1);
  const int local_rank = environmentInt("LOCAL_RANK", rank);
  if (!cuda::isAvailable()) {
    std::printf(
        "bench_moe_cuda: no CUDA device on this machine; nothing "
        "to measure\n");
    return 0;
  }
  if (cuda::deviceCount() < world) {
    std::printf(
        "bench_moe_cuda: %d ranks need %d GPUs, %d visible; "
        "nothing to measure\n",
        world, world, cuda::deviceCount());
    return 0;
  }
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) {
    sizes.push_back(std::atoll(argv[i]));
  }
  if (sizes.empty()) {
    sizes = {128, 4096};
  }
  try {
    HF_CUDA_CHECK(cudaSetDevice(local_rank));
    run(rank, world, local_rank, sizes);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moe_cuda rank %d: %s\n", rank, e.what());
    return 1;
  }
  return 0;
}
