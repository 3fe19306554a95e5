// MoeDispatch/MoeCombine with backend=cuda, run by the HostIrEvaluator; part
// of the test_multidevice binary. Each case runs a program whose MoE nodes
// use backend=cuda and the same program with backend=collective on the same
// inputs, on every rank, and requires the valid rows, their provenance, the
// counts and the combine results to be bit-identical (docs/moe.md: both
// backends give the same valid rows, bit for bit). The collective backend
// itself is checked against an independent reference in
// test_multidevice.cpp. Then bad input, capacity overflow and a T above the
// first run's, each on every rank, followed by a valid run.
//
// Needs one GPU per rank (symmetric memory over NVLink): every test skips
// without. Every rank makes the same collective calls in the same order.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iterator>
#include <optional>
#include <sstream>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/torch_cuda.h>
#include "moe_reference.h"
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::communicator;
using test::myRank;
using test::Routing;
using test::worldSize;

constexpr int64_t kHidden = 16;

#define SKIP_WITHOUT_GPUS()                                          \
  do {                                                               \
    if (test::lacksGpuPerRank()) {                                   \
      GTEST_SKIP() << "the cuda MoE backend needs one GPU per rank"; \
    }                                                                \
  } while (false)

// ---------------------------------------------------------------------------
// One MoE layer as a program, built for either backend.

struct LayerSpec {
  int64_t experts = 0;
  int64_t picks = 0;
  at::ScalarType dtype = at::kFloat;
  bool weighted = false;
  MoeBackend backend = MoeBackend::Collective;
  int64_t capacity = 0;
  MoeCombineReduce reduce = MoeCombineReduce::PerPick;
  MoeDispatchQuant quantize = MoeDispatchQuant::None;
  int64_t hidden = kHidden;  // a multiple of 128 with fp8
};

// The program's outputs, in order (recv_weights only with weights).
enum LayerOutput : size_t {
  kCombined,
  kRecvX,
  kSrcRank,
  kSrcToken,
  kSrcK,
  kCounts,
  kToRank,
  kFromRank,
  kExpertOut,
  kRecvWeights,
};

// Inputs x [T, H], topk_idx [T, K] i64, topk_weights [T, K] (when weighted),
// expert_w [L, H, H]:
//   d = moeDispatch(x, topk_idx, topk_weights, E, backend, capacity)
//   y = groupedMatmul(d.recv_x, expert_w, d.recv_expert_counts)
//   combined = moeCombine(y, d, topk_weights, T)
std::unique_ptr<HostIrContainer> layerProgram(const LayerSpec& spec) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  const DataType dtype = toDataType(spec.dtype);
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  const int64_t hidden = spec.hidden;
  TensorView* x = makeTensor({tokens, hidden}, dtype, "x");
  TensorView* idx =
      makeTensor({tokens, spec.picks}, DataType::Int64, "topk_idx");
  TensorView* w = spec.weighted
                      ? makeTensor({tokens, spec.picks}, dtype, "topk_weights")
                      : nullptr;
  TensorView* expert_w = makeTensor(
      {spec.experts / worldSize(), hidden, hidden}, dtype, "expert_w");
  program->addInput(x);
  program->addInput(idx);
  if (w != nullptr) {
    program->addInput(w);
  }
  program->addInput(expert_w);
  const MoeDispatchResult d = moeDispatch(x, idx, w, spec.experts, spec.backend,
                                          spec.capacity, spec.quantize);
  TensorView* y =
      groupedMatmul(d.recv_x, expert_w, d.recv_expert_counts, d.recv_scales);
  program->addOutput(moeCombine(y, d, w, tokens, spec.reduce));
  for (TensorView* out :
       {d.recv_x, d.recv_src_rank, d.recv_src_token, d.recv_src_k,
        d.recv_expert_counts, d.n_tokens_to_rank, d.n_tokens_from_rank, y}) {
    program->addOutput(out);
  }
  if (w != nullptr) {
    program->addOutput(d.recv_weights);
  }
  if (d.recv_scales != nullptr) {
    program->addOutput(d.recv_scales);
  }
  return program;
}

LayerSpec withBackend(LayerSpec spec, MoeBackend backend) {
  spec.backend = backend;
  return spec;
}

// The same program built with backend=collective and with backend=cuda.
struct BackendPair {
  explicit BackendPair(const LayerSpec& spec)
      : collective(layerProgram(withBackend(spec, MoeBackend::Collective))),
        cuda(layerProgram(withBackend(spec, MoeBackend::Cuda))) {}
  HostIrEvaluator collective;
  HostIrEvaluator cuda;
};

const char* outputName(size_t i) {
  static const char* const names[] = {"combined",
                                      "recv_x",
                                      "recv_src_rank",
                                      "recv_src_token",
                                      "recv_src_k",
                                      "recv_expert_counts",
                                      "n_tokens_to_rank",
                                      "n_tokens_from_rank",
                                      "expert outputs",
                                      "recv_weights (recv_scales without "
                                      "weights)",
                                      "recv_scales"};
  return i < std::size(names) ? names[i] : "output";
}

// The cuda backend's outputs equal the collective's bit for bit: rows
// outputs in their first n rows (n = the collective's exact row count; the
// cuda backend has C rows), the others whole.
void expectBitIdentical(const std::vector<at::Tensor>& cuda,
                        const std::vector<at::Tensor>& collective,
                        const std::string& when) {
  ASSERT_EQ(cuda.size(), collective.size()) << when;
  const int64_t rows = collective[kRecvX].size(0);
  for (size_t i = 0; i < cuda.size(); ++i) {
    SCOPED_TRACE(when + ": " + outputName(i));
    const bool has_rows =
        i != kCombined && i != kCounts && i != kToRank && i != kFromRank;
    at::Tensor actual = cuda[i];
    at::Tensor expected = collective[i];
    if (actual.scalar_type() == at::kFloat8_e4m3fn) {
      // Compared as bytes (the checks do no fp8 arithmetic).
      actual = actual.contiguous().view(at::kByte);
      expected = expected.contiguous().view(at::kByte);
    }
    if (has_rows) {
      ASSERT_GE(actual.size(0), rows);
      actual = actual.narrow(0, 0, rows);
    }
    test::expectClose(actual.cpu(), expected.cpu());
  }
}

// Inputs of layerProgram on this rank.
std::vector<c10::IValue> layerInputs(const LayerSpec& spec, Routing routing,
                                     int64_t tokens, uint64_t seed) {
  const at::Device device = communicator().device();
  const int64_t me = myRank();
  std::vector<c10::IValue> inputs;
  inputs.emplace_back(test::randomTensor({tokens, spec.hidden}, spec.dtype,
                                         device, seed * 131 + me));
  inputs.emplace_back(test::makeRouting(routing, tokens, spec.picks,
                                        spec.experts, worldSize(), me, seed)
                          .to(device));
  if (spec.weighted) {
    inputs.emplace_back(
        test::randomWeights(tokens, spec.picks, spec.dtype, device, seed + me));
  }
  // Small weights keep bf16 outputs in a range where rounding matters.
  inputs.emplace_back((test::randomTensor({spec.experts / worldSize(),
                                           spec.hidden, spec.hidden},
                                          at::kFloat, at::kCPU, seed * 7 + me) *
                       (spec.hidden == kHidden ? 0.25 : 0.05))
                          .to(spec.dtype)
                          .to(device));
  return inputs;
}

// ---------------------------------------------------------------------------
// The grid of test_multidevice.cpp: K x E x routing x dtype x weights.

struct GridCase {
  int64_t picks;
  int64_t experts_per_rank;
  Routing routing;
  at::ScalarType dtype;
  bool weighted;
  MoeCombineReduce reduce = MoeCombineReduce::PerPick;
  MoeDispatchQuant quantize = MoeDispatchQuant::None;
};

std::string gridName(const testing::TestParamInfo<GridCase>& info) {
  const GridCase& c = info.param;
  std::ostringstream ss;
  ss << "K" << c.picks << "_E" << c.experts_per_rank << "R_"
     << test::toString(c.routing) << "_"
     << (c.dtype == at::kBFloat16 ? "bf16" : "fp32") << "_"
     << (c.weighted ? "weighted" : "unweighted");
  if (c.reduce == MoeCombineReduce::PerRank) {
    ss << "_per_rank";
  }
  if (c.quantize == MoeDispatchQuant::Fp8E4M3) {
    ss << "_fp8";
  }
  return ss.str();
}

std::vector<GridCase> gridCases() {
  std::vector<GridCase> cases;
  for (int64_t picks : {1, 2, 4, 8}) {
    for (int64_t per_rank : {1, 2, 8}) {
      for (Routing routing :
           {Routing::Uniform, Routing::Skewed, Routing::IdleRank,
            Routing::EmptyRank, Routing::Masked, Routing::VaryingTokens}) {
        for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
          for (bool weighted : {true, false}) {
            cases.push_back({picks, per_rank, routing, dtype, weighted});
          }
        }
      }
    }
  }
  return cases;
}

class CudaBackendGrid : public testing::TestWithParam<GridCase> {};

TEST_P(CudaBackendGrid, BitIdenticalToCollective) {
  SKIP_WITHOUT_GPUS();
  const GridCase& c = GetParam();
  if (c.routing == Routing::IdleRank && worldSize() == 1) {
    GTEST_SKIP() << "one rank cannot leave a rank idle";
  }
  LayerSpec spec;
  spec.experts = c.experts_per_rank * worldSize();
  spec.picks = c.picks;
  spec.dtype = c.dtype;
  spec.weighted = c.weighted;
  spec.reduce = c.reduce;
  spec.quantize = c.quantize;
  if (c.quantize == MoeDispatchQuant::Fp8E4M3) {
    spec.hidden = 128;
  }
  BackendPair pair(spec);
  const uint64_t seed = std::hash<std::string>{}(
                            gridName(testing::TestParamInfo<GridCase>(c, 0))) %
                        100000;
  const std::vector<c10::IValue> inputs =
      layerInputs(spec, c.routing, test::tokensFor(c.routing, myRank()), seed);

  const std::vector<at::Tensor> expected = pair.collective.run(inputs);
  const std::vector<at::Tensor> actual = pair.cuda.run(inputs);
  // recv_x has C rows, the worst case R * T_max * min(K, L).
  int64_t max_tokens = 1;
  for (int64_t r = 0; r < worldSize(); ++r) {
    max_tokens = std::max(max_tokens, test::tokensFor(c.routing, r));
  }
  EXPECT_EQ(actual[kRecvX].size(0),
            worldSize() * max_tokens * std::min(c.picks, c.experts_per_rank));
  expectBitIdentical(actual, expected, "the first run");
}

INSTANTIATE_TEST_SUITE_P(Grid, CudaBackendGrid, testing::ValuesIn(gridCases()),
                         gridName);

// reduce=per_rank on part of the grid: K 2 and 8, 1 and 8 experts per rank.
std::vector<GridCase> perRankCases() {
  std::vector<GridCase> cases;
  for (GridCase c : gridCases()) {
    if ((c.picks == 2 || c.picks == 8) &&
        (c.experts_per_rank == 1 || c.experts_per_rank == 8)) {
      c.reduce = MoeCombineReduce::PerRank;
      cases.push_back(c);
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(PerRank, CudaBackendGrid,
                         testing::ValuesIn(perRankCases()), gridName);

// fp8 dispatch (H = 128) on the same part of the grid, both combine modes.
std::vector<GridCase> fp8Cases() {
  std::vector<GridCase> cases;
  for (GridCase c : perRankCases()) {
    c.quantize = MoeDispatchQuant::Fp8E4M3;
    cases.push_back(c);
    c.reduce = MoeCombineReduce::PerPick;
    cases.push_back(c);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fp8, CudaBackendGrid, testing::ValuesIn(fp8Cases()),
                         gridName);

// ---------------------------------------------------------------------------
// Programs: several runs, two layers, the large-T push mode.

// Two MoE layers, the second on the first's output, with relu experts in
// between; outputs: the second combine, the first combine, the second
// dispatch's recv_x.
std::unique_ptr<HostIrContainer> twoLayerProgram(MoeBackend backend,
                                                 int64_t experts, int64_t picks,
                                                 int64_t capacity) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  const int64_t local = experts / worldSize();
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, kHidden}, DataType::BFloat16, "x");
  program->addInput(x);
  std::vector<TensorView*> layer_inputs;
  for (const char* name : {"topk_idx0", "topk_weights0", "expert_w0",
                           "topk_idx1", "topk_weights1", "expert_w1"}) {
    const std::string n = name;
    TensorView* tv =
        n.rfind("topk_idx", 0) == 0
            ? makeTensor({tokens, picks}, DataType::Int64, n)
        : n.rfind("topk_weights", 0) == 0
            ? makeTensor({tokens, picks}, DataType::Float, n)
            : makeTensor({local, kHidden, kHidden}, DataType::BFloat16, n);
    program->addInput(tv);
    layer_inputs.push_back(tv);
  }
  TensorView* h = x;
  MoeDispatchResult last;
  std::vector<TensorView*> combined;
  for (int layer = 0; layer < 2; ++layer) {
    TensorView* idx = layer_inputs[3 * layer];
    TensorView* w = layer_inputs[3 * layer + 1];
    TensorView* expert_w = layer_inputs[3 * layer + 2];
    last =
        moeDispatch(h, idx, w, experts, backend,
                    layer == 1 && backend == MoeBackend::Cuda ? capacity : 0);
    TensorView* y =
        relu(groupedMatmul(last.recv_x, expert_w, last.recv_expert_counts));
    h = moeCombine(y, last, w, tokens);
    combined.push_back(h);
  }
  program->addOutput(combined[1]);
  program->addOutput(combined[0]);
  program->addOutput(last.recv_x);
  return program;
}

TEST(CudaBackendProgram, TwoLayersOverSeveralRunsAreBitIdenticalToCollective) {
  SKIP_WITHOUT_GPUS();
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const int64_t experts = 4 * ranks;
  const int64_t picks = 4;
  const int64_t max_tokens = 12 + ranks - 1;  // the first run's largest T
  // Layer 1 gets an explicit capacity a little above its worst case.
  const int64_t capacity = ranks * max_tokens * std::min<int64_t>(picks, 4) + 5;
  HostIrEvaluator collective(
      twoLayerProgram(MoeBackend::Collective, experts, picks, capacity));
  HostIrEvaluator cuda(
      twoLayerProgram(MoeBackend::Cuda, experts, picks, capacity));
  EXPECT_NE(
      cuda.program().toString().find("capacity=" + std::to_string(capacity)),
      std::string::npos)
      << cuda.program().toString();

  const at::Device device = communicator().device();
  // T per run: the largest first, then fewer, then none on rank 0.
  const int64_t runs_tokens[] = {12 + me, 5 + me, me == 0 ? 0 : 9};
  for (int run = 0; run < 3; ++run) {
    const int64_t tokens = runs_tokens[run];
    const uint64_t seed = 1000 + 10 * run;
    std::vector<c10::IValue> inputs;
    inputs.emplace_back(test::randomTensor({tokens, kHidden}, at::kBFloat16,
                                           device, seed + me));
    for (int layer = 0; layer < 2; ++layer) {
      inputs.emplace_back(
          test::makeRouting(layer == 0 ? Routing::Masked : Routing::Uniform,
                            tokens, picks, experts, ranks, me, seed + layer)
              .to(device));
      inputs.emplace_back(test::randomWeights(tokens, picks, at::kFloat, device,
                                              seed + 2 * layer + me));
      inputs.emplace_back(
          (test::randomTensor({experts / ranks, kHidden, kHidden}, at::kFloat,
                              at::kCPU, seed + 5 * layer + me) *
           0.25)
              .to(at::kBFloat16)
              .to(device));
    }
    const std::vector<at::Tensor> expected = collective.run(inputs);
    const std::vector<at::Tensor> actual = cuda.run(inputs);
    SCOPED_TRACE("run " + std::to_string(run));
    EXPECT_EQ(actual[2].size(0), capacity);
    test::expectClose(actual[1].cpu(), expected[1].cpu());  // layer 0
    test::expectClose(actual[0].cpu(), expected[0].cpu());  // layer 1
    // No early return: every rank still makes the next run's collectives.
    if (actual[2].size(0) >= expected[2].size(0)) {
      test::expectClose(actual[2].narrow(0, 0, expected[2].size(0)).cpu(),
                        expected[2].cpu());
    }
  }
}

// `runs` runs of one program pair (masked routing, 40 - 3 * rank tokens,
// seeds from `seed` on), each bit-identical between the backends. The
// cuda workspace reads the HOSTFUSE_MOE_* variables at the first run.
void expectMaskedRunsBitIdentical(const LayerSpec& spec, int runs,
                                  uint64_t seed, const std::string& what) {
  BackendPair pair(spec);
  for (int run = 0; run < runs; ++run) {
    const std::vector<c10::IValue> inputs =
        layerInputs(spec, Routing::Masked, 40 - 3 * myRank(), seed + run);
    const std::vector<at::Tensor> expected = pair.collective.run(inputs);
    const std::vector<at::Tensor> actual = pair.cuda.run(inputs);
    expectBitIdentical(actual, expected, what + ", run " + std::to_string(run));
  }
}

// The same with the staged push (docs/moe_cuda.md), over both routes and
// both combine modes.
TEST(CudaBackendProgram, TheStagedPushIsBitIdentical) {
  SKIP_WITHOUT_GPUS();
  // Read when the workspace is created, at the first run.
  test::ScopedEnvironment staged("HOSTFUSE_MOE_STAGED_PUSH", "1");
  for (const bool grid_route : {false, true}) {
    test::ScopedEnvironment route("HOSTFUSE_MOE_GRID_ROUTE_MIN_TOKENS",
                                  grid_route ? "1" : "0");
    for (const MoeCombineReduce reduce :
         {MoeCombineReduce::PerPick, MoeCombineReduce::PerRank}) {
      LayerSpec spec;
      spec.experts = 4 * worldSize();
      spec.picks = 4;
      spec.weighted = true;
      spec.reduce = reduce;
      expectMaskedRunsBitIdentical(spec, 3, 91,
                                   std::string(grid_route ? "grid" : "local") +
                                       " route, " + toString(reduce));
    }
  }
}

TEST(CudaBackendProgram, TheGridRouteIsBitIdentical) {
  SKIP_WITHOUT_GPUS();
  // Read when the workspace is created, at the first run.
  test::ScopedEnvironment grid_route("HOSTFUSE_MOE_GRID_ROUTE_MIN_TOKENS", "1");
  for (const at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
    LayerSpec spec;
    spec.experts = 4 * worldSize();
    spec.picks = 4;
    spec.dtype = dtype;
    spec.weighted = true;
    expectMaskedRunsBitIdentical(spec, 2, 77, c10::toString(dtype));
  }
}

// ---------------------------------------------------------------------------
// Errors: every rank raises, then the next valid run works.

class CudaBackendErrors : public testing::Test {
 protected:
  void SetUp() override {
    if (test::lacksGpuForCudaBackend()) {
      GTEST_SKIP() << "the cuda MoE backend needs a GPU per rank (of its own, "
                      "or shared: HOSTFUSE_SHARE_GPUS=1)";
    }
  }

  int64_t ranks() const { return worldSize(); }
  int64_t me() const { return myRank(); }
  int64_t experts() const { return 2 * ranks(); }
  bool isBadRank() const { return me() == ranks() - 1; }
  std::string badRank() const { return "rank " + std::to_string(ranks() - 1); }
  at::Device device() const { return communicator().device(); }

  // x, topk_idx, topk_weights with extents of their own (so that a bad
  // shape on one rank reaches the node instead of failing input binding
  // there alone): d = moeDispatch(backend=cuda), combined =
  // moeCombine(d.recv_x, d, w, T). With topk_weights 0.5 on two distinct
  // experts per token, combined == x exactly.
  std::unique_ptr<HostIrEvaluator> roundTrip(int64_t capacity = 0,
                                             bool weighted = true) {
    auto program = std::make_unique<HostIrContainer>();
    {
      FusionGuard guard(program.get());
      TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
      TensorView* idx = makeSymbolicTensor(2, DataType::Int64, "topk_idx");
      TensorView* w =
          weighted ? makeSymbolicTensor(2, DataType::Float, "topk_weights")
                   : nullptr;
      program->addInput(x);
      program->addInput(idx);
      if (w != nullptr) {
        program->addInput(w);
      }
      const MoeDispatchResult d =
          moeDispatch(x, idx, w, experts(), MoeBackend::Cuda, capacity);
      program->addOutput(moeCombine(d.recv_x, d, w, x->extent(0)));
    }
    return std::make_unique<HostIrEvaluator>(std::move(program));
  }

  at::Tensor x(int64_t tokens) const {
    return test::randomTensor({tokens, kHidden}, at::kFloat, device(),
                              100 + me());
  }
  at::Tensor idx(int64_t tokens) const {
    return test::makeRouting(Routing::Uniform, tokens, 2, experts(), ranks(),
                             me(), 5);
  }
  at::Tensor weights(int64_t tokens) const {
    return at::full({tokens, 2}, 0.5, at::TensorOptions(device()));
  }

  // A valid run: combined == x.
  void expectValidRunWorks(HostIrEvaluator& evaluator, int64_t tokens,
                           const std::string& when) {
    SCOPED_TRACE(when);
    const at::Tensor input = x(tokens);
    std::vector<at::Tensor> out;
    try {
      out = evaluator.run({input, idx(tokens).to(device()), weights(tokens)});
    } catch (const std::exception& e) {
      FAIL() << "rank " << me() << ": " << e.what();
    }
    test::expectClose(out[0].cpu(), input.cpu());
  }
};

constexpr int64_t kTokens = 6;

TEST_F(CudaBackendErrors, ExpertIdOutOfRangeOnOneRank) {
  auto evaluator = roundTrip();
  for (const int64_t bad_id : {experts(), int64_t{-2}}) {
    at::Tensor bad = idx(kTokens);
    if (isBadRank()) {
      bad[3][1] = bad_id;
    }
    // The first iteration is the node's first run (the rendezvous).
    test::expectErrorContains(
        [&] {
          evaluator->run({x(kTokens), bad.to(device()), weights(kTokens)});
        },
        {"MoeDispatch(", "backend=cuda", badRank(),
         "topk_idx holds expert id " + std::to_string(bad_id) +
             " at token 3, pick 1, which is out of range"});
    expectValidRunWorks(*evaluator, kTokens,
                        "after expert id " + std::to_string(bad_id));
  }
}

TEST_F(CudaBackendErrors, OneExpertTwiceInATokenOnOneRank) {
  auto evaluator = roundTrip();
  expectValidRunWorks(*evaluator, kTokens, "the first run");
  at::Tensor bad = idx(kTokens);
  if (isBadRank()) {
    bad[4][0] = 1;
    bad[4][1] = 1;
  }
  test::expectErrorContains(
      [&] {
        evaluator->run({x(kTokens), bad.to(device()), weights(kTokens)});
      },
      {"backend=cuda", badRank() + " of ",
       "topk_idx names expert 1 twice in token 4"});
  expectValidRunWorks(*evaluator, kTokens, "after the duplicate");
}

TEST_F(CudaBackendErrors, BadShapeOnOneRankAtTheFirstRun) {
  auto evaluator = roundTrip();
  const at::Tensor bad =
      isBadRank() ? at::cat({idx(kTokens), idx(kTokens).narrow(0, 0, 1)})
                  : idx(kTokens);
  test::expectErrorContains(
      [&] {
        evaluator->run({x(kTokens), bad.to(device()), weights(kTokens)});
      },
      {"backend=cuda",
       "bad input on rank " + std::to_string(ranks() - 1) + " of " +
           std::to_string(ranks()),
       "topk_idx has 7 rows but x has 6 tokens"});
  expectValidRunWorks(*evaluator, kTokens, "after the bad shape");
}

// Ranks that disagree on K are refused at the first run, on every rank, in
// the collective backend's words (multidevice_bad_input.cpp).
TEST_F(CudaBackendErrors, PicksPerTokenDifferOnOneRankAtTheFirstRun) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  auto evaluator = roundTrip();
  const int64_t picks = isBadRank() ? 1 : 2;
  test::expectErrorContains(
      [&] {
        evaluator->run(
            {x(kTokens),
             idx(kTokens).narrow(1, 0, picks).contiguous().to(device()),
             weights(kTokens).narrow(1, 0, picks).contiguous()});
      },
      {"backend=cuda",
       "K (the columns of topk_idx) must be the same on every rank",
       "it is 2 on rank 0 and 1 on rank " + std::to_string(ranks() - 1)});
  expectValidRunWorks(*evaluator, kTokens, "after the disagreement");
}

TEST_F(CudaBackendErrors, CapacityOverflowThenARunThatFits) {
  // K = 1, no weights, every token to expert 0: rank 0 receives R * T rows.
  const int64_t capacity = 2 * ranks();
  auto evaluator = roundTrip(capacity, /*weighted=*/false);
  auto to_expert_zero = [&](int64_t tokens) {
    return at::zeros({tokens, 1}, at::TensorOptions(device()).dtype(at::kLong));
  };
  test::expectErrorContains(
      [&] {
        evaluator->run({x(3), to_expert_zero(3)});
      },
      {"capacity=" + std::to_string(capacity), "capacity overflow",
       "rank 0 of " + std::to_string(ranks()) + " receives " +
           std::to_string(3 * ranks()) + " rows",
       "the capacity is " + std::to_string(capacity) + " rows"});
  // Two tokens per rank fill the capacity exactly.
  const at::Tensor input = x(2);
  std::vector<at::Tensor> out;
  try {
    out = evaluator->run({input, to_expert_zero(2)});
  } catch (const std::exception& e) {
    FAIL() << "rank " << me() << ": the run that fits failed: " << e.what();
  }
  test::expectClose(out[0].cpu(), input.cpu());
}

// One rank's run fails before its dispatch (its input does not bind); the
// evaluator tells the peers through the cuda backend's workspace, and their
// dispatch kernels raise naming it at once instead of waiting out the
// timeout. The workspace is then unusable on every rank; new evaluators
// work. (On one GPU: HOSTFUSE_SHARE_GPUS=1, tools/gpu_check.sh.)
TEST_F(CudaBackendErrors, ARankThatFailsBeforeItsDispatchStopsEveryPeerAtOnce) {
  if (ranks() < 2) {
    GTEST_SKIP() << "needs two ranks";
  }
  auto evaluator = roundTrip();
  expectValidRunWorks(*evaluator, kTokens, "the first run (the rendezvous)");
  const auto start = std::chrono::steady_clock::now();
  if (isBadRank()) {
    const at::Tensor three_dims = x(kTokens).unsqueeze(0);
    test::expectErrorContains(
        [&] {
          evaluator->run(
              {three_dims, idx(kTokens).to(device()), weights(kTokens)});
        },
        {"must have rank 2"});
  } else {
    test::expectErrorContains(
        [&] {
          evaluator->run(
              {x(kTokens), idx(kTokens).to(device()), weights(kTokens)});
        },
        {"backend=cuda",
         badRank() + " of " + std::to_string(ranks()) +
             " raised an error on its host (its own error says why) and told "
             "every rank"});
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  // The kernels' timeout is HOSTFUSE_MOE_TIMEOUT_S, 30 s by default.
  EXPECT_LT(seconds, 10) << "the peers waited for their timeout";
  evaluator = roundTrip();
  expectValidRunWorks(*evaluator, kTokens, "a new evaluator after the error");
}

TEST_F(CudaBackendErrors, MoreTokensThanAtTheFirstRunIsAnError) {
  auto evaluator = roundTrip();
  expectValidRunWorks(*evaluator, 4, "the first run, T = 4");
  // Every rank has more tokens than T_max = 4: each fails before its
  // kernel, so none waits for another.
  auto tooMany = [&] {
    evaluator->run({x(kTokens), idx(kTokens).to(device()), weights(kTokens)});
  };
  test::expectErrorContains(tooMany, {"backend=cuda", "x has 6 tokens",
                                      "sized at its first run for T_max = 4"});
  if (ranks() == 1) {
    expectValidRunWorks(*evaluator, 3, "fewer tokens after the error");
    return;
  }
  // With peers the refusal was published: the workspace is unusable on
  // every rank until each makes a new one (here: a new evaluator).
  test::expectErrorContains(
      [&] {
        evaluator->run({x(3), idx(3).to(device()), weights(3)});
      },
      {"backend=cuda", "unusable after an earlier failure"});
  evaluator = roundTrip();
  expectValidRunWorks(*evaluator, 3, "a new evaluator after the error");
}

}  // namespace
}  // namespace hostfuse
