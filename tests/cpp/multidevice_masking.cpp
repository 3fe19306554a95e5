// Rank masking (csrc/hostfuse/multidevice/moe/masking.h; docs/moe.md, "Rank
// masking") without killing a rank: the runtime of a process group that
// leaves rank 0 out, decorated as if rank 0 had died, must give what the
// reference of the whole world gives when rank 0 holds no tokens and every
// pick of its experts is -1. The fault test (test_fault_tolerance.cpp,
// RankFailure.SurvivorsMask*) does the same after a real death and
// recover(). Part of test_multidevice (multidevice_np<N>).
#include <gtest/gtest.h>

#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/masking.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include "moe_reference.h"
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::communicator;
using test::myRank;
using test::Routing;
using test::worldSize;

constexpr int64_t kHidden = 16;
constexpr int64_t kPicks = 2;
constexpr int64_t kLocal = 3;  // experts per rank of the first world
constexpr double kScale = 3.0;

struct MaskCase {
  c10::DeviceType device_type;
  MoeBackend backend;
};

std::string maskCaseName(const testing::TestParamInfo<MaskCase>& info) {
  return std::string(info.param.device_type == c10::DeviceType::CUDA ? "cuda"
                                                                     : "cpu") +
         "_" + toString(info.param.backend);
}

bool unavailable(const MaskCase& c) {
  return c.device_type == c10::DeviceType::CUDA && test::lacksGpuPerRank();
}

at::Device deviceOf(const MaskCase& c) {
  return c.device_type == c10::DeviceType::CUDA ? communicator().device()
                                                : at::Device(at::kCPU);
}

// Call `call`'s inputs of world rank `rank`, made from (call, rank) alone so
// that every rank can make every rank's; a rank in `dead` has no tokens. The
// first call has the most tokens (the cuda backend sizes its workspace by
// it).
struct Inputs {
  at::Tensor x, idx, w;
};

Inputs inputsOf(uint64_t call, int64_t rank, bool dead) {
  static const Routing kRoutings[] = {Routing::Uniform, Routing::Masked,
                                      Routing::Skewed};
  const int64_t experts = kLocal * worldSize();
  const int64_t tokens =
      dead ? 0 : (call == 0 ? 7 : static_cast<int64_t>(call + rank) % 7 + 1);
  Inputs in;
  in.x = test::randomTensor({tokens, kHidden}, at::kFloat, at::kCPU,
                            call * 13 + rank);
  in.idx = test::makeRouting(kRoutings[call % 3], tokens, kPicks, experts,
                             worldSize(), rank, call);
  in.w = test::randomWeights(tokens, kPicks, at::kFloat, at::kCPU,
                             call * 7 + rank);
  return in;
}

// What one dispatch and combine returned, on the CPU; the cuda backend's
// [rows] outputs cut to their valid rows.
struct Outputs {
  MoeDispatchOutput dispatch;
  at::Tensor combined;
};

Outputs runOnce(MoeRuntime& runtime, const void* site, const Inputs& in,
                const at::Device& device) {
  MoeDispatchArgs args;
  args.site = site;
  args.x = in.x.to(device);
  args.topk_idx = in.idx.to(device);
  args.topk_weights = in.w.to(device);
  args.num_experts = kLocal * worldSize();
  Outputs out;
  out.dispatch = runtime.dispatch(args);
  MoeCombineArgs combine;
  combine.dispatch_site = site;
  combine.expert_out = out.dispatch.recv_x * kScale;
  combine.layout = out.dispatch.layout;
  combine.topk_weights = args.topk_weights;
  combine.num_tokens = in.x.size(0);
  combine.num_experts = args.num_experts;
  out.combined = runtime.combine(combine).cpu();
  MoeLayout& layout = out.dispatch.layout;
  const int64_t rows = layout.expert_counts.sum().item<int64_t>();
  const auto valid = [rows](const at::Tensor& t) {
    return t.cpu().narrow(0, 0, rows);
  };
  out.dispatch.recv_x = valid(out.dispatch.recv_x);
  out.dispatch.recv_weights = valid(out.dispatch.recv_weights);
  layout.src_rank = valid(layout.src_rank);
  layout.src_token = valid(layout.src_token);
  layout.src_k = valid(layout.src_k);
  layout.expert_counts = layout.expert_counts.cpu();
  layout.n_tokens_to_rank = layout.n_tokens_to_rank.cpu();
  layout.n_tokens_from_rank = layout.n_tokens_from_rank.cpu();
  return out;
}

void expectSame(const Outputs& actual, const Outputs& expected,
                const std::string& what) {
  const MoeLayout& a = actual.dispatch.layout;
  const MoeLayout& e = expected.dispatch.layout;
  EXPECT_TRUE(at::equal(actual.dispatch.recv_x, expected.dispatch.recv_x))
      << what << ": recv_x";
  EXPECT_TRUE(
      at::equal(actual.dispatch.recv_weights, expected.dispatch.recv_weights))
      << what << ": recv_weights";
  EXPECT_TRUE(at::equal(a.src_rank, e.src_rank))
      << what << ": recv_src_rank " << a.src_rank << " vs " << e.src_rank;
  EXPECT_TRUE(at::equal(a.src_token, e.src_token)) << what << ": src_token";
  if (e.id.defined()) {
    // Word 0 numbers the call, which two runtimes count apart; the
    // fingerprints of the rows sent must agree.
    const int64_t words = e.id.numel();
    EXPECT_TRUE(at::equal(a.id.narrow(0, 1, words - 1).cpu(),
                          e.id.narrow(0, 1, words - 1).cpu()))
        << what << ": recv_layout_id " << a.id << " vs " << e.id;
  }
  EXPECT_TRUE(at::equal(a.src_k, e.src_k)) << what << ": src_k";
  EXPECT_TRUE(at::equal(a.expert_counts, e.expert_counts))
      << what << ": recv_expert_counts";
  EXPECT_TRUE(at::equal(a.n_tokens_to_rank, e.n_tokens_to_rank))
      << what << ": n_tokens_to_rank " << a.n_tokens_to_rank << " vs "
      << e.n_tokens_to_rank;
  EXPECT_TRUE(at::equal(a.n_tokens_from_rank, e.n_tokens_from_rank))
      << what << ": n_tokens_from_rank " << a.n_tokens_from_rank << " vs "
      << e.n_tokens_from_rank;
  EXPECT_TRUE(at::equal(actual.combined, expected.combined))
      << what << ": combined";
}

class RankMasking : public testing::TestWithParam<MaskCase> {};

// Without a lost rank, masking on changes nothing and costs nothing: the
// runtime is the backend's own, not a decorator.
TEST_P(RankMasking, WithNoRankLostTheRuntimeIsTheBackendsOwn) {
  const MaskCase c = GetParam();
  if (unavailable(c)) {
    GTEST_SKIP() << "needs one GPU per rank on this host";
  }
  const std::unique_ptr<MoeRuntime> runtime =
      createMoeRuntime(c.backend, communicator(), /*mask_failed_ranks=*/true);
  EXPECT_EQ(dynamic_cast<MaskingMoeRuntime*>(runtime.get()), nullptr);
  EXPECT_TRUE(failedRanks(communicator()).empty());
  EXPECT_EQ(communicator().originalSize(), worldSize());
}

// A decorator that masks no rank is the identity, bit for bit.
TEST_P(RankMasking, AMaskOfNoRankGivesTheBackendsBits) {
  const MaskCase c = GetParam();
  if (unavailable(c)) {
    GTEST_SKIP() << "needs one GPU per rank on this host";
  }
  const at::Device device = deviceOf(c);
  std::vector<int64_t> everyone(worldSize());
  std::iota(everyone.begin(), everyone.end(), 0);
  MaskingMoeRuntime masking(
      moeBackendInfo(c.backend).create_runtime(communicator()), everyone,
      worldSize());
  EXPECT_TRUE(masking.maskedRanks().empty());
  const std::unique_ptr<MoeRuntime> plain =
      moeBackendInfo(c.backend).create_runtime(communicator());
  const int plain_site = 0;
  const int masking_site = 0;
  for (uint64_t call = 0; call < 3; ++call) {
    const Inputs in = inputsOf(call, myRank(), false);
    const Outputs want = runOnce(*plain, &plain_site, in, device);
    const Outputs got = runOnce(masking, &masking_site, in, device);
    expectSame(got, want, "call " + std::to_string(call));
  }
}

// Rank 0 stands for a dead rank: ranks 1 .. R-1 run over a group of their
// own, decorated with the first world's placement. Each survivor's rank in
// the group is one less than its world rank, so a missed renumbering shows.
TEST_P(RankMasking, AMaskedRankGetsNoRowsAndItsExpertsAddNothing) {
  const MaskCase c = GetParam();
  if (unavailable(c)) {
    GTEST_SKIP() << "needs one GPU per rank on this host";
  }
  if (worldSize() < 2) {
    GTEST_SKIP() << "needs 2 ranks or more";
  }
  constexpr int64_t kMasked = 0;
  if (myRank() == kMasked) {
    return;  // dead: it takes part in nothing
  }
  std::vector<int64_t> survivors;
  for (int64_t r = 0; r < worldSize(); ++r) {
    if (r != kMasked) {
      survivors.push_back(r);
    }
  }
  Communicator group(communicator().newGroup(survivors));
  MaskingMoeRuntime masking(moeBackendInfo(c.backend).create_runtime(group),
                            survivors, worldSize());
  EXPECT_EQ(masking.maskedRanks(), std::vector<int64_t>{kMasked});
  const at::Device device = deviceOf(c);
  const int site = 0;
  for (uint64_t call = 0; call < 4; ++call) {
    std::vector<at::Tensor> xs, idxs, ws;
    for (int64_t r = 0; r < worldSize(); ++r) {
      const Inputs in = inputsOf(call, r, r == kMasked);
      xs.push_back(in.x);
      idxs.push_back(
          in.idx.masked_fill(in.idx.div(kLocal, "floor").eq(kMasked), -1));
      ws.push_back(in.w);
    }
    const Inputs mine = inputsOf(call, myRank(), false);
    const Outputs got = runOnce(masking, &site, mine, device);
    const test::ExpectedDispatch e =
        test::referenceDispatch(xs, idxs, ws, kLocal * worldSize(), myRank());
    Outputs want;
    want.dispatch.recv_x = e.recv_x;
    want.dispatch.recv_weights = e.recv_weights;
    // The reference has no layout id (expectSame skips it then).
    MoeLayout& layout = want.dispatch.layout;
    layout.src_rank = e.src_rank;
    layout.src_token = e.src_token;
    layout.src_k = e.src_k;
    layout.expert_counts = e.expert_counts;
    layout.n_tokens_to_rank = e.n_tokens_to_rank;
    layout.n_tokens_from_rank = e.n_tokens_from_rank;
    want.combined = test::referenceCombineInPickOrder(
        xs[myRank()], idxs[myRank()], ws[myRank()],
        [](int64_t, const at::Tensor& rows) { return rows * kScale; });
    expectSame(got, want, "call " + std::to_string(call));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Backends, RankMasking,
    testing::Values(MaskCase{c10::DeviceType::CPU, MoeBackend::Collective},
                    MaskCase{c10::DeviceType::CUDA, MoeBackend::Collective},
                    MaskCase{c10::DeviceType::CUDA, MoeBackend::Cuda}),
    maskCaseName);

}  // namespace
}  // namespace hostfuse
