// The floor under the MoE kernels' transfers: every GPU of this process
// writes (or reads) the same number of bytes to (from) each other GPU at
// once, with SM loads and stores over peer mappings, and the time from the
// common start to the last block's system-scope fence is measured on each
// GPU (%globaltimer). CUDA runtime only, one process, all visible GPUs.
//
//   build/bench_nvlink_push [bytes per peer ...]   (default: the MoE sizes)
//   build/bench_nvlink_push --peers-csv peers.csv [--tokens 128,4096]
//   (--help lists the arguments; --peers-csv adds the floor under
//   bench_peers.py's workload to its CSV, as rows "NVLink floor")
//
// Variants: "rows": one warp per row of 14336 bytes (H = 7168 bf16), rows
// spread over the blocks of a peer's group, 8 loads in flight per lane,
// like the MoE push; "stride": a grid-stride loop of 16-byte units over
// the peer's bytes, 4 in flight per lane; "pull": like "rows", but every
// GPU reads its peers' rows into its own memory. Blocks of a GPU are split
// into one group per peer. Times are medians over the repetitions, of the
// slowest GPU; GB/s = bytes sent (pull: received) per GPU / time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../examples/cli_flags.h"
#include "peers/peers_csv.h"

namespace {

#define CHECK_CUDA(call)                                                 \
  do {                                                                   \
    const cudaError_t status_ = (call);                                  \
    if (status_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, \
                   cudaGetErrorString(status_));                         \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGpus = 8;
constexpr int64_t kRowBytes = 14336;
constexpr int kRepetitions = 20;

enum Mode : int { kRows = 0, kStride = 1, kPull = 2 };
const char* const kModeNames[] = {"rows", "stride", "pull"};

struct Params {
  // Per peer slot p (p = 0 .. peers-1, peer = (gpu + 1 + p) % gpus): where
  // this GPU's bytes go on (or come from) that peer, and where they come
  // from (go to) here.
  char* remote[kMaxGpus];
  char* local[kMaxGpus];
  int64_t bytes;  // per peer
  int peers;
  int mode;
  // Block 0 waits for the host's go (host-mapped), then raises `release`
  // to `round` in device memory for the other blocks: many blocks polling
  // host memory would stagger the start.
  const volatile int* go;
  unsigned* release;
  unsigned round;
  unsigned long long* times;  // [blocks][2]: start, end (ns)
};

__device__ __forceinline__ unsigned long long now() {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ void copyRow(uint4* destination, const uint4* source,
                                        int64_t units, int lane) {
  for (int64_t base = lane; base < units; base += 32 * 8) {
    uint4 values[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (base + 32 * i < units) {
        values[i] = source[base + 32 * i];
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (base + 32 * i < units) {
        destination[base + 32 * i] = values[i];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) pushKernel(Params p) {
  const int slot = blockIdx.x % p.peers;
  const int group_blocks = gridDim.x / p.peers;
  const int block_in_group = blockIdx.x / p.peers;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) {
      while (*p.go == 0) {
      }
      atomicExch(p.release, p.round);
    } else {
      while (*reinterpret_cast<volatile unsigned*>(p.release) < p.round) {
      }
    }
  }
  __syncthreads();
  const unsigned long long start = now();
  char* to = p.mode == kPull ? p.local[slot] : p.remote[slot];
  const char* from = p.mode == kPull ? p.remote[slot] : p.local[slot];
  if (p.mode == kStride) {
    const int64_t units = p.bytes / 16;
    const int64_t stride = static_cast<int64_t>(group_blocks) * kThreads;
    auto* destination = reinterpret_cast<uint4*>(to);
    const auto* source = reinterpret_cast<const uint4*>(from);
    for (int64_t base =
             static_cast<int64_t>(block_in_group) * kThreads + threadIdx.x;
         base < units; base += 4 * stride) {
      uint4 values[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (base + i * stride < units) {
          values[i] = source[base + i * stride];
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (base + i * stride < units) {
          destination[base + i * stride] = values[i];
        }
      }
    }
  } else {
    const int64_t rows = p.bytes / kRowBytes;
    const int64_t warps = static_cast<int64_t>(group_blocks) * kWarps;
    for (int64_t row =
             static_cast<int64_t>(warp) * group_blocks + block_in_group;
         row < rows; row += warps) {
      copyRow(reinterpret_cast<uint4*>(to + row * kRowBytes),
              reinterpret_cast<const uint4*>(from + row * kRowBytes),
              kRowBytes / 16, lane);
    }
  }
  asm volatile("fence.acq_rel.sys;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    p.times[2 * blockIdx.x] = start;
    p.times[2 * blockIdx.x + 1] = now();
  }
}

struct Gpu {
  char* recv = nullptr;  // [gpus][bytes]: slot of each source
  char* send = nullptr;  // [bytes]
  unsigned long long* times = nullptr;
  unsigned* release = nullptr;
  unsigned rounds = 0;
  cudaStream_t stream = nullptr;
};

// One measurement: all GPUs at once, `blocks_per_peer` blocks per peer.
// Returns the median over repetitions of the slowest GPU's span (us).
// `go` is the host-mapped start flag, `go_device` its device address (the
// same on every GPU: portable, unified addressing).
double measure(std::vector<Gpu>& gpus, int* go, const int* go_device,
               int64_t bytes, int mode, int blocks_per_peer) {
  const int n = static_cast<int>(gpus.size());
  const int peers = n - 1;
  const int blocks = blocks_per_peer * peers;
  std::vector<double> spans;
  std::vector<unsigned long long> host(2 * blocks);
  for (int repetition = 0; repetition < kRepetitions + 2; ++repetition) {
    *reinterpret_cast<volatile int*>(go) = 0;
    for (int g = 0; g < n; ++g) {
      CHECK_CUDA(cudaSetDevice(g));
      Params p = {};
      for (int s = 0; s < peers; ++s) {
        const int peer = (g + 1 + s) % n;
        // Push: our bytes into slot g of the peer. Pull: the peer's bytes
        // (its send buffer) into our slot for it.
        p.remote[s] =
            mode == kPull ? gpus[peer].send : gpus[peer].recv + g * bytes;
        p.local[s] = mode == kPull ? gpus[g].recv + peer * bytes : gpus[g].send;
      }
      p.bytes = bytes;
      p.peers = peers;
      p.mode = mode;
      p.go = go_device;
      p.times = gpus[g].times;
      p.release = gpus[g].release;
      p.round = ++gpus[g].rounds;
      pushKernel<<<blocks, kThreads, 0, gpus[g].stream>>>(p);
      CHECK_CUDA(cudaGetLastError());
    }
    *reinterpret_cast<volatile int*>(go) = 1;
    double slowest = 0;
    for (int g = 0; g < n; ++g) {
      CHECK_CUDA(cudaSetDevice(g));
      CHECK_CUDA(cudaStreamSynchronize(gpus[g].stream));
      CHECK_CUDA(cudaMemcpy(host.data(), gpus[g].times,
                            sizeof(unsigned long long) * 2 * blocks,
                            cudaMemcpyDeviceToHost));
      unsigned long long first = ~0ull;
      unsigned long long last = 0;
      for (int b = 0; b < blocks; ++b) {
        first = std::min(first, host[2 * b]);
        last = std::max(last, host[2 * b + 1]);
      }
      slowest = std::max(slowest, (last - first) / 1e3);
    }
    if (repetition >= 2) {  // the first two warm up
      spans.push_back(slowest);
    }
  }
  std::sort(spans.begin(), spans.end());
  return spans[spans.size() / 2];
}

}  // namespace

// bench_peers.py's workload on `ranks` GPUs (K distinct experts per token,
// uniform over L x ranks experts): the rows a rank sends each peer, as
// expected. A dispatch sends each token's row once to each peer holding one
// of its picks; a per-pick combine sends one row per pick held there.
struct PeerRows {
  int64_t tokens;
  int64_t dispatch;
  int64_t combine;
};

PeerRows peerRows(int64_t tokens, int64_t topk, int64_t local_experts,
                  int ranks) {
  const double experts = static_cast<double>(local_experts) * ranks;
  double none_there = 1;  // P(no pick of a token on a given peer)
  for (int64_t i = 0; i < topk; ++i) {
    none_there *= (experts - local_experts - i) / (experts - i);
  }
  return {tokens, std::llround(tokens * (1 - std::max(none_there, 0.0))),
          std::llround(static_cast<double>(tokens) * topk / ranks)};
}

// Appends the "NVLink floor" rows to bench_peers.py's CSV: per token count
// and phase, the best push time for its bytes per peer.
bool appendFloorRows(const std::string& path, const char* device, int ranks,
                     int64_t topk, int64_t local_experts,
                     const std::vector<PeerRows>& rows,
                     const std::vector<std::pair<int64_t, double>>& best) {
  std::vector<hostfuse::peers::CsvRow> csv;
  for (const PeerRows& r : rows) {
    const std::pair<const char*, int64_t> phases[] = {{"dispatch", r.dispatch},
                                                      {"combine", r.combine}};
    for (const auto& [phase, peer_rows] : phases) {
      for (const auto& [bytes, us] : best) {
        if (bytes == peer_rows * kRowBytes && us > 0) {
          // bench_peers.py's bytes: every pick's row, H = 7168 bf16.
          csv.push_back({device, ranks, r.tokens, 7168, topk,
                         local_experts * ranks, "NVLink floor", phase, us,
                         static_cast<double>(r.tokens) * topk * kRowBytes,
                         "-"});
        }
      }
    }
  }
  return hostfuse::peers::appendCsv(path, csv);
}

int main(int argc, char** argv) {
  std::vector<int64_t> sizes;
  std::string peers_csv;
  std::vector<int64_t> peer_tokens = {128, 4096};
  int64_t topk = 8;
  int64_t local_experts = 8;
  hostfuse::cli::Flags flags(
      "bench_nvlink_push",
      "The floor under the MoE kernels' transfers: every GPU of this process "
      "writes (rows, stride) or reads (pull) the same number of bytes to "
      "(from) each other GPU at once, with SM loads and stores over peer "
      "mappings. Prints, per size, mode and blocks per peer, the median over "
      "repetitions of the slowest GPU's time and GB/s per GPU. CUDA runtime "
      "only, one process, all visible GPUs (at least 2; with fewer it says "
      "so and exits 0).");
  flags.positionalIntegers(
      "BYTES", &sizes, kRowBytes, int64_t{1} << 32,
      "bytes per peer, rounded down to a multiple of 14336, one row of H = "
      "7168 bf16",
      "1705984 3670016 54620160, the MoE sizes at H = 7168, K = 8, 8 experts "
      "a rank, 4 ranks: dispatch and combine at T = 128, dispatch at "
      "T = 4096");
  flags.text("--peers-csv", "FILE", &peers_csv,
             "measure the floor under bench_peers.py's workload instead of "
             "BYTES, and append it to FILE as rows 'NVLink floor': per "
             "--tokens T, the bytes a rank's dispatch sends each peer (a "
             "token's row once per peer holding one of its picks) and a "
             "per-pick combine's (a row per pick held there), as expected "
             "under uniform routing; time: the best push (rows or stride, any "
             "blocks per peer)",
             "none");
  flags.integerList("--tokens", "T1,T2,...", &peer_tokens, 1, 1 << 20,
                    "tokens per rank, with --peers-csv");
  flags.integer("--topk", "K", &topk, 1, 64,
                "distinct experts per token, with --peers-csv");
  flags.integer("--experts-per-rank", "L", &local_experts, 1, 1 << 16,
                "experts on each rank, with --peers-csv");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (!peers_csv.empty() && !sizes.empty()) {
    return flags.fail("give BYTES or --peers-csv, not both");
  }
  if (peers_csv.empty()) {
    for (const char* flag : {"--tokens", "--topk", "--experts-per-rank"}) {
      if (flags.given(flag)) {
        return flags.fail(std::string(flag) + " goes with --peers-csv");
      }
    }
  } else {
    // Appended to at the end: find out now if it cannot be.
    if (!hostfuse::peers::appendCsv(peers_csv, {})) {
      return flags.fail("cannot append to --peers-csv " + peers_csv);
    }
  }
  for (int64_t& bytes : sizes) {
    bytes = bytes / kRowBytes * kRowBytes;
  }
  if (sizes.empty() && peers_csv.empty()) {
    // Per peer at H = 7168 bf16, K = 8, 8 experts a rank, 4 ranks: the
    // dispatch (tokens with picks on the peer) and the combine (picks) at
    // T = 128, then the dispatch at T = 4096 (119, 256 and 3810 rows).
    const PeerRows small = peerRows(128, 8, 8, 4);
    sizes = {small.dispatch * kRowBytes, small.combine * kRowBytes,
             peerRows(4096, 8, 8, 4).dispatch * kRowBytes};
  }
  int n = 0;
  const cudaError_t count_status = cudaGetDeviceCount(&n);
  if (count_status != cudaSuccess) {
    // Without a driver (a machine with no GPU) the runtime says the driver
    // is too old, which reads as if one were there.
    std::printf(
        "bench_nvlink_push: needs at least 2 GPUs, found none "
        "(cudaGetDeviceCount: %s%s)\n",
        cudaGetErrorString(count_status),
        count_status == cudaErrorInsufficientDriver
            ? "; also what it says where no NVIDIA driver is installed"
            : "");
    return 0;
  }
  n = std::min(n, kMaxGpus);
  if (n < 2) {
    std::printf("bench_nvlink_push: needs at least 2 GPUs, found %d\n", n);
    return 0;
  }
  if (!peers_csv.empty() && topk > local_experts * n) {
    return flags.fail(
        hostfuse::cli::topkExceedsExperts(topk, local_experts, n));
  }
  std::vector<PeerRows> peer_rows;
  for (const int64_t tokens : peer_tokens) {
    if (peers_csv.empty()) {
      break;
    }
    peer_rows.push_back(peerRows(tokens, topk, local_experts, n));
    for (const int64_t rows :
         {peer_rows.back().dispatch, peer_rows.back().combine}) {
      if (rows > 0 && std::find(sizes.begin(), sizes.end(), rows * kRowBytes) ==
                          sizes.end()) {
        sizes.push_back(rows * kRowBytes);
      }
    }
  }
  if (sizes.empty()) {
    std::printf("bench_nvlink_push: no bytes to send at these --tokens\n");
    return 0;
  }
  cudaDeviceProp properties;
  CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<Gpu> gpus(n);
  const int64_t most = *std::max_element(sizes.begin(), sizes.end());
  for (int g = 0; g < n; ++g) {
    CHECK_CUDA(cudaSetDevice(g));
    for (int peer = 0; peer < n; ++peer) {
      if (peer != g) {
        const cudaError_t status = cudaDeviceEnablePeerAccess(peer, 0);
        if (status != cudaSuccess &&
            status != cudaErrorPeerAccessAlreadyEnabled) {
          CHECK_CUDA(status);
        }
      }
    }
    CHECK_CUDA(cudaMalloc(&gpus[g].recv, n * most));
    CHECK_CUDA(cudaMalloc(&gpus[g].send, most));
    CHECK_CUDA(cudaMemset(gpus[g].send, g + 1, most));
    CHECK_CUDA(
        cudaMalloc(&gpus[g].times, sizeof(unsigned long long) * 2 * sms));
    CHECK_CUDA(cudaMalloc(&gpus[g].release, sizeof(unsigned)));
    CHECK_CUDA(cudaMemset(gpus[g].release, 0, sizeof(unsigned)));
    CHECK_CUDA(
        cudaStreamCreateWithFlags(&gpus[g].stream, cudaStreamNonBlocking));
  }
  int* go = nullptr;
  CHECK_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&go), sizeof(int),
                           cudaHostAllocMapped | cudaHostAllocPortable));
  int* go_device = nullptr;
  CHECK_CUDA(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&go_device), go, 0));
  std::printf("%d GPUs, %d SMs each; all GPUs to all peers at once\n", n, sms);
  std::printf("%12s  %-6s  %14s  %9s  %10s\n", "bytes/peer", "mode",
              "blocks/peer", "time us", "GB/s/GPU");
  const int peers = n - 1;
  std::vector<std::pair<int64_t, double>> best;  // bytes, best push time
  for (const int64_t bytes : sizes) {
    best.emplace_back(bytes, std::numeric_limits<double>::infinity());
    for (const int mode : {kRows, kStride, kPull}) {
      for (const int per_peer : {2, 4, 8, 16, 32, sms / peers}) {
        if (per_peer * peers > sms || per_peer < 1) {
          continue;
        }
        const double us = measure(gpus, go, go_device, bytes, mode, per_peer);
        if (mode != kPull) {
          best.back().second = std::min(best.back().second, us);
        }
        std::printf("%12lld  %-6s  %14d  %9.1f  %10.1f\n",
                    static_cast<long long>(bytes), kModeNames[mode], per_peer,
                    us, peers * bytes / us / 1e3);
        std::fflush(stdout);
      }
    }
  }
  if (!peers_csv.empty()) {
    if (!appendFloorRows(peers_csv, properties.name, n, topk, local_experts,
                         peer_rows, best)) {
      std::fprintf(stderr, "bench_nvlink_push: cannot append to %s\n",
                   peers_csv.c_str());
      return 1;
    }
    std::printf("appended the NVLink floor rows to %s\n", peers_csv.c_str());
  }
  return 0;
}
