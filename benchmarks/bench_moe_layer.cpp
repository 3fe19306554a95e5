// Benchmark of a whole MoE layer (host_ir/moe_layer.h): router (fp32
// linear, softmax, top-k), MoeDispatch, grouped GEMMs for gate and up, the
// silu(gate) * up fusion, the down grouped GEMM, MoeCombine. Three ways, in
// one run, for every T:
//   eager-collective  HostIrEvaluator, MoeBackend::Collective (NCCL; counts
//                     go through the host)
//   eager-cuda        the GraphRunner's evaluator, MoeBackend::Cuda
//   graph replay      GraphRunner::run, MoeBackend::Cuda: the layer as one
//                     CUDA graph (inputs copied in: x; the router and expert
//                     weights are persistent inputs)
// Default shape: T = 128 and 4096 tokens per rank, H = 7168, I = 2048
// (intermediate size of an expert), 8 experts per rank, K = 8, bf16.
//
//   tools/launch.sh 4 build/bench_moe_layer [--tokens 128,4096] [--hidden H]
//       [--intermediate I] [--experts-per-rank L] [--topk K] [--steps N]
//       [--blocks B] [--link-gbps G] [--exprs] [--fp8]
//       [--reduce auto|per_pick|per_rank] [--gate-up fused|separate]
//       [--activation auto|fusion|epilogue] [--csv FILE]
//
// Modes: by default the fastest known (useFastestModes, host_ir/moe_layer.h):
// gate and up as one grouped GEMM with silu(gate) * up in its epilogue
// (MoeLayerConfig::fused_activation), and the per_rank combine with more
// than one rank; --gate-up, --activation and --reduce override them, --fp8
// adds fp8 dispatch.
//
// Reported: the median over B blocks of the mean time per step of N
// back-to-back steps (each block starts after a barrier; the time of a
// block is its slowest rank's), and the ratios to eager-collective. The
// cuda backend's capacity is the worst case R * T * min(K, L) rows; the
// activation fusion computes only the rows the experts' counts cover (a
// row-limited kernel, docs/cuda_graphs.md).
//
// Then, per T, the graph-replayed layer stage by stage (router, dispatch,
// grouped GEMM 1 for gate and up, the fusion, grouped GEMM 2, combine):
// CUDA events recorded at the stage boundaries inside the captured graph
// (HostIrEvaluator::setExprObserver), the median over replays of each
// stage's time, the slowest rank's, next to the stage's floor: the largest
// of its HBM bytes / the device-to-device copy rate, its FLOPs / the bf16
// GEMM rate (both measured in the same run, on this GPU) and its off-rank
// bytes / --link-gbps. Rows are this rank's real ones (from the routing);
// stageWork says which bytes count.
// --csv FILE appends every stage's time and floor per T (rank 0; the
// columns of tools/plot_layer.py, which plots them). Without one GPU per
// rank it says so and exits 0. --help lists the flags.
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/utils/torch_cuda.h>
#include "../examples/cli_flags.h"
#include "peers/peers_csv.h"

namespace {

using namespace hostfuse;

struct Args {
  std::vector<int64_t> tokens = {128, 4096};
  int64_t hidden = 7168;
  int64_t intermediate = 2048;
  int64_t local_experts = 8;
  int64_t topk = 0;  // 0: 8, at most the number of experts
  int steps = 0;     // 0: 20 for T <= 1024, else 5
  int blocks = 7;
  int64_t link_gbps = 330;
  bool exprs = false;
  bool fp8 = false;
  MoeLayerModeWords modes;
  std::string csv;
};

cli::Flags makeFlags(Args& args) {
  cli::Flags flags(
      "bench_moe_layer",
      "Benchmark of a whole MoE layer (router, MoeDispatch, grouped GEMMs, "
      "silu(gate) * up, MoeCombine) in bf16, three ways for every T: "
      "eager-collective (HostIrEvaluator, the collective backend over NCCL), "
      "eager-cuda (the cuda backend), graph replay (the cuda backend as one "
      "CUDA graph). Reports the median over B blocks of the mean time per "
      "step of N back-to-back steps, the slowest rank's. Needs one GPU per "
      "rank; without, it says so and exits 0.\n"
      "\n"
      "  tools/launch.sh N build/bench_moe_layer [flags]");
  flags.integerList("--tokens", "T1,T2,...", &args.tokens, 1, cli::kMaxCount,
                    "tokens per rank, one table row each");
  flags.integer("--hidden", "H", &args.hidden, 1, cli::kMaxCount,
                "hidden size");
  flags.integer("--intermediate", "I", &args.intermediate, 1, cli::kMaxCount,
                "intermediate size of an expert");
  flags.integer("--experts-per-rank", "L", &args.local_experts, 1,
                cli::kMaxCount, "experts on each rank");
  flags.integer("--topk", "K", &args.topk, 1, cli::kMaxCount,
                "experts each token goes to; at most the number of experts, "
                "L x ranks",
                "8, at most L x ranks");
  flags.integer("--steps", "N", &args.steps, 1, cli::kMaxCount,
                "back-to-back steps per timed block",
                "20 for T <= 1024, else 5");
  flags.integer("--blocks", "B", &args.blocks, 1, cli::kMaxCount,
                "timed blocks; the median is reported");
  flags.integer("--link-gbps", "G", &args.link_gbps, 1, cli::kMaxCount,
                "GB/s a GPU can push to its peers, for the dispatch and "
                "combine floors with more than one rank (330: all 4 H200 "
                "pushing at once, bench_nvlink_push, docs/perf_log.md)");
  flags.option("--exprs", &args.exprs,
               "also print the time of every top-level expression of the "
               "graph replay (rank 0's)");
  flags.option("--fp8", &args.fp8,
               "dispatch in fp8 e4m3 with a scale per 128 channels (both "
               "backends; the output check allows fp8's error)");
  flags.choice("--reduce", "MODE", &args.modes.reduce,
               MoeLayerModeWords::kReduceWords,
               "the combine's mode (both backends); auto: per_rank with more "
               "than one rank (one row per token and rank on the links), "
               "per_pick on one");
  flags.choice("--gate-up", "MODE", &args.modes.gate_up,
               MoeLayerModeWords::kGateUpWords,
               "gate and up projections as one grouped GEMM of [L, H, 2I] "
               "weights, or as two of [L, H, I] (both backends)");
  flags.choice("--activation", "MODE", &args.modes.activation,
               MoeLayerModeWords::kActivationWords,
               "silu(gate) * up as a fusion kernel after the first grouped "
               "GEMM, or in that GEMM's epilogue (needs --gate-up fused; "
               "hostfuse's sm_90a GEMM computes it there; where that kernel "
               "does not run, a small kernel applies it after "
               "at::_grouped_mm, as the fusion would); auto: the epilogue "
               "with --gate-up fused, else the fusion");
  flags.text("--csv", "FILE", &args.csv,
             "append the graph replay's stage times and floors to FILE (rank "
             "0), for tools/plot_layer.py");
  return flags;
}

// Every rank's `value` (a CPU tensor), stacked in rank order: [R, ...],
// over Gloo; also a barrier.
at::Tensor allGather(Communicator& comm, const at::Tensor& value) {
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < comm.size(); ++r) {
    outputs[0].push_back(at::empty_like(value));
  }
  std::vector<at::Tensor> inputs = {value};
  comm.backend(c10::DeviceType::CPU).allgather(outputs, inputs)->wait();
  return at::stack(outputs[0]);
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

double slowest(Communicator& comm, double value) {
  return allGather(comm, at::full({1}, value, at::kDouble))
      .max()
      .item<double>();
}

// Median over `blocks` of the mean microseconds per step of `steps`
// back-to-back steps, each block's time being its slowest rank's.
double timeSteps(Communicator& comm, int device, int steps, int blocks,
                 const std::function<void()>& step) {
  for (int i = 0; i < 3; ++i) {
    step();
  }
  std::vector<double> per_block;
  for (int block = 0; block < blocks; ++block) {
    cuda::synchronize(device);
    slowest(comm, 0.0);  // start together
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) {
      step();
    }
    cuda::synchronize(device);
    const double us = std::chrono::duration<double, std::micro>(
                          std::chrono::steady_clock::now() - start)
                          .count();
    per_block.push_back(slowest(comm, us / steps));
  }
  return median(per_block);
}

// The layer's stages, in program order.
enum Stage { kRouter, kDispatch, kGemm1, kFusion, kGemm2, kCombine, kStages };
constexpr const char* kStageNames[kStages] = {"router",
                                              "dispatch",
                                              "grouped GEMM 1 (gate, up)",
                                              "silu(gate) * up",
                                              "grouped GEMM 2 (down)",
                                              "combine"};

// Times the stages of the program inside each graph replay: the evaluator
// calls observe() before every top-level expression and once after the
// last; each call records a CUDA event on the current stream, which in a
// capture becomes an event node of the graph (cudaEventRecordExternal).
// After a replay, exprTimes() reads the time of each expression and
// stageTimes() sums them by stage. Expressions that are not stage nodes
// themselves (casts, the router's ops, allocations) belong to the stage
// they follow; those before the dispatch are the router.
class StageTimer {
 public:
  // `gemm1_count`: the grouped matmuls of the first GEMM stage (2: gate
  // and up; 1 with fused_gate_up).
  StageTimer(int device, int gemm1_count)
      : device_(device), gemm1_count_(gemm1_count) {}
  ~StageTimer() {
    for (cudaEvent_t event : events_) {
      cudaEventDestroy(event);
    }
  }
  StageTimer(const StageTimer&) = delete;
  StageTimer& operator=(const StageTimer&) = delete;

  void observe(const Expr* next) {
    if (position_ == events_.size()) {
      cudaEvent_t event = nullptr;
      check(cudaEventCreate(&event), "cudaEventCreate");
      events_.push_back(event);
    }
    const cudaStream_t stream = cuda::currentStream(device_);
    const unsigned flags = cuda::isCapturing(device_) ? cudaEventRecordExternal
                                                      : cudaEventRecordDefault;
    check(cudaEventRecordWithFlags(events_[position_], stream, flags),
          "cudaEventRecordWithFlags");
    if (next == nullptr) {
      position_ = 0;
      gemms_ = 0;
      return;
    }
    int stage = position_ == 0 ? kRouter : stages_[position_ - 1];
    if (dynamic_cast<const MoeDispatch*>(next) != nullptr) {
      stage = kDispatch;
    } else if (dynamic_cast<const GroupedMatmul*>(next) != nullptr) {
      stage = ++gemms_ <= gemm1_count_ ? kGemm1 : kGemm2;
    } else if (dynamic_cast<const RunFusion*>(next) != nullptr) {
      stage = kFusion;
    } else if (dynamic_cast<const MoeCombine*>(next) != nullptr) {
      stage = kCombine;
    }
    if (position_ == stages_.size()) {  // the first run names them
      stages_.push_back(stage);
      std::string name = next->toString();
      while (!name.empty() && name.back() == '\n') {
        name.pop_back();
      }
      names_.push_back(name);
    }
    ++position_;
  }

  // Microseconds of each top-level expression in the latest replay (waits
  // for it).
  std::vector<double> exprTimes() const {
    HF_CHECK(events_.size() == stages_.size() + 1,
             "bench_moe_layer: no complete run was observed");
    check(cudaEventSynchronize(events_.back()), "cudaEventSynchronize");
    std::vector<double> us;
    for (size_t i = 0; i + 1 < events_.size(); ++i) {
      float ms = 0;
      check(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]),
            "cudaEventElapsedTime");
      us.push_back(1000.0 * ms);
    }
    return us;
  }
  std::vector<double> stageTimes(const std::vector<double>& expr_us) const {
    std::vector<double> us(kStages, 0.0);
    for (size_t i = 0; i < expr_us.size(); ++i) {
      us[stages_[i]] += expr_us[i];
    }
    return us;
  }
  const std::vector<std::string>& names() const { return names_; }
  const std::vector<int>& stages() const { return stages_; }

 private:
  static void check(cudaError_t status, const char* what) {
    HF_CHECK(status == cudaSuccess, "bench_moe_layer: ", what, ": ",
             cudaGetErrorString(status));
  }

  int device_;
  std::vector<cudaEvent_t> events_;  // one per expression, then the end
  std::vector<int> stages_;          // per expression
  std::vector<std::string> names_;   // per expression
  size_t position_ = 0;
  int gemms_ = 0;
  int gemm1_count_ = 2;
};

// What this GPU sustains, measured once: device-to-device copy (bytes read
// plus written per second) and a large bf16 GEMM.
struct DeviceRates {
  double copy_gbps = 0;
  double gemm_tflops = 0;
};

// Microseconds per call of `work`, median of 9 timed repeats of 10 calls.
double deviceTime(int device, const std::function<void()>& work) {
  work();
  std::vector<double> us;
  for (int repeat = 0; repeat < 9; ++repeat) {
    cuda::synchronize(device);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) {
      work();
    }
    cuda::synchronize(device);
    us.push_back(std::chrono::duration<double, std::micro>(
                     std::chrono::steady_clock::now() - start)
                     .count() /
                 10);
  }
  return median(us);
}

DeviceRates measureRates(const at::Device& device) {
  DeviceRates rates;
  const int64_t bytes = int64_t{1} << 30;
  const at::Tensor a =
      at::empty({bytes}, at::TensorOptions(at::kByte).device(device));
  const at::Tensor b = at::empty_like(a);
  rates.copy_gbps =
      2.0 * bytes / deviceTime(device.index(), [&] { b.copy_(a); }) / 1e3;
  const int64_t n = 8192;
  const at::Tensor m =
      at::randn({n, n}, at::TensorOptions(at::kBFloat16).device(device));
  rates.gemm_tflops =
      2.0 * n * n * n / deviceTime(device.index(), [&] { at::mm(m, m); }) / 1e6;
  return rates;
}

// A stage's floor in microseconds: its HBM bytes at the copy rate, its
// FLOPs at the GEMM rate, its off-rank bytes at the link rate, whichever is
// longest.
struct Work {
  double hbm_bytes = 0;
  double flops = 0;
  double link_bytes = 0;
  double floor(const DeviceRates& rates, double link_gbps) const {
    return std::max({hbm_bytes / rates.copy_gbps / 1e3,
                     flops / rates.gemm_tflops / 1e6,
                     link_bytes / link_gbps / 1e3});
  }
};

// The bytes and FLOPs of each stage on this rank, from its rows:
// `received` rows arrive (one per pick), `off_rank` rows cross a link (the
// larger of the off-rank rows sent and received). The least any
// implementation must move: every input read once from memory, every
// output written once (a token's row read once for all its picks).
std::vector<Work> stageWork(const MoeLayerConfig& c, int64_t tokens,
                            double received, double off_rank) {
  // With fused_activation the first GEMM writes the activation (I columns)
  // and no fusion stage runs.
  const double H = c.hidden, I = c.intermediate, L = c.local_experts;
  const double E = c.num_experts, T = tokens, bf16 = 2;
  std::vector<Work> work(kStages);
  // x and the router's weights read; fp32 sums of bf16 products.
  work[kRouter] = {T * H * bf16 + E * H * bf16, 2 * T * H * E, 0};
  // The tokens' rows read, the received rows written.
  work[kDispatch] = {(T + received) * H * bf16, 0, off_rank * H * bf16};
  const double gemm1_out = c.fused_activation ? I : 2 * I;
  work[kGemm1] = {(L * H * 2 * I + received * (H + gemm1_out)) * bf16,
                  2 * received * H * 2 * I, 0};
  work[kFusion] = {c.fused_activation ? 0 : received * 3 * I * bf16, 0, 0};
  work[kGemm2] = {(L * I * H + received * (I + H)) * bf16, 2 * received * I * H,
                  0};
  // The expert rows read, the token rows written.
  work[kCombine] = {(received + T) * H * bf16, 0, off_rank * H * bf16};
  return work;
}

// One line of --csv: a stage of the graph replay at `tokens` per rank, or
// the whole replay ("graph replay", its floor the sum of the stages').
struct LayerCsvRow {
  int64_t tokens = 0;
  std::string stage;
  double time_us = 0, floor_us = 0, hbm_mb = 0, gflop = 0;
};

// Appends `rows` to `path` (the header first when the file is new or
// empty), with the run's device, ranks, shape and modes on every line, the
// columns tools/plot_layer.py reads; false if it cannot be written.
bool appendLayerCsv(const std::string& path, const std::string& device,
                    int64_t ranks, const MoeLayerConfig& config,
                    const std::string& modes,
                    const std::vector<LayerCsvRow>& rows) {
  std::FILE* csv = peers::openCsvForAppend(
      path,
      "date,device,ranks,tokens,hidden,intermediate,experts,topk,modes,"
      "stage,time_us,floor_us,hbm_mb,gflop\n",
      /*write_header=*/true);
  if (csv == nullptr) {
    return false;
  }
  const std::string date = peers::today();
  for (const LayerCsvRow& r : rows) {
    std::fprintf(
        csv, "%s,%s,%lld,%lld,%lld,%lld,%lld,%lld,%s,%s,%.2f,%.2f,%.1f,%.2f\n",
        date.c_str(), peers::csvField(device).c_str(),
        static_cast<long long>(ranks), static_cast<long long>(r.tokens),
        static_cast<long long>(config.hidden),
        static_cast<long long>(config.intermediate),
        static_cast<long long>(config.num_experts),
        static_cast<long long>(config.topk), peers::csvField(modes).c_str(),
        peers::csvField(r.stage).c_str(), r.time_us, r.floor_us, r.hbm_mb,
        r.gflop);
  }
  return std::fclose(csv) == 0;
}

// The stages of one T's graph replay as CSV rows (the fusion left out
// when the first GEMM's epilogue computes it), each with its floor, then
// "graph replay": the replay's time and the sum of the stages' floors.
// Both the printed table and --csv come from these rows.
std::vector<LayerCsvRow> stageRows(int64_t tokens,
                                   const std::vector<double>& stage_us,
                                   const std::vector<Work>& work,
                                   double replay_us,
                                   const MoeLayerConfig& config,
                                   const DeviceRates& rates, double link_gbps) {
  std::vector<LayerCsvRow> rows;
  double total_floor = 0;
  for (int stage = 0; stage < kStages; ++stage) {
    if (stage == kFusion && config.fused_activation) {
      continue;  // in grouped GEMM 1
    }
    const double floor = work[stage].floor(rates, link_gbps);
    total_floor += floor;
    rows.push_back({tokens, kStageNames[stage], stage_us[stage], floor,
                    work[stage].hbm_bytes / 1e6, work[stage].flops / 1e9});
  }
  rows.push_back({tokens, "graph replay", replay_us, total_floor, 0, 0});
  return rows;
}

std::string formatTime(double us) {
  char text[32];
  if (us < 0) {
    return "n/a";
  }
  std::snprintf(text, sizeof(text), "%.1f us", us);
  return text;
}

std::string formatRatio(double numerator, double denominator) {
  char text[32];
  if (numerator < 0 || denominator <= 0) {
    return "n/a";
  }
  std::snprintf(text, sizeof(text), "%.2fx", numerator / denominator);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  cli::Flags flags = makeFlags(args);
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (const std::string problem = moeLayerModeWordsProblem(args.modes);
      !problem.empty()) {
    return flags.fail(problem);
  }
  if (!args.csv.empty()) {
    std::FILE* csv = std::fopen(args.csv.c_str(), "a");
    if (csv == nullptr) {
      return flags.fail("cannot append to --csv " + args.csv);
    }
    std::fclose(csv);
  }
  Communicator& comm = Communicator::getInstance();
  const int64_t rank = comm.rank();
  const int64_t num_experts = args.local_experts * comm.size();
  if (args.topk > num_experts) {
    comm.shutdown();
    return flags.fail(
        cli::topkExceedsExperts(args.topk, args.local_experts, comm.size()));
  }
  if (!cuda::isAvailable() || comm.localSize() > cuda::deviceCount()) {
    if (rank == 0) {
      std::cout << "bench_moe_layer: needs one GPU per rank (" << comm.size()
                << " ranks, " << cuda::deviceCount()
                << " GPUs visible); nothing to measure\n";
    }
    comm.shutdown();
    return 0;
  }
  const at::Device device = comm.device();
  const int index = device.index();

  MoeLayerConfig config;
  config.hidden = args.hidden;
  config.intermediate = args.intermediate;
  config.local_experts = args.local_experts;
  config.num_experts = num_experts;
  config.topk = args.topk > 0 ? args.topk : std::min<int64_t>(8, num_experts);
  config.dtype = DataType::BFloat16;
  config.quantize =
      args.fp8 ? MoeDispatchQuant::Fp8E4M3 : MoeDispatchQuant::None;
  useMoeLayerModes(config, /*on_gpu=*/true, comm.size(), args.modes);
  MoeLayerConfig collective_config = config;
  collective_config.backend = MoeBackend::Collective;
  config.backend = MoeBackend::Cuda;

  struct Row {
    int64_t tokens = 0;
    double collective = -1, eager = -1, replay = -1, difference = -1;
    std::string note;
    std::vector<double> stages;  // us per stage, slowest rank; empty: none
    std::vector<Work> work;      // this rank's
    double received = 0;         // rows this rank received
    struct Expr {
      std::string name;
      int stage = 0;
      double us = 0;  // this rank's median
    };
    std::vector<Expr> exprs;  // with --exprs
  };
  const DeviceRates rates = measureRates(device);
  int replays_per_stage_sample = 0;
  std::vector<Row> rows;
  bool own_grouped_gemm = false;
  try {
    // Weights made on the GPU: the router the same on every rank, the
    // experts this rank's.
    const auto options = at::TensorOptions().device(device);
    const int64_t H = config.hidden;
    const int64_t I = config.intermediate;
    const int64_t L = config.local_experts;
    at::manual_seed(7);
    const at::Tensor router_w =
        at::randn({config.num_experts, H}, options).to(at::kBFloat16);
    at::manual_seed(1000 + static_cast<uint64_t>(rank));
    auto expert = [&](std::vector<int64_t> sizes) {
      return (at::randn(sizes, options) / std::sqrt(double(sizes[1])))
          .to(at::kBFloat16);
    };
    const at::Tensor w_gate = expert({L, H, I});
    const at::Tensor w_up = expert({L, H, I});
    const at::Tensor w_down = expert({L, I, H});
    const std::vector<at::Tensor> experts =
        moeLayerExpertWeights(config, w_gate, w_up, w_down);
    own_grouped_gemm = groupedMatmulUsesOwnKernel(experts.back());
    HostIrEvaluator collective(makeMoeLayerProgram(collective_config));

    for (const int64_t tokens : args.tokens) {
      Row row;
      row.tokens = tokens;
      const int steps = args.steps > 0 ? args.steps : (tokens <= 1024 ? 20 : 5);
      const at::Tensor x = at::randn({tokens, H}, options).to(at::kBFloat16);
      std::vector<c10::IValue> inputs = {x, router_w};
      inputs.insert(inputs.end(), experts.begin(), experts.end());
      const std::vector<at::Tensor> collective_out = collective.run(inputs);
      const at::Tensor reference = collective_out[0];
      {
        // Rows per (source, destination) rank of this routing.
        const at::Tensor to_rank =
            at::bincount(collective_out[1].flatten().div(L, "floor"), {},
                         comm.size())
                .cpu();
        const at::Tensor all = allGather(comm, to_rank);
        const double self = all[rank][rank].item<double>();
        const double sent = all[rank].sum().item<double>();
        row.received = all.select(1, rank).sum().item<double>();
        row.work = stageWork(config, tokens, row.received,
                             std::max(sent, row.received) - self);
      }
      row.collective = timeSteps(comm, index, steps, args.blocks,
                                 [&] { collective.run(inputs); });

      // A runner per T: its MoE workspaces are sized for this T.
      GraphRunnerOptions runner_options;
      runner_options.persistent_inputs = moeLayerPersistentInputs(config);
      GraphRunner runner(makeMoeLayerProgram(config), {}, runner_options);
      bool have_cuda = true;
      try {
        runner.run(inputs);  // eager: workspaces (a rendezvous), cuBLAS
      } catch (const std::exception& error) {
        // Every rank fails here alike (a host-side check), so all go on.
        have_cuda = false;
        row.note = std::string("cuda backend: ") + error.what();
      }
      if (have_cuda) {
        runner.run(inputs);  // capture
        row.eager = timeSteps(comm, index, steps, args.blocks,
                              [&] { runner.evaluator().run(inputs); });
        row.replay = timeSteps(comm, index, steps, args.blocks,
                               [&] { runner.run(inputs); });
        runner.checkStatus();
        const at::Tensor out = runner.run(inputs)[0].to(at::kFloat);
        const double scale =
            reference.to(at::kFloat).abs().max().item<double>();
        row.difference = slowest(
            comm, (out - reference.to(at::kFloat)).abs().max().item<double>() /
                      std::max(scale, 1e-30));

        // The stages of a replay, from a runner of their own whose graph
        // has the event nodes (the times above come from one without).
        StageTimer timer(index, config.fused_gate_up ? 1 : 2);
        GraphRunner staged(makeMoeLayerProgram(config), {}, runner_options);
        staged.evaluator().setExprObserver(
            [&timer](const Expr* next) { timer.observe(next); });
        staged.run(inputs);  // eager
        staged.run(inputs);  // capture
        replays_per_stage_sample = 3 * steps;
        std::vector<std::vector<double>> stage_samples(kStages);
        std::vector<std::vector<double>> expr_samples;
        for (int i = 0; i < replays_per_stage_sample; ++i) {
          staged.run(inputs);
          const std::vector<double> expr_us = timer.exprTimes();
          const std::vector<double> stage_us = timer.stageTimes(expr_us);
          expr_samples.resize(expr_us.size());
          for (size_t e = 0; e < expr_us.size(); ++e) {
            expr_samples[e].push_back(expr_us[e]);
          }
          for (int stage = 0; stage < kStages; ++stage) {
            stage_samples[stage].push_back(stage_us[stage]);
          }
        }
        staged.checkStatus();
        for (const std::vector<double>& stage : stage_samples) {
          row.stages.push_back(slowest(comm, median(stage)));
        }
        if (args.exprs) {
          for (size_t e = 0; e < expr_samples.size(); ++e) {
            row.exprs.push_back(
                {timer.names()[e], timer.stages()[e], median(expr_samples[e])});
          }
        }
        cuda::synchronize(index);
      }
      // No rank frees its workspace while a peer may still use it.
      cuda::synchronize(index);
      slowest(comm, 0.0);
      rows.push_back(row);
    }
  } catch (const std::exception& error) {
    std::cerr << "bench_moe_layer failed on rank " << rank << ": "
              << error.what() << "\n";
    return 1;
  }

  if (rank == 0) {
    cudaDeviceProp properties{};
    cudaGetDeviceProperties(&properties, index);
    std::printf(
        "MoE layer: %lld ranks (%s), H = %lld, I = %lld, E = %lld (%lld per "
        "rank), K = %lld, bf16 (router in fp32)\n"
        "modes: quantize=%s, reduce=%s, gate and up as %s, silu(gate) * up %s\n"
        "grouped GEMMs on the GPU: %s\n"
        "time per step: median over %d blocks of back-to-back steps, slowest "
        "rank\n\n",
        static_cast<long long>(comm.size()), properties.name,
        static_cast<long long>(config.hidden),
        static_cast<long long>(config.intermediate),
        static_cast<long long>(config.num_experts),
        static_cast<long long>(config.local_experts),
        static_cast<long long>(config.topk), toString(config.quantize),
        toString(config.reduce),
        config.fused_gate_up ? "one grouped GEMM" : "two grouped GEMMs",
        config.fused_activation ? "in its epilogue (its stage has it)"
                                : "as a fusion",
        own_grouped_gemm
            ? ("hostfuse's sm_90a kernel up to " +
               std::to_string(kOwnGroupedGemmMaxRowsPerGroup) +
               " rows per expert, else at::_grouped_mm")
                  .c_str()
            : "at::_grouped_mm (HOSTFUSE_TORCH_GROUPED_GEMM=1 or not an sm_90 "
              "GPU)",
        args.blocks);
    std::printf("%6s  %16s  %12s  %12s  %18s  %16s  %10s\n", "T",
                "eager-collective", "eager-cuda", "graph replay",
                "collective/replay", "eager-cuda/replay", "max diff");
    for (const Row& row : rows) {
      char difference[32] = "n/a";
      if (row.difference >= 0) {
        std::snprintf(difference, sizeof(difference), "%.2e", row.difference);
      }
      std::printf("%6lld  %16s  %12s  %12s  %18s  %16s  %10s\n",
                  static_cast<long long>(row.tokens),
                  formatTime(row.collective).c_str(),
                  formatTime(row.eager).c_str(), formatTime(row.replay).c_str(),
                  formatRatio(row.collective, row.replay).c_str(),
                  formatRatio(row.eager, row.replay).c_str(), difference);
      if (!row.note.empty()) {
        std::printf("        (%s)\n", row.note.c_str());
      }
    }
    std::printf(
        "\nmax diff: max |replay - eager-collective| / max |eager-collective| "
        "of the layer's output (rounding: bf16, another GEMM tiling)\n");

    std::printf(
        "\nGraph replay by stage: median of %d replays, slowest rank. "
        "floor = the longest of HBM bytes / %.0f GB/s (device copy, read + "
        "write), FLOPs / %.0f TFLOPS (bf16 GEMM 8192^3), both measured here "
        "on rank 0's GPU, and off-rank bytes / %lld GB/s (--link-gbps). "
        "These are rates of a copy and a GEMM, not the hardware's peaks: a "
        "stage can beat its floor a little (rows in L2, a GEMM faster than "
        "the 8192^3 one). Stage times include ~1-2 us per expression for "
        "the event nodes; their sum exceeds the replay's time by that\n",
        replays_per_stage_sample, rates.copy_gbps, rates.gemm_tflops,
        static_cast<long long>(args.link_gbps));
    for (const Row& row : rows) {
      if (row.stages.empty()) {
        continue;
      }
      std::printf("\nT = %lld (rank 0 received %.0f rows)\n",
                  static_cast<long long>(row.tokens), row.received);
      std::printf("%-26s  %10s  %10s  %11s  %10s  %9s\n", "stage", "time",
                  "floor", "time/floor", "HBM MB", "GFLOP");
      const std::vector<LayerCsvRow> stages =
          stageRows(row.tokens, row.stages, row.work, row.replay, config, rates,
                    double(args.link_gbps));
      double total = 0;
      for (size_t i = 0; i + 1 < stages.size(); ++i) {
        const LayerCsvRow& stage = stages[i];
        total += stage.time_us;
        std::printf("%-26s  %10s  %10s  %11s  %10.1f  %9.2f\n",
                    stage.stage.c_str(), formatTime(stage.time_us).c_str(),
                    formatTime(stage.floor_us).c_str(),
                    formatRatio(stage.time_us, stage.floor_us).c_str(),
                    stage.hbm_mb, stage.gflop);
      }
      const double total_floor = stages.back().floor_us;
      std::printf("%-26s  %10s  %10s  %11s\n", "sum of stages",
                  formatTime(total).c_str(), formatTime(total_floor).c_str(),
                  formatRatio(total, total_floor).c_str());
      std::printf("%-26s  %10s\n", "graph replay (table above)",
                  formatTime(row.replay).c_str());
      if (!row.exprs.empty()) {
        std::printf("\nT = %lld on rank 0, by top-level expression:\n",
                    static_cast<long long>(row.tokens));
        for (const Row::Expr& expr : row.exprs) {
          std::printf("  %10s  %-26s  %.100s\n", formatTime(expr.us).c_str(),
                      kStageNames[expr.stage], expr.name.c_str());
        }
      }
    }
    if (!args.csv.empty()) {
      const std::string modes =
          std::string("gate_up=") + args.modes.gate_up +
          " activation=" + (config.fused_activation ? "epilogue" : "fusion") +
          " reduce=" + toString(config.reduce) +
          " quantize=" + toString(config.quantize) +
          // Where GroupedMatmul's rule lets hostfuse's kernel run.
          " gemm=" + (own_grouped_gemm ? "hostfuse_up_to_512_rows" : "torch");
      std::vector<LayerCsvRow> csv_rows;
      for (const Row& row : rows) {
        if (row.stages.empty()) {
          continue;
        }
        const std::vector<LayerCsvRow> stages =
            stageRows(row.tokens, row.stages, row.work, row.replay, config,
                      rates, double(args.link_gbps));
        csv_rows.insert(csv_rows.end(), stages.begin(), stages.end());
      }
      if (!appendLayerCsv(args.csv, properties.name, comm.size(), config, modes,
                          csv_rows)) {
        std::cerr << "bench_moe_layer: cannot append to --csv " << args.csv
                  << "\n";
        comm.shutdown();
        return 1;
      }
      std::printf("\nappended %zu rows to %s\n", csv_rows.size(),
                  args.csv.c_str());
    }
  }
  comm.shutdown();
  return 0;
}
