// The same bad input gives the same message text on both MoE backends: the
// input checks, the status vocabulary and describeStatus are shared
// (csrc/hostfuse/multidevice/moe/input_checks.h, status.h). Each case runs on
// the collective backend (CPU tensors over Gloo, and CUDA tensors over NCCL
// when a GPU is present) and, with a GPU, on the cuda backend; the messages
// must be equal, and must name the rank, the argument, the index and the
// value. One process: a world of one rank.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/collective/kernels/collective_kernels.h>
#include <hostfuse/multidevice/moe/input_checks.h>
#include <hostfuse/multidevice/moe/runtime.h>
#include <hostfuse/utils/torch_cuda.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

constexpr int64_t kTokens = 8;
constexpr int64_t kHidden = 64;
constexpr int64_t kPicks = 4;
constexpr int64_t kExperts = 8;

// A valid dispatch on `device`; the cases break one thing each.
MoeDispatchArgs validArgs(const at::Device& device, uint64_t seed) {
  MoeDispatchArgs args;
  args.x = test::randomTensor({kTokens, kHidden}, at::kFloat, device, seed);
  // Distinct experts per token: a shifted window of a permutation.
  at::Tensor idx = at::empty({kTokens, kPicks}, at::kLong);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t k = 0; k < kPicks; ++k) {
      idx[t][k] = (t + 3 * k) % kExperts;
    }
  }
  args.topk_idx = idx.to(device);
  args.topk_weights =
      test::randomTensor({kTokens, kPicks}, at::kFloat, device, seed + 1);
  args.num_experts = kExperts;
  return args;
}

struct DispatchCase {
  const char* name;
  std::function<void(MoeDispatchArgs&)> breakIt;
  std::vector<std::string> expected;  // fragments of the message
};

std::vector<DispatchCase> dispatchCases() {
  auto setIdx = [](MoeDispatchArgs& a, int64_t t, int64_t k, int64_t v) {
    a.topk_idx = a.topk_idx.clone();
    a.topk_idx[t][k] = v;
  };
  const std::string prefix = "MoeDispatch: bad input on rank 0 of 1: ";
  return {
      {"ExpertIdTooLarge",
       [&](MoeDispatchArgs& a) { setIdx(a, 3, 1, kExperts + 5); },
       {prefix + "topk_idx holds expert id 13 at token 3, pick 1, which is "
                 "out of range"}},
      {"ExpertIdBelowMinusOne",
       [&](MoeDispatchArgs& a) { setIdx(a, 6, 0, -2); },
       {"topk_idx holds expert id -2 at token 6, pick 0"}},
      {"DuplicateExpert",
       [&](MoeDispatchArgs& a) {
         setIdx(a, 4, 2, a.topk_idx[4][0].item<int64_t>());
       },
       {prefix + "topk_idx names expert 4 twice in token 4 (pick 2 repeats"}},
      // The first bad (token, pick) in row-major order wins, whatever its
      // kind: the duplicate in token 2 comes before the bad id in token 5.
      {"FirstBadPickWins",
       [&](MoeDispatchArgs& a) {
         setIdx(a, 5, 0, 99);
         setIdx(a, 2, 3, a.topk_idx[2][1].item<int64_t>());
       },
       {"names expert 5 twice in token 2 (pick 3 repeats"}},
      {"TwoDuplicatesInOneToken",
       [&](MoeDispatchArgs& a) {
         a.topk_idx = a.topk_idx.clone();
         a.topk_idx[1] = at::tensor({5, 3, 5, 3}, at::kLong);
       },
       {"names expert 5 twice in token 1 (pick 2 repeats"}},
      {"XRank",
       [](MoeDispatchArgs& a) { a.x = a.x.reshape({-1}); },
       {prefix + "x must be a 2-D tensor [T, H], got rank 1"}},
      {"XNotFloating",
       [](MoeDispatchArgs& a) { a.x = a.x.to(at::kInt); },
       {prefix + "x must be Float, Double, BFloat16 or Half, got Int"}},
      {"XFp8",
       [](MoeDispatchArgs& a) { a.x = a.x.to(at::kFloat8_e4m3fn); },
       {"x must be Float, Double, BFloat16 or Half, got Float8_e4m3fn"}},
      {"XFp4",
       [](MoeDispatchArgs& a) {
         a.x = at::empty({kTokens, kHidden},
                         a.x.options().dtype(at::kFloat4_e2m1fn_x2));
       },
       {"x must be Float, Double, BFloat16 or Half, got Float4_e2m1fn_x2"}},
      {"ZeroHidden",
       [](MoeDispatchArgs& a) { a.x = a.x.narrow(1, 0, 0).contiguous(); },
       {prefix + "x has shape [8, 0]; H, its columns, must be > 0"}},
      {"ZeroPicks",
       [](MoeDispatchArgs& a) {
         a.topk_idx = a.topk_idx.narrow(1, 0, 0).contiguous();
         a.topk_weights = a.topk_weights->narrow(1, 0, 0).contiguous();
       },
       {prefix + "topk_idx has K = 0 columns; K must be > 0"}},
      {"IdxDtype",
       [](MoeDispatchArgs& a) { a.topk_idx = a.topk_idx.to(at::kFloat); },
       {"topk_idx must be Long (i64) or Int (i32), got Float"}},
      {"IdxTokens",
       [](MoeDispatchArgs& a) {
         a.topk_idx = a.topk_idx.narrow(0, 0, kTokens - 1);
       },
       {"topk_idx has 7 rows but x has 8 tokens"}},
      {"WeightsShape",
       [](MoeDispatchArgs& a) {
         a.topk_weights = a.topk_weights->narrow(1, 0, kPicks - 1);
       },
       {"topk_weights has shape [8, 3] but topk_idx has shape [8, 4]"}},
      {"WeightsDtype",
       [](MoeDispatchArgs& a) {
         a.topk_weights = a.topk_weights->to(at::kLong);
       },
       {"topk_weights must be Float, Double, BFloat16, Half or a Float8 "
        "type, got Long"}},
      {"WeightsFp4",
       [](MoeDispatchArgs& a) {
         a.topk_weights = at::empty({kTokens, kPicks},
                                    a.x.options().dtype(at::kFloat4_e2m1fn_x2));
       },
       {"topk_weights must be Float, Double, BFloat16, Half or a Float8 "
        "type, got Float4_e2m1fn_x2"}},
      {"NumExpertsZero",
       [](MoeDispatchArgs& a) { a.num_experts = 0; },
       {"num_experts (0) must be a positive multiple of the world size (1)"}},
  };
}

// Integers in [0, n) from a fixed seed: the random layouts of the trials.
class Below {
 public:
  explicit Below(uint32_t seed) : random_(seed) {}
  int64_t operator()(int64_t n) {
    return static_cast<int64_t>(random_() % static_cast<uint64_t>(n));
  }

 private:
  std::mt19937 random_;
};

// The message of `fn`'s hostfuse::Error without the lines that say where
// in hostfuse it was raised ("  at file:line"), or ""
// when it does not throw.
std::string messageOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string what = e.what();
    return what.substr(0, what.find("\n  "));
  }
  return "";
}

// A runtime per backend on this process's one-rank world.
class MoeErrors : public testing::Test {
 protected:
  MoeRuntime& runtime(MoeBackend backend) {
    auto& slot = runtimes_[backend];
    if (slot == nullptr) {
      slot =
          moeBackendInfo(backend).create_runtime(Communicator::getInstance());
    }
    return *slot;
  }

  // The message of dispatching `args` on `backend` at site `site`.
  std::string dispatchMessage(MoeBackend backend, MoeDispatchArgs args,
                              const void* site) {
    args.site = site;
    return messageOf([&] { runtime(backend).dispatch(args); });
  }

  std::map<MoeBackend, std::unique_ptr<MoeRuntime>> runtimes_;
};

TEST_F(MoeErrors, DispatchBadInputsNameRankArgumentIndexAndValueOnCpu) {
  int site = 0;
  for (const DispatchCase& c : dispatchCases()) {
    SCOPED_TRACE(c.name);
    MoeDispatchArgs args = validArgs(at::kCPU, 7);
    c.breakIt(args);
    const std::string message =
        dispatchMessage(MoeBackend::Collective, args, &site);
    for (const std::string& fragment : c.expected) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message: " << message << "\nexpected: " << fragment;
    }
  }
  // And the next valid call works.
  const MoeDispatchOutput out =
      runtime(MoeBackend::Collective).dispatch(validArgs(at::kCPU, 7));
  EXPECT_EQ(out.recv_x.size(0), kTokens * kPicks);
}

TEST_F(MoeErrors, DispatchBadInputsGiveTheSameTextOnBothBackends) {
  if (!cuda::isAvailable()) {
    GTEST_SKIP() << "the cuda backend needs a GPU";
  }
  const at::Device gpu(at::kCUDA, 0);
  // One site for every case: the cuda backend creates its workspace at the
  // first call that passes the host checks and keeps it, as in a program.
  int site = 0;
  for (const DispatchCase& c : dispatchCases()) {
    SCOPED_TRACE(c.name);
    MoeDispatchArgs args = validArgs(gpu, 11);
    c.breakIt(args);
    const std::string collective =
        dispatchMessage(MoeBackend::Collective, args, &site);
    const std::string cuda = dispatchMessage(MoeBackend::Cuda, args, &site);
    EXPECT_FALSE(collective.empty());
    EXPECT_EQ(collective, cuda);
    for (const std::string& fragment : c.expected) {
      EXPECT_NE(cuda.find(fragment), std::string::npos)
          << "message: " << cuda << "\nexpected: " << fragment;
    }
  }
  const MoeDispatchOutput out = runtime(MoeBackend::Cuda).dispatch([&] {
    MoeDispatchArgs args = validArgs(gpu, 11);
    args.site = &site;
    return args;
  }());
  EXPECT_EQ(out.layout.expert_counts.sum().item<int64_t>(), kTokens * kPicks);
}

// Combine with expert outputs or weights that do not fit the dispatch.
TEST_F(MoeErrors, CombineBadInputsGiveTheSameTextOnBothBackends) {
  std::vector<MoeBackend> backends = {MoeBackend::Collective};
  at::Device device = at::kCPU;
  if (cuda::isAvailable()) {
    backends.push_back(MoeBackend::Cuda);
    device = at::Device(at::kCUDA, 0);
  }
  struct CombineCase {
    const char* name;
    std::function<void(MoeCombineArgs&)> breakIt;
    std::string expected;
  };
  const std::string prefix = "MoeCombine: bad input on rank 0 of 1: ";
  const std::vector<CombineCase> cases = {
      {"ExpertOutRows",
       [](MoeCombineArgs& a) {
         a.expert_out = a.expert_out.narrow(0, 0, a.expert_out.size(0) - 1);
       },
       prefix + "recv_src_rank has 32 entries but expert_out has 31 rows"},
      {"ExpertOutDtype",
       [](MoeCombineArgs& a) { a.expert_out = a.expert_out.to(at::kInt); },
       prefix + "expert_out must be Float, Double, BFloat16 or Half, got Int"},
      {"ExpertOutFp8",
       [](MoeCombineArgs& a) {
         a.expert_out = a.expert_out.to(at::kFloat8_e5m2);
       },
       prefix + "expert_out must be Float, Double, BFloat16 or Half, got "
                "Float8_e5m2"},
      {"ExpertOutNoColumns",
       [](MoeCombineArgs& a) {
         a.expert_out = a.expert_out.narrow(1, 0, 0).contiguous();
       },
       prefix + "expert_out has shape [32, 0]; H', its columns, must be > 0"},
      {"WeightsFp4",
       [](MoeCombineArgs& a) {
         a.topk_weights =
             at::empty({kTokens, kPicks},
                       a.expert_out.options().dtype(at::kFloat4_e2m1fn_x2));
       },
       prefix +
           "topk_weights must be Float, Double, BFloat16, Half or a Float8 "
           "type, got Float4_e2m1fn_x2"},
      {"WeightsTokens",
       [](MoeCombineArgs& a) {
         a.topk_weights = a.topk_weights->narrow(0, 0, kTokens - 2);
       },
       prefix + "topk_weights has 6 rows but num_tokens is 8"},
      {"NegativeTokens", [](MoeCombineArgs& a) { a.num_tokens = -1; },
       prefix + "num_tokens must be >= 0, got -1"},
  };
  std::map<MoeBackend, std::vector<std::string>> messages;
  for (const MoeBackend backend : backends) {
    int site = 0;
    MoeDispatchArgs dispatch = validArgs(device, 13);
    dispatch.site = &site;
    const MoeDispatchOutput out = runtime(backend).dispatch(dispatch);
    for (const CombineCase& c : cases) {
      SCOPED_TRACE(c.name);
      MoeCombineArgs args;
      args.dispatch_site = &site;
      args.expert_out = out.recv_x.clone();
      args.layout = out.layout;
      args.topk_weights = dispatch.topk_weights;
      args.num_tokens = kTokens;
      args.num_experts = kExperts;
      c.breakIt(args);
      const std::string message =
          messageOf([&] { runtime(backend).combine(args); });
      EXPECT_NE(message.find(c.expected), std::string::npos)
          << toString(backend) << ": " << message;
      messages[backend].push_back(message);
    }
  }
  if (backends.size() == 2) {
    EXPECT_EQ(messages[MoeBackend::Collective], messages[MoeBackend::Cuda]);
  }
}

// A layout that names some (rank, token, pick) two or three times: every
// device names the first row that repeats an earlier one, as
// moe::firstRepeatedRow (three stable sorts, on the CPU) finds it. On GPUs
// the check kernel finds it with a hash table instead of sorts, with 1200
// rows over its 1024 threads; random repeats from a fixed seed.
TEST_F(MoeErrors, CombineNamesTheFirstRowThatRepeatsAnEarlierOne) {
  std::vector<at::Device> devices = {at::kCPU};
  if (cuda::isAvailable()) {
    devices.emplace_back(at::kCUDA, 0);
  }
  constexpr int64_t tokens = 300;
  constexpr int64_t rows = tokens * kPicks;
  at::Tensor idx = at::empty({tokens, kPicks}, at::kLong);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < kPicks; ++k) {
      idx[t][k] = (5 * t + 3 * k) % kExperts;  // distinct in a token
    }
  }
  for (const at::Device& device : devices) {
    SCOPED_TRACE(device.str());
    MoeDispatchArgs dispatch;
    dispatch.x = test::randomTensor({tokens, kHidden}, at::kFloat, device, 3);
    dispatch.topk_idx = idx.to(device);
    dispatch.topk_weights =
        test::randomTensor({tokens, kPicks}, at::kFloat, device, 4);
    dispatch.num_experts = kExperts;
    int site = 0;
    dispatch.site = &site;
    MoeRuntime& moe = runtime(MoeBackend::Collective);
    const MoeDispatchOutput out = moe.dispatch(dispatch);
    ASSERT_EQ(out.layout.src_rank.numel(), rows);
    Below below(17);
    int checked = 0;
    for (int trial = 0; trial < 8; ++trial) {
      SCOPED_TRACE("trial " + std::to_string(trial));
      MoeLayout layout = out.layout;
      at::Tensor token = layout.src_token.cpu().clone();
      at::Tensor pick = layout.src_k.cpu().clone();
      // One to three rows repeated, each once or twice elsewhere.
      for (int64_t kept = below(3) + 1; kept > 0; --kept) {
        const int64_t from = below(rows);
        for (int64_t copies = below(2) + 1; copies > 0; --copies) {
          const int64_t to = below(rows);
          token[to] = token[from].item<int64_t>();
          pick[to] = pick[from].item<int64_t>();
        }
      }
      MoeLayout on_cpu;
      on_cpu.src_rank = layout.src_rank.cpu();
      on_cpu.src_token = token;
      on_cpu.src_k = pick;
      const int64_t first = moe::firstRepeatedRow(on_cpu).item<int64_t>();
      if (first == rows) {
        continue;  // every copy landed on its own row
      }
      layout.src_token = token.to(device);
      layout.src_k = pick.to(device);
      MoeCombineArgs args;
      args.dispatch_site = &site;
      args.expert_out = out.recv_x;
      args.layout = layout;
      args.topk_weights = dispatch.topk_weights;
      args.num_tokens = tokens;
      args.num_experts = kExperts;
      const std::string message = messageOf([&] { moe.combine(args); });
      const std::string expected =
          "MoeCombine: bad input on rank 0 of 1: row " + std::to_string(first) +
          " of the layout names rank 0, token " +
          std::to_string(token[first].item<int64_t>()) + ", pick " +
          std::to_string(pick[first].item<int64_t>()) +
          " (recv_src_rank, recv_src_token, recv_src_k) like an earlier row";
      EXPECT_NE(message.find(expected), std::string::npos)
          << "message: " << message << "\nexpected: " << expected;
      ++checked;
    }
    EXPECT_GE(checked, 6) << "too few trials made a repeat";
    // And the layout as dispatch made it still combines.
    MoeCombineArgs args;
    args.dispatch_site = &site;
    args.expert_out = out.recv_x;
    args.layout = out.layout;
    args.topk_weights = dispatch.topk_weights;
    args.num_tokens = tokens;
    args.num_experts = kExperts;
    EXPECT_EQ(moe.combine(args).size(0), tokens);
  }
}

// The GPU search for a repeated row on its own, with keys of several
// ranks and many rows of three or more copies (a few hundred keys over up
// to 5000 rows), and with none: the row moe::firstRepeatedRow finds, or -1.
TEST_F(MoeErrors, FirstRepeatedRowKernelMatchesTheSortsOnRandomLayouts) {
  // The layouts and their answers first (on the CPU, so that CI checks
  // that the trials do make repeats), then the kernel on each.
  struct Trial {
    MoeLayout layout;
    int64_t expected;  // firstRepeatedRow's row, -1 for none
  };
  std::vector<Trial> trials;
  Below below(29);
  int repeats = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t rows = std::vector<int64_t>{1, 2, 300, 5000}[trial % 4];
    const bool distinct = trial % 5 == 0;
    std::vector<int64_t> ranks(rows);
    std::vector<int64_t> tokens(rows);
    std::vector<int64_t> picks(rows);
    for (int64_t i = 0; i < rows; ++i) {
      // Distinct: every row its own token. Else 3 ranks x 50 tokens x 4
      // picks, so that most keys come back several times.
      ranks[i] = distinct ? i % 3 : below(3);
      tokens[i] = distinct ? i : below(50);
      picks[i] = distinct ? i % 4 : below(4);
    }
    Trial t;
    t.layout.src_rank = at::tensor(ranks, at::kLong);
    t.layout.src_token = at::tensor(tokens, at::kLong);
    t.layout.src_k = at::tensor(picks, at::kLong);
    const int64_t first = moe::firstRepeatedRow(t.layout).item<int64_t>();
    t.expected = first < rows ? first : -1;
    repeats += first < rows ? 1 : 0;
    trials.push_back(std::move(t));
  }
  // Every layout of 300 or 5000 rows that is not distinct: 16 of the 40.
  EXPECT_GE(repeats, 16) << "too few layouts had a repeated row";
  if (!cuda::isAvailable()) {
    GTEST_SKIP() << "the repeat-search kernel needs a GPU";
  }
  const at::Device gpu(at::kCUDA, 0);
  for (size_t i = 0; i < trials.size(); ++i) {
    const Trial& t = trials[i];
    const int64_t rows = t.layout.src_rank.numel();
    SCOPED_TRACE("trial " + std::to_string(i) + ", " + std::to_string(rows) +
                 " rows, expected row " + std::to_string(t.expected));
    const at::Tensor rank = t.layout.src_rank.to(gpu);
    const at::Tensor token = t.layout.src_token.to(gpu);
    const at::Tensor pick = t.layout.src_k.to(gpu);
    const int64_t slots = moe::collective::repeatSlots(rows);
    at::Tensor seen = at::full({slots + 1}, -1, rank.options());
    ASSERT_EQ(
        moe::collective::launchFirstRepeatedRow(
            rank.const_data_ptr<int64_t>(), token.const_data_ptr<int64_t>(),
            pick.const_data_ptr<int64_t>(), rows,
            seen.mutable_data_ptr<int64_t>(), cuda::currentStream(0)),
        cudaSuccess);
    EXPECT_EQ(seen[slots].item<int64_t>(), t.expected);
  }
}

// A count outside [0, rows] is refused before anything searches by it,
// with the same text on CPU and CUDA tensors: counts [-1, n + 1] keep the
// sum and every row's expert, and would otherwise pass every other check.
TEST_F(MoeErrors, CollectiveCombineRefusesACountOutsideTheRows) {
  std::vector<at::Device> devices = {at::kCPU};
  if (cuda::isAvailable()) {
    devices.emplace_back(at::kCUDA, 0);
  }
  std::vector<std::string> messages;
  for (const at::Device& device : devices) {
    SCOPED_TRACE(device.str());
    int site = 0;
    MoeDispatchArgs dispatch = validArgs(device, 19);
    dispatch.site = &site;
    MoeRuntime& moe = runtime(MoeBackend::Collective);
    const MoeDispatchOutput out = moe.dispatch(dispatch);
    const int64_t rows = out.recv_x.size(0);
    for (const bool negative : {true, false}) {
      at::Tensor counts = out.layout.expert_counts.cpu().clone();
      const int64_t first = counts[0].item<int64_t>();
      // Expert 0's count to -1 and expert 1's up by as much, or expert 2's
      // to rows + 1 and expert 3's down by as much: the same sum.
      if (negative) {
        counts[0] = -1;
        counts[1] = counts[1].item<int64_t>() + first + 1;
      } else {
        const int64_t two = counts[2].item<int64_t>();
        counts[2] = rows + 1;
        counts[3] = counts[3].item<int64_t>() + two - (rows + 1);
      }
      ASSERT_EQ(counts.sum().item<int64_t>(), rows);
      MoeCombineArgs args;
      args.dispatch_site = &site;
      args.expert_out = out.recv_x;
      args.layout = out.layout;
      args.layout.expert_counts = counts.to(device);
      args.topk_weights = dispatch.topk_weights;
      args.num_tokens = kTokens;
      args.num_experts = kExperts;
      const std::string message = messageOf([&] { moe.combine(args); });
      const std::string expected =
          "MoeCombine: bad input on rank 0 of 1: recv_expert_counts holds " +
          std::to_string(negative ? -1 : rows + 1) + " for local expert " +
          std::to_string(negative ? 0 : 2) + "; a count is in [0, " +
          std::to_string(rows) + "], the rows of expert_out";
      EXPECT_NE(message.find(expected), std::string::npos)
          << "message: " << message << "\nexpected: " << expected;
      messages.push_back(message);
    }
  }
  if (messages.size() == 4) {
    EXPECT_EQ(messages[0], messages[2]);
    EXPECT_EQ(messages[1], messages[3]);
  }
}

// On GPUs the combine groups the rows by source rank with
// collective::launchSourceOrder (binary searches in each expert's rows,
// which are in (rank, token) order) instead of a sort: its permutation is
// the one of a stable sort by src_rank, for random layouts of 2 to 5 ranks
// with empty experts and ranks that hold nothing. One GPU, no peers: the
// kernel is given the layouts directly.
TEST_F(MoeErrors, SourceOrderOfTheCollectiveCombineIsAStableSortByRank) {
  if (!cuda::isAvailable()) {
    GTEST_SKIP() << "the source-order kernel needs a GPU";
  }
  const at::Device gpu(at::kCUDA, 0);
  Below below(23);
  for (int trial = 0; trial < 44; ++trial) {
    // The last four: more (expert, rank) runs, then more ranks, than the
    // 1024 threads of the run-finding block.
    const int64_t ranks = trial < 40 ? 2 + below(4) : trial < 42 ? 40 : 1100;
    const int64_t experts = trial < 40 ? 1 + below(5) : trial < 42 ? 30 : 1;
    std::vector<int64_t> src_rank;
    std::vector<int64_t> counts;
    for (int64_t e = 0; e < experts; ++e) {
      const size_t before = src_rank.size();
      for (int64_t r = 0; r < ranks; ++r) {
        // Some runs empty, some long.
        const int64_t run =
            below(4) == 0 ? 0 : below(trial < 20 || trial >= 40 ? 7 : 700);
        src_rank.insert(src_rank.end(), run, r);
      }
      counts.push_back(static_cast<int64_t>(src_rank.size() - before));
    }
    SCOPED_TRACE("trial " + std::to_string(trial) + ": " +
                 std::to_string(ranks) + " ranks, " + std::to_string(experts) +
                 " experts, " + std::to_string(src_rank.size()) + " rows");
    MoeLayout layout;
    layout.src_rank = at::tensor(src_rank, at::kLong);
    layout.expert_counts = at::tensor(counts, at::kLong);
    const at::Tensor from_rank =
        at::bincount(layout.src_rank, {}, ranks).to(gpu);
    layout.src_rank = layout.src_rank.to(gpu);
    layout.expert_counts = layout.expert_counts.to(gpu);
    const at::Tensor row_expert = moe::rowLocalExperts(layout);
    const auto rows = static_cast<int64_t>(src_rank.size());
    at::Tensor runs = at::empty({2, experts, ranks}, layout.src_rank.options());
    at::Tensor order = at::full({rows}, -1, layout.src_rank.options());
    moe::collective::SourceOrderArgs args;
    args.src_rank = layout.src_rank.const_data_ptr<int64_t>();
    args.expert_counts = layout.expert_counts.const_data_ptr<int64_t>();
    args.from_rank = from_rank.const_data_ptr<int64_t>();
    args.row_expert = row_expert.const_data_ptr<int64_t>();
    args.rows = rows;
    args.local_experts = experts;
    args.world_size = ranks;
    args.runs = runs.mutable_data_ptr<int64_t>();
    args.order = order.mutable_data_ptr<int64_t>();
    ASSERT_EQ(moe::collective::launchSourceOrder(args, cuda::currentStream(0)),
              cudaSuccess);
    const at::Tensor expected =
        std::get<1>(at::sort(layout.src_rank.cpu(), /*stable=*/true, 0, false));
    EXPECT_TRUE(at::equal(order.cpu(), expected));
  }
}

// What the cuda backend cannot do is refused with a message naming it,
// before anything is sent; the collective backend accepts it.
TEST_F(MoeErrors, CudaBackendRefusesFp64RowsAndCpuTensorsByName) {
  if (!cuda::isAvailable()) {
    GTEST_SKIP() << "the cuda backend needs a GPU";
  }
  const at::Device gpu(at::kCUDA, 0);
  int site = 0;
  MoeDispatchArgs fp64 = validArgs(gpu, 17);
  fp64.x = fp64.x.to(at::kDouble);
  EXPECT_EQ(dispatchMessage(MoeBackend::Collective, fp64, &site), "");
  EXPECT_NE(dispatchMessage(MoeBackend::Cuda, fp64, &site)
                .find("rows of Double are not supported by backend=cuda"),
            std::string::npos);
  MoeDispatchArgs cpu = validArgs(at::kCPU, 17);
  EXPECT_NE(dispatchMessage(MoeBackend::Cuda, cpu, &site)
                .find("x is on the CPU, but backend=cuda needs it on that "
                      "rank's own GPU"),
            std::string::npos);
}

// A damaged count row (the cuda backend's kStatusBadCountRow) is described
// by what it held: the token count, an expert's rows, or (staged push) the
// tokens for a rank, out of [0, T_max] or at odds with the expert counts.
TEST(MoeStatusText, BadCountRowNamesTheNumberAndWhyItIsBad) {
  moe::StatusContext context;
  context.op = "MoeDispatch";
  context.rank = 2;
  context.world_size = 4;
  auto text = [&](int64_t what, int64_t value, int64_t bound) {
    const int64_t words[] = {moe::kStatusBadCountRow, what, value, bound, 0};
    return moe::describeStatus(context, words);
  };
  const std::string tokens = text(-1, 900, 128);
  EXPECT_NE(tokens.find("rank 2 of 4 wrote its token count = 900 into its "
                        "count row, outside [0, 128] (T_max)"),
            std::string::npos)
      << tokens;
  const std::string expert = text(5, -3, 128);
  EXPECT_NE(expert.find("the rows of expert 5 = -3"), std::string::npos)
      << expert;
  const std::string range = text(-2 - 3, 4000, 128);
  EXPECT_NE(range.find("its count of tokens for rank 3 = 4000 into its count "
                       "row, outside [0, 128]"),
            std::string::npos)
      << range;
  const std::string odd = text(-2 - 1, 7, -1);
  EXPECT_NE(odd.find("its count of tokens for rank 1 = 7 into its count row, "
                     "which disagrees with its counts of that rank's experts"),
            std::string::npos)
      << odd;
}

}  // namespace
}  // namespace hostfuse
