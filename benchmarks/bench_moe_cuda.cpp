// Benchmark of MoE dispatch and combine: the cuda backend (eager and
// CUDA-graph replayed) against the collective backend (NCCL alltoall_base,
// eager), on the same inputs in the same run. bf16 rows, H = 7168, K = 8,
// 8 experts per rank, uniform random routing.
//
//   tools/run_cuda_moe_bench.sh N [T ...] [--sweep] [--profile]
//   (default T: 128 4096; --tokens T1,T2,... says the same; --help lists
//   the flags)
// which runs build/bench_moe_cuda under
//   torchrun --no-python --standalone --nproc-per-node=N
// (tools/launch.sh N build/bench_moe_cuda ... works too).
//
// Reported per configuration (rank 0 prints; times are the slowest rank's):
//   time        median over blocks of back-to-back calls of the mean time
//               per call, from CUDA events on the current stream (back-to-
//               back calls keep the ranks in step, as in a model; each block
//               starts after a host barrier). The collective backend copies
//               its counts to the host in every call; that wait is inside
//               the block, so its time is end to end.
//   phys GB/s   bytes that leave each GPU / time, averaged over GPUs.
//               cuda: dispatch sends one row per (token, remote rank) + 16
//               bytes of metadata per remote pick; combine one row per
//               remote pick. collective: rows it sends to other ranks (one
//               per remote pick, both ways) x H x 2; its per-row metadata
//               and the count exchange are not counted.
//   logic GB/s  every delivered (token, rank) row, local ones included,
//               x H x 2 bytes / time, averaged over GPUs (the same bytes
//               for both backends)
//   vs NCCL     collective time / this row's time (> 1: faster than NCCL)
// and whether the cuda backend's outputs (dispatched rows, combined tokens
// in both combine modes) equal the collective's bit for bit on every rank;
// the exit status is 1 if not. "combine per_rank" rows are the
// reduce=per_rank combine (docs/moe.md, "Combine modes"), which sends one
// row per (token, remote rank); the cuda one is timed graph-replayed only.
// "dispatch fp8" rows dispatch with quantize=fp8_e4m3 (a workspace of
// their own, graph-replayed; the collective's eager), and the cuda rows and
// scales are checked against the collective's bit for bit. After each T's
// table, one line per low-latency target of that T (4 x H200; graph
// replay) with this run's value, "met" or "NOT met" on 4 GPUs.
// "dispatch staged" rows (more than one rank) dispatch with the staged push
// (CudaMoeConfig::staged_push, docs/moe_cuda.md; a workspace of their own,
// graph-replayed), checked against the collective's rows bit for bit.
//
// --sweep adds, after the table, one line per setting of CudaMoeConfig's
// blocks and push_blocks for every T, graph
// replay only, each setting with its own workspace.
//
// --profile adds, per T, the kernels' per-phase timing (CudaMoeConfig::
// profile, a workspace of its own): rank 0's phase table for the last of
// back-to-back graph replays of dispatch+combine, every rank's kernel spans,
// the gap between the dispatch's last block exit and the combine's first
// block entry (same GPU clock), and the per-call time of back-to-back
// replays of each op alone (CUDA events) against its kernel span.
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/comm/symmetric_memory.h>
#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>
#include <hostfuse/multidevice/moe/cuda/workspace.h>
#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>
#include "../examples/cli_flags.h"
#include "event_timer.h"

namespace hostfuse {
namespace {

constexpr int64_t kHidden = 7168;
constexpr int64_t kTopK = 8;
constexpr int64_t kExpertsPerRank = 8;
constexpr int kBlocks = 21;       // timed blocks; the median is reported
constexpr int kSweepBlocks = 11;  // the same, per sweep setting

// NCCL's watchdog thread queries its events while we capture; a global
// capture would refuse that and invalidate the graph (docs/cuda_graphs.md).
constexpr auto kCaptureMode = cuda::CudaGraph::CaptureMode::ThreadLocal;

int environmentInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

struct Traffic {
  double physical_dispatch = 0;  // bytes leaving this GPU, cuda backend
  double physical_combine = 0;
  double physical_combine_per_rank = 0;  // reduce=per_rank
  double dispatch_meta = 0;  // of physical_dispatch: 24 B per remote pick
  double token_rows = 0;     // (token, remote rank) rows x H x 2: the
                             // collective's per_rank combine
  double logical = 0;        // (token, rank) rows x H x 2
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
        traffic.physical_dispatch += 24;  // RowMeta body + epoch
        traffic.dispatch_meta += 24;
        traffic.physical_combine += row;
      }
    }
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    for (const int64_t dst : ranks) {
      traffic.logical += row;
      traffic.physical_dispatch += dst != rank ? row : 0;
      traffic.physical_combine += dst != rank ? 8 : 0;  // arrival epoch
      traffic.physical_combine_per_rank += dst != rank ? row + 8 : 0;
      traffic.token_rows += dst != rank ? row : 0;
    }
  }
  return traffic;
}

// Rows of `counts` [R] (on any device) other than `rank`'s, x H x 2 bytes.
double offRankBytes(const at::Tensor& counts, int rank) {
  const at::Tensor host = counts.to(at::kCPU, at::kLong);
  int64_t rows = 0;
  for (int64_t r = 0; r < host.numel(); ++r) {
    rows += r != rank ? host.data_ptr<int64_t>()[r] : 0;
  }
  return static_cast<double>(rows) * kHidden * 2.0;
}

class Bench {
 public:
  Bench(int rank, int world, int device, c10::intrusive_ptr<c10d::Store> store)
      : rank_(rank), world_(world), device_(device), store_(store) {}

  // Mean microseconds per call of `fn`, median over `blocks` blocks of
  // `per_block` calls, as the slowest rank saw it. `key` must be new.
  double time(const std::string& key, int per_block,
              const std::function<void()>& fn, int blocks = kBlocks) {
    const cudaStream_t stream = cuda::currentStream(device_);
    for (int i = 0; i < std::max(3, per_block / 4); ++i) {
      fn();
    }
    std::vector<double> means;
    for (int block = 0; block < blocks; ++block) {
      HF_CUDA_CHECK(cudaDeviceSynchronize());
      storeBarrier(*store_, toString(key, "/", block), world_);
      means.push_back(bench::eventTimeUs(stream, per_block, fn));
    }
    std::nth_element(means.begin(), means.begin() + blocks / 2, means.end());
    return maxOverRanks(key, means[blocks / 2]);
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

  // Waits for the device and every rank (before freeing a workspace).
  void barrier(const std::string& key) {
    HF_CUDA_CHECK(cudaDeviceSynchronize());
    storeBarrier(*store_, key, world_);
  }

  c10::intrusive_ptr<c10d::Store> store() const { return store_; }

  // `value` of every rank, in rank order. `key` must be new.
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

 private:
  int rank_;
  int world_;
  int device_;
  c10::intrusive_ptr<c10d::Store> store_;
};

// The mean of every rank's traffic; `id` must be new.
Traffic meanOverRanks(Bench& bench, const std::string& id, const Traffic& mine,
                      int world) {
  Traffic mean;
  mean.physical_dispatch =
      bench.sumOverRanks(id + "/pd", mine.physical_dispatch) / world;
  mean.physical_combine =
      bench.sumOverRanks(id + "/pc", mine.physical_combine) / world;
  mean.physical_combine_per_rank =
      bench.sumOverRanks(id + "/pcr", mine.physical_combine_per_rank) / world;
  mean.token_rows = bench.sumOverRanks(id + "/tr", mine.token_rows) / world;
  mean.dispatch_meta =
      bench.sumOverRanks(id + "/dm", mine.dispatch_meta) / world;
  mean.logical = bench.sumOverRanks(id + "/l", mine.logical) / world;
  return mean;
}

// One rank's inputs for T tokens; the same for every backend and setting.
struct Inputs {
  at::Tensor idx_cpu;  // [T, K] i64
  at::Tensor x;        // [T, H] bf16, device
  at::Tensor idx;      // [T, K] i64, device
  at::Tensor weights;  // [T, K] fp32, device
  Traffic traffic;     // this rank's
};

Inputs makeInputs(int64_t tokens, int rank, int world, const at::Device& gpu) {
  const int64_t experts = kExpertsPerRank * world;
  at::Generator gen = at::detail::createCPUGenerator(1234 + rank);
  Inputs in;
  in.idx_cpu = at::rand({tokens, experts}, gen)
                   .argsort(/*dim=*/int64_t{1})
                   .slice(1, 0, kTopK)
                   .contiguous();
  in.x = at::randn({tokens, kHidden}, gen).to(at::kBFloat16).to(gpu);
  in.idx = in.idx_cpu.to(gpu);
  in.weights = at::rand({tokens, kTopK}, gen).to(gpu);
  in.traffic = countTraffic(in.idx_cpu, rank, kExpertsPerRank);
  return in;
}

CudaMoeConfig makeConfig(int rank, int world, int device, int64_t tokens,
                         const std::string& tag) {
  CudaMoeConfig config;
  config.rank = rank;
  config.world_size = world;
  config.device = device;
  config.num_experts = kExpertsPerRank * world;
  config.max_tokens = tokens;
  config.hidden = kHidden;
  config.topk = kTopK;
  config.dtype = at::kBFloat16;
  config.tag = tag;
  config.check_each_call = false;
  return config;
}

int callsPerBlock(int64_t tokens) { return tokens <= 512 ? 200 : 20; }

// The cuda backend's reduce=per_rank combine of `result`, weighted with
// the rows' weights.
at::Tensor combinePerRank(CudaMoeWorkspace& workspace,
                          const CudaDispatchResult& result) {
  return workspace.combine(result.recv_x, result, result.recv_weights, -1,
                           at::Tensor(), MoeCombineReduce::PerRank);
}

// The collective backend's reduce=per_rank combine.
at::Tensor collectivePerRank(const MoeDispatchOutput& dispatched,
                             int64_t tokens, int64_t experts,
                             Communicator& comm) {
  MoeCombineArgs args;
  args.expert_out = dispatched.recv_x;
  args.layout = dispatched.layout;
  args.reduce = MoeCombineReduce::PerRank;
  args.recv_weights = dispatched.recv_weights;
  args.num_tokens = tokens;
  args.num_experts = experts;
  return combineCollective(args, comm);
}

// The ops' graphs on one workspace (both ops are safe to repeat
// alone). Captured in this order so that combine's handle is the latest
// dispatch's.
struct Graphs {
  cuda::CudaGraph dispatch;
  cuda::CudaGraph combine;
  cuda::CudaGraph combine_per_rank;
  cuda::CudaGraph both;

  Graphs(CudaMoeWorkspace& workspace, const Inputs& in) {
    CudaDispatchResult result;
    dispatch.captureBegin(kCaptureMode);
    result = workspace.dispatch(in.x, in.idx, in.weights);
    dispatch.captureEnd();
    combine.captureBegin(kCaptureMode);
    workspace.combine(result.recv_x, result, in.weights);
    combine.captureEnd();
    combine_per_rank.captureBegin(kCaptureMode);
    combinePerRank(workspace, result);
    combine_per_rank.captureEnd();
    both.captureBegin(kCaptureMode);
    result = workspace.dispatch(in.x, in.idx, in.weights);
    workspace.combine(result.recv_x, result, in.weights);
    both.captureEnd();
  }
};

struct Row {
  const char* op;
  const char* backend;
  const char* mode;
  double us;
  double physical;  // bytes, mean over GPUs
};

void printHeader(int world) {
  std::printf(
      "MoE dispatch/combine: %d ranks, H = %lld bf16, K = %lld, %lld experts "
      "per rank, uniform random routing\n"
      "  time us    median over %d blocks of the mean per call of "
      "back-to-back calls, slowest rank (CUDA events; the collective's host "
      "syncs included)\n"
      "  phys GB/s  bytes leaving each GPU / time, mean over GPUs; cuda: "
      "dispatch one row per (token, remote rank) + 24 B of metadata per "
      "remote pick, combine one row per remote pick + 8 B per (token, remote "
      "rank); collective: rows sent off-rank x H x 2\n"
      "  logic GB/s delivered (token, rank) rows, local included, x H x 2 / "
      "time, mean over GPUs (same bytes for both backends)\n"
      "  vs NCCL    collective time / this time (> 1: faster than NCCL; "
      "target >= 1.3x at T = 4096)\n",
      world, static_cast<long long>(kHidden), static_cast<long long>(kTopK),
      static_cast<long long>(kExpertsPerRank), kBlocks);
  std::printf("%6s  %-16s %-10s %-5s %10s %10s %11s %8s\n", "T", "op",
              "backend", "mode", "time us", "phys GB/s", "logic GB/s",
              "vs NCCL");
}

// The low-latency targets (graph replay, 4 x H200, H = 7168, K = 8, 32
// experts): at T = 128 a time in us, at T = 4096 physical GB/s per GPU.
struct Target {
  int64_t tokens;
  const char* op;
  double us;    // at most; 0: none
  double gbps;  // at least; 0: none
};
constexpr Target kTargets[] = {
    {128, "dispatch", 25, 0},         {128, "combine", 40, 0},
    {128, "combine per_rank", 25, 0}, {128, "dispatch fp8", 18, 0},
    {128, "dispatch staged", 25, 0},  {4096, "dispatch", 0, 330},
    {4096, "combine", 0, 330},
};

// One line per target of T next to this run's graph-replay row; the
// targets are for 4 GPUs, so other world sizes say so instead of met/not.
void printTargets(const std::vector<Row>& rows, int64_t tokens, int world) {
  for (const Target& target : kTargets) {
    if (target.tokens != tokens) {
      continue;
    }
    for (const Row& row : rows) {
      if (std::strcmp(row.mode, "graph") != 0 ||
          std::strcmp(row.op, target.op) != 0) {
        continue;
      }
      const double gbps = row.physical / (row.us * 1e3);
      const bool met =
          target.us > 0 ? row.us <= target.us : gbps >= target.gbps;
      char want[32];
      char got[32];
      if (target.us > 0) {
        std::snprintf(want, sizeof(want), "<= %.0f us", target.us);
        std::snprintf(got, sizeof(got), "%.1f us", row.us);
      } else {
        std::snprintf(want, sizeof(want), ">= %.0f GB/s", target.gbps);
        std::snprintf(got, sizeof(got), "%.1f GB/s", gbps);
      }
      std::printf("%6lld  target %-16s %-13s (4 x H200): %s, %s\n",
                  static_cast<long long>(tokens), row.op, want, got,
                  world != 4 ? "not comparable (this run is not 4 GPUs)"
                  : met      ? "met"
                             : "NOT met");
    }
  }
}

// Runs both backends for T tokens; prints the rows (rank 0). Returns
// whether the cuda backend's outputs equal the collective's on every rank;
// `blocks` and `push_blocks` are set to the workspace's (the defaults).
bool runTokens(Bench& bench, Communicator& comm, int rank, int world,
               int device, const at::Device& gpu, int64_t tokens, int& blocks,
               int& push_blocks) {
  const int64_t experts = kExpertsPerRank * world;
  const Inputs in = makeInputs(tokens, rank, world, gpu);
  const std::string id = toString("T", tokens);
  const Traffic traffic = meanOverRanks(bench, id, in.traffic, world);
  const int per_block = callsPerBlock(tokens);

  CudaMoeWorkspace workspace(
      bench.store(),
      makeConfig(rank, world, device, tokens, toString("bench/T", tokens)));
  blocks = workspace.blocks();
  push_blocks = workspace.pushBlocks();

  // Same inputs through both backends; the experts are the identity.
  CudaDispatchResult result = workspace.dispatch(in.x, in.idx, in.weights);
  const int64_t cuda_rows = result.recv_expert_counts.sum().item<int64_t>();
  const at::Tensor cuda_recv = result.recv_x.narrow(0, 0, cuda_rows).clone();
  const at::Tensor cuda_combined =
      workspace.combine(result.recv_x, result, in.weights);
  const at::Tensor cuda_per_rank = combinePerRank(workspace, result);
  workspace.checkStatus();
  MoeDispatchOutput collective =
      dispatchCollective(in.x, in.idx, in.weights, experts, comm);
  const at::Tensor collective_combined = combineCollective(
      collective.recv_x, collective.layout, in.weights, tokens, experts, comm);
  const at::Tensor collective_per_rank =
      collectivePerRank(collective, tokens, experts, comm);
  const bool same_here = at::equal(cuda_recv, collective.recv_x) &&
                         at::equal(cuda_combined, collective_combined) &&
                         at::equal(cuda_per_rank, collective_per_rank);
  bool fp8_identical = false;
  bool staged_identical = true;
  const bool identical =
      bench.sumOverRanks(id + "/same", same_here ? 1 : 0) == world;
  // What the collective sends off-rank: its dispatch rows to other ranks,
  // and its combine rows back to the ranks they came from.
  const double collective_dispatch =
      bench.sumOverRanks(
          id + "/cpd", offRankBytes(collective.layout.n_tokens_to_rank, rank)) /
      world;
  const double collective_combine =
      bench.sumOverRanks(
          id + "/cpc",
          offRankBytes(collective.layout.n_tokens_from_rank, rank)) /
      world;

  std::vector<Row> rows;
  // cuda, eager.
  rows.push_back({"dispatch", "cuda", "eager",
                  bench.time(id + "/de", per_block,
                             [&] {
                               result =
                                   workspace.dispatch(in.x, in.idx, in.weights);
                             }),
                  traffic.physical_dispatch});
  rows.push_back(
      {"combine", "cuda", "eager",
       bench.time(
           id + "/ce", per_block,
           [&] { workspace.combine(result.recv_x, result, in.weights); }),
       traffic.physical_combine});
  rows.push_back(
      {"dispatch+combine", "cuda", "eager",
       bench.time(id + "/dce", per_block,
                  [&] {
                    result = workspace.dispatch(in.x, in.idx, in.weights);
                    workspace.combine(result.recv_x, result, in.weights);
                  }),
       traffic.physical_dispatch + traffic.physical_combine});
  workspace.checkStatus();
  // cuda, graph-replayed.
  {
    Graphs graphs(workspace, in);
    rows.push_back(
        {"dispatch", "cuda", "graph",
         bench.time(id + "/dg", per_block, [&] { graphs.dispatch.replay(); }),
         traffic.physical_dispatch});
    rows.push_back(
        {"combine", "cuda", "graph",
         bench.time(id + "/cg", per_block, [&] { graphs.combine.replay(); }),
         traffic.physical_combine});
    rows.push_back({"combine per_rank", "cuda", "graph",
                    bench.time(id + "/crg", per_block,
                               [&] { graphs.combine_per_rank.replay(); }),
                    traffic.physical_combine_per_rank});
    rows.push_back(
        {"dispatch+combine", "cuda", "graph",
         bench.time(id + "/dcg", per_block, [&] { graphs.both.replay(); }),
         traffic.physical_dispatch + traffic.physical_combine});
    workspace.checkStatus();
  }
  // collective (NCCL), eager: it cannot be captured (host sync for counts).
  rows.push_back({"dispatch", "collective", "eager",
                  bench.time(id + "/dn", per_block,
                             [&] {
                               collective = dispatchCollective(
                                   in.x, in.idx, in.weights, experts, comm);
                             }),
                  collective_dispatch});
  rows.push_back({"combine", "collective", "eager",
                  bench.time(id + "/cn", per_block,
                             [&] {
                               combineCollective(collective.recv_x,
                                                 collective.layout, in.weights,
                                                 tokens, experts, comm);
                             }),
                  collective_combine});
  rows.push_back(
      {"combine per_rank", "collective", "eager",
       bench.time(
           id + "/crn", per_block,
           [&] { collectivePerRank(collective, tokens, experts, comm); }),
       traffic.token_rows});
  rows.push_back({"dispatch+combine", "collective", "eager",
                  bench.time(id + "/dcn", per_block,
                             [&] {
                               collective = dispatchCollective(
                                   in.x, in.idx, in.weights, experts, comm);
                               combineCollective(collective.recv_x,
                                                 collective.layout, in.weights,
                                                 tokens, experts, comm);
                             }),
                  collective_dispatch + collective_combine});
  // fp8 dispatch: its own workspace; rows checked against the collective
  // backend's fp8 dispatch.
  {
    CudaMoeConfig config = makeConfig(rank, world, device, tokens,
                                      toString("bench/fp8/T", tokens));
    config.fp8_dispatch = true;
    CudaMoeWorkspace fp8(bench.store(), config);
    CudaDispatchResult quantized = fp8.dispatch(in.x, in.idx, in.weights);
    const int64_t valid = quantized.recv_expert_counts.sum().item<int64_t>();
    const MoeDispatchOutput expected = dispatchCollective(
        in.x, in.idx, in.weights, experts, comm, MoeDispatchQuant::Fp8E4M3);
    fp8_identical =
        bench.sumOverRanks(
            id + "/fp8same",
            at::equal(quantized.recv_x.narrow(0, 0, valid)
                          .contiguous()
                          .view(at::kByte),
                      expected.recv_x.view(at::kByte)) &&
                    at::equal(quantized.recv_scales.narrow(0, 0, valid),
                              expected.recv_scales)
                ? 1
                : 0) == world;
    cuda::CudaGraph graph;
    graph.captureBegin(kCaptureMode);
    fp8.dispatch(in.x, in.idx, in.weights);
    graph.captureEnd();
    // Packed rows instead of bf16 ones; the metadata is the same.
    const double ratio =
        static_cast<double>(moe::fp8PackedRowBytes(kHidden)) / (kHidden * 2.0);
    rows.push_back(
        {"dispatch fp8", "cuda", "graph",
         bench.time(id + "/dfg", per_block, [&] { graph.replay(); }),
         (traffic.physical_dispatch - traffic.dispatch_meta) * ratio +
             traffic.dispatch_meta});
    fp8.checkStatus();
    rows.push_back({"dispatch fp8", "collective", "eager",
                    bench.time(id + "/dfn", per_block,
                               [&] {
                                 dispatchCollective(in.x, in.idx, in.weights,
                                                    experts, comm,
                                                    MoeDispatchQuant::Fp8E4M3);
                               }),
                    collective_dispatch * ratio});
    bench.barrier(id + "/fp8done");
  }
  // Staged push: its own workspace; rows and provenance checked against the
  // collective's. One rank has no peer to stage for.
  if (world > 1) {
    CudaMoeConfig config = makeConfig(rank, world, device, tokens,
                                      toString("bench/staged/T", tokens));
    config.staged_push = true;
    CudaMoeWorkspace staged(bench.store(), config);
    CudaDispatchResult sent = staged.dispatch(in.x, in.idx, in.weights);
    const int64_t valid = sent.recv_expert_counts.sum().item<int64_t>();
    const at::Tensor combined = staged.combine(sent.recv_x, sent, in.weights);
    staged_identical =
        bench.sumOverRanks(
            id + "/stagedsame",
            at::equal(sent.recv_x.narrow(0, 0, valid), collective.recv_x) &&
                    at::equal(combined, collective_combined)
                ? 1
                : 0) == world;
    cuda::CudaGraph graph;
    graph.captureBegin(kCaptureMode);
    staged.dispatch(in.x, in.idx, in.weights);
    graph.captureEnd();
    rows.push_back({"dispatch staged", "cuda", "graph",
                    bench.time(id + "/dsg", per_block, [&] { graph.replay(); }),
                    traffic.physical_dispatch});
    staged.checkStatus();
    bench.barrier(id + "/stageddone");
  }
  bench.barrier(id + "/done");  // no rank frees the workspace early

  if (rank == 0) {
    auto collectiveTime = [&](const char* op) {
      for (const Row& row : rows) {
        if (std::strcmp(row.backend, "collective") == 0 &&
            std::strcmp(row.op, op) == 0) {
          return row.us;
        }
      }
      return -1.0;
    };
    for (const Row& row : rows) {
      char ratio[16] = "";
      // Rows without a collective peer (fp8 dispatch) get no ratio.
      if (std::strcmp(row.backend, "cuda") == 0 && collectiveTime(row.op) > 0) {
        std::snprintf(ratio, sizeof(ratio), "%.2fx",
                      collectiveTime(row.op) / row.us);
      }
      std::printf("%6lld  %-16s %-10s %-5s %10.1f %10.1f %11.1f %8s\n",
                  static_cast<long long>(tokens), row.op, row.backend, row.mode,
                  row.us, row.physical / (row.us * 1e3),
                  traffic.logical / (row.us * 1e3), ratio);
    }
    auto graphRatio = [&](const char* op) {
      for (const Row& row : rows) {
        if (std::strcmp(row.mode, "graph") == 0 &&
            std::strcmp(row.op, op) == 0) {
          return collectiveTime(op) / row.us;
        }
      }
      return 0.0;
    };
    std::printf(
        "%6lld  cuda graph vs NCCL: dispatch %.2fx, combine %.2fx, "
        "dispatch+combine %.2fx; outputs identical: %s\n",
        static_cast<long long>(tokens), graphRatio("dispatch"),
        graphRatio("combine"), graphRatio("dispatch+combine"),
        identical ? "yes" : "no");
    std::printf(
        "%6lld  fp8 dispatch rows and scales identical to the "
        "collective's: %s\n",
        static_cast<long long>(tokens), fp8_identical ? "yes" : "no");
    if (world > 1) {
      std::printf(
          "%6lld  staged-push dispatch rows and combined tokens identical to "
          "the collective's: %s\n",
          static_cast<long long>(tokens), staged_identical ? "yes" : "no");
    }
    printTargets(rows, tokens, world);
    std::fflush(stdout);
  }
  return identical && fp8_identical && staged_identical;
}

struct SweepSetting {
  int blocks;
  int push_blocks;
};

// The settings: blocks all that fit (`all_blocks`, what blocks = 0 gives)
// and half of them; push blocks 8, 16, 24, 32 and 40 per peer, clamped as
// the workspace does (at least one per peer, at least one local block;
// settings that clamp to one already listed are dropped).
std::vector<SweepSetting> sweepSettings(int all_blocks, int world) {
  std::vector<SweepSetting> settings;
  const int peers = world - 1;
  for (const int blocks : {all_blocks, std::max(world, all_blocks / 2)}) {
    for (const int per_peer : {8, 16, 24, 32, 40}) {
      const int push =
          peers == 0 ? 0
                     : std::clamp(per_peer, 1, (blocks - 1) / peers) * peers;
      const SweepSetting setting{blocks, push};
      const bool listed = std::any_of(
          settings.begin(), settings.end(), [&](const SweepSetting& s) {
            return s.blocks == setting.blocks &&
                   s.push_blocks == setting.push_blocks;
          });
      if (!listed) {
        settings.push_back(setting);
      }
    }
  }
  return settings;
}

// One line per setting and T, graph replay only; each setting has its own
// workspace (a collective construction, a tag of its own), freed before the
// next one is made.
void runSweep(Bench& bench, int rank, int world, int device,
              const at::Device& gpu, const std::vector<int64_t>& sizes,
              int all_blocks, int default_push) {
  if (rank == 0) {
    std::printf(
        "\nsweep: graph replay, median over %d blocks, slowest rank; blocks "
        "per kernel (default: all that fit); push = blocks that push rows to "
        "peers, the same number per peer (default 32 x (R - 1), below "
        "blocks); * = the defaults (no HOSTFUSE_MOE_* overrides)\n",
        kSweepBlocks);
    std::printf("%6s %6s %7s  %11s %9s  %11s %9s\n", "T", "blocks", "push",
                "dispatch us", "phys GB/s", "combine us", "phys GB/s");
  }
  for (const int64_t tokens : sizes) {
    const Inputs in = makeInputs(tokens, rank, world, gpu);
    const std::string id = toString("sweep/T", tokens);
    const Traffic traffic = meanOverRanks(bench, id, in.traffic, world);
    const int per_block = callsPerBlock(tokens);
    for (const SweepSetting& setting : sweepSettings(all_blocks, world)) {
      const std::string key =
          toString(id, "/b", setting.blocks, "/p", setting.push_blocks);
      CudaMoeConfig config =
          makeConfig(rank, world, device, tokens, "bench/" + key);
      config.blocks = setting.blocks;
      config.push_blocks = std::max(1, setting.push_blocks);
      CudaMoeWorkspace workspace(bench.store(), config);
      workspace.dispatch(in.x, in.idx, in.weights);
      workspace.checkStatus();
      double dispatch_us = 0;
      double combine_us = 0;
      {
        Graphs graphs(workspace, in);
        dispatch_us = bench.time(
            key + "/d", per_block, [&] { graphs.dispatch.replay(); },
            kSweepBlocks);
        combine_us = bench.time(
            key + "/c", per_block, [&] { graphs.combine.replay(); },
            kSweepBlocks);
        workspace.checkStatus();
      }
      bench.barrier(key + "/done");  // no rank frees the workspace early
      if (rank == 0) {
        const bool is_default = workspace.blocks() == all_blocks &&
                                workspace.pushBlocks() == default_push;
        std::printf("%6lld %6d %5d%-2s  %11.1f %9.1f  %11.1f %9.1f\n",
                    static_cast<long long>(tokens), workspace.blocks(),
                    workspace.pushBlocks(), is_default ? " *" : "", dispatch_us,
                    traffic.physical_dispatch / (dispatch_us * 1e3), combine_us,
                    traffic.physical_combine / (combine_us * 1e3));
        std::fflush(stdout);
      }
    }
  }
}

// Mean microseconds per call of `per_block` back-to-back calls of `fn` on
// this rank (CUDA events), after a barrier.
double backToBack(Bench& bench, int device, const std::string& key,
                  int per_block, const std::function<void()>& fn) {
  bench.barrier(key);
  return bench::eventTimeUs(cuda::currentStream(device), per_block, fn);
}

// The kernels' phase timing per T (--profile), with a workspace of its own
// (profile on, distinct tag). Rank 0 prints.
void runProfile(Bench& bench, int rank, int world, int device,
                const at::Device& gpu, const std::vector<int64_t>& sizes) {
  constexpr int kCalls = 20;  // back-to-back calls before each reading
  for (const int64_t tokens : sizes) {
    const Inputs in = makeInputs(tokens, rank, world, gpu);
    const std::string id = toString("profile/T", tokens);
    CudaMoeConfig config =
        makeConfig(rank, world, device, tokens, "bench/" + id);
    config.profile = true;
    CudaMoeWorkspace workspace(bench.store(), config);
    CudaDispatchResult result = workspace.dispatch(in.x, in.idx, in.weights);
    workspace.combine(result.recv_x, result, in.weights);
    workspace.checkStatus();

    // Eager dispatch+combine, back to back.
    backToBack(bench, device, id + "/eager", kCalls, [&] {
      result = workspace.dispatch(in.x, in.idx, in.weights);
      workspace.combine(result.recv_x, result, in.weights);
    });
    const CudaMoeProfile eager = workspace.profileReport();
    workspace.checkStatus();

    CudaMoeProfile graph;
    double dispatch_call_us = 0;
    double dispatch_alone_span = 0;
    double combine_call_us = 0;
    double combine_alone_span = 0;
    {
      Graphs graphs(workspace, in);
      backToBack(bench, device, id + "/both", kCalls,
                 [&] { graphs.both.replay(); });
      graph = workspace.profileReport();
      dispatch_call_us = backToBack(bench, device, id + "/d", kCalls,
                                    [&] { graphs.dispatch.replay(); });
      dispatch_alone_span = workspace.profileReport().dispatch.span_us;
      combine_call_us = backToBack(bench, device, id + "/c", kCalls,
                                   [&] { graphs.combine.replay(); });
      combine_alone_span = workspace.profileReport().combine.span_us;
      workspace.checkStatus();
    }
    auto gap = [](const CudaMoeProfile& p) {
      return p.dispatch.epoch != 0 && p.combine.epoch != 0
                 ? (static_cast<double>(p.combine.entry_ns) -
                    static_cast<double>(p.dispatch.exit_ns)) /
                       1e3
                 : -1.0;
    };
    const std::vector<double> d_span =
        bench.gather(id + "/ds", graph.dispatch.span_us);
    const std::vector<double> c_span =
        bench.gather(id + "/cs", graph.combine.span_us);
    const std::vector<double> d_gap = bench.gather(id + "/gap", gap(graph));
    const std::vector<double> d_call =
        bench.gather(id + "/dcall", dispatch_call_us);
    const std::vector<double> d_alone =
        bench.gather(id + "/dalone", dispatch_alone_span);
    const std::vector<double> c_call =
        bench.gather(id + "/ccall", combine_call_us);
    const std::vector<double> c_alone =
        bench.gather(id + "/calone", combine_alone_span);
    bench.barrier(id + "/done");  // no rank frees the workspace early
    if (rank == 0) {
      std::printf(
          "\nprofile T = %lld: %%globaltimer per phase, last of %d "
          "back-to-back graph replays of dispatch+combine\n",
          static_cast<long long>(tokens), kCalls);
      std::printf("%s", graph.format().c_str());
      std::printf("  %-5s %10s %10s %14s %24s %24s\n", "rank", "dispatch",
                  "combine", "d exit->c in", "dispatch alone: call",
                  "combine alone: call");
      int slowest_dispatch = 0;
      int slowest_combine = 0;
      for (int r = 0; r < world; ++r) {
        slowest_dispatch =
            d_span[r] > d_span[slowest_dispatch] ? r : slowest_dispatch;
        slowest_combine =
            c_span[r] > c_span[slowest_combine] ? r : slowest_combine;
        std::printf(
            "  %-5d %7.1f us %7.1f us %11.1f us %9.1f us (span %5.1f) %9.1f "
            "us (span %5.1f)\n",
            r, d_span[r], c_span[r], d_gap[r], d_call[r], d_alone[r], c_call[r],
            c_alone[r]);
      }
      std::printf(
          "  slowest rank: dispatch span %.1f us (rank %d), combine span "
          "%.1f us (rank %d); span = last block exit - first block entry; "
          "call = events over %d back-to-back replays of the op alone, "
          "call - span = time outside the kernel\n",
          d_span[slowest_dispatch], slowest_dispatch, c_span[slowest_combine],
          slowest_combine, kCalls);
      std::printf(
          "  eager (rank 0, last of %d dispatch+combine): dispatch span %.1f "
          "us, combine span %.1f us, d exit->c in %.1f us\n",
          kCalls, eager.dispatch.span_us, eager.combine.span_us, gap(eager));
      std::fflush(stdout);
    }
  }
}

bool run(Communicator& comm, const std::vector<int64_t>& sizes, bool sweep,
         bool profile) {
  const int rank = static_cast<int>(comm.rank());
  const int world = static_cast<int>(comm.size());
  const int device = static_cast<int>(comm.device().index());
  Bench bench(rank, world, device,
              c10::make_intrusive<c10d::PrefixStore>("hostfuse/bench_moe_cuda",
                                                     comm.store()));
  cuda::StreamScope stream_scope(device);
  const at::Device gpu = comm.device();
  if (rank == 0) {
    printHeader(world);
  }
  bool identical = true;
  int all_blocks = 0;
  int default_push = 0;
  for (const int64_t tokens : sizes) {
    identical = runTokens(bench, comm, rank, world, device, gpu, tokens,
                          all_blocks, default_push) &&
                identical;
  }
  if (profile) {
    runProfile(bench, rank, world, device, gpu, sizes);
  }
  if (sweep) {
    runSweep(bench, rank, world, device, gpu, sizes, all_blocks, default_push);
  }
  return identical;
}

}  // namespace
}  // namespace hostfuse

int main(int argc, char** argv) {
  using namespace hostfuse;
  std::vector<int64_t> listed;  // T ...
  std::vector<int64_t> given;   // --tokens
  bool sweep = false;
  bool profile = false;
  cli::Flags flags(
      "bench_moe_cuda",
      "Benchmark of MoE dispatch and combine: the cuda backend (eager and "
      "CUDA-graph replayed) against the collective backend (NCCL, eager), "
      "on the same inputs in the same run; bf16 rows, H = 7168, K = 8, 8 "
      "experts per rank, uniform random routing. Rank 0 prints the slowest "
      "rank's times; exit status 1 if the backends' outputs differ. Needs "
      "one GPU per rank; without, it says so and exits 0.\n"
      "\n"
      "  tools/run_cuda_moe_bench.sh N [flags] [T ...]\n"
      "  tools/launch.sh N build/bench_moe_cuda [flags] [T ...]");
  flags.positionalIntegers("T", &listed, 1, cli::kMaxCount,
                           "tokens per rank, one table row each", "128 4096");
  flags.integerList("--tokens", "T1,T2,...", &given, 1, cli::kMaxCount,
                    "the same as T ...", "128,4096");
  flags.option("--sweep", &sweep,
               "adds one line per setting of CudaMoeConfig's blocks and "
               "push_blocks for every T (graph replay)");
  flags.option("--profile", &profile,
               "adds, per T, the kernels' per-phase timing on every rank");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  // Each T once: T names the store keys of its measurements.
  std::vector<int64_t> sizes;
  listed.insert(listed.end(), given.begin(), given.end());
  for (const int64_t tokens : listed) {
    if (std::find(sizes.begin(), sizes.end(), tokens) == sizes.end()) {
      sizes.push_back(tokens);
    }
  }
  if (sizes.empty()) {
    sizes = {128, 4096};
  }
  const int world = environmentInt("WORLD_SIZE", 1);
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
  const int rank = environmentInt("RANK", 0);
  bool identical = false;
  try {
    // Makes GPU <local rank> the current device.
    Communicator& comm = Communicator::getInstance();
    identical = run(comm, sizes, sweep, profile);
    comm.shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moe_cuda rank %d: %s\n", rank, e.what());
    return 1;
  }
  if (!identical) {
    std::fprintf(stderr,
                 "bench_moe_cuda rank %d: the cuda backend's outputs differ "
                 "from the collective backend's\n",
                 rank);
    return 1;
  }
  return 0;
}
