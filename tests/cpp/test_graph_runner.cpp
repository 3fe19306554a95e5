// Tests of GraphRunner: capture checks (these run on the CPU too), and on a
// GPU eager -> capture -> replays of a program of ATen ops, a RunFusion,
// TopKOp and GroupedMatmul, compared with eager runs of the same program;
// graphs per input signature; output lifetimes; persistent inputs; a failed
// capture; and, from the host with CUPTI, that a replay launches nothing
// but the graph. The multi-rank MoE layer is in test_graph_moe.cpp.
#include <numeric>

#include <hostfuse/host_ir/graph_runner.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/torch_cuda.h>
#include "cuda_launch_counter.h"
#include "test_utils.h"

namespace hostfuse {
namespace {

constexpr int64_t kExperts = 8;  // router outputs
constexpr int64_t kGroups = 4;   // grouped matmul groups
constexpr int64_t kInter = 32;   // grouped matmul output width
constexpr int64_t kPicks = 2;

// Inputs: x [T, H], router_w [8, H], w_gate [4, H, 32], w_up [4, H, 32]
// (all `dtype`), counts [4] i64 summing to at most T (the rest is padding).
// Outputs: topk weights [T, 2] f32, topk indices [T, 2] i64, and
// act = silu(x w_gate[g]) * (x w_up[g]) per group [T, 32]. `hidden` < 0
// makes H symbolic.
std::unique_ptr<HostIrContainer> makeProgram(
    DataType dtype = DataType::BFloat16, int64_t hidden = 64) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  Scalar* h = hidden < 0 ? makeSymbolicScalar(DataType::Int64, "hidden")
                         : makeConstant(hidden);
  TensorView* x = makeTensor({tokens, h}, dtype, "x");
  TensorView* router_w = makeTensor({kExperts, h}, dtype, "router_w");
  TensorView* w_gate = makeTensor({kGroups, h, kInter}, dtype, "w_gate");
  TensorView* w_up = makeTensor({kGroups, h, kInter}, dtype, "w_up");
  TensorView* counts = makeTensor({kGroups}, DataType::Int64, "counts");
  for (TensorView* input : {x, router_w, w_gate, w_up, counts}) {
    program->addInput(input);
  }
  TensorView* scores = softmax(
      linear(cast(x, DataType::Float), cast(router_w, DataType::Float)), -1);
  const TopKResult top = topk(scores, kPicks);
  program->addOutput(div(top.values, sum(top.values, -1, true)));
  program->addOutput(top.indices);
  TensorView* gate = groupedMatmul(x, w_gate, counts);
  TensorView* up = groupedMatmul(x, w_up, counts);
  program->addOutput(
      runFusion(makeSiluMulFusion(kInter, dtype), {gate, up}).at(0));
  return program;
}

struct Inputs {
  at::Tensor x, router_w, w_gate, w_up, counts;
  int64_t valid_rows = 0;

  std::vector<c10::IValue> list() const {
    return {x, router_w, w_gate, w_up, counts};
  }
};

// New x, router and counts for every seed; the expert weights are kept.
Inputs makeInputs(int64_t tokens, uint64_t seed, const at::Device& device,
                  const Inputs* weights_from = nullptr,
                  at::ScalarType dtype = at::kBFloat16, int64_t hidden = 64) {
  Inputs in;
  in.x = test::randomTensor({tokens, hidden}, dtype, device, seed);
  in.router_w =
      test::randomTensor({kExperts, hidden}, dtype, device, seed + 1000);
  if (weights_from != nullptr) {
    in.w_gate = weights_from->w_gate;
    in.w_up = weights_from->w_up;
  } else {
    in.w_gate =
        (test::randomTensor({kGroups, hidden, kInter}, at::kFloat, device, 7) /
         8)
            .to(dtype);
    in.w_up =
        (test::randomTensor({kGroups, hidden, kInter}, at::kFloat, device, 8) /
         8)
            .to(dtype);
  }
  // Random group sizes; a few rows of padding at the end.
  at::Generator gen = at::detail::createCPUGenerator(seed + 2000);
  in.valid_rows = std::max<int64_t>(0, tokens - static_cast<int64_t>(seed % 5));
  const at::Tensor cuts = std::get<0>(
      at::randint(0, in.valid_rows + 1, {kGroups - 1}, gen, at::kLong).sort());
  const at::Tensor ends =
      at::cat({cuts, at::full({1}, in.valid_rows, at::kLong)});
  in.counts = at::diff(ends, 1, 0, at::zeros({1}, at::kLong)).to(device);
  return in;
}

// Replay and eager outputs: the same kernels on the same inputs, so they
// agree bit for bit, unless cuBLAS picks another kernel for the router on
// the capture stream; the checks allow rounding differences in the
// floating outputs (activation rows past the counts are padding).
void expectSameOutputs(const std::vector<at::Tensor>& actual,
                       const std::vector<at::Tensor>& expected,
                       int64_t valid_rows, const std::string& when) {
  SCOPED_TRACE(when);
  ASSERT_EQ(actual.size(), 3u);
  ASSERT_EQ(expected.size(), 3u);
  test::expectClose(actual[0], expected[0], 1e-5, 1e-6);
  test::expectClose(actual[1], expected[1]);
  test::expectClose(actual[2].narrow(0, 0, valid_rows),
                    expected[2].narrow(0, 0, valid_rows), 1e-2, 1e-2);
}

// Whether the outputs are bit-identical (reported, not required).
bool bitIdentical(const std::vector<at::Tensor>& actual,
                  const std::vector<at::Tensor>& expected, int64_t valid_rows) {
  return at::equal(actual[0].cpu(), expected[0].cpu()) &&
         at::equal(actual[1].cpu(), expected[1].cpu()) &&
         at::equal(actual[2].narrow(0, 0, valid_rows).cpu(),
                   expected[2].narrow(0, 0, valid_rows).cpu());
}

const at::Device kGpu(at::kCUDA, 0);

std::string joined(const std::vector<std::string>& lines) {
  std::string text;
  for (const std::string& line : lines) {
    text += line + "\n";
  }
  return text;
}

#define SKIP_WITHOUT_GPU()                              \
  do {                                                  \
    if (!cuda::isAvailable()) {                         \
      GTEST_SKIP() << "no CUDA device on this machine"; \
    }                                                   \
  } while (false)

GraphRunnerOptions persistentWeights(bool copy_outputs = false) {
  GraphRunnerOptions options;
  options.persistent_inputs = {2, 3};
  options.copy_outputs = copy_outputs;
  return options;
}

// ---------------------------------------------------------------------------
// Capture checks (no GPU needed).

// A small MoE layer program's configuration (8 experts, 4 per rank).
MoeLayerConfig smallMoeLayer(MoeBackend backend) {
  MoeLayerConfig config;
  config.hidden = 64;
  config.intermediate = 32;
  config.num_experts = 8;
  config.local_experts = 4;
  config.topk = 2;
  config.backend = backend;
  return config;
}

TEST(GraphRunner, RejectsCpuTensorsNamingTheInputBeforeRunning) {
  GraphRunner runner(makeProgram(DataType::Float));
  const Inputs in =
      makeInputs(16, 1, at::kCPU, nullptr, at::kFloat, /*hidden=*/64);
  test::expectErrorContains(
      [&] { runner.run(in.list()); },
      {"cannot be captured in a CUDA graph (checked before running anything)",
       "input 0 (T0 'x') is a cpu tensor",
       "input 4 (T4 'counts') is a cpu tensor", "GroupedMatmul(x=T0,",
       "it runs on cpu, not on a GPU"});
  EXPECT_EQ(runner.numGraphs(), 0);
}

TEST(GraphRunner, NamesEveryExpressionThatSynchronizesWithTheHost) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({tokens, 64}, DataType::Float, "x");
    TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "idx");
    TensorView* w = makeTensor({2, 64, 64}, DataType::Float, "w");
    program->addInput(x);
    program->addInput(idx);
    program->addInput(w);
    const MoeDispatchResult d = moeDispatch(x, idx, nullptr, 4);
    TensorView* y = groupedMatmul(d.recv_x, w, d.recv_expert_counts);
    program->addOutput(moeCombine(y, d, nullptr, tokens));
  }
  const std::vector<std::string> problems = findCaptureProblems(*program, kGpu);
  ASSERT_EQ(problems.size(), 3u) << program->toString();
  EXPECT_NE(problems[0].find("MoeDispatch(x=T0,"), std::string::npos);
  EXPECT_NE(problems[0].find("backend=collective copies the row counts to "
                             "the host"),
            std::string::npos)
      << problems[0];
  EXPECT_NE(problems[1].find("GroupedMatmul(x="), std::string::npos);
  EXPECT_NE(problems[1].find("reads group_counts on the host"),
            std::string::npos);
  EXPECT_NE(problems[1].find("its dtype is Float, not bf16"), std::string::npos)
      << problems[1];
  EXPECT_NE(problems[2].find("MoeCombine("), std::string::npos);
}

TEST(GraphRunner, CudaBackendMoeLayerHasNothingInTheWay) {
  MoeLayerConfig config = smallMoeLayer(MoeBackend::Cuda);
  const std::unique_ptr<HostIrContainer> program = makeMoeLayerProgram(config);
  EXPECT_TRUE(findCaptureProblems(*program, kGpu).empty())
      << joined(findCaptureProblems(*program, kGpu));
  config.backend = MoeBackend::Collective;
  EXPECT_EQ(findCaptureProblems(*makeMoeLayerProgram(config), kGpu).size(), 2u);
}

// Capturability is a property each expression declares
// (Expr::captureProblems, pure virtual): the ATen ops, the fusion and its
// expressions declare none on a GPU; what depends on the device says why.
TEST(GraphRunner, ExpressionsDeclareWhatKeepsThemFromACapture) {
  const std::unique_ptr<HostIrContainer> program = makeProgram();
  for (const Expr* expr : program->topLevelExprs()) {
    EXPECT_TRUE(expr->captureProblems(kGpu).empty()) << expr->toString();
  }
  MoeLayerConfig config = smallMoeLayer(MoeBackend::Cuda);
  const std::vector<std::string> on_cpu =
      findCaptureProblems(*makeMoeLayerProgram(config), at::kCPU);
  ASSERT_EQ(on_cpu.size(), 3u) << joined(on_cpu);  // gate, up, down
  EXPECT_NE(on_cpu[0].find("GroupedMatmul("), std::string::npos);
  EXPECT_NE(on_cpu[0].find("it runs on cpu, not on a GPU"), std::string::npos)
      << on_cpu[0];
}

TEST(GraphRunner, PersistentInputsMustBeTensorInputsOfTheProgram) {
  GraphRunnerOptions options;
  options.persistent_inputs = {5};
  test::expectErrorContains(
      [&] { GraphRunner(makeProgram(), {}, options); },
      {"persistent input 5 is out of range: the program has 5 inputs"});
}

TEST(GraphRunner, CheckStatusRunsTheEvaluatorsCheckers) {
  GraphRunner runner(makeProgram());
  int checks = 0;
  runner.evaluator().addStatusChecker([&] { ++checks; });
  runner.evaluator().addStatusChecker([&] {
    if (checks > 1) {
      HF_THROW("MoE dispatch: capacity overflow (recorded on the device)");
    }
  });
  runner.checkStatus();
  EXPECT_EQ(checks, 1);
  test::expectErrorContains([&] { runner.checkStatus(); },
                            {"capacity overflow"});
}

// ---------------------------------------------------------------------------
// Capture and replay (GPU).

TEST(GraphRunner, ReplaysMatchEagerRunsForHundredCallsWithNewInputs) {
  SKIP_WITHOUT_GPU();
  GraphRunner runner(makeProgram(), {}, persistentWeights());
  const Inputs first = makeInputs(48, 1, kGpu);
  int identical = 0;
  for (uint64_t call = 0; call < 102; ++call) {
    const Inputs in = makeInputs(48, 1 + call, kGpu, &first);
    const std::vector<at::Tensor> out = runner.run(in.list());
    EXPECT_EQ(runner.lastMode(), call == 0   ? GraphRunner::Mode::Eager
                                 : call == 1 ? GraphRunner::Mode::Capture
                                             : GraphRunner::Mode::Replay);
    const std::vector<at::Tensor> eager = runner.evaluator().run(in.list());
    expectSameOutputs(out, eager, in.valid_rows, toString("call ", call));
    identical += bitIdentical(out, eager, in.valid_rows) ? 1 : 0;
    if (call == 101) {
      // And the eager run against plain ATen.
      const at::Tensor scores = at::softmax(
          at::linear(in.x.to(at::kFloat), in.router_w.to(at::kFloat)), -1);
      const auto [top, idx] = at::topk(scores, kPicks, -1);
      test::expectClose(out[1], idx);
      test::expectClose(out[0], top / top.sum(-1, true), 1e-5, 1e-6);
      const at::Tensor counts = in.counts.cpu();
      int64_t offset = 0;
      for (int64_t g = 0; g < kGroups; ++g) {
        const int64_t rows = counts[g].item<int64_t>();
        const at::Tensor x = in.x.narrow(0, offset, rows).to(at::kFloat);
        const at::Tensor expected =
            at::silu(at::matmul(x, in.w_gate[g].to(at::kFloat))) *
            at::matmul(x, in.w_up[g].to(at::kFloat));
        test::expectClose(out[2].narrow(0, offset, rows).to(at::kFloat),
                          expected, 2e-2, 2e-2);
        offset += rows;
      }
    }
  }
  std::cout << "replay equal to the eager run bit for bit in " << identical
            << " of 102 calls\n";
  EXPECT_EQ(runner.numGraphs(), 1);
  EXPECT_EQ(runner.numReplays(), 101);  // the capture's run and 100 more
  EXPECT_NO_THROW(runner.checkStatus());
}

TEST(GraphRunner, NewInputSignatureGetsItsOwnGraph) {
  SKIP_WITHOUT_GPU();
  GraphRunner runner(makeProgram(), {}, persistentWeights());
  const Inputs weights = makeInputs(48, 1, kGpu);
  uint64_t seed = 10;
  auto runAndCheck = [&](int64_t tokens, GraphRunner::Mode mode) {
    const Inputs in = makeInputs(tokens, ++seed, kGpu, &weights);
    const std::vector<at::Tensor> out = runner.run(in.list());
    EXPECT_EQ(runner.lastMode(), mode) << "T = " << tokens;
    expectSameOutputs(out, runner.evaluator().run(in.list()), in.valid_rows,
                      toString("T = ", tokens));
  };
  runAndCheck(48, GraphRunner::Mode::Eager);
  runAndCheck(48, GraphRunner::Mode::Capture);
  runAndCheck(32, GraphRunner::Mode::Eager);
  EXPECT_EQ(runner.numGraphs(), 1);
  runAndCheck(32, GraphRunner::Mode::Capture);
  EXPECT_EQ(runner.numGraphs(), 2);
  for (int i = 0; i < 5; ++i) {
    runAndCheck(48, GraphRunner::Mode::Replay);
    runAndCheck(32, GraphRunner::Mode::Replay);
  }
  EXPECT_EQ(runner.numGraphs(), 2);
}

TEST(GraphRunner, ScalarInputsArePartOfTheSignature) {
  SKIP_WITHOUT_GPU();
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
    Scalar* scale = makeSymbolicScalar(DataType::Double, "scale");
    program->addInput(x);
    program->addInput(scale);
    program->addOutput(mul(x, scale));
  }
  GraphRunner runner(std::move(program));
  const at::Tensor x = test::randomTensor({4, 8}, at::kFloat, kGpu, 3);
  for (const double scale : {2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 2.0}) {
    const at::Tensor out = runner.run({x, scale})[0];
    test::expectClose(out, x * scale);
  }
  EXPECT_EQ(runner.numGraphs(), 2);
}

TEST(GraphRunner, OutputsStayValidUntilTheNextCallOrAreCopied) {
  SKIP_WITHOUT_GPU();
  for (const bool copy : {false, true}) {
    SCOPED_TRACE(copy ? "copy_outputs" : "static outputs");
    GraphRunner runner(makeProgram(), {}, persistentWeights(copy));
    const Inputs a = makeInputs(48, 1, kGpu);
    const Inputs b = makeInputs(48, 2, kGpu, &a);
    runner.run(a.list());
    runner.run(a.list());
    const std::vector<at::Tensor> out_a = runner.run(a.list());
    const at::Tensor kept = out_a[0].clone();
    const std::vector<at::Tensor> out_b = runner.run(b.list());
    EXPECT_EQ(runner.lastMode(), GraphRunner::Mode::Replay);
    const at::Tensor expected_b = runner.evaluator().run(b.list())[0];
    test::expectClose(out_b[0], expected_b, 1e-5, 1e-6);
    if (copy) {
      EXPECT_NE(out_a[0].data_ptr(), out_b[0].data_ptr());
      test::expectClose(out_a[0], kept);  // untouched by the next call
    } else {
      // The same static tensor, now holding b's result.
      EXPECT_EQ(out_a[0].data_ptr(), out_b[0].data_ptr());
      test::expectClose(out_a[0], expected_b, 1e-5, 1e-6);
    }
  }
}

TEST(GraphRunner, PersistentInputsAreReadInPlace) {
  SKIP_WITHOUT_GPU();
  GraphRunner runner(makeProgram(), {}, persistentWeights());
  Inputs in = makeInputs(48, 1, kGpu);
  runner.run(in.list());
  runner.run(in.list());
  // New values in the captured weights show in the next replay.
  in.w_gate.mul_(-1.5);
  const std::vector<at::Tensor> out = runner.run(in.list());
  expectSameOutputs(out, runner.evaluator().run(in.list()), in.valid_rows,
                    "after an in-place update of w_gate");
  Inputs other = in;
  other.w_up = in.w_up.clone();
  test::expectErrorContains([&] { runner.run(other.list()); },
                            {"input 3 (T3 'w_up') is a persistent input",
                             "update that tensor in place"});
  // Nothing was copied or replayed: the next valid call still works.
  EXPECT_NO_THROW(runner.run(in.list()));
}

TEST(GraphRunner, ReplayLaunchesOnlyTheGraph) {
  SKIP_WITHOUT_GPU();
  std::string why;
  if (!test::CudaLaunchCounter::available(&why)) {
    GTEST_SKIP() << "cannot count launches: " << why;
  }
  GraphRunner runner(makeProgram(), {}, persistentWeights());
  const Inputs a = makeInputs(48, 1, kGpu);
  const Inputs b = makeInputs(48, 2, kGpu, &a);
  runner.run(a.list());  // eager
  runner.run(a.list());  // capture
  cuda::synchronize(0);
  test::CudaLaunchCounter counter;
  counter.start();
  const std::vector<at::Tensor> out = runner.run(b.list());
  counter.stop();
  EXPECT_EQ(runner.lastMode(), GraphRunner::Mode::Replay);
  EXPECT_EQ(counter.kernelLaunches(), 0)
      << "kernels launched outside the graph during a replay:\n"
      << counter.callList();
  EXPECT_GE(counter.graphLaunches(), 1) << counter.callList();
  EXPECT_EQ(counter.memorySets(), 0) << counter.callList();
  // x, router_w and counts are copied in (persistent weights are not).
  EXPECT_GE(counter.memoryCopies(), 3) << counter.callList();
  expectSameOutputs(out, runner.evaluator().run(b.list()), b.valid_rows,
                    "the counted replay");
}

TEST(GraphRunner, HostSyncingGroupedMatmulIsRejectedBeforeRunning) {
  SKIP_WITHOUT_GPU();
  GraphRunner runner(makeProgram(DataType::Float));
  const Inputs in = makeInputs(16, 1, kGpu, nullptr, at::kFloat);
  test::expectErrorContains(
      [&] { runner.run(in.list()); },
      {"checked before running anything", "= GroupedMatmul(x=T0,",
       "reads group_counts on the host", "its dtype is Float, not bf16"});
}

TEST(GraphRunner, CollectiveMoeIsRejectedBeforeRunning) {
  SKIP_WITHOUT_GPU();
  MoeLayerConfig config;
  config.hidden = 64;
  config.intermediate = 32;
  config.num_experts = 4;
  config.local_experts = 4;
  config.topk = 2;
  GraphRunner runner(makeMoeLayerProgram(config));
  const auto options = at::TensorOptions().dtype(at::kBFloat16).device(kGpu);
  // Rejected before the eager run, so no communicator is ever needed.
  test::expectErrorContains(
      [&] {
        runner.run({at::ones({8, 64}, options), at::ones({4, 64}, options),
                    at::ones({4, 64, 32}, options),
                    at::ones({4, 64, 32}, options),
                    at::ones({4, 32, 64}, options)});
      },
      {"MoeDispatch(x=T0,", "backend=collective copies the row counts",
       "MoeCombine(", "MoeBackend::Cuda"});
}

TEST(GraphRunner, FailedCaptureLeavesTheRunnerUsable) {
  SKIP_WITHOUT_GPU();
  // H is symbolic, so the check before the eager run cannot see that
  // H = 60 keeps GroupedMatmul on its host path; the capture finds out.
  GraphRunner runner(makeProgram(DataType::BFloat16, /*hidden=*/-1), {},
                     persistentWeights());
  const Inputs odd = makeInputs(24, 1, kGpu, nullptr, at::kBFloat16, 60);
  runner.run(odd.list());  // eager: fine
  for (int attempt = 0; attempt < 2; ++attempt) {
    test::expectErrorContains(
        [&] { runner.run(odd.list()); },
        {"capturing the program failed",
         "cannot run inside a CUDA graph "
         "capture",
         "H = 60 is not a multiple of 8", "= GroupedMatmul(x=T0,"});
    EXPECT_FALSE(cuda::isCapturing(0));
  }
  EXPECT_EQ(runner.numGraphs(), 0);
  // Eager runs, other work and another signature still work.
  const std::vector<at::Tensor> eager = runner.evaluator().run(odd.list());
  EXPECT_EQ(eager[2].size(1), kInter);
  test::expectClose((odd.x + 1).cpu(), odd.x.cpu() + 1);
  Inputs even = makeInputs(24, 2, kGpu);
  for (int call = 0; call < 4; ++call) {
    even = makeInputs(24, 3 + call, kGpu, &even);
    expectSameOutputs(runner.run(even.list()),
                      runner.evaluator().run(even.list()), even.valid_rows,
                      toString("H = 64, call ", call));
  }
  EXPECT_EQ(runner.numGraphs(), 1);
}

}  // namespace
}  // namespace hostfuse
