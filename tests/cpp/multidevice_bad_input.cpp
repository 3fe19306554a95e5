// Bad input to MoE dispatch/combine, part of the test_multidevice binary.
// In each test only the last rank's input is bad (where that makes sense):
// every rank must raise an error that names the argument and the bad rank,
// no rank may be left waiting in a collective, and the next valid call must
// work.
#include <gtest/gtest.h>

#include <chrono>
#include <limits>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/moe/collective/dispatch_combine.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/torch_cuda.h>
#include "moe_reference.h"
#include "test_utils.h"

namespace hostfuse {
namespace {

using test::communicator;
using test::Routing;

constexpr int64_t kTokens = 6;
constexpr int64_t kHidden = 8;
constexpr int64_t kPicks = 2;

class BadInput : public testing::TestWithParam<c10::DeviceType> {
 protected:
  void SetUp() override {
    if (GetParam() == c10::DeviceType::CUDA &&
        (!cuda::isAvailable() ||
         communicator().localSize() > cuda::deviceCount())) {
      GTEST_SKIP() << "needs one GPU per rank on this host";
    }
    device_ = GetParam() == c10::DeviceType::CUDA ? communicator().device()
                                                  : at::Device(at::kCPU);
  }

  int64_t ranks() const { return communicator().size(); }
  int64_t me() const { return communicator().rank(); }
  int64_t experts() const { return 2 * ranks(); }
  bool isBadRank() const { return me() == ranks() - 1; }
  std::string badRank() const {
    return "rank " + std::to_string(ranks() - 1) + " of " +
           std::to_string(ranks());
  }

  at::Tensor x() const {
    return test::randomTensor({kTokens, kHidden}, at::kFloat, device_,
                              100 + me());
  }
  at::Tensor idx() const {
    return test::makeRouting(Routing::Uniform, kTokens, kPicks, experts(),
                             ranks(), me(), 5)
        .to(device_);
  }
  at::Tensor weights() const {
    return at::full({kTokens, kPicks}, 0.5, at::TensorOptions(device_));
  }

  MoeDispatchOutput dispatch(const at::Tensor& x, const at::Tensor& idx,
                             const std::optional<at::Tensor>& weights,
                             int64_t experts) {
    return dispatchCollective(x, idx, weights, experts, communicator());
  }

  // A valid dispatch + combine after an error: it must work, and with
  // weights 0.5 + 0.5 and identity experts it returns x.
  void expectValidCallWorks() {
    const at::Tensor input = x();
    const MoeDispatchOutput out = dispatch(input, idx(), weights(), experts());
    const at::Tensor back = combineCollective(
        out.recv_x, out.layout, weights(), kTokens, experts(), communicator());
    SCOPED_TRACE("the valid call after the error");
    test::expectClose(back.cpu(), input.cpu(), 1e-6, 1e-6);
  }

  // `call` fails on every rank with an error naming all `fragments` and the
  // bad rank, then a valid call works.
  template <typename Fn>
  void expectErrorOnEveryRank(Fn&& call, std::vector<std::string> fragments) {
    fragments.push_back(badRank());
    test::expectErrorContains(call, fragments);
    expectValidCallWorks();
  }

  at::Device device_ = at::kCPU;
};

TEST_P(BadInput, ExpertIdOutOfRange) {
  at::Tensor idx = this->idx();
  if (isBadRank()) {
    idx[3][1] = experts();
  }
  expectErrorOnEveryRank(
      [&] { dispatch(x(), idx, weights(), experts()); },
      {"MoeDispatch", "topk_idx holds expert id " + std::to_string(experts()),
       "token 3, pick 1", "out of range"});
  if (isBadRank()) {
    idx[3][1] = -2;
  }
  expectErrorOnEveryRank([&] { dispatch(x(), idx, weights(), experts()); },
                         {"topk_idx holds expert id -2"});
}

TEST_P(BadInput, TwoPicksOfOneTokenNameOneExpert) {
  at::Tensor idx = this->idx();
  if (isBadRank()) {
    idx[4][0] = 1;
    idx[4][1] = 1;
  }
  expectErrorOnEveryRank([&] { dispatch(x(), idx, weights(), experts()); },
                         {"topk_idx names expert 1 twice in token 4"});
}

TEST_P(BadInput, NumExpertsNotAMultipleOfWorldSize) {
  // With one rank every positive count is a multiple: use 0 there.
  const int64_t bad_experts = ranks() > 1 ? ranks() + 1 : 0;
  const at::Tensor idx =
      at::zeros({kTokens, 1}, at::TensorOptions(device_).dtype(at::kLong));
  test::expectErrorContains(
      [&] { dispatch(x(), idx, std::nullopt, bad_experts); },
      {"num_experts (" + std::to_string(bad_experts) +
           ") must be a positive multiple of the world size",
       "rank 0"});
  expectValidCallWorks();
}

TEST_P(BadInput, NumExpertsDifferOnOneRank) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  const int64_t mine = isBadRank() ? 2 * experts() : experts();
  test::expectErrorContains([&] { dispatch(x(), idx(), weights(), mine); },
                            {"num_experts must be the same on every rank",
                             "on rank " + std::to_string(ranks() - 1)});
  expectValidCallWorks();
}

// Ranks that disagree on K are refused on every rank (the cuda backend
// does the same at a node's first run: CudaBackendErrors in
// multidevice_cuda_backend.cpp).
TEST_P(BadInput, PicksPerTokenDifferOnOneRank) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  const int64_t picks = isBadRank() ? kPicks - 1 : kPicks;
  const at::Tensor idx = this->idx().narrow(1, 0, picks).contiguous();
  const at::Tensor w = weights().narrow(1, 0, picks).contiguous();
  test::expectErrorContains(
      [&] { dispatch(x(), idx, w, experts()); },
      {"K (the columns of topk_idx) must be the same on every rank",
       "it is " + std::to_string(kPicks) + " on rank 0 and " +
           std::to_string(kPicks - 1) + " on rank " +
           std::to_string(ranks() - 1)});
  expectValidCallWorks();
}

TEST_P(BadInput, TopkIdxRowsDifferFromX) {
  const at::Tensor idx =
      isBadRank() ? at::cat({this->idx(), this->idx().narrow(0, 0, 1)})
                  : this->idx();
  expectErrorOnEveryRank(
      [&] { dispatch(x(), idx, std::nullopt, experts()); },
      {"topk_idx has " + std::to_string(kTokens + 1) + " rows but x has " +
       std::to_string(kTokens) + " tokens"});
}

TEST_P(BadInput, TopkWeightsShapeDiffersFromTopkIdx) {
  const at::Tensor w = isBadRank() ? at::full({kTokens, kPicks + 1}, 0.5,
                                              at::TensorOptions(device_))
                                   : weights();
  expectErrorOnEveryRank([&] { dispatch(x(), idx(), w, experts()); },
                         {"topk_weights has shape [6, 3] but topk_idx has "
                          "shape [6, 2]"});
}

TEST_P(BadInput, XNotFloatingPoint) {
  const at::Tensor input = isBadRank() ? x().to(at::kLong) : x();
  expectErrorOnEveryRank(
      [&] { dispatch(input, idx(), weights(), experts()); },
      {"x must be Float, Double, BFloat16 or Half, got Long"});
}

// fp8 and fp4 rows are moved by neither backend: refused up front on every
// rank, naming the dtypes that are accepted.
TEST_P(BadInput, XOfAnFp8OrFp4DtypeIsRefused) {
  for (const at::ScalarType dtype :
       {at::kFloat8_e4m3fn, at::kFloat8_e5m2, at::kFloat8_e8m0fnu,
        at::kFloat4_e2m1fn_x2}) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor input =
        isBadRank() ? at::empty({kTokens, kHidden},
                                at::TensorOptions(device_).dtype(dtype))
                    : x();
    expectErrorOnEveryRank(
        [&] { dispatch(input, idx(), weights(), experts()); },
        {"MoeDispatch", "x must be Float, Double, BFloat16 or Half, got " +
                            std::string(c10::toString(dtype))});
  }
}

TEST_P(BadInput, XWithNoColumnsIsRefused) {
  const at::Tensor input = isBadRank() ? x().narrow(1, 0, 0) : x();
  expectErrorOnEveryRank(
      [&] { dispatch(input, idx(), weights(), experts()); },
      {"MoeDispatch", "x has shape [6, 0]; H, its columns, must be > 0"});
}

// A rank without tokens (T = 0) still takes part: its peers' rows come and
// go as usual, and it gets back [0, H].
TEST_P(BadInput, ARankWithNoTokensStillDispatchesAndCombines) {
  const int64_t tokens = isBadRank() ? 0 : kTokens;
  const at::Tensor input = x().narrow(0, 0, tokens);
  const at::Tensor w = weights().narrow(0, 0, tokens);
  const MoeDispatchOutput out =
      dispatch(input, idx().narrow(0, 0, tokens), w, experts());
  const at::Tensor back = combineCollective(out.recv_x, out.layout, w, tokens,
                                            experts(), communicator());
  EXPECT_EQ(back.sizes(), input.sizes());
  test::expectClose(back.cpu(), input.cpu(), 1e-6, 1e-6);
}

TEST_P(BadInput, XNotTwoDimensional) {
  const at::Tensor input = isBadRank() ? x().reshape({-1}) : x();
  expectErrorOnEveryRank([&] { dispatch(input, idx(), weights(), experts()); },
                         {"x must be a 2-D tensor [T, H], got rank 1"});
}

TEST_P(BadInput, TopkIdxNotInteger) {
  const at::Tensor idx = isBadRank() ? this->idx().to(at::kFloat) : this->idx();
  expectErrorOnEveryRank([&] { dispatch(x(), idx, weights(), experts()); },
                         {"topk_idx must be Long (i64) or Int (i32), got "
                          "Float"});
}

TEST_P(BadInput, TopkWeightsNotFloatingPoint) {
  const at::Tensor w = isBadRank() ? weights().to(at::kInt) : weights();
  expectErrorOnEveryRank([&] { dispatch(x(), idx(), w, experts()); },
                         {"topk_weights must be Float, Double, BFloat16, Half "
                          "or a Float8 type, got Int"});
}

// fp4 weights (two values packed per element) convert to nothing the
// combine can sum: refused by dispatch and by combine, on every rank.
TEST_P(BadInput, TopkWeightsOfFp4AreRefused) {
  const at::Tensor fp4 =
      at::empty({kTokens, kPicks},
                at::TensorOptions(device_).dtype(at::kFloat4_e2m1fn_x2));
  const at::Tensor w = isBadRank() ? fp4 : weights();
  const std::string refused =
      "topk_weights must be Float, Double, BFloat16, Half or a Float8 type, "
      "got Float4_e2m1fn_x2";
  expectErrorOnEveryRank([&] { dispatch(x(), idx(), w, experts()); },
                         {"MoeDispatch", refused});
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, w, kTokens, experts(),
                          communicator());
      },
      {"MoeCombine", refused});
}

// fp8 weights convert to fp32 exactly: both backends take them.
TEST_P(BadInput, TopkWeightsOfAnFp8DtypeAreAccepted) {
  const at::Tensor w = weights().to(at::kFloat8_e4m3fn);  // 0.5 exactly
  const at::Tensor input = x();
  const MoeDispatchOutput out = dispatch(input, idx(), w, experts());
  EXPECT_EQ(out.recv_weights.scalar_type(), at::kFloat8_e4m3fn);
  const at::Tensor back = combineCollective(out.recv_x, out.layout, w, kTokens,
                                            experts(), communicator());
  test::expectClose(back.cpu(), input.cpu(), 1e-6, 1e-6);
}

TEST_P(BadInput, TopkIdxInt32IsAccepted) {
  const at::Tensor input = x();
  const MoeDispatchOutput out =
      dispatch(input, idx().to(at::kInt), weights(), experts());
  const at::Tensor back = combineCollective(out.recv_x, out.layout, weights(),
                                            kTokens, experts(), communicator());
  test::expectClose(back.cpu(), input.cpu(), 1e-6, 1e-6);
}

TEST_P(BadInput, CombineGivenMoreRowsThanItsDispatch) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const at::Tensor rows =
      isBadRank()
          ? at::cat({out.recv_x, at::zeros({1, kHidden}, out.recv_x.options())})
          : out.recv_x;
  expectErrorOnEveryRank(
      [&] {
        combineCollective(rows, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine", "recv_src_rank has", "expert_out has",
       "the rows do not match their dispatch"});
}

TEST_P(BadInput, CombineGivenTheLayoutOfAnotherDispatch) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  // Dispatch a: every token to expert 0 (rank 0). Dispatch b: all masked.
  const at::Tensor to_zero =
      at::zeros({kTokens, 1}, at::TensorOptions(device_).dtype(at::kLong));
  const MoeDispatchOutput a = dispatch(x(), to_zero, std::nullopt, experts());
  const MoeDispatchOutput b =
      dispatch(x(), to_zero - 1, std::nullopt, experts());
  const MoeDispatchOutput& mine = isBadRank() ? b : a;
  test::expectErrorContains(
      [&] {
        combineCollective(mine.recv_x, mine.layout, std::nullopt, kTokens,
                          experts(), communicator());
      },
      {"MoeCombine: the rows do not match their dispatch",
       "rank " + std::to_string(ranks() - 1) + " sent 0 rows to rank 0"});
  expectValidCallWorks();
}

// Every token of every rank goes to the last rank's two experts, so its
// layout's rows 0 and 1 are (rank 0, token 0, pick 0) and (rank 0, token 1,
// pick 0).
MoeDispatchOutput dispatchToTheLastRank(const at::Tensor& x,
                                        const std::optional<at::Tensor>& w,
                                        int64_t experts) {
  const at::Tensor idx = at::tensor({experts - 2, experts - 1}, at::kLong)
                             .repeat({x.size(0), 1})
                             .to(x.device());
  return dispatchCollective(x, idx, w, experts, communicator());
}

// The last rank's layout names (rank 0, token 0, pick 0) twice, and (rank
// 0, token 1, pick 0) not at all: the counts all match, and without the
// check rank 0 would get token 0's pick 0 twice and token 1 without it.
TEST_P(BadInput, CombineGivenALayoutThatNamesARowTwice) {
  MoeDispatchOutput out = dispatchToTheLastRank(x(), weights(), experts());
  if (isBadRank()) {
    out.layout.src_token = out.layout.src_token.clone();
    out.layout.src_token[1] = 0;
  }
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine", "row 1 of the layout names rank 0, token 0, pick 0",
       "like an earlier row", "the rows do not match their dispatch"});
}

// Row T - 1 is rank 0's last row of expert E - 2 (token T - 1): token T
// there keeps the expert's rows in order.
TEST_P(BadInput, CombineGivenATokenOutOfRange) {
  MoeDispatchOutput out = dispatchToTheLastRank(x(), weights(), experts());
  if (isBadRank()) {
    out.layout.src_token = out.layout.src_token.clone();
    out.layout.src_token[kTokens - 1] = kTokens;
  }
  test::expectErrorContains(
      [&] {
        combineCollective(out.recv_x, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine: recv_src_token on rank " + std::to_string(ranks() - 1) +
           " names token 6 of rank 0, which has 6 tokens",
       "the rows do not match their dispatch"});
  expectValidCallWorks();
}

// Without weights combine does not know K, so nothing bounds a pick but
// the dispatch's fingerprint: a huge one must cost nothing (no scratch
// sized by it, no overflow) and be refused on every rank as a row its
// source did not send.
TEST_P(BadInput, CombineWithoutWeightsAllocatesNothingForAHugePick) {
  const at::Tensor input = x();
  // Into a row of pick 0 and one of pick 1: values that differ from the
  // true pick only above bit 30 too.
  for (const int64_t was : {int64_t{0}, int64_t{1}}) {
    for (const int64_t pick :
         {int64_t{1000000}, (int64_t{1} << 31) + 1, int64_t{1} << 40,
          int64_t{1} << 62, std::numeric_limits<int64_t>::max()}) {
      SCOPED_TRACE("recv_src_k = " + std::to_string(pick) +
                   " in a row of pick " + std::to_string(was));
      MoeDispatchOutput out =
          dispatchToTheLastRank(input, std::nullopt, experts());
      if (isBadRank()) {
        out.layout.src_k = out.layout.src_k.clone();
        const int64_t row =
            at::nonzero(out.layout.src_k == was).flatten()[0].item<int64_t>();
        out.layout.src_k[row] = pick;
      }
      const auto start = std::chrono::steady_clock::now();
      expectErrorOnEveryRank(
          [&] {
            combineCollective(out.recv_x, out.layout, std::nullopt, kTokens,
                              experts(), communicator());
          },
          {"MoeCombine: the layout on " + badRank() + " names rows from rank 0",
           "that rank 0 did not send it in the dispatch that made the layout",
           "the rows do not match their dispatch"});
      const double seconds = std::chrono::duration<double>(
                                 std::chrono::steady_clock::now() - start)
                                 .count();
      EXPECT_LT(seconds, 10.0);
    }
  }
}

// Dispatch a routes every token like idx(), dispatch b every token like the
// token before it: the same rows to every rank and expert, other tokens.
// The last rank combines b's layout, its peers a's: every count matches,
// and without the layouts' ids the peers would get the rows of other tokens.
TEST_P(BadInput, CombineGivenAnotherDispatchsLayoutWithTheSameCounts) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  const at::Tensor input = x();
  const MoeDispatchOutput a = dispatch(input, idx(), weights(), experts());
  const MoeDispatchOutput b =
      dispatch(input, idx().roll(1, 0), weights(), experts());
  ASSERT_TRUE(at::equal(a.layout.n_tokens_to_rank, b.layout.n_tokens_to_rank));
  ASSERT_TRUE(at::equal(a.layout.expert_counts, b.layout.expert_counts));
  const MoeDispatchOutput& mine = isBadRank() ? b : a;
  expectErrorOnEveryRank(
      [&] {
        combineCollective(mine.recv_x, mine.layout, weights(), kTokens,
                          experts(), communicator());
      },
      {"MoeCombine: the ranks combine the layouts of different dispatches",
       badRank() + " was given the layout of collective MoE call #",
       "while rank 0 was given that of #", "(recv_layout_id)"});
}

// Token t of every rank picks the last rank's expert E - 2 if t is even,
// E - 1 if odd (K = 1): the last rank's local expert 0 holds rows (rank r,
// token 0, 2, 4) for every r, its local expert 1 rows (rank r, token 1,
// 3, 5).
MoeDispatchOutput dispatchEvenOddToTheLastRank(const at::Tensor& x,
                                               int64_t experts) {
  const at::Tensor idx =
      (experts - 2 + at::arange(x.size(0), at::kLong).remainder(2))
          .unsqueeze(1)
          .to(x.device());
  return dispatchCollective(x, idx, std::nullopt, experts, communicator());
}

// Swapped where they keep every count and the set of (rank, token, pick)
// of an expert: the rows of one expert are no longer in (rank, token)
// order.
TEST_P(BadInput, CombineGivenALayoutWithTwoTokensSwappedInOneExpert) {
  MoeDispatchOutput out = dispatchEvenOddToTheLastRank(x(), experts());
  if (isBadRank()) {
    out.layout.src_token = out.layout.src_token.clone();
    out.layout.src_token[0] = 2;
    out.layout.src_token[1] = 0;
  }
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, std::nullopt, kTokens,
                          experts(), communicator());
      },
      {"MoeCombine", "row 1 of the layout (local expert 0, rank 0, token 0)",
       "does not come after the row before it",
       "ordered by source rank, then source token"});
}

// Token 0 (expert E - 2) and token 1 (expert E - 1) of rank 0 trade places
// on the last rank: both experts' rows stay in order, every count and
// every (rank, token, pick) appears once; the fingerprint of what rank 0
// sent differs.
TEST_P(BadInput, CombineGivenALayoutWithTwoTokensSwappedAcrossExperts) {
  MoeDispatchOutput out = dispatchEvenOddToTheLastRank(x(), experts());
  const int64_t expert1_start = ranks() * kTokens / 2;
  if (isBadRank()) {
    out.layout.src_token = out.layout.src_token.clone();
    out.layout.src_token[0] = 1;
    out.layout.src_token[expert1_start] = 0;
  }
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, std::nullopt, kTokens,
                          experts(), communicator());
      },
      {"MoeCombine: the layout on " + badRank() + " names rows from rank 0",
       "that rank 0 did not send it in the dispatch that made the layout",
       "the rows do not match their dispatch"});
}

// Picks 0 and 1 of rank 0's token 0 (experts E - 2 and E - 1) trade places
// on the last rank: the same (rank, token, pick) rows, in order, under
// the wrong experts.
TEST_P(BadInput, CombineGivenALayoutWithTwoPicksSwappedAcrossExperts) {
  MoeDispatchOutput out = dispatchToTheLastRank(x(), weights(), experts());
  const int64_t expert1_start = ranks() * kTokens;
  if (isBadRank()) {
    out.layout.src_k = out.layout.src_k.clone();
    out.layout.src_k[0] = 1;
    out.layout.src_k[expert1_start] = 0;
  }
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine: the layout on " + badRank() + " names rows from rank 0",
       "that rank 0 did not send it"});
}

// Rank 0 sends its even tokens to expert E - 2, rank 1 its odd tokens to
// E - 1, the other ranks nothing; the last rank holds (rank 0, token 0, 2,
// 4) in its local expert 0 and (rank 1, token 1, 3, 5) in 1. The ranks of
// rows 2 and 3 swapped keep every count, both experts' order and every
// (rank, token, pick) once; the fingerprints of what ranks 0 and 1 sent
// differ.
TEST_P(BadInput, CombineGivenALayoutWithTwoSourceRanksSwapped) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  const at::Tensor parity = at::arange(kTokens, at::kLong).remainder(2);
  const at::Tensor idx = me() == 0   ? at::where(parity == 0, experts() - 2, -1)
                         : me() == 1 ? at::where(parity == 1, experts() - 1, -1)
                                     : at::full({kTokens}, -1, at::kLong);
  MoeDispatchOutput out =
      dispatch(x(), idx.unsqueeze(1).to(device_), std::nullopt, experts());
  if (isBadRank()) {
    out.layout.src_rank = out.layout.src_rank.clone();
    out.layout.src_rank[2] = 1;
    out.layout.src_rank[3] = 0;
  }
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, std::nullopt, kTokens,
                          experts(), communicator());
      },
      {"MoeCombine: the layout on " + badRank() + " names rows from rank 0",
       "that rank 0 did not send it"});
}

// Every pick goes to expert 0: the other ranks receive no rows (an empty
// layout, whose tensors have no data pointer) and still take part in the
// combine, and every token comes back.
TEST_P(BadInput, RanksThatReceiveNoRowsStillCombine) {
  const at::TensorOptions options(device_);
  const at::Tensor to_zero = at::zeros({kTokens, 1}, options.dtype(at::kLong));
  const at::Tensor half = at::full({kTokens, 1}, 0.5, options);
  const at::Tensor input = x();
  const MoeDispatchOutput out = dispatch(input, to_zero, half, experts());
  EXPECT_EQ(out.recv_x.size(0), me() == 0 ? kTokens * ranks() : 0);
  const at::Tensor back = combineCollective(out.recv_x, out.layout, half,
                                            kTokens, experts(), communicator());
  test::expectClose(back.cpu(), (input * 0.5).cpu(), 0, 0);
}

// One rank calls combine where its peers dispatch (it skipped a dispatch):
// the tables of both ops have one size, so nothing aborts, and every rank
// raises the same error naming both calls.
TEST_P(BadInput, OneRankCombinesWhileThePeersDispatch) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const std::string mismatch = "rank 0 called MoeDispatch";
  test::expectErrorContains(
      [&] {
        if (isBadRank()) {
          combineCollective(out.recv_x, out.layout, weights(), kTokens,
                            experts(), communicator());
        } else {
          dispatch(x(), idx(), weights(), experts());
        }
      },
      {"the ranks' MoE calls do not pair up", mismatch,
       "while rank " + std::to_string(ranks() - 1) + " called MoeCombine",
       "in the same order"});
  expectValidCallWorks();
}

TEST_P(BadInput, CombineWeightsWithFewerPicksThanTheDispatch) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const at::Tensor fewer =
      isBadRank() ? weights().narrow(1, 0, 1).contiguous() : weights();
  // Some rank holds a row of the bad rank's pick 1: every rank raises.
  test::expectErrorContains(
      [&] {
        combineCollective(out.recv_x, out.layout, fewer, kTokens, experts(),
                          communicator());
      },
      {"topk_weights on rank " + std::to_string(ranks() - 1) +
           " has K = 1 columns",
       "holds a row of its pick 1", "of the dispatch that made the layout"});
  expectValidCallWorks();
}

TEST_P(BadInput, CombineWeightsDisagreeWithNumTokens) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const int64_t tokens = isBadRank() ? kTokens + 1 : kTokens;
  expectErrorOnEveryRank(
      [&] {
        combineCollective(out.recv_x, out.layout, weights(), tokens, experts(),
                          communicator());
      },
      {"topk_weights has 6 rows but num_tokens is 7"});
}

TEST_P(BadInput, CombineExpertOutNotFloatingPoint) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const at::Tensor rows = isBadRank() ? out.recv_x.to(at::kInt) : out.recv_x;
  expectErrorOnEveryRank(
      [&] {
        combineCollective(rows, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"expert_out must be Float, Double, BFloat16 or Half, got Int"});
}

TEST_P(BadInput, CombineExpertOutOfAnFp8DtypeIsRefused) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const at::Tensor rows =
      isBadRank() ? out.recv_x.to(at::kFloat8_e4m3fn) : out.recv_x;
  expectErrorOnEveryRank(
      [&] {
        combineCollective(rows, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine",
       "expert_out must be Float, Double, BFloat16 or Half, got "
       "Float8_e4m3fn"});
}

TEST_P(BadInput, CombineExpertOutWithNoColumnsIsRefused) {
  const MoeDispatchOutput out = dispatch(x(), idx(), weights(), experts());
  const at::Tensor rows = isBadRank() ? out.recv_x.narrow(1, 0, 0) : out.recv_x;
  // The message gives the bad rank's row count, which its peers do not
  // know.
  expectErrorOnEveryRank(
      [&] {
        combineCollective(rows, out.layout, weights(), kTokens, experts(),
                          communicator());
      },
      {"MoeCombine", "expert_out has shape [",
       ", 0]; H', its columns, must be > 0"});
}

TEST_P(BadInput, ProgramWithBadExpertIdFailsOnEveryRankAndRunsAgain) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
    TensorView* idx = makeSymbolicTensor(2, DataType::Int64, "topk_idx");
    program->addInput(x);
    program->addInput(idx);
    const MoeDispatchResult d = moeDispatch(x, idx, nullptr, experts());
    program->addOutput(moeCombine(d.recv_x, d, nullptr, x->extent(0)));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor input = x();
  const at::Tensor good = idx().narrow(1, 0, 1).contiguous();
  at::Tensor bad = good.clone();
  if (isBadRank()) {
    bad[0][0] = -7;
  }
  test::expectErrorContains(
      [&] {
        evaluator.run({input, bad});
      },
      {"topk_idx holds expert id -7", badRank()});
  const std::vector<at::Tensor> out = evaluator.run({input, good});
  test::expectClose(out[0].cpu(), input.cpu());
}

// The last rank's program fails before its MoeDispatch (an ATen error in
// an op of its own), where its peers wait for it: it tells them, and they
// raise at once naming it (not at their timeout, 120 s here), and the next
// run works on every rank.
TEST_P(BadInput, ALocalErrorBeforeDispatchRaisesOnEveryRankAtOnce) {
  if (ranks() == 1) {
    GTEST_SKIP() << "needs two ranks";
  }
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
    TensorView* shift = makeSymbolicTensor(2, DataType::Float, "shift");
    TensorView* idx = makeSymbolicTensor(2, DataType::Int64, "topk_idx");
    program->addInput(x);
    program->addInput(shift);
    program->addInput(idx);
    TensorView* shifted = add(x, shift);
    const MoeDispatchResult d = moeDispatch(shifted, idx, nullptr, experts());
    program->addOutput(moeCombine(d.recv_x, d, nullptr, x->extent(0)));
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor input = x();
  const at::Tensor zero = at::zeros_like(input);
  const at::Tensor one_pick = idx().narrow(1, 0, 1).contiguous();
  const at::Tensor bad_shift =
      isBadRank() ? at::zeros({kTokens + 1, kHidden}, input.options()) : zero;
  const auto start = std::chrono::steady_clock::now();
  if (isBadRank()) {
    test::expectErrorContains(
        [&] {
          evaluator.run({input, bad_shift, one_pick});
        },
        {"must match the size of tensor"});
  } else {
    test::expectErrorContains(
        [&] {
          evaluator.run({input, bad_shift, one_pick});
        },
        {badRank() + " failed outside a MoE call, before collective MoE call",
         "every rank abandons this call"});
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  EXPECT_LT(seconds, 30.0) << "the peers waited for the failed rank";
  const std::vector<at::Tensor> out = evaluator.run({input, zero, one_pick});
  test::expectClose(out[0].cpu(), input.cpu());
  expectValidCallWorks();
}

INSTANTIATE_TEST_SUITE_P(Devices, BadInput,
                         testing::Values(c10::DeviceType::CPU,
                                         c10::DeviceType::CUDA),
                         [](const testing::TestParamInfo<c10::DeviceType>& i) {
                           return i.param == c10::DeviceType::CUDA
                                      ? std::string("cuda")
                                      : std::string("cpu");
                         });

}  // namespace
}  // namespace hostfuse
