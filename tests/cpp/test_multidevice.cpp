// Multi-rank tests of MoE dispatch/combine over the collective backend. Run
// as N processes by tools/launch.sh (ctest: multidevice_np<N>); every rank
// runs every test and checks its own part against an independent reference
// built from all-gathered inputs (moe_reference.h).
//
// Every rank must make the same collective calls in the same order, so
// tests check results only after their last collective, with EXPECT_*.
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <sstream>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/cuda_utils.h>
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

// The device of a test parameter on this rank: its own GPU for CUDA.
at::Device rankDevice(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? communicator().device()
                                       : at::Device(at::kCPU);
}

bool unavailable(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA && test::lacksGpuPerRank();
}

#define SKIP_IF_UNAVAILABLE(type)                            \
  do {                                                       \
    if (unavailable(type)) {                                 \
      GTEST_SKIP() << "needs one GPU per rank on this host"; \
    }                                                        \
  } while (false)

std::string deviceTypeName(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? "cuda" : "cpu";
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

void expectEqual(const at::Tensor& actual, const at::Tensor& expected,
                 const char* what) {
  SCOPED_TRACE(what);
  test::expectClose(actual.cpu(), expected.cpu());
}

// ---------------------------------------------------------------------------
// The grid: K x E x routing x dtype x weights x device.

struct GridCase {
  int64_t picks;
  int64_t experts_per_rank;
  Routing routing;
  at::ScalarType dtype;
  bool weighted;
  c10::DeviceType device;
};

std::string gridName(const testing::TestParamInfo<GridCase>& info) {
  const GridCase& c = info.param;
  std::ostringstream ss;
  ss << "K" << c.picks << "_E" << c.experts_per_rank << "R_"
     << test::toString(c.routing) << "_"
     << (c.dtype == at::kBFloat16 ? "bf16" : "fp32") << "_"
     << (c.weighted ? "weighted" : "unweighted") << "_"
     << deviceTypeName(c.device);
  return ss.str();
}

std::vector<GridCase> gridCases() {
  std::vector<GridCase> cases;
  for (c10::DeviceType device : {c10::DeviceType::CPU, c10::DeviceType::CUDA}) {
    for (int64_t picks : {1, 2, 4, 8}) {
      for (int64_t per_rank : {1, 2, 8}) {
        for (Routing routing :
             {Routing::Uniform, Routing::Skewed, Routing::IdleRank,
              Routing::EmptyRank, Routing::Masked, Routing::VaryingTokens}) {
          for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
            for (bool weighted : {true, false}) {
              cases.push_back(
                  {picks, per_rank, routing, dtype, weighted, device});
            }
          }
        }
      }
    }
  }
  return cases;
}

// This rank's inputs of a grid case, from a seed of the case's name
// (`salt` gives another draw).
struct GridInputs {
  int64_t experts = 0;
  int64_t tokens = 0;
  at::Tensor x, idx, weights;  // weights undefined when unweighted
};

GridInputs gridInputs(const GridCase& c, uint64_t salt = 0) {
  const at::Device device = rankDevice(c.device);
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  GridInputs in;
  in.experts = c.experts_per_rank * ranks;
  in.tokens = test::tokensFor(c.routing, me);
  const uint64_t seed = std::hash<std::string>{}(
                            gridName(testing::TestParamInfo<GridCase>(c, 0))) %
                            100000 +
                        salt;
  in.x = test::randomTensor({in.tokens, kHidden}, c.dtype, device,
                            seed * 131 + me);
  in.idx = test::makeRouting(c.routing, in.tokens, c.picks, in.experts, ranks,
                             me, seed)
               .to(device);
  if (c.weighted) {
    in.weights =
        test::randomWeights(in.tokens, c.picks, c.dtype, device, seed + me);
  }
  return in;
}

class DispatchCombineGrid : public testing::TestWithParam<GridCase> {};

TEST_P(DispatchCombineGrid, MatchesReference) {
  const GridCase& c = GetParam();
  SKIP_IF_UNAVAILABLE(c.device);
  if (c.routing == Routing::IdleRank && worldSize() == 1) {
    GTEST_SKIP() << "one rank cannot leave a rank idle";
  }
  const at::Device device = rankDevice(c.device);
  const int64_t me = myRank();
  const GridInputs in = gridInputs(c);
  const int64_t experts = in.experts;
  const int64_t tokens = in.tokens;
  const at::Tensor& x = in.x;
  const at::Tensor& idx = in.idx;
  const at::Tensor& weights = in.weights;

  // The collectives, the same on every rank.
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, optional(weights), experts, communicator());
  const at::Tensor expert_out =
      test::applyExperts(out.recv_x, out.layout.expert_counts,
                         me * c.experts_per_rank, test::scaleByExpert);
  const at::Tensor combined =
      combineCollective(expert_out, out.layout, optional(weights), tokens,
                        experts, communicator());
  const std::vector<at::Tensor> xs = test::allGatherRows(x);
  const std::vector<at::Tensor> idxs = test::allGatherRows(idx);
  const std::vector<at::Tensor> ws =
      c.weighted ? test::allGatherRows(weights) : std::vector<at::Tensor>{};

  // Dispatch moves data: bit-exact.
  const test::ExpectedDispatch expected =
      test::referenceDispatch(xs, idxs, ws, experts, me);
  expectEqual(out.recv_x, expected.recv_x, "recv_x");
  expectEqual(out.layout.src_rank, expected.src_rank, "recv_src_rank");
  expectEqual(out.layout.src_token, expected.src_token, "recv_src_token");
  expectEqual(out.layout.src_k, expected.src_k, "recv_src_k");
  expectEqual(out.layout.expert_counts, expected.expert_counts,
              "recv_expert_counts");
  expectEqual(out.layout.n_tokens_to_rank, expected.n_tokens_to_rank,
              "n_tokens_to_rank");
  expectEqual(out.layout.n_tokens_from_rank, expected.n_tokens_from_rank,
              "n_tokens_from_rank");
  EXPECT_EQ(out.recv_weights.defined(), c.weighted);
  if (c.weighted) {
    expectEqual(out.recv_weights, expected.recv_weights, "recv_weights");
  }
  EXPECT_EQ(out.recv_x.device(), device);

  // Combine sums in fp32 (the reference in fp64): one rounding to the
  // output dtype apart, plus fp32 summation error for fp32.
  SCOPED_TRACE("combined");
  const double tolerance = c.dtype == at::kBFloat16 ? 1e-2 : 1e-5;
  test::expectClose(
      combined.cpu(),
      test::referenceCombine(x, idx, weights, test::scaleByExpert), tolerance,
      tolerance);
  // ... and it sums in pick order, one rounding per operation, so it
  // equals that sum bit for bit (what the cuda backend computes too).
  expectEqual(
      combined,
      test::referenceCombineInPickOrder(x, idx, weights, test::scaleByExpert),
      "combined, summed in pick order");
}

INSTANTIATE_TEST_SUITE_P(Grid, DispatchCombineGrid,
                         testing::ValuesIn(gridCases()), gridName);

// ---------------------------------------------------------------------------
// reduce=per_rank: the partial sums per (token, rank), in the order
// docs/moe.md states, on a smaller grid (the dispatch is the same).

std::vector<GridCase> perRankCases() {
  std::vector<GridCase> cases;
  for (const GridCase& c : gridCases()) {
    if ((c.picks == 2 || c.picks == 8) &&
        (c.experts_per_rank == 1 || c.experts_per_rank == 8)) {
      cases.push_back(c);
    }
  }
  return cases;
}

class PerRankCombineGrid : public testing::TestWithParam<GridCase> {};

TEST_P(PerRankCombineGrid, MatchesTheReferenceOrder) {
  const GridCase& c = GetParam();
  SKIP_IF_UNAVAILABLE(c.device);
  if (c.routing == Routing::IdleRank && worldSize() == 1) {
    GTEST_SKIP() << "one rank cannot leave a rank idle";
  }
  const at::Device device = rankDevice(c.device);
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const GridInputs in = gridInputs(c, /*salt=*/7);
  const int64_t experts = in.experts;
  const int64_t tokens = in.tokens;
  const at::Tensor& x = in.x;
  const at::Tensor& idx = in.idx;
  const at::Tensor& weights = in.weights;
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, optional(weights), experts, communicator());
  MoeCombineArgs args;
  args.expert_out =
      test::applyExperts(out.recv_x, out.layout.expert_counts,
                         me * c.experts_per_rank, test::scaleByExpert);
  args.layout = out.layout;
  args.reduce = MoeCombineReduce::PerRank;
  args.recv_weights = optional(out.recv_weights);
  args.num_tokens = tokens;
  args.num_experts = experts;
  const at::Tensor combined = combineCollective(args, communicator());
  EXPECT_EQ(combined.device(), device);
  expectEqual(combined,
              test::referenceCombinePerRank(
                  x, idx, weights, test::scaleByExpert, experts, ranks),
              "combined per rank");
}

INSTANTIATE_TEST_SUITE_P(Grid, PerRankCombineGrid,
                         testing::ValuesIn(perRankCases()), gridName);

// ---------------------------------------------------------------------------
// fp8 dispatch: every received row is its source row quantized as the
// independent reference quantizer does, bit for bit (values and scales),
// and the layout is the one of the unquantized dispatch.

class Fp8Dispatch : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(Fp8Dispatch, RowsEqualAReferenceQuantizerBitForBit) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const int64_t experts = 4 * ranks;
  const int64_t tokens = 12 + 3 * me;
  const int64_t hidden = 384;
  // Rows of very different magnitudes, an all-zero block and a tiny block
  // (below the smallest amax).
  at::Tensor x =
      test::randomTensor({tokens, hidden}, at::kFloat, at::kCPU, 700 + me);
  x.select(0, 0).mul_(1e4);
  x.select(0, 1).narrow(0, 0, 128).zero_();
  x.select(0, 2).narrow(0, 128, 128).mul_(1e-7);
  x = x.to(at::kBFloat16).to(device);
  const at::Tensor idx =
      test::makeRouting(Routing::Masked, tokens, 4, experts, ranks, me, 701)
          .to(device);
  const MoeDispatchOutput plain =
      dispatchCollective(x, idx, std::nullopt, experts, communicator());
  const MoeDispatchOutput fp8 = dispatchCollective(
      x, idx, std::nullopt, experts, communicator(), MoeDispatchQuant::Fp8E4M3);
  EXPECT_EQ(fp8.recv_x.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(fp8.recv_x.device(), device);
  ASSERT_TRUE(fp8.recv_scales.defined());
  EXPECT_EQ(fp8.recv_scales.sizes(),
            (std::vector<int64_t>{plain.recv_x.size(0), hidden / 128}));
  expectEqual(fp8.layout.src_token, plain.layout.src_token, "src_token");
  expectEqual(fp8.layout.expert_counts, plain.layout.expert_counts,
              "expert_counts");
  const test::Fp8Rows expected = test::referenceQuantizeFp8(plain.recv_x);
  expectEqual(fp8.recv_x.view(at::kByte), expected.bytes, "fp8 rows");
  expectEqual(fp8.recv_scales, expected.scales, "scales");
  // Dequantized, within e4m3's half step (2^-4 relative) of the bf16 row.
  const at::Tensor dequantized =
      (fp8.recv_x.to(at::kFloat).cpu().view({-1, hidden / 128, 128}) *
       fp8.recv_scales.cpu().unsqueeze(2))
          .view({-1, hidden});
  const at::Tensor error =
      (dequantized - plain.recv_x.to(at::kFloat).cpu()).abs();
  const at::Tensor bound =
      plain.recv_x.to(at::kFloat).cpu().abs() * std::ldexp(1.0, -4) +
      fp8.recv_scales.cpu().repeat_interleave(128, 1) * std::ldexp(1.0, -9);
  EXPECT_TRUE(at::all(error <= bound).item<bool>())
      << "largest error " << error.max().item<float>();
}

// Values exactly halfway between two e4m3 codes round to the even code:
// with amax 448 a block's scale is 1, and 1.0625, 17, -272 and 2^-10 must
// become 1, 16, -256 and 0 (round half away from zero would give 1.125, 18,
// -288 and 2^-9). Every rank sends its one token to its own expert.
TEST_P(Fp8Dispatch, ValuesHalfwayBetweenCodesRoundToTheEvenCode) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t me = myRank();
  at::Tensor x = at::zeros({1, 128}, at::kFloat);
  x.narrow(1, 0, 5).copy_(
      at::tensor({448.0f, 1.0625f, 17.0f, -272.0f, std::ldexp(1.0f, -10)})
          .unsqueeze(0));
  const at::Tensor idx = at::full({1, 1}, me, at::kLong).to(device);
  const MoeDispatchOutput out = dispatchCollective(
      x.to(at::kBFloat16).to(device), idx, std::nullopt, worldSize(),
      communicator(), MoeDispatchQuant::Fp8E4M3);
  ASSERT_EQ(out.recv_x.size(0), 1);
  expectEqual(out.recv_scales, at::ones({1, 1}), "scale");
  expectEqual(out.recv_x.narrow(1, 0, 5).to(at::kFloat),
              at::tensor({448.0f, 1.0f, 16.0f, -256.0f, 0.0f}).unsqueeze(0),
              "values halfway between codes");
  expectEqual(out.recv_x.view(at::kByte), test::referenceQuantizeFp8(x).bytes,
              "the reference's codes");
}

// A rank that dispatches with quantize=fp8_e4m3 while the others do not:
// every rank raises the same error before any row moves, and the next
// call pairs up.
TEST_P(Fp8Dispatch, RanksThatQuantizeDifferentlyAllRaise) {
  SKIP_IF_UNAVAILABLE(GetParam());
  if (worldSize() < 2) {
    GTEST_SKIP() << "needs two ranks";
  }
  const at::Device device = rankDevice(GetParam());
  const int64_t experts = 2 * worldSize();
  const at::Tensor x = test::randomTensor({4, 128}, at::kBFloat16, device, 5);
  const at::Tensor idx = test::makeRouting(Routing::Uniform, 4, 2, experts,
                                           worldSize(), myRank(), 6)
                             .to(device);
  test::expectErrorContains(
      [&] {
        dispatchCollective(
            x, idx, std::nullopt, experts, communicator(),
            myRank() == 1 ? MoeDispatchQuant::Fp8E4M3 : MoeDispatchQuant::None);
      },
      {"MoeDispatch: rank 0 dispatches with quantize=none but rank 1 with "
       "quantize=fp8_e4m3; every rank must send its rows the same way"});
  const MoeDispatchOutput out = dispatchCollective(
      x, idx, std::nullopt, experts, communicator(), MoeDispatchQuant::Fp8E4M3);
  EXPECT_EQ(out.recv_x.scalar_type(), at::kFloat8_e4m3fn);
}

// Refused on every rank alike: H not a multiple of 128, fp64 x.
TEST_P(Fp8Dispatch, HiddenSizeAndDtypeAreChecked) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t experts = 2 * worldSize();
  const at::Tensor idx = test::makeRouting(Routing::Uniform, 4, 2, experts,
                                           worldSize(), myRank(), 9)
                             .to(device);
  const at::Tensor x = test::randomTensor({4, 96}, at::kBFloat16, device, 3);
  test::expectErrorContains(
      [&] {
        dispatchCollective(x, idx, std::nullopt, experts, communicator(),
                           MoeDispatchQuant::Fp8E4M3);
      },
      {"quantize=fp8_e4m3 needs x of Float, BFloat16 or Half with H a "
       "multiple of 128",
       "got H = 96 and BFloat16"});
  const at::Tensor wide = test::randomTensor({4, 128}, at::kDouble, device, 3);
  test::expectErrorContains(
      [&] {
        dispatchCollective(wide, idx, std::nullopt, experts, communicator(),
                           MoeDispatchQuant::Fp8E4M3);
      },
      {"got H = 128 and Double"});
}

INSTANTIATE_TEST_SUITE_P(Devices, Fp8Dispatch,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// A rank that combines per_pick while the others combine per_rank: every
// rank raises the same error before any row moves, and the next call pairs
// up.
TEST(CombineModes, RanksInDifferentModesAllRaiseTheSameError) {
  if (worldSize() < 2) {
    GTEST_SKIP() << "needs two ranks";
  }
  const int64_t me = myRank();
  const int64_t experts = 2 * worldSize();
  const at::Tensor x =
      test::randomTensor({6, kHidden}, at::kFloat, at::kCPU, 3);
  const at::Tensor idx =
      test::makeRouting(Routing::Uniform, 6, 2, experts, worldSize(), me, 5);
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, std::nullopt, experts, communicator());
  MoeCombineArgs args;
  args.expert_out = out.recv_x;
  args.layout = out.layout;
  args.num_tokens = 6;
  args.num_experts = experts;
  args.reduce = me == 1 ? MoeCombineReduce::PerRank : MoeCombineReduce::PerPick;
  test::expectErrorContains(
      [&] { combineCollective(args, communicator()); },
      {"MoeCombine: rank 0 combines with reduce=per_pick but rank 1 with "
       "reduce=per_rank; every rank must use the same mode"});
  args.reduce = MoeCombineReduce::PerRank;
  const at::Tensor back = combineCollective(args, communicator());
  // K = 2 distinct experts, identity experts, no weights: 2 x.
  test::expectClose(back, x * 2);
}

// per_rank reads expert_out through its strides: a column slice of a wider
// fp32 tensor combines like its contiguous copy. Weights of the other mode
// are refused on every rank alike.
class PerRankInputs : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(PerRankInputs, AViewOfExpertOutAndWeightsOfTheOtherMode) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t experts = 2 * worldSize();
  const at::Tensor x = test::randomTensor({7, kHidden}, at::kFloat, device, 8);
  const at::Tensor idx = test::makeRouting(Routing::Uniform, 7, 2, experts,
                                           worldSize(), myRank(), 9)
                             .to(device);
  const at::Tensor w = test::randomWeights(7, 2, at::kFloat, device, 10);
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, w, experts, communicator());
  const at::Tensor wide = at::cat({out.recv_x, out.recv_x * 3}, 1);
  MoeCombineArgs args;
  args.layout = out.layout;
  args.reduce = MoeCombineReduce::PerRank;
  args.recv_weights = out.recv_weights;
  args.num_tokens = 7;
  args.num_experts = experts;
  args.expert_out = wide.narrow(1, kHidden, kHidden);
  ASSERT_FALSE(args.expert_out.is_contiguous());
  const at::Tensor from_view = combineCollective(args, communicator());
  args.expert_out = args.expert_out.contiguous();
  expectEqual(from_view, combineCollective(args, communicator()),
              "a view of expert_out");
  args.topk_weights = w;
  test::expectErrorContains(
      [&] { combineCollective(args, communicator()); },
      {"MoeCombine: bad input on rank",
       "with reduce=per_rank the weights are recv_weights"});
}

INSTANTIATE_TEST_SUITE_P(Devices, PerRankInputs,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// Both modes against a sum in fp64, on bf16 rows: per_pick rounds once,
// per_rank once per rank and once more, so its error may be larger, but
// both stay within a few bf16 rounding steps of the exact sum. Prints the
// errors it measured.
TEST(CombineModes, ErrorAgainstAnFp64Reference) {
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const int64_t experts = 4 * ranks;
  const int64_t picks = std::min<int64_t>(8, experts);
  const int64_t tokens = 64;
  const uint64_t seed = 4242;
  const at::Tensor x = test::randomTensor({tokens, 256}, at::kBFloat16,
                                          at::kCPU, seed * 131 + me);
  const at::Tensor idx = test::makeRouting(Routing::Uniform, tokens, picks,
                                           experts, ranks, me, seed);
  const at::Tensor weights =
      test::randomWeights(tokens, picks, at::kFloat, at::kCPU, seed + me);
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, weights, experts, communicator());
  MoeCombineArgs args;
  args.expert_out =
      test::applyExperts(out.recv_x, out.layout.expert_counts,
                         me * (experts / ranks), test::scaleByExpert);
  args.layout = out.layout;
  args.num_tokens = tokens;
  args.num_experts = experts;
  args.topk_weights = weights;
  const at::Tensor per_pick = combineCollective(args, communicator());
  args.topk_weights = std::nullopt;
  args.reduce = MoeCombineReduce::PerRank;
  args.recv_weights = out.recv_weights;
  const at::Tensor per_rank = combineCollective(args, communicator());

  // The exact sum, in fp64, of the same bf16 expert outputs.
  const at::Tensor exact = test::referenceCombine(
      x.to(at::kDouble), idx, weights.to(at::kDouble),
      [](int64_t expert, const at::Tensor& rows) {
        return test::scaleByExpert(expert, rows.to(at::kBFloat16))
            .to(at::kDouble);
      });
  // Errors in units of 2^-7 (bf16's relative spacing) times the token's
  // sum of |w * out|: a rounding of any partial sum costs at most half of
  // that, whatever cancels.
  const at::Tensor magnitude = test::referenceCombine(
      x.to(at::kDouble).abs(), idx, weights.to(at::kDouble),
      [](int64_t expert, const at::Tensor& rows) {
        return test::scaleByExpert(expert, rows.to(at::kBFloat16))
            .to(at::kDouble);
      });
  const at::Tensor ulp =
      magnitude.abs().amax(1, true).clamp_min(1e-30) * std::ldexp(1.0, -7);
  const double pick_err =
      ((per_pick.to(at::kDouble) - exact).abs() / ulp).max().item<double>();
  const double rank_err =
      ((per_rank.to(at::kDouble) - exact).abs() / ulp).max().item<double>();
  std::cout << "[rank " << me << " of " << ranks
            << "] max error vs fp64, in bf16 ulps: per_pick " << pick_err
            << ", per_rank " << rank_err << "\n";
  // per_pick: one rounding of an fp32 sum (half a unit, plus fp32 error);
  // per_rank: the partials' roundings (half a unit together at most), then
  // the last one.
  EXPECT_LE(pick_err, 0.51);
  EXPECT_LE(rank_err, 1.01);
  if (ranks == 1) {
    // One rank: the partial is the whole sum, and rounding it again changes
    // nothing.
    EXPECT_TRUE(at::equal(per_pick, per_rank));
  }
}

// ---------------------------------------------------------------------------
// K = 1 without weights and identity experts returns x exactly.

struct RoundTripCase {
  at::ScalarType dtype;
  c10::DeviceType device;
};

class RoundTrip : public testing::TestWithParam<RoundTripCase> {};

// Dispatch and combine x with K = 1, no weights, identity experts.
at::Tensor roundTrip(const at::Tensor& x, int64_t experts, uint64_t seed) {
  const at::Tensor idx = test::makeRouting(Routing::Uniform, x.size(0), 1,
                                           experts, worldSize(), myRank(), seed)
                             .to(x.device());
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, std::nullopt, experts, communicator());
  return combineCollective(out.recv_x, out.layout, std::nullopt, x.size(0),
                           experts, communicator());
}

TEST_P(RoundTrip, TopOneWithoutWeightsReturnsXExactly) {
  const RoundTripCase& c = GetParam();
  SKIP_IF_UNAVAILABLE(c.device);
  const at::Tensor x = test::randomTensor({9 + myRank(), 32}, c.dtype,
                                          rankDevice(c.device), 7 + myRank());
  const at::Tensor back = roundTrip(x, 2 * worldSize(), 11);
  test::expectClose(back.cpu(), x.cpu());
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypes, RoundTrip,
    testing::Values(RoundTripCase{at::kFloat, c10::DeviceType::CPU},
                    RoundTripCase{at::kBFloat16, c10::DeviceType::CPU},
                    RoundTripCase{at::kFloat, c10::DeviceType::CUDA},
                    RoundTripCase{at::kBFloat16, c10::DeviceType::CUDA}),
    [](const testing::TestParamInfo<RoundTripCase>& info) {
      return std::string(info.param.dtype == at::kBFloat16 ? "bf16" : "fp32") +
             "_" + deviceTypeName(info.param.device);
    });

// ---------------------------------------------------------------------------
// Combine adds the picks of a token in pick order, as the cuda kernel does,
// never in the order rows happen to come back.

class CombineOrder : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(CombineOrder, SumsPicksInPickOrder) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t ranks = worldSize();
  const int64_t experts = 3 * ranks;
  const int64_t tokens = 6;
  // Token t picks three experts of three different "thirds", rotated per
  // token, so the experts' order (the order rows come back in) differs
  // from the pick order for most tokens.
  at::Tensor idx = at::empty({tokens, 3}, at::kLong);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < 3; ++k) {
      idx[t][k] = ((t + k) % 3) * ranks + (t + myRank()) % ranks;
    }
  }
  // In fp32, (1e8 + 1) - 1e8 == 0 but (1e8 - 1e8) + 1 == 1.
  const at::Tensor weights =
      at::tensor({1e8f, 1.f, -1e8f}).repeat({tokens, 1}).to(device);
  const at::Tensor x = at::ones({tokens, kHidden}, at::kFloat).to(device);
  const MoeDispatchOutput out =
      dispatchCollective(x, idx.to(device), weights, experts, communicator());
  const at::Tensor combined = combineCollective(
      out.recv_x, out.layout, weights, tokens, experts, communicator());
  expectEqual(combined, at::zeros({tokens, kHidden}, at::kFloat),
              "(1e8 + 1) - 1e8 in pick order");
}

TEST_P(CombineOrder, MaskedPicksNeverReadTheirWeights) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t experts = 2 * worldSize();
  const int64_t tokens = 5;
  at::Tensor idx = test::makeRouting(Routing::Uniform, tokens, 2, experts,
                                     worldSize(), myRank(), 17);
  idx.select(1, 1).fill_(-1);
  at::Tensor weights = at::full({tokens, 2}, 0.5f, at::kFloat);
  weights.select(1, 1).fill_(std::numeric_limits<float>::quiet_NaN());
  weights[0][1] = std::numeric_limits<float>::infinity();
  const at::Tensor x =
      test::randomTensor({tokens, kHidden}, at::kFloat, device, 3 + myRank());
  const MoeDispatchOutput out = dispatchCollective(
      x, idx.to(device), weights.to(device), experts, communicator());
  const at::Tensor combined =
      combineCollective(out.recv_x, out.layout, weights.to(device), tokens,
                        experts, communicator());
  expectEqual(combined, x * 0.5, "0.5 x, untouched by masked NaN weights");
}

INSTANTIATE_TEST_SUITE_P(Devices, CombineOrder,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// ---------------------------------------------------------------------------
// The worked example of docs/moe.md ("Layout"), value for value.

TEST(DocsExample, TwoRanksFourExpertsTopTwo) {
  if (worldSize() != 2) {
    GTEST_SKIP() << "the example has two ranks";
  }
  const int64_t me = myRank();
  // x[t] = 100 * rank + t, so a row names its source.
  const at::Tensor x =
      (at::arange(me == 0 ? 3 : 2, at::kFloat) + 100 * me).unsqueeze(1);
  const at::Tensor idx =
      me == 0 ? at::tensor({1, 2, 3, -1, 0, 1}, at::kLong).reshape({3, 2})
              : at::tensor({2, 0, 1, 3}, at::kLong).reshape({2, 2});
  const MoeDispatchOutput out =
      dispatchCollective(x, idx, std::nullopt, 4, communicator());
  auto longs = [](std::vector<int64_t> v) { return at::tensor(v, at::kLong); };
  const MoeLayout& layout = out.layout;
  if (me == 0) {
    expectEqual(out.recv_x.squeeze(1),
                at::tensor({2.f, 100.f, 0.f, 2.f, 101.f}), "recv_x");
    expectEqual(layout.src_rank, longs({0, 1, 0, 0, 1}), "src_rank");
    expectEqual(layout.src_token, longs({2, 0, 0, 2, 1}), "src_token");
    expectEqual(layout.src_k, longs({0, 1, 0, 1, 0}), "src_k");
    expectEqual(layout.expert_counts, longs({2, 3}), "expert_counts");
    expectEqual(layout.n_tokens_to_rank, longs({3, 2}), "to_rank");
    expectEqual(layout.n_tokens_from_rank, longs({3, 2}), "from_rank");
  } else {
    expectEqual(out.recv_x.squeeze(1), at::tensor({0.f, 100.f, 1.f, 101.f}),
                "recv_x");
    expectEqual(layout.src_rank, longs({0, 1, 0, 1}), "src_rank");
    expectEqual(layout.src_token, longs({0, 0, 1, 1}), "src_token");
    expectEqual(layout.src_k, longs({1, 0, 0, 1}), "src_k");
    expectEqual(layout.expert_counts, longs({2, 2}), "expert_counts");
    expectEqual(layout.n_tokens_to_rank, longs({2, 2}), "to_rank");
    expectEqual(layout.n_tokens_from_rank, longs({2, 2}), "from_rank");
  }
}

// ---------------------------------------------------------------------------
// A host program: MoeDispatch, a grouped matmul per expert, MoeCombine.

// Inputs x [T, hidden] and expert_w [local, hidden, hidden] of `dtype`,
// topk_idx [T, picks] i64, topk_weights [T, picks] f32; MoeDispatch
// (collective, `quantize`), one matmul per local expert (GroupedMatmul, with
// the fp8 rows' scales when quantized), MoeCombine. Outputs: the combined
// rows, then recv_expert_counts.
std::unique_ptr<HostIrContainer> dispatchMatmulCombine(
    DataType dtype, int64_t hidden, int64_t local, int64_t picks,
    int64_t experts, MoeDispatchQuant quantize = MoeDispatchQuant::None) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* t = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({t, hidden}, dtype, "x");
  TensorView* idx = makeTensor({t, picks}, DataType::Int64, "topk_idx");
  TensorView* w = makeTensor({t, picks}, DataType::Float, "topk_weights");
  TensorView* expert_w = makeTensor({local, hidden, hidden}, dtype, "expert_w");
  for (TensorView* input : {x, idx, w, expert_w}) {
    program->addInput(input);
  }
  const MoeDispatchResult d =
      moeDispatch(x, idx, w, experts, MoeBackend::Collective, 0, quantize);
  TensorView* y =
      groupedMatmul(d.recv_x, expert_w, d.recv_expert_counts, d.recv_scales);
  program->addOutput(moeCombine(y, d, w, x->extent(0)));
  program->addOutput(d.recv_expert_counts);
  return program;
}

class MoeProgram : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(MoeProgram, DispatchGroupedMatmulCombineMatchesReference) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const int64_t local = 2;
  const int64_t experts = local * ranks;
  const int64_t picks = 2;
  const int64_t tokens = 5 + 2 * me;

  HostIrEvaluator evaluator(
      dispatchMatmulCombine(DataType::Float, kHidden, local, picks, experts));

  const at::Tensor x =
      test::randomTensor({tokens, kHidden}, at::kFloat, device, 40 + me);
  const at::Tensor idx =
      test::makeRouting(Routing::Masked, tokens, picks, experts, ranks, me, 3)
          .to(device);
  const at::Tensor w =
      test::randomWeights(tokens, picks, at::kFloat, device, 50 + me);
  const at::Tensor expert_w = test::randomTensor({local, kHidden, kHidden},
                                                 at::kFloat, device, 60 + me);
  const std::vector<at::Tensor> outputs = evaluator.run({x, idx, w, expert_w});
  // Every expert's weights, for the reference.
  const at::Tensor all_w = at::cat(test::allGatherRows(expert_w));

  EXPECT_EQ(outputs[1].numel(), local);
  const test::ExpertFn matmul = [&](int64_t e, const at::Tensor& rows) {
    return at::matmul(rows.cpu(), all_w[e]);
  };
  test::expectClose(outputs[0].cpu(), test::referenceCombine(x, idx, w, matmul),
                    1e-4, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Devices, MoeProgram,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// The MoE layer with its gate and up projections as one grouped matmul of
// [L, H, 2I] weights (fused_gate_up) against the layer with two, on the
// same inputs: the same routing, and outputs within rounding of each other
// and of the ATen reference (a GEMM of twice the width may sum in another
// order); the program has one grouped matmul fewer. Then the fused layer
// with silu(gate) * up as that grouped matmul's epilogue (fused_activation)
// against it: on CPUs the same bits (the same ATen ops in the same order),
// on GPUs within rounding, on hostfuse's sm_90a kernel (where it runs) and
// on at::_grouped_mm (HOSTFUSE_TORCH_GROUPED_GEMM=1); its program has no
// fusion. I = 48: 2I = 96 is a multiple of 16, as the kernel's epilogue
// needs.
class FusedGateUpLayer : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(FusedGateUpLayer, MatchesTheLayerWithTwoProjections) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  MoeLayerConfig config;
  config.hidden = 128;
  config.intermediate = 48;
  config.local_experts = 2;
  config.num_experts = 2 * ranks;
  config.topk = std::min<int64_t>(3, config.num_experts);
  config.dtype = DataType::BFloat16;
  MoeLayerConfig fused_config = config;
  fused_config.fused_gate_up = true;
  MoeLayerConfig epilogue_config = fused_config;
  epilogue_config.fused_activation = true;
  HostIrEvaluator separate(makeMoeLayerProgram(config));
  HostIrEvaluator fused(makeMoeLayerProgram(fused_config));
  HostIrEvaluator epilogue(makeMoeLayerProgram(epilogue_config));
  auto count = [](const HostIrEvaluator& e, const std::string& what) {
    const std::string text = e.program().toString();
    int n = 0;
    for (size_t at = text.find(what); at != std::string::npos;
         at = text.find(what, at + 1)) {
      ++n;
    }
    return n;
  };
  EXPECT_EQ(count(separate, "GroupedMatmul("), 3);
  EXPECT_EQ(count(fused, "GroupedMatmul("), 2);
  EXPECT_EQ(count(fused, "= narrow("), 2) << fused.program().toString();
  EXPECT_EQ(count(epilogue, "GroupedMatmul("), 2);
  EXPECT_EQ(count(epilogue, "epilogue=silu_mul"), 1);
  EXPECT_EQ(count(epilogue, "RunFusion"), 0) << epilogue.program().toString();
  MoeLayerConfig unfused = epilogue_config;
  unfused.fused_gate_up = false;
  test::expectErrorContains([&] { makeMoeLayerProgram(unfused); },
                            {"fused_activation", "needs fused_gate_up"});

  const int64_t H = config.hidden, I = config.intermediate;
  const int64_t L = config.local_experts, tokens = 10 + 3 * me;
  auto weights = [&](std::vector<int64_t> sizes, uint64_t seed) {
    return (test::randomTensor(sizes, at::kFloat, at::kCPU, seed + 10 * me) /
            std::sqrt(static_cast<double>(sizes[1])))
        .to(at::kBFloat16)
        .to(device);
  };
  const at::Tensor x =
      test::randomTensor({tokens, H}, at::kBFloat16, device, 90 + me);
  const at::Tensor router_w =
      test::randomTensor({config.num_experts, H}, at::kBFloat16, device, 91);
  const at::Tensor w_gate = weights({L, H, I}, 92);
  const at::Tensor w_up = weights({L, H, I}, 93);
  const at::Tensor w_down = weights({L, I, H}, 94);
  const std::vector<at::Tensor> a =
      separate.run({x, router_w, w_gate, w_up, w_down});
  std::vector<c10::IValue> fused_inputs = {x, router_w};
  for (const at::Tensor& w :
       moeLayerExpertWeights(fused_config, w_gate, w_up, w_down)) {
    fused_inputs.emplace_back(w);
  }
  ASSERT_EQ(fused_inputs.size(), 4u);
  const std::vector<at::Tensor> b = fused.run(fused_inputs);
  EXPECT_TRUE(at::equal(a[1], b[1])) << "the routing differs";
  EXPECT_TRUE(at::equal(a[2], b[2]));
  const at::Tensor expected = moeLayerReference(
      x, b[1], b[2], at::cat(test::allGatherRows(w_gate.cpu())),
      at::cat(test::allGatherRows(w_up.cpu())),
      at::cat(test::allGatherRows(w_down.cpu())));
  const double scale = expected.to(at::kFloat).abs().max().item<double>();
  auto error = [&](const at::Tensor& u, const at::Tensor& v) {
    return (u.to(at::kFloat).cpu() - v.to(at::kFloat).cpu())
        .abs()
        .max()
        .item<double>();
  };
  EXPECT_LE(error(b[0], a[0]), 2e-2 * scale);
  EXPECT_LE(error(b[0], expected), 3e-2 * scale);
  EXPECT_GT(scale, 0.0);

  for (const char* torch_gemm : {"0", "1"}) {
    if (!device.is_cuda() && std::string(torch_gemm) == "1") {
      continue;  // the CPU has one path
    }
    SCOPED_TRACE(std::string("HOSTFUSE_TORCH_GROUPED_GEMM=") + torch_gemm);
    const test::ScopedEnvironment env("HOSTFUSE_TORCH_GROUPED_GEMM",
                                      torch_gemm);
    const std::vector<at::Tensor> with_fusion = fused.run(fused_inputs);
    const std::vector<at::Tensor> c = epilogue.run(fused_inputs);
    EXPECT_TRUE(at::equal(with_fusion[1], c[1])) << "the routing differs";
    EXPECT_TRUE(at::equal(with_fusion[2], c[2]));
    if (device.is_cuda()) {
      EXPECT_LE(error(c[0], with_fusion[0]), 2e-2 * scale);
    } else {
      EXPECT_TRUE(at::equal(c[0], with_fusion[0]))
          << "max difference " << error(c[0], with_fusion[0]);
    }
    EXPECT_LE(error(c[0], expected), 3e-2 * scale);
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, FusedGateUpLayer,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// The bf16 MoE layer (dispatch, grouped matmul, combine) with the rows
// dispatched in fp8: (1) it equals, to fp32 summation order, the layer
// computed from the dequantized rows of the reference quantizer; (2) it
// stays within 4% of the largest output of the bf16 layer (e4m3 keeps 3
// mantissa bits: each value within 1/16 of itself; a dot product of 256
// of them averages the errors down). Prints the error it measured.
class Fp8Layer : public testing::TestWithParam<c10::DeviceType> {};

TEST_P(Fp8Layer, OutputIsCloseToTheBf16Layer) {
  SKIP_IF_UNAVAILABLE(GetParam());
  const at::Device device = rankDevice(GetParam());
  const int64_t ranks = worldSize();
  const int64_t me = myRank();
  const int64_t local = 2;
  const int64_t experts = local * ranks;
  const int64_t picks = 2;
  const int64_t hidden = 256;
  const int64_t tokens = 9 + 2 * me;
  auto layer = [&](MoeDispatchQuant quantize) {
    return std::make_unique<HostIrEvaluator>(dispatchMatmulCombine(
        DataType::BFloat16, hidden, local, picks, experts, quantize));
  };
  auto fp8 = layer(MoeDispatchQuant::Fp8E4M3);
  auto bf16 = layer(MoeDispatchQuant::None);
  EXPECT_NE(fp8->program().toString().find("quantize=fp8_e4m3"),
            std::string::npos);
  EXPECT_NE(fp8->program().toString().find("x_scales="), std::string::npos);

  const at::Tensor x =
      test::randomTensor({tokens, hidden}, at::kBFloat16, device, 80 + me);
  const at::Tensor idx =
      test::makeRouting(Routing::Masked, tokens, picks, experts, ranks, me, 81)
          .to(device);
  const at::Tensor w =
      test::randomWeights(tokens, picks, at::kFloat, device, 82 + me);
  const at::Tensor expert_w =
      (test::randomTensor({local, hidden, hidden}, at::kFloat, at::kCPU,
                          83 + me) /
       16.0)
          .to(at::kBFloat16)
          .to(device);
  const at::Tensor out = fp8->run({x, idx, w, expert_w})[0];
  const at::Tensor exact = bf16->run({x, idx, w, expert_w})[0];
  const at::Tensor all_w = at::cat(test::allGatherRows(expert_w)).cpu();
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);

  // (1) The reference: the token's row through the reference quantizer,
  // dequantized to bf16, times its expert's weights.
  const test::Fp8Rows q = test::referenceQuantizeFp8(x.cpu());
  const at::Tensor dequantized =
      (q.bytes.view(at::kFloat8_e4m3fn).to(at::kFloat).view({tokens, -1, 128}) *
       q.scales.unsqueeze(2))
          .view({tokens, hidden})
          .to(at::kBFloat16);
  const at::Tensor x_cpu = x.cpu();
  const test::ExpertFn through_fp8 = [&](int64_t e, const at::Tensor& rows) {
    // rows is x[t] of one token: find it to take its dequantized row.
    const at::Tensor t = (x_cpu == rows).all(1).nonzero().select(1, 0);
    return at::matmul(dequantized.index_select(0, t).to(at::kFloat),
                      all_w[e].to(at::kFloat))
        .to(at::kBFloat16);
  };
  test::expectClose(
      out.cpu().to(at::kFloat),
      test::referenceCombine(x, idx, w, through_fp8).to(at::kFloat), 2e-2,
      2e-2);
  // (2) Against the bf16 layer.
  const double largest = exact.abs().max().item<double>();
  const double error =
      (out.to(at::kFloat) - exact.to(at::kFloat)).abs().max().item<double>();
  std::cout << "[rank " << me << " of " << ranks << "] fp8 layer: max error "
            << error << " of the bf16 layer's largest output " << largest
            << " (" << 100 * error / largest << "%)\n";
  EXPECT_LE(error, 0.04 * largest);
}

INSTANTIATE_TEST_SUITE_P(Devices, Fp8Layer,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return deviceTypeName(i.param);
                         });

// ---------------------------------------------------------------------------
// MoE over process groups: the world split into two halves (ranks
// [0, n/2) and [n/2, n); with one rank, one group of it), each half running
// its own MoE program at the same time through a Communicator made from its
// group, checked against the reference built from its members' inputs only.

struct GroupCase {
  c10::DeviceType device_type;
  MoeBackend backend;
};

std::string groupCaseName(const testing::TestParamInfo<GroupCase>& info) {
  return deviceTypeName(info.param.device_type) + "_" +
         toString(info.param.backend);
}

// This rank's half of the world.
std::vector<int64_t> myHalf() {
  const int64_t half = worldSize() / 2;
  const bool first = myRank() < half;
  std::vector<int64_t> ranks;
  for (int64_t r = first ? 0 : half; r < (first ? half : worldSize()); ++r) {
    ranks.push_back(r);
  }
  return ranks;
}

class ProcessGroups : public testing::TestWithParam<GroupCase> {};

TEST_P(ProcessGroups, EachHalfRunsItsOwnMoeProgram) {
  const GroupCase c = GetParam();
  SKIP_IF_UNAVAILABLE(c.device_type);
  const at::Device device = rankDevice(c.device_type);
  const std::vector<int64_t> members = myHalf();
  Communicator group(communicator().newGroup(members));
  ASSERT_EQ(group.size(), static_cast<int64_t>(members.size()));
  const int64_t me = group.rank();
  ASSERT_EQ(members.at(me), myRank());
  EXPECT_EQ(group.launcher(), Launcher::ProcessGroup);

  const int64_t local = 2;
  const int64_t experts = local * group.size();
  const int64_t picks = 2;
  // Inputs differ between the halves (seeded by world rank), so a half that
  // received the other half's rows would not match its reference.
  const int64_t tokens = 3 + myRank();
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    Scalar* t = makeSymbolicScalar(DataType::Int64, "tokens");
    TensorView* x = makeTensor({t, kHidden}, DataType::Float, "x");
    TensorView* idx = makeTensor({t, picks}, DataType::Int64, "topk_idx");
    TensorView* w = makeTensor({t, picks}, DataType::Float, "topk_weights");
    for (TensorView* input : {x, idx, w}) {
      program->addInput(input);
    }
    const MoeDispatchResult d = moeDispatch(x, idx, w, experts, c.backend);
    TensorView* y = mul(d.recv_x, 3.0);
    program->addOutput(moeCombine(y, d, w, x->extent(0)));
    program->addOutput(d.recv_expert_counts);
  }
  HostIrEvaluatorParams params;
  params.communicator = &group;
  HostIrEvaluator evaluator(std::move(program), params);

  const at::Tensor x =
      test::randomTensor({tokens, kHidden}, at::kFloat, device, 70 + myRank());
  const at::Tensor idx =
      test::makeRouting(Routing::Uniform, tokens, picks, experts, group.size(),
                        me, 80 + myRank())
          .to(device);
  const at::Tensor w =
      test::randomWeights(tokens, picks, at::kFloat, device, 90 + myRank());
  std::vector<at::Tensor> outputs;
  for (int step = 0; step < 2; ++step) {
    outputs = evaluator.run({x, idx, w});
  }
  evaluator.checkStatus();

  // The reference from the members' inputs, gathered over the whole world.
  const std::vector<at::Tensor> all_x = test::allGatherRows(x);
  const std::vector<at::Tensor> all_idx = test::allGatherRows(idx);
  std::vector<at::Tensor> xs;
  std::vector<at::Tensor> idxs;
  for (int64_t r : members) {
    xs.push_back(all_x.at(r));
    idxs.push_back(all_idx.at(r));
  }
  const test::ExpectedDispatch expected =
      test::referenceDispatch(xs, idxs, {}, experts, me);
  expectEqual(outputs[1].cpu(), expected.expert_counts, "recv_expert_counts");
  const test::ExpertFn triple = [](int64_t, const at::Tensor& rows) {
    return rows.cpu() * 3.0;
  };
  test::expectClose(outputs[0].cpu(),
                    test::referenceCombine(x.cpu(), idx.cpu(), w.cpu(), triple),
                    1e-5, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Halves, ProcessGroups,
    testing::Values(GroupCase{c10::DeviceType::CPU, MoeBackend::Collective},
                    GroupCase{c10::DeviceType::CUDA, MoeBackend::Collective},
                    GroupCase{c10::DeviceType::CUDA, MoeBackend::Cuda}),
    groupCaseName);

TEST(ProcessGroupErrors, NewGroupNamesTheBadRanks) {
  const int64_t me = myRank();
  const int64_t n = worldSize();
  test::expectErrorContains([&] { communicator().newGroup({}); }, {"is empty"});
  test::expectErrorContains(
      [&] {
        communicator().newGroup({me, n});
      },
      {"must be ranks of this communicator, in [0, " + std::to_string(n) +
       ")"});
  test::expectErrorContains(
      [&] {
        communicator().newGroup({me, me});
      },
      {"names a rank twice"});
  if (n > 1) {
    test::expectErrorContains(
        [&] { communicator().newGroup({(me + 1) % n}); },
        {"this rank (" + std::to_string(me) + ") is not in ranks"});
  }
}

TEST(ProcessGroupErrors, MissingBackendIsNamed) {
  if (cuda::isAvailable()) {
    GTEST_SKIP() << "groups made on a GPU machine have a CUDA backend";
  }
  Communicator group(communicator().newGroup({myRank()}));
  test::expectErrorContains([&] { group.backend(c10::DeviceType::CUDA); },
                            {"has no backend for cuda tensors"});
  test::expectErrorContains(
      [] { Communicator null_group{c10::intrusive_ptr<c10d::ProcessGroup>()}; },
      {"the process group given is null"});
}

}  // namespace
}  // namespace hostfuse
