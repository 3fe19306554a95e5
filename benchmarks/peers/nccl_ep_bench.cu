// NCCL EP (NVIDIA's MoE dispatch/combine, the nccl_ep library of NCCL >=
// 2.30) on the inputs that bench_peers.py measured hostfuse and plain
// PyTorch on, its outputs checked against hostfuse's, its times printed
// next to theirs. A program of its own because NCCL EP needs an NCCL newer
// than the one torch loads (both are libnccl.so.2): no torch here, only the
// CUDA runtime, NCCL and nccl_ep.
//
//   torchrun ... benchmarks/peers/bench_peers.py --dump DIR [--tokens ...]
//   tools/launch.sh N <nccl_ep>/bin/nccl_ep_bench --dump DIR [--csv F]
//
// (tools/nccl_ep.sh builds NCCL, nccl_ep and this program; --help lists the
// flags.) Same N as the dump's ranks, one GPU per rank.
//
// Modes: "LL" (low latency: one cooperative kernel each way, expert-major
// output [L, R x T, H], the weighted sum inside the combine) and "HT" (high
// throughput: the routing handle updated per step, expert-major output, the
// user weights the rows before the combine, as NCCL EP asks). Each step's
// dispatch includes what a new routing costs (HT's handle update; LL reads
// the routing at launch). Times: per step, synchronized, dispatch then
// combine timed separately; the median over --iters steps, the slowest
// rank's (bench_peers.py's method). Checks, after the first step:
//   - per local expert, the row count equals hostfuse's
//     (recv_expert_counts), and the rows received are exactly the rows the
//     dump's inputs send there, as a multiset (NCCL EP orders rows inside
//     an expert as they arrive);
//   - the combined output [T, H] (expert = identity) is within bf16
//     rounding of hostfuse's: |a - b| <= 2e-2 + 2e-2 |b|, bench_peers.py's
//     tolerance (NCCL EP sums in its own order; HT rounds each weighted row
//     to bf16 before its sum).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_ep.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../../examples/cli_flags.h"
#include "nccl_ep_dump.h"
#include "peers_csv.h"

namespace {

using namespace hostfuse::peers;  // NOLINT: this program is their user

// A failure (files, CUDA, NCCL, NCCL EP) ends the rank with one line naming
// the call, and torchrun stops the other ranks. A mode whose limits the
// workload exceeds is reported as not measured, before anything runs.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define CHECK_CUDA(call)                                                      \
  do {                                                                        \
    const cudaError_t status_ = (call);                                       \
    if (status_ != cudaSuccess) {                                             \
      throw Failure(std::string(#call) + ": " + cudaGetErrorString(status_)); \
    }                                                                         \
  } while (0)

#define CHECK_NCCL(call)                                                      \
  do {                                                                        \
    const ncclResult_t status_ = (call);                                      \
    if (status_ != ncclSuccess) {                                             \
      throw Failure(std::string(#call) + ": " + ncclGetErrorString(status_) + \
                    " (" + ncclGetLastError(nullptr) + ")");                  \
    }                                                                         \
  } while (0)

struct Args {
  std::string dump;
  std::string csv;
  std::string modes = "both";
  int64_t iters = 50;
};

struct Rank {
  int rank = 0;
  int world = 1;
  int local = 0;
};

int envInt(const char* name, int fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    return fallback;
  }
  const std::optional<int64_t> v =
      hostfuse::cli::parseInteger(text, 0, 1 << 20);
  if (!v) {
    throw Failure(std::string(name) + "=" + text + " is not a rank number");
  }
  return static_cast<int>(*v);
}

// ---------------------------------------------------------------------------
// NCCL, bootstrapped through a file in the dump directory, named by the
// launch (torchrun's run id) so that an earlier run's file is never read.

ncclComm_t initNccl(const Rank& r, const std::string& dir) {
  const char* run = std::getenv("TORCHELASTIC_RUN_ID");
  if (run == nullptr || *run == '\0') {
    throw Failure(
        "TORCHELASTIC_RUN_ID is not set: start the ranks with "
        "tools/launch.sh or torchrun");
  }
  const std::string path = dir + "/nccl_id." + run;
  ncclUniqueId id;
  if (r.rank == 0) {
    CHECK_NCCL(ncclGetUniqueId(&id));
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary);
      out.write(id.internal, sizeof(id.internal));
      if (!out) {
        throw Failure("cannot write " + tmp);
      }
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      throw Failure("cannot rename " + tmp + " to " + path);
    }
  } else {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (true) {
      std::ifstream in(path, std::ios::binary);
      if (in.read(id.internal, sizeof(id.internal))) {
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        throw Failure("rank 0 wrote no " + path + " within 120 s");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ncclComm_t comm;
  CHECK_NCCL(ncclCommInitRank(&comm, r.world, id, r.rank));
  if (r.rank == 0) {
    std::remove(path.c_str());  // every rank has joined: it has been read
  }
  return comm;
}

// ---------------------------------------------------------------------------

template <typename T>
struct DeviceArray {
  T* data = nullptr;
  size_t count = 0;
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : count(n) {
    CHECK_CUDA(cudaMalloc(&data, std::max<size_t>(n, 1) * sizeof(T)));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(data); }
  void upload(const std::vector<T>& host) {
    CHECK_CUDA(cudaMemcpy(data, host.data(), host.size() * sizeof(T),
                          cudaMemcpyHostToDevice));
  }
  std::vector<T> download(size_t offset, size_t n) const {
    std::vector<T> host(n);
    CHECK_CUDA(cudaMemcpy(host.data(), data + offset, n * sizeof(T),
                          cudaMemcpyDeviceToHost));
    return host;
  }
};

// An ncclEpTensor_t over `data`, with its own sizes.
struct Tensor {
  std::vector<size_t> sizes;
  ncclEpTensor_t t = NCCL_EP_TENSOR_INIT;
  Tensor(void* data, ncclDataType_t type, std::vector<size_t> shape)
      : sizes(std::move(shape)) {
    t.ndim = static_cast<unsigned>(sizes.size());
    t.datatype = type;
    t.data = data;
    t.sizes = sizes.data();
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ncclEpTensor_t* get() { return &t; }
};

// y[i] = bf16(float(x[i]) * w[i]) for rows i < *rows (a device count):
// HT's combine takes rows already weighted. 8 channels per 16-byte access
// (hidden % 8 == 0, which HT requires): no slower than a user's own.
__global__ void weightRows(const __nv_bfloat16* x, const float* w,
                           const int32_t* rows, int64_t hidden,
                           __nv_bfloat16* y) {
  const int64_t n = *rows;
  const int64_t units = hidden / 8;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float weight = w[row];
    const uint4* in = reinterpret_cast<const uint4*>(x + row * hidden);
    uint4* out = reinterpret_cast<uint4*>(y + row * hidden);
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      uint4 v = in[u];
      __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&v);
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        pairs[i] = __floats2bfloat162_rn(f.x * weight, f.y * weight);
      }
      out[u] = v;
    }
  }
}

struct Outcome {
  explicit Outcome(std::string name) : mode(std::move(name)) {}
  std::string mode;
  double dispatch_us = -1, combine_us = -1;
  bool ok = false;
  std::string why;  // the check that failed, or why nothing was measured
};

double seconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The slowest rank's value.
double slowest(double mine, ncclComm_t comm, cudaStream_t stream) {
  DeviceArray<double> value(1);
  value.upload({mine});
  CHECK_NCCL(ncclAllReduce(value.data, value.data, 1, ncclFloat64, ncclMax,
                           comm, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  return value.download(0, 1)[0];
}

// Every rank's verdict: true when all are true.
bool allAgree(bool mine, ncclComm_t comm, cudaStream_t stream) {
  return slowest(mine ? 0.0 : 1.0, comm, stream) == 0.0;
}

struct Workload {
  const Meta& m;
  const Rank& r;
  int64_t tokens;
  const RankData& mine;
  const std::vector<std::vector<uint64_t>>& expected;
  ncclComm_t comm;
  cudaStream_t stream;
  int64_t iters;
};

// Times `dispatch` and `combine`, one step after the other, synchronized;
// `checkFirst` runs after the first (untimed) step.
template <typename D, typename C, typename K>
void timeSteps(Workload& w, Outcome& o, D dispatch, C combine, K checkFirst) {
  dispatch();
  combine();
  CHECK_CUDA(cudaStreamSynchronize(w.stream));
  const std::string why = checkFirst();
  o.ok = allAgree(why.empty(), w.comm, w.stream);
  o.why = why.empty() && !o.ok ? "another rank's check failed" : why;
  std::vector<double> d, c;
  for (int64_t i = 0; i < w.iters; ++i) {
    CHECK_CUDA(cudaStreamSynchronize(w.stream));
    const double t0 = seconds();
    dispatch();
    CHECK_CUDA(cudaStreamSynchronize(w.stream));
    const double t1 = seconds();
    combine();
    CHECK_CUDA(cudaStreamSynchronize(w.stream));
    const double t2 = seconds();
    d.push_back((t1 - t0) * 1e6);
    c.push_back((t2 - t1) * 1e6);
  }
  o.dispatch_us = slowest(median(d), w.comm, w.stream);
  o.combine_us = slowest(median(c), w.comm, w.stream);
}

// A bf16 device array's elements [offset, offset + n) as their bits.
std::vector<uint16_t> bf16Bits(const DeviceArray<__nv_bfloat16>& a,
                               size_t offset, size_t n) {
  const std::vector<__nv_bfloat16> values = a.download(offset, n);
  std::vector<uint16_t> bits(n);
  std::memcpy(bits.data(), values.data(), n * sizeof(uint16_t));
  return bits;
}

// check() on NCCL EP's outputs: local expert e's rows are rows
// [starts[e], starts[e] + counts[e]) of `recv` (H wide), which must lie
// before ends[e]; `out` holds the combined tokens.
std::string checkOutputs(const Workload& wl,
                         const DeviceArray<__nv_bfloat16>& recv,
                         const std::vector<int32_t>& counts32,
                         const std::vector<int64_t>& starts,
                         const std::vector<int64_t>& ends,
                         const DeviceArray<__nv_bfloat16>& out) {
  const size_t H = wl.m.hidden;
  const std::vector<int64_t> counts(counts32.begin(), counts32.end());
  std::vector<std::vector<uint16_t>> experts(counts.size());
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] < 0 || starts[e] < 0 || counts[e] > ends[e] - starts[e]) {
      return "local expert " + std::to_string(e) + ": " +
             std::to_string(counts[e]) + " rows from row " +
             std::to_string(starts[e]) + " do not fit before row " +
             std::to_string(ends[e]);
    }
    experts[e] = bf16Bits(recv, starts[e] * H, counts[e] * H);
  }
  return check(experts, counts, bf16Bits(out, 0, wl.tokens * H), wl.mine,
               wl.expected, wl.m);
}

struct Inputs {
  DeviceArray<__nv_bfloat16> x;
  DeviceArray<int64_t> idx;
  DeviceArray<float> w;
  DeviceArray<__nv_bfloat16> out;
  explicit Inputs(const Workload& wl)
      : x(wl.tokens * wl.m.hidden),
        idx(wl.tokens * wl.m.topk),
        w(wl.tokens * wl.m.topk),
        out(wl.tokens * wl.m.hidden) {
    CHECK_CUDA(cudaMemcpy(x.data, wl.mine.x.data(), wl.mine.x.size() * 2,
                          cudaMemcpyHostToDevice));
    idx.upload(wl.mine.idx);
    w.upload(wl.mine.w);
  }
};

ncclEpGroup_t createGroup(const Workload& wl, ncclEpAlgorithm_t algorithm,
                          int64_t max_recv) {
  ncclEpGroupConfig_t config = NCCL_EP_GROUP_CONFIG_INIT;
  config.algorithm = algorithm;
  config.num_experts = static_cast<unsigned>(wl.m.experts);
  config.max_dispatch_tokens_per_rank = static_cast<unsigned>(wl.tokens);
  config.max_recv_tokens_per_rank = static_cast<unsigned>(max_recv);
  config.max_token_bytes = static_cast<unsigned>(wl.m.hidden * 2);
  config.rdma_buffer_size = NCCL_EP_AUTO;
  config.num_qp_per_rank = NCCL_EP_AUTO;
  config.num_channels = NCCL_EP_AUTO;
  config.max_num_sms = NCCL_EP_AUTO;
  ncclEpGroup_t group;
  CHECK_NCCL(ncclEpCreateGroup(&group, wl.comm, &config));
  return group;
}

// Low latency, expert-major: recv [L, R T, H], per-expert counts int32.
Outcome runLowLatency(Workload& wl) {
  Outcome o("NCCL EP LL");
  const Meta& m = wl.m;
  const size_t T = wl.tokens, H = m.hidden, K = m.topk;
  const size_t L = m.experts / m.ranks, slots = m.ranks * T;
  Inputs in(wl);
  DeviceArray<__nv_bfloat16> recv(L * slots * H);
  DeviceArray<int32_t> counters(L);
  ncclEpGroup_t group = createGroup(wl, NCCL_EP_ALGO_LOW_LATENCY, 0);
  Tensor x(in.x.data, ncclBfloat16, {T, H});
  Tensor idx(in.idx.data, ncclInt64, {T, K});
  Tensor w(in.w.data, ncclFloat32, {T, K});
  Tensor rows(recv.data, ncclBfloat16, {L, slots, H});
  Tensor count(counters.data, ncclInt32, {L});
  Tensor out(in.out.data, ncclBfloat16, {T, H});
  ncclEpHandle_t handle;
  CHECK_NCCL(ncclEpCreateHandle(&handle, group, NCCL_EP_LAYOUT_EXPERT_MAJOR,
                                idx.get(), nullptr, nullptr, wl.stream));

  ncclEpDispatchInputs_t d_in = NCCL_EP_DISPATCH_INPUTS_INIT;
  d_in.tokens = x.get();
  ncclEpDispatchOutputs_t d_out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  d_out.tokens = rows.get();
  ncclEpLayoutInfo_t layout = NCCL_EP_LAYOUT_INFO_INIT;
  layout.expert_counters = count.get();
  ncclEpCombineInputs_t c_in = NCCL_EP_COMBINE_INPUTS_INIT;
  c_in.tokens = rows.get();  // the expert is the identity
  ncclEpCombineOutputs_t c_out = NCCL_EP_COMBINE_OUTPUTS_INIT;
  c_out.tokens = out.get();
  c_out.topk_weights = w.get();  // read by the combine: the weighted sum

  timeSteps(
      wl, o,
      [&] {
        CHECK_NCCL(
            ncclEpDispatch(handle, &d_in, &d_out, &layout, nullptr, wl.stream));
      },
      [&] {
        CHECK_NCCL(ncclEpCombine(handle, &c_in, &c_out, nullptr, wl.stream));
      },
      [&] {
        std::vector<int64_t> starts, ends;
        for (size_t e = 0; e < L; ++e) {  // expert e's zone of R x T rows
          starts.push_back(e * slots);
          ends.push_back((e + 1) * slots);
        }
        return checkOutputs(wl, recv, counters.download(0, L), starts, ends,
                            in.out);
      });
  CHECK_CUDA(cudaStreamSynchronize(wl.stream));
  CHECK_NCCL(ncclEpHandleDestroy(handle));
  CHECK_NCCL(ncclEpGroupDestroy(group));
  return o;
}

// High throughput, expert-major: recv [N, H] in per-expert zones (offsets
// and counts from the handle update), one weight per row.
Outcome runHighThroughput(Workload& wl) {
  Outcome o("NCCL EP HT");
  const Meta& m = wl.m;
  const size_t T = wl.tokens, H = m.hidden, K = m.topk;
  const size_t L = m.experts / m.ranks;
  // The worst case: every token of every rank on min(K, L) experts here.
  const size_t slots = m.ranks * T * std::min(K, L);
  Inputs in(wl);
  DeviceArray<__nv_bfloat16> recv(slots * H), weighted(slots * H);
  DeviceArray<float> recv_w(slots);
  DeviceArray<int32_t> counters(L), offsets(L), total(1);
  ncclEpGroup_t group = createGroup(wl, NCCL_EP_ALGO_HIGH_THROUGHPUT,
                                    static_cast<int64_t>(slots));
  Tensor x(in.x.data, ncclBfloat16, {T, H});
  Tensor idx(in.idx.data, ncclInt64, {T, K});
  Tensor w(in.w.data, ncclFloat32, {T, K});
  Tensor rows(recv.data, ncclBfloat16, {slots, H});
  Tensor row_w(recv_w.data, ncclFloat32, {slots});
  // The combine copies its input's rows into NCCL EP's buffer: give it the
  // rows received (hostfuse's counts, which the check compares), not the
  // worst case the buffers are sized for. Right as long as the handle pads
  // no expert's zone (no handle config: alignment 1); with an alignment,
  // the padded total (recv_total_counter) is the number.
  int64_t received = 0;
  for (const int64_t c : wl.mine.counts) {
    received += c;
  }
  Tensor weighted_rows(
      weighted.data, ncclBfloat16,
      {static_cast<size_t>(std::max<int64_t>(received, 1)), H});
  Tensor count(counters.data, ncclInt32, {L});
  Tensor offset(offsets.data, ncclInt32, {L});
  Tensor sum(total.data, ncclInt32, {1});
  Tensor out(in.out.data, ncclBfloat16, {T, H});
  ncclEpHandle_t handle;
  CHECK_NCCL(ncclEpInitHandle(&handle, group, NCCL_EP_LAYOUT_EXPERT_MAJOR,
                              nullptr, static_cast<int>(K), nullptr));
  ncclEpLayoutInfo_t layout = NCCL_EP_LAYOUT_INFO_INIT;
  layout.expert_counters = count.get();
  layout.expert_offsets = offset.get();
  layout.recv_total_counter = sum.get();
  ncclEpDispatchInputs_t d_in = NCCL_EP_DISPATCH_INPUTS_INIT;
  d_in.tokens = x.get();
  d_in.topk_weights = w.get();
  ncclEpDispatchOutputs_t d_out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  d_out.tokens = rows.get();
  d_out.topk_weights = row_w.get();
  ncclEpCombineInputs_t c_in = NCCL_EP_COMBINE_INPUTS_INIT;
  c_in.tokens = weighted_rows.get();
  ncclEpCombineOutputs_t c_out = NCCL_EP_COMBINE_OUTPUTS_INIT;
  c_out.tokens = out.get();

  timeSteps(
      wl, o,
      [&] {
        CHECK_NCCL(ncclEpUpdateHandle(handle, idx.get(), &layout, wl.stream));
        CHECK_NCCL(
            ncclEpDispatch(handle, &d_in, &d_out, nullptr, nullptr, wl.stream));
      },
      [&] {
        weightRows<<<1024, 256, 0, wl.stream>>>(recv.data, recv_w.data,
                                                total.data, H, weighted.data);
        CHECK_CUDA(cudaGetLastError());
        CHECK_NCCL(ncclEpCombine(handle, &c_in, &c_out, nullptr, wl.stream));
      },
      [&] {
        const std::vector<int32_t> offset = offsets.download(0, L);
        const std::vector<int64_t> starts(offset.begin(), offset.end());
        return checkOutputs(wl, recv, counters.download(0, L), starts,
                            std::vector<int64_t>(L, slots), in.out);
      });
  CHECK_CUDA(cudaStreamSynchronize(wl.stream));
  CHECK_NCCL(ncclEpHandleDestroy(handle));
  // HT's group destroy is no collective: timeSteps ended with reductions
  // on every rank, so no peer still reads this rank's buffers.
  CHECK_NCCL(ncclEpGroupDestroy(group));
  return o;
}

// Prints T's table (the dump's rows, then NCCL EP's) and appends NCCL EP's
// rows to the CSV.
void report(const Args& args, const Meta& m, int64_t tokens,
            const RankData& mine, const std::vector<Outcome>& outcomes) {
  int64_t sent = 0;
  for (const int64_t e : mine.idx) {
    sent += e >= 0;
  }
  const double bytes = static_cast<double>(sent) * m.hidden * 2;
  std::printf(
      "%lld x %s, T = %lld, H = %lld bf16, K = %lld, E = %lld "
      "(rows marked * are bench_peers.py's, from the dump; this "
      "rank's bytes sent: %.0f):\n",
      static_cast<long long>(m.ranks), m.device.c_str(),
      static_cast<long long>(tokens), static_cast<long long>(m.hidden),
      static_cast<long long>(m.topk), static_cast<long long>(m.experts), bytes);
  std::printf("  %-26s %-9s %10s %8s %12s  check\n", "row", "phase",
              "median us", "GB/s", "vs torch a2a");
  auto line = [&](const std::string& row, const std::string& phase, double us,
                  const std::string& check) {
    const auto base = m.times.find({tokens, "torch a2a", phase});
    const double ratio =
        base != m.times.end() && us > 0 ? base->second / us : NAN;
    std::printf("  %-26s %-9s %10.1f %8.1f %11.2fx  %s\n", row.c_str(),
                phase.c_str(), us, bytes / us / 1e3, ratio, check.c_str());
  };
  for (const auto& key : m.order) {
    if (std::get<0>(key) == tokens) {
      line(std::get<1>(key) + " *", std::get<2>(key), m.times.at(key), "");
    }
  }
  std::vector<hostfuse::peers::CsvRow> csv;
  for (const Outcome& o : outcomes) {
    if (o.dispatch_us < 0) {
      std::printf("  %-26s not measured: %s\n", o.mode.c_str(), o.why.c_str());
      continue;
    }
    const std::string verdict = o.ok ? "ok" : "MISMATCH: " + o.why;
    line(o.mode, "dispatch", o.dispatch_us, verdict);
    line(o.mode, "combine", o.combine_us, verdict);
    const std::pair<const char*, double> phases[] = {
        {"dispatch", o.dispatch_us}, {"combine", o.combine_us}};
    for (const auto& [phase, us] : phases) {
      csv.push_back({m.device, m.ranks, tokens, m.hidden, m.topk, m.experts,
                     o.mode, phase, us, bytes, o.ok ? "ok" : "mismatch"});
    }
  }
  if (!args.csv.empty() && !hostfuse::peers::appendCsv(args.csv, csv)) {
    throw Failure("cannot append to " + args.csv);
  }
  std::fflush(stdout);
}

// nccl_ep compiles its HT kernels at run time against the headers it was
// built with, at the paths of the machine that built it. tools/nccl_ep.sh
// puts them in include/ next to this program's bin/: point the compiler
// there, unless the caller chose.
void useHeadersNextToThisProgram() {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) {
    return;
  }
  exe[n] = '\0';
  std::string prefix(exe);
  for (int up = 0; up < 2; ++up) {  // OUT/bin/nccl_ep_bench -> OUT
    prefix = prefix.substr(0, prefix.rfind('/'));
  }
  setenv("NCCL_EP_JIT_SOURCE_DIR", (prefix + "/include/nccl_ep").c_str(), 0);
  setenv("NCCL_EP_JIT_BUILD_INCLUDE_DIR", (prefix + "/include").c_str(), 0);
  setenv("CUDA_HOME", "/usr/local/cuda", 0);
  // nvcc needs a host compiler: the one in CXX where it names one (machines
  // with a compiler of their own off PATH set it).
  const char* cxx = std::getenv("CXX");
  if (cxx != nullptr && *cxx == '/' && access(cxx, X_OK) == 0) {
    setenv("NVCC_EXTRA_FLAGS", (std::string("-ccbin ") + cxx).c_str(), 0);
  }
}

int run(const Args& args, const Rank& r) {
  const Meta m = readMeta(args.dump);
  if (m.ranks != r.world) {
    throw Failure("the dump in " + args.dump + " is of " +
                  std::to_string(m.ranks) + " ranks; this run has " +
                  std::to_string(r.world));
  }
  int devices = 0;
  CHECK_CUDA(cudaGetDeviceCount(&devices));
  if (r.local >= devices) {
    throw Failure("local rank " + std::to_string(r.local) + " has no GPU (" +
                  std::to_string(devices) + " visible)");
  }
  CHECK_CUDA(cudaSetDevice(r.local));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  ncclComm_t comm = initNccl(r, args.dump);
  // Rank 0 writes the CSV: find out now, on every rank, if it cannot.
  const bool csv_ok = r.rank != 0 || args.csv.empty() ||
                      hostfuse::peers::appendCsv(args.csv, {});
  if (!allAgree(csv_ok, comm, stream)) {
    throw Failure("rank 0 cannot append to " + args.csv);
  }
  bool all_ok = true;
  for (const int64_t tokens : m.tokens) {
    if (r.rank == 0) {
      std::printf("T = %lld: reading the dump, running NCCL EP (%s)\n",
                  static_cast<long long>(tokens), args.modes.c_str());
      std::fflush(stdout);
    }
    std::vector<RankData> all;
    for (int s = 0; s < r.world; ++s) {
      all.push_back(readRank(args.dump, m, tokens, s, s == r.rank));
    }
    const std::vector<std::vector<uint64_t>> expected =
        expectedRows(all, m, tokens, r.rank);
    Workload wl{m, r, tokens, all[r.rank], expected, comm, stream, args.iters};
    std::vector<Outcome> outcomes;
    for (const std::string mode : {"ll", "ht"}) {
      if (args.modes != "both" && args.modes != mode) {
        continue;
      }
      const std::string why = unsupported(mode, m, tokens);
      if (!why.empty()) {
        outcomes.emplace_back(mode == "ll" ? "NCCL EP LL" : "NCCL EP HT");
        outcomes.back().why = why;
        continue;
      }
      // A failure inside NCCL EP ends this rank (torchrun then stops the
      // others): its state after an error is not one to go on from.
      outcomes.push_back(mode == "ll" ? runLowLatency(wl)
                                      : runHighThroughput(wl));
    }
    for (const Outcome& o : outcomes) {
      all_ok = all_ok && (o.ok || o.dispatch_us < 0);
    }
    if (r.rank == 0) {
      report(args, m, tokens, all[r.rank], outcomes);
    }
  }
  CHECK_NCCL(ncclCommDestroy(comm));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  hostfuse::cli::Flags flags(
      "nccl_ep_bench",
      "NCCL EP's MoE dispatch and combine (low-latency and high-throughput "
      "modes) on the inputs bench_peers.py --dump DIR wrote, checked against "
      "hostfuse's outputs there, printed next to the times bench_peers.py "
      "measured. One rank per GPU, as many as the dump's ranks:\n"
      "\n"
      "  tools/launch.sh N nccl_ep_bench --dump DIR [--csv F]\n"
      "\n"
      "Exit status 1 when a row's check fails or NCCL EP fails; a mode "
      "whose limits the workload exceeds prints 'not measured' and why.");
  flags.text("--dump", "DIR", &args.dump,
             "what bench_peers.py --dump wrote (required)");
  flags.text("--csv", "FILE", &args.csv,
             "append NCCL EP's rows to this CSV (bench_peers.py's columns)",
             "none");
  flags.choice("--modes", "MODES", &args.modes, {"ll", "ht", "both"},
               "which NCCL EP modes run");
  flags.integer("--iters", "N", &args.iters, 1, 100000,
                "timed steps per mode and token count");
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (args.dump.empty()) {
    return flags.fail("--dump DIR is required");
  }
  Rank r;
  try {
    r.rank = envInt("RANK", 0);
    r.world = envInt("WORLD_SIZE", 1);
    r.local = envInt("LOCAL_RANK", r.rank);
    useHeadersNextToThisProgram();
    return run(args, r);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_ep_bench: rank %d: %s\n", r.rank, e.what());
    return 1;
  }
}
