// What happens when a rank fails, and a long run that must not drift. Run
// as N processes, one test per run (each kills a rank):
//
//   RankFailure.*  3 ranks through tests/cpp/launch_faults.sh (plain
//                  processes: torchrun would stop the survivors when a rank
//                  dies). Rank 2 dies or stops between two MoE calls; ranks
//                  0 and 1 must raise within a bounded time naming rank 2,
//                  recover, and go on as 2 ranks with results checked
//                  against the reference. With rank masking, rank 1 dies and
//                  ranks 0 and 2 go on with the first world's placement,
//                  rank 1's experts masked.
//   MoeSoak.*      any number of ranks through tools/launch.sh: 10,000
//                  dispatch + combine calls with routing that changes every
//                  call, every result exact, and the resident memory flat.
//
// ctest: fault_kill_np3, fault_stop_np3, fault_mask_np3, moe_soak_np2
// (tests/cpp/ CMakeLists.txt). docs/moe.md, "When a rank fails", has the
// protocol.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/exceptions.h>
#include "moe_reference.h"
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::Routing;

constexpr int64_t kHidden = 8;
constexpr int64_t kPicks = 2;
// Divisible by 1, 2 and 3 ranks: the same program runs before and after a
// rank is lost.
constexpr int64_t kExperts = 6;
constexpr double kExpertScale = 2.0;

// MoeDispatch on `backend`, every expert doubling its rows, MoeCombine;
// the dispatch's whole layout comes out too, for the check.
std::unique_ptr<HostIrContainer> moeProgram(
    int64_t experts = kExperts, MoeBackend backend = MoeBackend::Collective) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* t = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({t, kHidden}, DataType::Float, "x");
  TensorView* idx = makeTensor({t, kPicks}, DataType::Int64, "topk_idx");
  TensorView* w = makeTensor({t, kPicks}, DataType::Float, "topk_weights");
  program->addInput(x);
  program->addInput(idx);
  program->addInput(w);
  const MoeDispatchResult d = moeDispatch(x, idx, w, experts, backend);
  program->addOutput(
      moeCombine(mul(d.recv_x, kExpertScale), d, w, x->extent(0)));
  for (TensorView* tv :
       {d.recv_x, d.recv_src_rank, d.recv_src_token, d.recv_src_k,
        d.recv_expert_counts, d.n_tokens_to_rank, d.n_tokens_from_rank}) {
    program->addOutput(tv);
  }
  return program;
}

// One call's inputs on rank `rank`: made from (call, rank) alone, so every
// rank can make every rank's and no all-gather is needed for the reference.
struct CallInputs {
  at::Tensor x, idx, w;
};

CallInputs callInputs(uint64_t call, int64_t rank, int64_t ranks) {
  static const Routing kRoutings[] = {Routing::Uniform, Routing::Masked,
                                      Routing::Skewed};
  const Routing routing = kRoutings[call % 3];
  // T changes too, and is 0 now and then.
  const int64_t tokens = static_cast<int64_t>((call * 5 + rank * 3) % 9);
  CallInputs in;
  in.x = test::randomTensor({tokens, kHidden}, at::kFloat, at::kCPU,
                            call * 31 + rank);
  in.idx =
      test::makeRouting(routing, tokens, kPicks, kExperts, ranks, rank, call);
  in.w = test::randomWeights(tokens, kPicks, at::kFloat, at::kCPU,
                             call * 17 + rank);
  return in;
}

std::vector<c10::IValue> inputsOf(const CallInputs& in) {
  return {in.x, in.idx, in.w};
}

// Runs call `call` through `evaluator` over `ranks` ranks and compares every
// output, exactly, with the reference; returns the number of outputs that
// differ (0 when all match).
// Seconds spent making inputs, in the evaluator, and in the reference.
struct Seconds {
  double inputs = 0;
  double run = 0;
  double reference = 0;
};

int64_t runAndCount(HostIrEvaluator& evaluator, uint64_t call, int64_t me,
                    int64_t ranks, Seconds* seconds = nullptr) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0 = Clock::now();
  std::vector<at::Tensor> xs, idxs, ws;
  for (int64_t r = 0; r < ranks; ++r) {
    CallInputs in = callInputs(call, r, ranks);
    xs.push_back(in.x);
    idxs.push_back(in.idx);
    ws.push_back(in.w);
  }
  const Clock::time_point t1 = Clock::now();
  const std::vector<at::Tensor> out = evaluator.run({xs[me], idxs[me], ws[me]});
  const Clock::time_point t2 = Clock::now();
  const test::ExpectedDispatch expected =
      test::referenceDispatch(xs, idxs, ws, kExperts, me);
  const test::ExpertFn doubled = [](int64_t, const at::Tensor& rows) {
    return rows * kExpertScale;
  };
  const at::Tensor combined =
      test::referenceCombineInPickOrder(xs[me], idxs[me], ws[me], doubled);
  int64_t mismatches = 0;
  const auto same = [&](const at::Tensor& actual, const at::Tensor& want) {
    if (!at::equal(actual.cpu(), want)) {
      ++mismatches;
    }
  };
  same(out[0], combined);
  same(out[1], expected.recv_x);
  same(out[2], expected.src_rank);
  same(out[3], expected.src_token);
  same(out[4], expected.src_k);
  same(out[5], expected.expert_counts);
  if (seconds != nullptr) {
    const auto span = [](Clock::time_point a, Clock::time_point b) {
      return std::chrono::duration<double>(b - a).count();
    };
    seconds->inputs += span(t0, t1);
    seconds->run += span(t1, t2);
    seconds->reference += span(t2, Clock::now());
  }
  return mismatches;
}

double secondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// The resident set of this process, in bytes.
int64_t residentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages = 0;
  int64_t resident = 0;
  statm >> pages >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// ---------------------------------------------------------------------------
// A rank fails between two MoE calls.

enum class Fault { Kill, Stop };

// The test of RankFailure: rank 2 of 3 dies (Kill) or stops itself (Stop)
// after a call that works; ranks 0 and 1 must raise within
// [min_seconds, max_seconds] naming rank 2, raise at once on a second try,
// then recover and run `calls` checked calls as ranks 0 and 1 of 2.
void loseRankTwo(Fault fault, double min_seconds, double max_seconds) {
  Communicator& world = Communicator::getInstance();
  if (world.size() != 3) {
    GTEST_SKIP() << "needs 3 ranks (tests/cpp/launch_faults.sh 3 ...)";
  }
  const int64_t me = world.rank();
  HostIrEvaluator evaluator(moeProgram());
  EXPECT_EQ(runAndCount(evaluator, 1, me, 3), 0);
  // Rank 0 kills the stopped rank at the end: it needs the pid.
  world.store()->set(fmt::format("test/pid/{}", me),
                     std::to_string(static_cast<int64_t>(getpid())));
  world.barrier();
  if (me == 2) {
    std::cout << std::flush;
    std::raise(fault == Fault::Kill ? SIGKILL : SIGSTOP);
    // A stopped rank that is continued must not reach this.
    ADD_FAILURE() << "rank 2 was continued";
    std::_Exit(3);
  }

  const auto start = std::chrono::steady_clock::now();
  std::string message;
  try {
    evaluator.run(inputsOf(callInputs(2, me, 3)));
  } catch (const Error& e) {
    message = e.what();
  }
  const double seconds = secondsSince(start);
  std::cout << "[rank " << me << "] raised after " << seconds
            << " s: " << message.substr(0, 600) << std::endl;
  EXPECT_NE(message.find("rank 2 did not answer the roll call"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("ranks 0, 1 are alive"), std::string::npos) << message;
  EXPECT_GE(seconds, min_seconds);
  EXPECT_LT(seconds, max_seconds);
  EXPECT_TRUE(world.hasFailed());

  // The failed communicator raises at once from now on, saying why.
  const auto again = std::chrono::steady_clock::now();
  test::expectErrorContains(
      [&] { evaluator.run(inputsOf(callInputs(3, me, 3))); },
      {"failed earlier", "recover()"});
  EXPECT_LT(secondsSince(again), 1.0);

  Communicator& survivors = Communicator::recoverInstance();
  EXPECT_EQ(&Communicator::getInstance(), &survivors);
  EXPECT_EQ(survivors.size(), 2);
  EXPECT_EQ(survivors.rank(), me);
  EXPECT_EQ(survivors.formerRanks(), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(survivors.name(), "world~1");
  // The failed one stays valid, aborted; its shutdown waits for nobody.
  EXPECT_NO_THROW(world.shutdown());

  // The same evaluator goes on over the survivors (its old MoE state is
  // dropped), and a new one works too.
  evaluator.resetCommunicator(nullptr);
  HostIrEvaluator fresh(moeProgram());
  for (uint64_t call = 10; call < 20; ++call) {
    EXPECT_EQ(runAndCount(call % 2 ? evaluator : fresh, call, me, 2), 0)
        << "call " << call;
  }
  survivors.barrier();

  if (fault == Fault::Stop && me == 0) {
    const std::vector<uint8_t> pid = survivors.store()->get("test/pid/2");
    kill(static_cast<pid_t>(std::stoll(std::string(pid.begin(), pid.end()))),
         SIGKILL);
  }
}

// Killed: the survivors see the closed connections at once, long before the
// timeout (HOSTFUSE_COMM_TIMEOUT_S=20 in ctest), and raise after the roll
// call's window (3 s).
TEST(RankFailure, KilledRankIsNamedAndSurvivorsGoOn) {
  loseRankTwo(Fault::Kill, 0.0, 10.0);
}

// Stopped: the survivors raise after the timeout (HOSTFUSE_COMM_TIMEOUT_S=2
// in ctest) and the roll call's window (2 s, the timeout).
TEST(RankFailure, StoppedRankTimesOutAndSurvivorsGoOn) {
  const double timeout = std::chrono::duration<double>(
                             Communicator::getInstance().config().timeout)
                             .count();
  loseRankTwo(Fault::Stop, timeout, 2 * timeout + 10.0);
}

// ---------------------------------------------------------------------------
// Rank masking (docs/moe.md, "Rank masking"): rank 1 of 3 dies; ranks 0 and
// 2 recover and run the same program, whose 9 experts do not divide among 2
// ranks, with the first world's placement (3 experts a rank) and rank 1's
// experts masked.

constexpr int64_t kMaskExperts = 9;
constexpr int64_t kMaskRanks = 3;
constexpr int64_t kDeadRank = 1;

// The program of maskRankOne: `moeProgram` with kMaskExperts experts.
std::unique_ptr<HostIrContainer> maskedMoeProgram(MoeBackend backend) {
  return moeProgram(kMaskExperts, backend);
}

// Call `call`'s inputs of every first-world rank; a rank in `dead` has none.
// The first calls in each world (1, 10, 11, 20, 21) have the most tokens:
// the cuda backend sizes its workspace by a site's first call.
std::vector<CallInputs> maskedCallInputs(uint64_t call,
                                         const std::vector<int64_t>& dead) {
  static const Routing kRoutings[] = {Routing::Uniform, Routing::Masked,
                                      Routing::Skewed};
  std::vector<CallInputs> inputs;
  for (int64_t r = 0; r < kMaskRanks; ++r) {
    const bool gone = std::find(dead.begin(), dead.end(), r) != dead.end();
    const int64_t tokens =
        gone ? 0
             : (call % 10 <= 1
                    ? 9
                    : static_cast<int64_t>((call * 5 + r * 3) % 9) + 1);
    CallInputs in;
    in.x = test::randomTensor({tokens, kHidden}, at::kFloat, at::kCPU,
                              call * 31 + r);
    in.idx = test::makeRouting(kRoutings[call % 3], tokens, kPicks,
                               kMaskExperts, kMaskRanks, r, call);
    in.w = test::randomWeights(tokens, kPicks, at::kFloat, at::kCPU,
                               call * 17 + r);
    inputs.push_back(in);
  }
  return inputs;
}

// Runs call `call` on first-world rank `me` through `evaluator` (on
// `device`) and compares every output, exactly, with the reference of the
// first world in which the ranks in `dead` hold no tokens and every pick of
// an expert of theirs is -1. The cuda backend's outputs are compared on
// their valid rows.
void runMaskedCall(HostIrEvaluator& evaluator, uint64_t call, int64_t me,
                   const std::vector<int64_t>& dead, const at::Device& device) {
  const std::vector<CallInputs> inputs = maskedCallInputs(call, dead);
  std::vector<at::Tensor> xs, idxs, ws;
  constexpr int64_t kLocal = kMaskExperts / kMaskRanks;
  for (const CallInputs& in : inputs) {
    at::Tensor masked = in.idx.clone();
    for (const int64_t r : dead) {
      masked.masked_fill_(masked.div(kLocal, "floor").eq(r), -1);
    }
    xs.push_back(in.x);
    idxs.push_back(masked);
    ws.push_back(in.w);
  }
  const CallInputs& mine = inputs[me];
  const std::vector<at::Tensor> out = evaluator.run(
      {mine.x.to(device), mine.idx.to(device), mine.w.to(device)});
  const test::ExpectedDispatch expected =
      test::referenceDispatch(xs, idxs, ws, kMaskExperts, me);
  const test::ExpertFn doubled = [](int64_t, const at::Tensor& rows) {
    return rows * kExpertScale;
  };
  const int64_t rows = expected.recv_x.size(0);
  const auto valid = [&](const at::Tensor& t) {
    return t.cpu().narrow(0, 0, rows);
  };
  EXPECT_TRUE(at::equal(out[0].cpu(), test::referenceCombineInPickOrder(
                                          xs[me], idxs[me], ws[me], doubled)))
      << "combine, call " << call;
  EXPECT_TRUE(at::equal(valid(out[1]), expected.recv_x)) << "call " << call;
  EXPECT_TRUE(at::equal(valid(out[2]), expected.src_rank)) << "call " << call;
  EXPECT_TRUE(at::equal(valid(out[3]), expected.src_token)) << "call " << call;
  EXPECT_TRUE(at::equal(valid(out[4]), expected.src_k)) << "call " << call;
  EXPECT_TRUE(at::equal(out[5].cpu(), expected.expert_counts))
      << "call " << call;
  EXPECT_TRUE(at::equal(out[6].cpu(), expected.n_tokens_to_rank))
      << "call " << call << ": " << out[6];
  EXPECT_TRUE(at::equal(out[7].cpu(), expected.n_tokens_from_rank))
      << "call " << call << ": " << out[7];
}

// Rank 1 of 3 is killed after a call on `backend`; ranks 0 and 2 learn of
// it from a collective-backend call (on every backend: the cuda backend's
// kernels would see it only at their timeout), recover, and the same
// evaluator goes on with rank 1 masked.
void maskRankOne(MoeBackend backend) {
  Communicator& world = Communicator::getInstance();
  if (world.size() != kMaskRanks) {
    GTEST_SKIP() << "needs 3 ranks (tests/cpp/launch_faults.sh 3 1 ...)";
  }
  if (backend == MoeBackend::Cuda && test::lacksGpuForCudaBackend()) {
    GTEST_SKIP() << "the cuda backend needs a GPU per rank (of its own, or "
                    "shared: HOSTFUSE_SHARE_GPUS=1)";
  }
  const int64_t me = world.rank();
  const at::Device device =
      backend == MoeBackend::Cuda ? world.device() : at::Device(at::kCPU);
  HostIrEvaluatorParams params;
  params.mask_failed_ranks = true;
  HostIrEvaluator evaluator(maskedMoeProgram(backend), params);
  // Nothing is lost yet: nothing is masked, and the plain runtime runs.
  EXPECT_TRUE(evaluator.maskedRanks().empty());
  runMaskedCall(evaluator, 1, me, {}, device);
  // The survivors learn of the death from this program's second call (its
  // first one makes the Gloo backend while every rank is alive).
  HostIrEvaluator detector(moeProgram());
  EXPECT_EQ(runAndCount(detector, 1, me, 3), 0);
  world.barrier();
  if (me == kDeadRank) {
    std::cout << std::flush;
    std::raise(SIGKILL);
  }

  test::expectErrorContains(
      [&] { detector.run(inputsOf(callInputs(2, me, 3))); },
      {"rank 1 did not answer the roll call", "ranks 0, 2 are alive"});
  Communicator& survivors = Communicator::recoverInstance();
  EXPECT_EQ(survivors.originalRanks(), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(survivors.originalSize(), 3);

  evaluator.resetCommunicator(nullptr);
  EXPECT_EQ(evaluator.maskedRanks(), (std::vector<int64_t>{kDeadRank}));
  for (uint64_t call = 10; call < 16; ++call) {
    runMaskedCall(evaluator, call, me, {kDeadRank}, device);
  }

  // An id out of range on one survivor: every survivor raises, naming the
  // id and saying which numbering the message's ranks are in; then the
  // next call works.
  {
    std::vector<CallInputs> inputs = maskedCallInputs(20, {kDeadRank});
    CallInputs& mine = inputs[me];
    if (me == 2) {
      mine.idx[0][1] = kMaskExperts;
    }
    test::expectErrorContains(
        [&] {
          evaluator.run(
              {mine.x.to(device), mine.idx.to(device), mine.w.to(device)});
        },
        {"bad input on rank 1 of 2", "expert id 9 at token 0, pick 1",
         "ranks 1 of the first world's 3 are masked",
         "first-world rank [0, 2][r]"});
  }
  runMaskedCall(evaluator, 21, me, {kDeadRank}, device);

  // Without masking, nothing changes: the experts must divide among the
  // survivors, and 9 do not among 2.
  HostIrEvaluatorParams plain;
  plain.mask_failed_ranks = false;
  HostIrEvaluator unmasked(maskedMoeProgram(MoeBackend::Collective), plain);
  EXPECT_TRUE(unmasked.maskedRanks().empty());
  const CallInputs mine = maskedCallInputs(22, {kDeadRank})[me];
  test::expectErrorContains(
      [&] { unmasked.run(inputsOf(mine)); },
      {"num_experts (9) must be a positive multiple of the world size (2)"});
  survivors.barrier();
}

TEST(RankFailure, SurvivorsMaskTheExpertsOfAKilledRank) {
  maskRankOne(MoeBackend::Collective);
}

TEST(RankFailure, SurvivorsMaskTheExpertsOfAKilledRankOnTheCudaBackend) {
  maskRankOne(MoeBackend::Cuda);
}

// ---------------------------------------------------------------------------
// 10,000 calls with routing and T changing every call.

TEST(MoeSoak, TenThousandCallsMatchAndKeepMemoryFlat) {
  constexpr uint64_t kCalls = 10000;
  constexpr uint64_t kWarmUp = 1000;
  // Allocator caches and Gloo's buffers settle during the warm-up (the
  // growth after it measured about 50 KiB); a leak of 100 bytes a call
  // would pass this bound within the 9,000 calls after it.
  constexpr int64_t kGrowthBound = 768 << 10;
  const int64_t me = test::myRank();
  const int64_t ranks = test::worldSize();
  HostIrEvaluator evaluator(moeProgram());
  int64_t mismatches = 0;
  int64_t rss_after_warm_up = 0;
  Seconds seconds;
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t call = 0; call < kCalls; ++call) {
    mismatches += runAndCount(evaluator, call, me, ranks, &seconds);
    if (call + 1 == kWarmUp) {
      rss_after_warm_up = residentBytes();
    }
  }
  const int64_t rss_end = residentBytes();
  std::cout << "[rank " << me << "] " << kCalls << " calls in "
            << secondsSince(start) << " s (inputs " << seconds.inputs
            << " s, hostfuse " << seconds.run << " s, reference "
            << seconds.reference << " s); resident " << rss_after_warm_up / 1024
            << " KiB after " << kWarmUp << " calls, " << rss_end / 1024
            << " KiB at the end" << std::endl;
  EXPECT_EQ(mismatches, 0);
  EXPECT_LT(rss_end - rss_after_warm_up, kGrowthBound);
}

}  // namespace
}  // namespace hostfuse
