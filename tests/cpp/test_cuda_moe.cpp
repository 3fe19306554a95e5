// Multi-process tests of the cuda MoE backend: symmetric memory, dispatch
// and combine against a plain ATen reference, device-reported errors, and
// CUDA graph replays.
//
// Run N processes on a machine with N GPUs: tools/run_cuda_moe_tests.sh N.
// Each process reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
// (torchrun sets them); without them it is a single rank. Every test skips
// without a GPU or with fewer GPUs than ranks.
//
// Every rank generates every rank's inputs from the same seeds, so the
// reference needs no communication. Tests never return early between
// collective calls: a rank that left would make the others time out.
#include <cuda_runtime_api.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <hostfuse/ir/fp8_rows.h>
#include <hostfuse/multidevice/comm/symmetric_memory.h>
#include <hostfuse/multidevice/moe/cuda/workspace.h>
#include <hostfuse/multidevice/moe/fp8_packing.h>
#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/utils/options.h>
#include <hostfuse/utils/torch_cuda.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

// ---------------------------------------------------------------------------
// Process-group glue: a TCPStore from the torchrun environment. The moe
// branch's Communicator replaces this at merge time.

struct ProcessGroup {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int device = 0;
  c10::intrusive_ptr<c10d::Store> store;
  std::string skip_reason;
};

int environmentInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

ProcessGroup makeProcessGroup() {
  ProcessGroup group;
  group.rank = environmentInt("RANK", 0);
  group.world = environmentInt("WORLD_SIZE", 1);
  group.local_rank = environmentInt("LOCAL_RANK", group.rank);
  if (!cuda::isAvailable()) {
    group.skip_reason = "no CUDA device on this machine";
    return group;
  }
  // HOSTFUSE_SHARE_GPUS=1 lets ranks share GPUs (rank i on GPU i mod the
  // count, as the Communicator does): the kernels' waits then rely on the
  // GPU time-slicing the processes, so this proves behaviour across ranks,
  // never speed.
  const bool share = options::getBool(Option::ShareGpus).value_or(false);
  if (cuda::deviceCount() < group.world && !share) {
    group.skip_reason = toString("needs one GPU per rank: ", group.world,
                                 " ranks, ", cuda::deviceCount(), " GPUs");
    return group;
  }
  group.device = group.local_rank % cuda::deviceCount();
  cudaSetDevice(group.device);
  const char* address = std::getenv("MASTER_ADDR");
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  c10d::TCPStoreOptions options;
  options.port = static_cast<uint16_t>(
      environmentInt("MASTER_PORT", group.world == 1 ? 0 : 29500));
  // torchrun's agent already serves a store on MASTER_PORT.
  options.isServer =
      !(agent != nullptr && std::string(agent) == "True") && group.rank == 0;
  options.waitWorkers = false;
  options.timeout = std::chrono::seconds(180);
  auto tcp = c10::make_intrusive<c10d::TCPStore>(
      address != nullptr ? address : "127.0.0.1", options);
  group.store =
      c10::make_intrusive<c10d::PrefixStore>("hostfuse/test_cuda_moe", tcp);
  return group;
}

ProcessGroup& processGroup() {
  static ProcessGroup group = makeProcessGroup();
  return group;
}

std::string testName() {
  const auto* info = testing::UnitTest::GetInstance()->current_test_info();
  return toString(info->test_suite_name(), ".", info->name());
}

// ---------------------------------------------------------------------------
// Inputs and the reference.

enum class Routing {
  kUniform,       // K distinct experts per token, uniformly
  kOneExpert,     // every token picks experts 0, 1, ..., K-1
  kSkipLastRank,  // no token picks an expert of the last rank
};

struct Case {
  int64_t experts = 8;
  int64_t topk = 2;
  int64_t hidden = 256;
  at::ScalarType dtype = at::kBFloat16;
  bool weights = true;
  bool int32_idx = false;
  Routing routing = Routing::kUniform;
  double mask = 0.1;            // probability that a pick is masked (-1)
  std::vector<int64_t> tokens;  // per rank; empty: 24 + 8 * rank
  uint64_t seed = 1;
  // Count the picks over the whole grid (what large T uses) even when every
  // block could count all of them itself.
  bool grid_route = false;
  // fp8 dispatch (CudaMoeConfig::fp8_dispatch); hidden a multiple of 128.
  bool fp8 = false;
  // CudaMoeConfig::blocks and push_blocks (0: the defaults).
  int blocks = 0;
  int push_blocks = 0;
  // CudaMoeConfig::staged_push (false: the variable decides).
  bool staged = false;

  int64_t tokensOf(int rank) const {
    return tokens.empty() ? 24 + 8 * rank : tokens.at(rank);
  }
  int64_t maxTokens(int world) const {
    int64_t most = 1;
    for (int r = 0; r < world; ++r) {
      most = std::max(most, tokensOf(r));
    }
    return most;
  }
};

// CPU tensors of one rank: x [T, H], idx [T, K] int64, weights [T, K] fp32.
struct Inputs {
  at::Tensor x;
  at::Tensor idx;
  at::Tensor weights;
};

Inputs makeInputs(const Case& c, int world, int rank, uint64_t round = 0) {
  at::Generator gen = at::detail::createCPUGenerator(
      c.seed * 1000003 + round * 7919 + static_cast<uint64_t>(rank));
  const int64_t tokens = c.tokensOf(rank);
  const int64_t local = c.experts / world;
  const auto cpu_float = at::dtype(at::kFloat);
  Inputs in;
  in.x = at::randn({tokens, c.hidden}, gen, cpu_float).to(c.dtype);
  const int64_t usable = c.routing == Routing::kSkipLastRank && world > 1
                             ? c.experts - local
                             : c.experts;
  const int64_t picked = std::min(c.topk, usable);
  at::Tensor ids;
  if (c.routing == Routing::kOneExpert) {
    ids = at::arange(picked, at::dtype(at::kLong))
              .unsqueeze(0)
              .expand({tokens, picked})
              .contiguous();
  } else {
    ids = at::rand({tokens, usable}, gen, cpu_float)
              .argsort(/*dim=*/int64_t{1})
              .slice(1, 0, picked)
              .contiguous();
  }
  in.idx = at::full({tokens, c.topk}, -1, at::dtype(at::kLong));
  in.idx.slice(1, 0, picked).copy_(ids);
  const at::Tensor masked = at::rand({tokens, c.topk}, gen, cpu_float) < c.mask;
  in.idx.masked_fill_(masked, -1);
  in.weights = at::rand({tokens, c.topk}, gen, cpu_float) + 0.1;
  return in;
}

std::vector<Inputs> allInputs(const Case& c, int world, uint64_t round = 0) {
  std::vector<Inputs> all;
  for (int r = 0; r < world; ++r) {
    all.push_back(makeInputs(c, world, r, round));
  }
  return all;
}

// The tests' expert e applied to row x of pick k: x * ((e + 1) + k / 2) in
// fp32, rounded to the dtype. Exactly representable scales, so the device
// and the CPU agree bit for bit.
at::Tensor expertScale(const at::Tensor& experts, const at::Tensor& picks) {
  return (experts + 1).to(at::kFloat) + 0.5 * picks.to(at::kFloat);
}

struct Expected {
  at::Tensor rows, src_rank, src_token, src_k, weights;
  at::Tensor counts, to_rank, from_rank, combined;
  at::Tensor combined_per_rank;  // reduce=per_rank
};

// Packed fp8 rows (moe::quantizeFp8Packed) back to c.dtype.
at::Tensor dequantize(const at::Tensor& packed, const Case& c) {
  const auto [q, scales] = moe::unpackFp8(packed, c.hidden);
  return dequantizeFp8Rows(q, scales, c.dtype);
}

Expected reference(const Case& c, int world, int rank,
                   const std::vector<Inputs>& all) {
  const int64_t local = c.experts / world;
  std::vector<at::Tensor> rows, src_rank, src_token, src_k, weights;
  Expected e;
  e.counts = at::zeros({local}, at::dtype(at::kLong));
  for (int64_t l = 0; l < local; ++l) {
    const int64_t expert = rank * local + l;
    for (int s = 0; s < world; ++s) {
      const at::Tensor hits = (all[s].idx == expert).nonzero();  // (t, k)
      const at::Tensor t = hits.select(1, 0);
      const at::Tensor k = hits.select(1, 1);
      rows.push_back(all[s].x.index_select(0, t));
      src_rank.push_back(at::full_like(t, s));
      src_token.push_back(t);
      src_k.push_back(k);
      weights.push_back(all[s].weights.index({t, k}));
      e.counts[l] += hits.size(0);
    }
  }
  e.rows = at::cat(rows);
  e.src_rank = at::cat(src_rank);
  e.src_token = at::cat(src_token);
  e.src_k = at::cat(src_k);
  e.weights = at::cat(weights);
  e.to_rank = at::zeros({world}, at::dtype(at::kLong));
  e.from_rank = at::zeros({world}, at::dtype(at::kLong));
  for (int d = 0; d < world; ++d) {
    auto on = [&](const at::Tensor& idx, int r) {
      return ((idx >= r * local) & (idx < (r + 1) * local)).sum();
    };
    e.to_rank[d] = on(all[rank].idx, d);
    e.from_rank[d] = on(all[d].idx, rank);
  }
  // combined[t] = sum over unmasked k in order of w * out(t, k), in fp32 with
  // separate multiply and add (separate ATen ops never fuse).
  const Inputs& own = all[rank];
  // With fp8 dispatch the experts see the dequantized rows: the same for
  // every pick of a token (rows are quantized per token).
  const at::Tensor own_x =
      c.fp8 ? dequantize(moe::quantizeFp8Packed(own.x), c) : own.x;
  at::Tensor sum = at::zeros({own.x.size(0), c.hidden}, at::dtype(at::kFloat));
  for (int64_t k = 0; k < c.topk; ++k) {
    const at::Tensor ids = own.idx.select(1, k);
    const at::Tensor scale =
        expertScale(ids, at::full_like(ids, k)).unsqueeze(1);
    const at::Tensor out =
        (own_x.to(at::kFloat) * scale).to(c.dtype).to(at::kFloat);
    const at::Tensor contribution =
        c.weights ? own.weights.select(1, k).unsqueeze(1) * out : out;
    sum = at::where((ids >= 0).unsqueeze(1), sum + contribution, sum);
  }
  e.combined = sum.to(c.dtype);
  // reduce=per_rank: per rank in rank order, the picks there summed the same
  // way and rounded to the dtype; those partials summed in fp32.
  at::Tensor total = at::zeros_like(sum);
  for (int r = 0; r < world; ++r) {
    at::Tensor partial = at::zeros_like(sum);
    at::Tensor has_picks = at::zeros({own.x.size(0)}, at::dtype(at::kBool));
    for (int64_t k = 0; k < c.topk; ++k) {
      const at::Tensor ids = own.idx.select(1, k);
      const at::Tensor on_r = (ids >= r * local) & (ids < (r + 1) * local);
      const at::Tensor scale =
          expertScale(ids, at::full_like(ids, k)).unsqueeze(1);
      const at::Tensor out =
          (own_x.to(at::kFloat) * scale).to(c.dtype).to(at::kFloat);
      const at::Tensor contribution =
          c.weights ? own.weights.select(1, k).unsqueeze(1) * out : out;
      partial = at::where(on_r.unsqueeze(1), partial + contribution, partial);
      has_picks = has_picks | on_r;
    }
    total = at::where(has_picks.unsqueeze(1),
                      total + partial.to(c.dtype).to(at::kFloat), total);
  }
  e.combined_per_rank = total.to(c.dtype);
  return e;
}

// Runs the tests' experts on the dispatched rows, on the device, without
// host synchronization (so it can be captured).
at::Tensor runExperts(const CudaDispatchResult& result, const Case& c,
                      int world, int rank) {
  const int64_t local = c.experts / world;
  const int64_t rows = result.recv_x.size(0);
  const at::Tensor ends = result.recv_expert_counts.cumsum(0);
  const at::Tensor row_ids = at::arange(rows, ends.options());
  const at::Tensor local_ids =
      at::searchsorted(ends, row_ids, /*out_int32=*/false, /*right=*/true)
          .clamp_max(local - 1);
  const at::Tensor scale = expertScale(local_ids + rank * local,
                                       result.recv_src_k.clamp(0, c.topk - 1));
  const at::Tensor values =
      c.fp8 ? dequantizeFp8Rows(result.recv_x, result.recv_scales, c.dtype)
            : result.recv_x;
  return (values.to(at::kFloat) * scale.unsqueeze(1)).to(c.dtype);
}

// Number of mismatches, with a message for the first few.
class Checker {
 public:
  void equal(const at::Tensor& actual, const at::Tensor& expected,
             const std::string& what) {
    const at::Tensor a = actual.cpu();
    const at::Tensor e = expected.cpu();
    const bool same = a.sizes() == e.sizes() &&
                      a.scalar_type() == e.scalar_type() && at::equal(a, e);
    if (!same && ++failures_ <= 5) {
      ADD_FAILURE() << "rank " << processGroup().rank << ": " << what
                    << " differs from the reference (sizes " << a.sizes()
                    << " vs " << e.sizes() << ")";
    }
  }
  int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

void checkDispatch(Checker& check, const CudaDispatchResult& result,
                   const Expected& e, bool weights, const std::string& when,
                   bool fp8 = false) {
  const int64_t rows = e.src_rank.size(0);
  check.equal(result.recv_expert_counts, e.counts, when + " counts");
  check.equal(result.n_rows_to_rank, e.to_rank, when + " n_rows_to_rank");
  check.equal(result.n_rows_from_rank, e.from_rank, when + " n_rows_from_rank");
  if (rows > result.recv_x.size(0)) {
    ADD_FAILURE() << when << ": " << rows << " rows exceed the capacity";
    return;
  }
  if (fp8) {
    // The collective backend's quantizer, bit for bit.
    const auto [q, scales] =
        moe::unpackFp8(moe::quantizeFp8Packed(e.rows), e.rows.size(1));
    check.equal(result.recv_x.slice(0, 0, rows).view(at::kByte),
                q.view(at::kByte), when + " recv_x (fp8)");
    check.equal(result.recv_scales.slice(0, 0, rows), scales,
                when + " recv_scales");
  } else {
    check.equal(result.recv_x.slice(0, 0, rows), e.rows, when + " recv_x");
  }
  check.equal(result.recv_src_rank.slice(0, 0, rows), e.src_rank,
              when + " recv_src_rank");
  check.equal(result.recv_src_token.slice(0, 0, rows), e.src_token,
              when + " recv_src_token");
  check.equal(result.recv_src_k.slice(0, 0, rows), e.src_k,
              when + " recv_src_k");
  if (weights) {
    check.equal(result.recv_weights.slice(0, 0, rows), e.weights,
                when + " recv_weights");
  }
}

// ---------------------------------------------------------------------------
// Fixture.

class CudaMoe : public testing::Test {
 protected:
  void SetUp() override {
    ProcessGroup& group = processGroup();
    if (!group.skip_reason.empty()) {
      GTEST_SKIP() << group.skip_reason;
    }
    rank_ = group.rank;
    world_ = group.world;
    device_ = group.device;
    cudaSetDevice(device_);
    storeBarrier(*group.store, testName() + "/start", world_);
  }

  void TearDown() override {
    if (processGroup().skip_reason.empty()) {
      cudaDeviceSynchronize();
      storeBarrier(*processGroup().store, testName() + "/end", world_);
    }
  }

  std::unique_ptr<CudaMoeWorkspace> makeWorkspace(const Case& c,
                                                  const std::string& name,
                                                  int64_t capacity = 0,
                                                  bool check_each_call = true,
                                                  double timeout_s = 20) {
    CudaMoeConfig config;
    config.rank = rank_;
    config.world_size = world_;
    config.device = device_;
    config.num_experts = c.experts;
    config.max_tokens = c.maxTokens(world_);
    config.hidden = c.hidden;
    config.topk = c.topk;
    config.dtype = c.dtype;
    config.capacity = capacity;
    config.tag = testName() + "/" + name;
    config.check_each_call = check_each_call;
    config.timeout_s = timeout_s;
    config.grid_route_min_tokens =
        c.grid_route ? 1 : std::numeric_limits<int64_t>::max();
    config.blocks = c.blocks;
    config.push_blocks = c.push_blocks;
    config.fp8_dispatch = c.fp8;
    config.staged_push = c.staged;
    return std::make_unique<CudaMoeWorkspace>(processGroup().store, config);
  }

  at::Device device() const {
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_));
  }

  struct DeviceInputs {
    at::Tensor x, idx, weights;
  };
  DeviceInputs toDevice(const Inputs& in, const Case& c) const {
    DeviceInputs out;
    out.x = in.x.to(device());
    out.idx = in.idx.to(c.int32_idx ? at::kInt : at::kLong).to(device());
    out.weights = in.weights.to(device());
    return out;
  }

  // One eager dispatch + experts + combine, checked against the reference.
  void runAndCheck(CudaMoeWorkspace& workspace, const Case& c,
                   const std::string& when, uint64_t round = 0) {
    const std::vector<Inputs> all = allInputs(c, world_, round);
    const DeviceInputs in = toDevice(all[rank_], c);
    std::optional<at::Tensor> weights;
    if (c.weights) {
      weights = in.weights;
    }
    const Expected e = reference(c, world_, rank_, all);
    Checker check;
    try {
      const CudaDispatchResult result =
          workspace.dispatch(in.x, in.idx, weights);
      checkDispatch(check, result, e, c.weights, when, c.fp8);
      const at::Tensor out = runExperts(result, c, world_, rank_);
      const at::Tensor combined = workspace.combine(out, result, weights);
      check.equal(combined, e.combined, when + " combined");
      // The same layout again, combined per rank with the rows' weights.
      std::optional<at::Tensor> recv_weights;
      if (c.weights) {
        recv_weights = result.recv_weights;
      }
      const at::Tensor per_rank =
          workspace.combine(out, result, recv_weights, -1, at::Tensor(),
                            MoeCombineReduce::PerRank);
      check.equal(per_rank, e.combined_per_rank, when + " combined per rank");
    } catch (const std::exception& error) {
      ADD_FAILURE() << "rank " << rank_ << ", " << when << ": " << error.what();
    }
  }

  void replayGraph(const Case& c, const std::string& name, int replays);

  int rank_ = 0;
  int world_ = 1;
  int device_ = 0;
};

// ---------------------------------------------------------------------------
// Symmetric memory.

TEST_F(CudaMoe, SymmetricMemoryMapsEveryPeersBuffer) {
  const size_t bytes = 3 << 20;
  auto memory = SymmetricMemory::allocate(processGroup().store, rank_, world_,
                                          device_, bytes, testName());
  ASSERT_EQ(memory->size(), bytes);
  cudaMemset(memory->localPtr(), rank_ + 1, bytes);
  cudaDeviceSynchronize();
  storeBarrier(*processGroup().store, testName() + "/written", world_);
  std::vector<void*> table(world_);
  cudaMemcpy(table.data(), memory->devicePeerPtrs(), sizeof(void*) * world_,
             cudaMemcpyDeviceToHost);
  for (int peer = 0; peer < world_; ++peer) {
    EXPECT_EQ(table[peer], memory->peerPtr(peer));
    std::vector<uint8_t> host(bytes);
    ASSERT_EQ(cudaMemcpy(host.data(), memory->peerPtr(peer), bytes,
                         cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_TRUE(std::all_of(host.begin(), host.end(),
                            [&](uint8_t v) { return v == peer + 1; }))
        << "rank " << rank_ << " reads a wrong value through its mapping of "
        << "rank " << peer << "'s buffer";
  }
  storeBarrier(*processGroup().store, testName() + "/read", world_);
}

// ---------------------------------------------------------------------------
// Dispatch and combine against the reference.

TEST_F(CudaMoe, MatchesReferenceForEveryTopKAndExpertCount) {
  for (const int64_t topk : {1, 2, 4, 8}) {
    for (const int64_t per_rank : {1, 2, 8}) {
      Case c;
      c.experts = per_rank * world_;
      c.topk = topk;
      c.seed = 100 + topk * 10 + per_rank;
      auto workspace = makeWorkspace(c, toString("k", topk, "_e", c.experts));
      runAndCheck(*workspace, c,
                  toString("K=", topk, " E=", c.experts, " call 1"));
      runAndCheck(*workspace, c,
                  toString("K=", topk, " E=", c.experts, " call 2"), 1);
    }
  }
}

TEST_F(CudaMoe, MatchesReferenceForEveryDtypeAndRowAlignment) {
  // Row sizes that take the 16-, 8-, 4- and 2-byte copy paths.
  struct Shape {
    at::ScalarType dtype;
    int64_t hidden;
  };
  for (const Shape shape : {Shape{at::kFloat, 256}, Shape{at::kFloat, 98},
                            Shape{at::kFloat, 97}, Shape{at::kBFloat16, 100},
                            Shape{at::kBFloat16, 97}, Shape{at::kHalf, 64}}) {
    Case c;
    c.experts = 4 * world_;
    c.topk = 4;
    c.dtype = shape.dtype;
    c.hidden = shape.hidden;
    c.seed = 7 + shape.hidden;
    auto workspace = makeWorkspace(
        c, toString(c10::toString(shape.dtype), "_h", shape.hidden));
    runAndCheck(*workspace, c, toString(shape.dtype, " H=", shape.hidden));
  }
}

TEST_F(CudaMoe, MatchesReferenceWithoutWeightsAndWithInt32Ids) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  c.weights = false;
  c.int32_idx = true;
  auto workspace = makeWorkspace(c, "plain");
  runAndCheck(*workspace, c, "no weights, int32 ids");
}

// fp8 dispatch: the rows arrive quantized exactly as the collective
// backend quantizes them (values and scales), for every row dtype, with
// both routes and in both combine modes; the experts see the dequantized
// rows.
TEST_F(CudaMoe, Fp8DispatchMatchesTheCollectiveQuantizer) {
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (const bool grid_route : {false, true}) {
      Case c;
      c.experts = 4 * world_;
      c.topk = 4;
      c.hidden = 384;
      c.dtype = dtype;
      c.fp8 = true;
      c.grid_route = grid_route;
      c.seed = 77;
      auto workspace =
          makeWorkspace(c, toString("fp8_", c10::toString(dtype), grid_route));
      runAndCheck(*workspace, c,
                  toString("fp8 ", c10::toString(dtype),
                           grid_route ? ", grid route" : ""));
    }
  }
}

TEST_F(CudaMoe, SkewedRoutingSendsEveryTokenToOneExpert) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 1;
  c.mask = 0.0;
  c.routing = Routing::kOneExpert;
  auto workspace = makeWorkspace(c, "one_expert");
  runAndCheck(*workspace, c, "all to expert 0");
  c.topk = std::min<int64_t>(4, c.experts);
  auto wide = makeWorkspace(c, "first_experts");
  runAndCheck(*wide, c, "all to experts 0..K-1");
}

TEST_F(CudaMoe, RankThatReceivesNothingAndRankWithoutTokens) {
  Case c;
  c.experts = 4 * world_;
  c.topk = 3;
  c.routing = Routing::kSkipLastRank;
  auto workspace = makeWorkspace(c, "skip_last");
  runAndCheck(*workspace, c, "last rank receives nothing");

  Case empty;
  empty.experts = 2 * world_;
  empty.topk = 2;
  empty.tokens.assign(world_, 16);
  empty.tokens[0] = 0;
  auto second = makeWorkspace(empty, "empty_rank");
  runAndCheck(*second, empty, "rank 0 has no tokens");
  runAndCheck(*second, empty, "rank 0 has no tokens, again", 1);
}

TEST_F(CudaMoe, FullyMaskedTokensCombineToZero) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 4;
  c.mask = 0.6;  // many tokens lose every pick
  auto workspace = makeWorkspace(c, "masked");
  runAndCheck(*workspace, c, "mostly masked");
}

TEST_F(CudaMoe, MatchesReferenceWithTheGridRoute) {
  for (const int64_t topk : {1, 3, 8}) {
    Case c;
    c.grid_route = true;
    c.experts = 4 * world_;
    c.topk = topk;
    c.seed = 300 + topk;
    auto workspace = makeWorkspace(c, toString("k", topk));
    runAndCheck(*workspace, c, toString("grid route, K=", topk));
    runAndCheck(*workspace, c, toString("grid route, K=", topk, " again"), 1);
  }
  Case skip;
  skip.grid_route = true;
  skip.experts = 2 * world_;
  skip.topk = 2;
  skip.routing = Routing::kSkipLastRank;
  skip.tokens.assign(world_, 40);
  skip.tokens[0] = 0;
  auto workspace = makeWorkspace(skip, "skip_last_empty_first");
  runAndCheck(*workspace, skip, "grid route, rank 0 empty, last rank idle");
  Case fp32 = skip;
  fp32.routing = Routing::kUniform;
  fp32.tokens.clear();
  fp32.dtype = at::kFloat;
  fp32.hidden = 97;
  auto odd = makeWorkspace(fp32, "fp32_odd");
  runAndCheck(*odd, fp32, "grid route, fp32, H = 97");
}

// T K above kLocalRoutePicks takes the grid route by itself; then the same
// T with the fewest blocks (one push block per peer, one local block), so
// that every warp handles many tokens and the local block also expands
// and reduces everything of this rank.
TEST_F(CudaMoe, MatchesReferenceWithManyTokensAndWithTheFewestBlocks) {
  Case c;
  c.experts = 4 * world_;
  c.topk = 8;
  c.hidden = 64;
  c.tokens.assign(world_, 600);  // 4800 picks
  c.tokens[0] = 557;
  c.seed = 909;
  auto workspace = makeWorkspace(c, "many");
  runAndCheck(*workspace, c, "600 tokens, K=8");
  runAndCheck(*workspace, c, "600 tokens, K=8, again", 1);
  Case few = c;
  few.blocks = world_;
  few.push_blocks = 1;
  few.seed = 910;
  auto small = makeWorkspace(few, "fewest_blocks");
  EXPECT_EQ(small->blocks(), world_);
  EXPECT_EQ(small->pushBlocks(), world_ - 1);
  runAndCheck(*small, few, "600 tokens, K=8, R blocks");
  Case few_local = few;
  few_local.tokens.assign(world_, 30);
  few_local.seed = 911;
  runAndCheck(*small, few_local, "30 tokens, K=8, R blocks", 1);
}

// The staged push (rows into staging slots before the counts are in, then
// copied into place by the receiver) gives exactly the reference's rows,
// provenance, counts and combined tokens, as the counted push does: every
// K and expert count, both routes, fp8, fp32 rows of odd width, skewed
// routing, a rank without tokens and one that receives nothing, masked
// picks, no weights with int32 ids, and the fewest blocks. Two calls per
// workspace, so that both staging parities are used; no guard is touched.
TEST_F(CudaMoe, StagedPushMatchesTheReference) {
  if (world_ < 2) {
    GTEST_SKIP() << "needs at least 2 ranks: with one there is no peer to "
                    "stage for, and the push is the counted one";
  }
  std::vector<std::pair<std::string, Case>> cases;
  for (const int64_t topk : {1, 3, 8}) {
    for (const int64_t per_rank : {1, 2, 8}) {
      Case c;
      c.experts = per_rank * world_;
      c.topk = std::min(topk, c.experts);
      c.seed = 500 + topk * 10 + per_rank;
      cases.emplace_back(toString("K=", c.topk, " E=", c.experts), c);
      c.grid_route = true;
      cases.emplace_back(toString("grid route, K=", c.topk, " E=", c.experts),
                         c);
    }
  }
  Case fp8;
  fp8.experts = 4 * world_;
  fp8.topk = 4;
  fp8.hidden = 384;
  fp8.fp8 = true;
  cases.emplace_back("fp8", fp8);
  Case odd;
  odd.experts = 2 * world_;
  odd.topk = 2;
  odd.dtype = at::kFloat;
  odd.hidden = 97;
  cases.emplace_back("fp32, H = 97", odd);
  Case skewed;
  skewed.experts = 2 * world_;
  skewed.topk = std::min<int64_t>(4, skewed.experts);
  skewed.mask = 0.0;
  skewed.routing = Routing::kOneExpert;
  cases.emplace_back("every token to experts 0..K-1", skewed);
  Case idle;
  idle.experts = 4 * world_;
  idle.topk = 3;
  idle.routing = Routing::kSkipLastRank;
  idle.tokens.assign(world_, 20);
  idle.tokens[0] = 0;
  cases.emplace_back("rank 0 without tokens, last rank receives nothing", idle);
  Case masked;
  masked.experts = 2 * world_;
  masked.topk = 4;
  masked.mask = 0.6;
  masked.weights = false;
  masked.int32_idx = true;
  cases.emplace_back("mostly masked, no weights, int32 ids", masked);
  Case few;
  few.experts = 4 * world_;
  few.topk = 8;
  few.hidden = 64;
  few.tokens.assign(world_, 600);
  few.tokens[0] = 557;
  few.blocks = world_;
  few.push_blocks = 1;
  cases.emplace_back("600 tokens, K=8, R blocks", few);
  int index = 0;
  for (auto& [what, c] : cases) {
    c.staged = true;
    auto workspace = makeWorkspace(c, toString("staged_", index++));
    runAndCheck(*workspace, c, "staged push, " + what);
    runAndCheck(*workspace, c, "staged push, " + what + ", again", 1);
    runAndCheck(*workspace, c, "staged push, " + what + ", third call", 2);
    EXPECT_EQ(workspace->damagedGuardBytes(), 0) << what;
  }
}

TEST_F(CudaMoe, TwoWorkspacesDoNotShareBuffers) {
  Case a;
  a.experts = 2 * world_;
  a.topk = 2;
  a.seed = 11;
  Case b = a;
  b.seed = 12;
  auto first = makeWorkspace(a, "layer0");
  auto second = makeWorkspace(b, "layer1");
  const std::vector<Inputs> all_a = allInputs(a, world_);
  const std::vector<Inputs> all_b = allInputs(b, world_);
  const DeviceInputs in_a = toDevice(all_a[rank_], a);
  const DeviceInputs in_b = toDevice(all_b[rank_], b);
  const CudaDispatchResult ra = first->dispatch(in_a.x, in_a.idx, in_a.weights);
  const CudaDispatchResult rb =
      second->dispatch(in_b.x, in_b.idx, in_b.weights);
  EXPECT_NE(ra.recv_x.data_ptr(), rb.recv_x.data_ptr());
  // The second layer's dispatch left the first layer's rows alone.
  Checker check;
  const Expected ea = reference(a, world_, rank_, all_a);
  const Expected eb = reference(b, world_, rank_, all_b);
  checkDispatch(check, ra, ea, true, "layer 0");
  checkDispatch(check, rb, eb, true, "layer 1");
  const at::Tensor ca =
      first->combine(runExperts(ra, a, world_, rank_), ra, in_a.weights);
  const at::Tensor cb =
      second->combine(runExperts(rb, b, world_, rank_), rb, in_b.weights);
  check.equal(ca, ea.combined, "layer 0 combined");
  check.equal(cb, eb.combined, "layer 1 combined");
  test::expectErrorContains(
      [&] { first->combine(runExperts(rb, b, world_, rank_), rb); },
      {"another workspace"});
}

// ---------------------------------------------------------------------------
// Errors.

// Malformed weights are refused on the host by dispatch and by combine, on
// every rank alike, before anything is launched. With one rank the next
// call works. With peers a refusal is published to them (they would wait
// for this rank otherwise), so the workspace is unusable on every rank
// after it, and each case takes a new one.
TEST_F(CudaMoe, BadWeightsAreRefusedByDispatchAndCombine) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  const DeviceInputs in = toDevice(allInputs(c, world_)[rank_], c);
  const int64_t tokens = c.tokensOf(rank_);
  const at::Tensor transposed = in.weights.t().contiguous();
  const at::Tensor integral = in.weights.to(at::kLong);
  const std::string shape = toString("[", tokens, ", ", c.topk, "]");
  auto expectNextCall = [&](CudaMoeWorkspace& workspace, const char* what) {
    if (world_ == 1) {
      runAndCheck(workspace, c, toString("valid call after ", what), 1);
    } else {
      test::expectErrorContains(
          [&] { workspace.dispatch(in.x, in.idx, in.weights); },
          {"unusable after an earlier failure"});
    }
  };
  int round = 0;
  for (const at::Tensor& bad : {transposed, integral}) {
    auto workspace = makeWorkspace(c, toString("dispatch", ++round));
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, in.idx, bad); },
        {"MoE dispatch", "topk_weights must be a floating", shape});
    expectNextCall(*workspace, "bad dispatch weights");
  }
  for (const at::Tensor& bad : {transposed, integral}) {
    auto workspace = makeWorkspace(c, toString("combine", ++round));
    const CudaDispatchResult result =
        workspace->dispatch(in.x, in.idx, in.weights);
    const at::Tensor out = runExperts(result, c, world_, rank_);
    test::expectErrorContains(
        [&] { workspace->combine(out, result, bad); },
        {"MoE combine", "topk_weights must be a floating", shape});
    if (world_ == 1) {
      workspace->combine(out, result, in.weights);
    }
    expectNextCall(*workspace, "bad combine weights");
  }
}

// One rank refuses its arguments while its peers dispatch: the peers'
// kernels learn it from the failure it publishes and raise naming it at
// once, long before their timeout; the workspace is then unusable on every
// rank, and new ones work.
TEST_F(CudaMoe, ARankThatRefusesItsInputsStopsEveryPeerAtOnce) {
  if (world_ < 2) {
    GTEST_SKIP() << "needs at least 2 ranks";
  }
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  constexpr double kTimeoutS = 30;
  auto workspace = makeWorkspace(c, "refuse", 0, true, kTimeoutS);
  const DeviceInputs in = toDevice(allInputs(c, world_)[rank_], c);
  const int bad = world_ - 1;
  const auto start = std::chrono::steady_clock::now();
  if (rank_ == bad) {
    const at::Tensor float_idx = in.idx.to(at::kFloat);
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, float_idx, in.weights); },
        {"topk_idx must be int64 or int32"});
  } else {
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, in.idx, in.weights); },
        {toString("rank ", bad, " of ", world_,
                  " raised an error on its host (its own error says why) and "
                  "told every rank"),
         "recreate it on every rank"});
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_LT(seconds, kTimeoutS / 3) << "the peers waited for their timeout";
  test::expectErrorContains(
      [&] { workspace->dispatch(in.x, in.idx, in.weights); },
      {"unusable after an earlier failure"});
  auto fresh = makeWorkspace(c, "fresh");
  runAndCheck(*fresh, c, "a new workspace after the failure");
}

// The last rank combines with the layout id of the workspace's first
// dispatch after a second one ran: its kernel finds the stale epoch on the
// device, writes NaN and tells its peers, who stop at once; the workspace
// is then unusable on every rank, and a new one works.
TEST_F(CudaMoe, CombineRefusesTheLayoutOfAnEarlierDispatch) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  auto workspace = makeWorkspace(c, "stale");
  const DeviceInputs in = toDevice(allInputs(c, world_)[rank_], c);
  const CudaDispatchResult first =
      workspace->dispatch(in.x, in.idx, in.weights);
  const CudaDispatchResult second =
      workspace->dispatch(in.x, in.idx, in.weights);
  EXPECT_EQ(first.recv_layout_id.cpu()[0].item<int64_t>(), 1);
  EXPECT_EQ(second.recv_layout_id.cpu()[0].item<int64_t>(), 2);
  const at::Tensor out = runExperts(second, c, world_, rank_);
  const int bad = world_ - 1;
  const at::Tensor& layout_id =
      rank_ == bad ? first.recv_layout_id : second.recv_layout_id;
  const std::vector<std::string> fragments =
      rank_ == bad
          ? std::vector<std::string>{toString("MoeCombine: bad input on rank ",
                                              bad, " of ", world_),
                                     "the layout (recv_layout_id) is the one "
                                     "of dispatch #1",
                                     "but its latest dispatch is #2"}
          : std::vector<std::string>{
                toString("rank ", bad, " of ", world_,
                         " was given a stale layout in its combine"),
                "recreate it on every rank"};
  test::expectErrorContains(
      [&] { workspace->combine(out, second, in.weights, -1, layout_id); },
      fragments);
  test::expectErrorContains(
      [&] { workspace->dispatch(in.x, in.idx, in.weights); },
      {"unusable after an earlier failure"});
  auto fresh = makeWorkspace(c, "fresh");
  runAndCheck(*fresh, c, "a new workspace after the stale layout");
}

// Rank 0 combines per_pick while the others combine per_rank: the slots
// would hold rows of another meaning. Every rank that waits for a peer's
// rows finds the peer's mode on the device, records it and tells the
// peers; every rank raises, and a new workspace works.
TEST_F(CudaMoe, RanksCombiningInDifferentModesAllRaise) {
  if (world_ < 2) {
    GTEST_SKIP() << "needs at least 2 ranks";
  }
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  c.mask = 0;
  auto workspace = makeWorkspace(c, "modes");
  const DeviceInputs in = toDevice(allInputs(c, world_)[rank_], c);
  const CudaDispatchResult result =
      workspace->dispatch(in.x, in.idx, in.weights);
  const at::Tensor out = runExperts(result, c, world_, rank_);
  test::expectErrorContains(
      [&] {
        if (rank_ == 0) {
          workspace->combine(out, result, in.weights);
        } else {
          workspace->combine(out, result, result.recv_weights, -1, at::Tensor(),
                             MoeCombineReduce::PerRank);
        }
      },
      {"reduce="});
  test::expectErrorContains(
      [&] { workspace->dispatch(in.x, in.idx, in.weights); },
      {"unusable after an earlier failure"});
  auto fresh = makeWorkspace(c, "fresh");
  runAndCheck(*fresh, c, "a new workspace after mixed modes");
}

TEST_F(CudaMoe, BadExpertIdIsReportedOnEveryRankAndTheNextCallWorks) {
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  const int bad = world_ - 1;
  for (const int variant : {0, 1, 2, 3, 4, 5, 6, 7}) {
    // Both kinds of bad id, eager and at the next check, with the counted
    // and (with peers) the staged push, which sends before it knows that a
    // peer's input is bad.
    const bool duplicate = (variant & 1) != 0;
    const bool eager = (variant & 2) == 0;
    c.staged = (variant & 4) != 0;
    if (c.staged && world_ < 2) {
      continue;  // no peer to stage for: the counted push again
    }
    auto workspace = makeWorkspace(c, toString("bad_", variant), 0, eager);
    std::vector<Inputs> all = allInputs(c, world_);
    Inputs& mine = all[rank_];
    if (rank_ == bad) {
      mine.idx[3][0] = 0;
      mine.idx[3][1] = duplicate ? 0 : c.experts;
    }
    const DeviceInputs in = toDevice(mine, c);
    const std::vector<std::string> fragments =
        duplicate ? std::vector<std::string>{toString("rank ", bad),
                                             "names expert 0 twice in token 3"}
                  : std::vector<std::string>{
                        toString("rank ", bad),
                        toString("topk_idx holds expert id ", c.experts,
                                 " at token 3, pick 1")};
    if (eager) {
      test::expectErrorContains(
          [&] { workspace->dispatch(in.x, in.idx, in.weights); }, fragments);
    } else {
      workspace->dispatch(in.x, in.idx, in.weights);
      test::expectErrorContains([&] { workspace->checkStatus(); }, fragments);
    }
    runAndCheck(*workspace, c, "valid call after a bad one", 1);
    // The bad call's parity again: its staging slots are read back only
    // with the new call's epoch.
    runAndCheck(*workspace, c, "second valid call after a bad one", 2);
    if (!eager) {
      EXPECT_NO_THROW(workspace->checkStatus());
    }
  }
}

TEST_F(CudaMoe, CapacityOverflowIsReportedAndNothingIsWrittenOutOfBounds) {
  for (const int variant : {0, 1, 2, 3}) {
    const bool grid_route = (variant & 1) != 0;
    Case c;
    c.staged = (variant & 2) != 0;
    if (c.staged && world_ < 2) {
      continue;  // no peer to stage for: the counted push again
    }
    c.experts = 2 * world_;
    c.topk = 1;
    c.mask = 0.0;
    c.routing = Routing::kOneExpert;  // rank 0 receives every token
    c.grid_route = grid_route;
    const int64_t capacity = 8;
    auto workspace = makeWorkspace(c, toString("small_", variant), capacity);
    EXPECT_EQ(workspace->capacity(), capacity);
    const std::vector<Inputs> all = allInputs(c, world_);
    const DeviceInputs in = toDevice(all[rank_], c);
    int64_t needed = 0;
    for (int r = 0; r < world_; ++r) {
      needed += c.tokensOf(r);
    }
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, in.idx, in.weights); },
        {"capacity overflow", "rank 0", toString("receives ", needed, " rows"),
         toString("capacity >= ", needed)});
    EXPECT_EQ(workspace->damagedGuardBytes(), 0);
    // A call that fits in the same workspace.
    Case fits = c;
    fits.tokens.assign(world_, 0);
    fits.tokens[0] = capacity;
    runAndCheck(*workspace, fits, "fitting call after an overflow");
    EXPECT_EQ(workspace->damagedGuardBytes(), 0);
  }
}

TEST_F(CudaMoe, TimeoutNamesTheRankThatSkippedTheCall) {
  if (world_ < 2) {
    GTEST_SKIP() << "needs at least 2 ranks";
  }
  Case c;
  c.experts = 2 * world_;
  c.topk = 2;
  auto workspace = makeWorkspace(c, "skip", 0, true, /*timeout_s=*/2);
  const int absent = world_ - 1;
  const std::vector<Inputs> all = allInputs(c, world_);
  const DeviceInputs in = toDevice(all[rank_], c);
  if (rank_ != absent) {
    // Its own timeout, or that of another rank waiting for the same count
    // row, which published it first: either names the absent rank.
    try {
      workspace->dispatch(in.x, in.idx, in.weights);
      ADD_FAILURE() << "a dispatch without rank " << absent << " succeeded";
    } catch (const Error& e) {
      const std::string message = e.what();
      EXPECT_TRUE(message.find(toString("rank ", absent, " of ", world_,
                                        " did not answer")) !=
                      std::string::npos ||
                  message.find(toString("timed out waiting for rank ", absent,
                                        "'s count row")) != std::string::npos)
          << message;
    }
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, in.idx, in.weights); }, {"unusable"});
  }
  // The ranks that timed out told the absent one: its next call stops at
  // its start instead of waiting for peers that gave up.
  storeBarrier(*processGroup().store, testName() + "/timed_out", world_);
  if (rank_ == absent) {
    const auto start = std::chrono::steady_clock::now();
    test::expectErrorContains(
        [&] { workspace->dispatch(in.x, in.idx, in.weights); },
        {toString("timed out waiting for rank ", absent,
                  "'s count row and told every rank"),
         "stopped at the start of the call"});
    EXPECT_LT(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count(),
        1.0);
  }
}

// ---------------------------------------------------------------------------
// CUDA graphs.

// Captures dispatch, the experts and combine in one graph and replays it
// `replays` times with new routing and data in the static inputs, checking
// every replay.
void CudaMoe::replayGraph(const Case& c, const std::string& name, int replays) {
  auto workspace = makeWorkspace(c, name);
  cuda::StreamScope stream(device_);

  const std::vector<Inputs> first = allInputs(c, world_, 0);
  const DeviceInputs in = toDevice(first[rank_], c);
  runAndCheck(*workspace, c, "eager call before the capture", 0);

  cuda::CudaGraph graph;
  graph.captureBegin();
  const CudaDispatchResult result =
      workspace->dispatch(in.x, in.idx, in.weights);
  const at::Tensor expert_out = runExperts(result, c, world_, rank_);
  // With the layout's id, so that every replay also checks it.
  const at::Tensor combined = workspace->combine(expert_out, result, in.weights,
                                                 -1, result.recv_layout_id);
  const at::Tensor per_rank =
      workspace->combine(expert_out, result, result.recv_weights, -1,
                         result.recv_layout_id, MoeCombineReduce::PerRank);
  graph.captureEnd();

  Checker check;
  for (int round = 1; round <= replays; ++round) {
    const std::vector<Inputs> all = allInputs(c, world_, round);
    in.x.copy_(all[rank_].x);
    in.idx.copy_(all[rank_].idx);
    in.weights.copy_(all[rank_].weights);
    graph.replay();
    const Expected e = reference(c, world_, rank_, all);
    checkDispatch(check, result, e, true, toString("replay ", round), c.fp8);
    check.equal(combined, e.combined, toString("replay ", round, " combined"));
    check.equal(per_rank, e.combined_per_rank,
                toString("replay ", round, " combined per rank"));
  }
  EXPECT_EQ(check.failures(), 0) << "replays with a wrong result";
  EXPECT_NO_THROW(workspace->checkStatus());
  EXPECT_EQ(workspace->damagedGuardBytes(), 0);
  std::cout << "[rank " << rank_ << "] " << name << ": " << replays
            << " replays with new routing, each checked (combine per_pick "
               "and per_rank)"
            << std::endl;
}

// HOSTFUSE_TEST_GRAPH_REPLAYS, when set, is the number of replays of each
// graph test (the GPU soak of docs/reliability.md uses 10000; runs under
// compute-sanitizer a few).
int graphReplays(int fallback) {
  const int replays = environmentInt("HOSTFUSE_TEST_GRAPH_REPLAYS", fallback);
  HF_CHECK(replays >= 1, "HOSTFUSE_TEST_GRAPH_REPLAYS must be at least 1");
  return replays;
}

TEST_F(CudaMoe, GraphReplaysWithNewRoutingMatchTheReference) {
  Case c;
  c.experts = 2 * world_;
  c.topk = std::min<int64_t>(4, c.experts);
  c.hidden = 128;
  c.seed = 2024;
  replayGraph(c, "graph", graphReplays(1000));
}

TEST_F(CudaMoe, GraphReplaysMatchTheReferenceWithTheGridRoute) {
  Case c;
  c.experts = 4 * world_;
  c.topk = 4;
  c.hidden = 64;
  c.seed = 4048;
  c.grid_route = true;
  replayGraph(c, "graph_grid", graphReplays(300));
}

TEST_F(CudaMoe, GraphReplaysWithTheStagedPushMatchTheReference) {
  if (world_ < 2) {
    GTEST_SKIP() << "needs at least 2 ranks: with one there is no peer to "
                    "stage for, and the push is the counted one";
  }
  for (const bool grid_route : {false, true}) {
    Case c;
    c.experts = 4 * world_;
    c.topk = 4;
    c.hidden = 128;
    c.seed = grid_route ? 5150 : 5050;
    c.grid_route = grid_route;
    c.staged = true;
    replayGraph(c, grid_route ? "graph_staged_grid" : "graph_staged",
                graphReplays(grid_route ? 300 : 1000));
  }
}

TEST_F(CudaMoe, GraphReplaysWithFp8DispatchMatchTheReference) {
  Case c;
  c.experts = 2 * world_;
  c.topk = std::min<int64_t>(4, c.experts);
  c.hidden = 256;
  c.seed = 8086;
  c.fp8 = true;
  replayGraph(c, "graph_fp8", graphReplays(1000));
}

}  // namespace
}  // namespace hostfuse
