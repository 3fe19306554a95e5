// Single-process tests of the MoE IR nodes (validation, printing, cloning),
// of GroupedMatmul, of the communicator's configuration, and of a world of
// one rank, which needs no launcher.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <optional>
#include <utility>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/host_ir/moe_layer.h>
#include <hostfuse/ir/fp8_rows.h>
#include <hostfuse/ir/grouped_matmul.h>
#include <hostfuse/ir/kernels/fp8_dequant.h>
#include <hostfuse/ir/kernels/group_ends.h>
#include <hostfuse/ir/kernels/grouped_gemm_sm90.h>
#include <hostfuse/ir/kernels/silu_mul_halves.h>
#include <hostfuse/ir/narrow.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/multidevice/moe/nodes.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/driver_api.h>
#include <hostfuse/utils/torch_cuda.h>
#include "test_utils.h"

namespace hostfuse {
namespace {

// A host program being built, active for the builders.
class MoeIr : public testing::Test {
 protected:
  MoeIr() : program_(std::make_unique<HostIrContainer>()) {}

  std::unique_ptr<HostIrContainer> program_;
  FusionGuard guard_{program_.get()};
};

TEST_F(MoeIr, DispatchAndCombinePrintTheirOperandsAndAttributes) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 64}, DataType::BFloat16, "x");
  TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "topk_idx");
  TensorView* w = makeTensor({tokens, 2}, DataType::Float, "topk_weights");
  const MoeDispatchResult d = moeDispatch(x, idx, w, 8);
  EXPECT_EQ(d.recv_x->definition()->toInlineString(),
            "MoeDispatch(x=T0, topk_idx=T1, topk_weights=T2, num_experts=8, "
            "backend=collective) -> (recv_x=T3, recv_src_rank=T4, "
            "recv_src_token=T5, recv_src_k=T6, recv_weights=T7, "
            "recv_expert_counts=T8, n_tokens_to_rank=T9, "
            "n_tokens_from_rank=T10, recv_layout_id=T11)");
  EXPECT_EQ(d.recv_x->typeString(), "bf16[rows, 64]");
  EXPECT_EQ(d.recv_weights->typeString(), "f32[rows]");
  EXPECT_EQ(d.recv_expert_counts->typeString(), "i64[local_experts]");
  EXPECT_EQ(d.n_tokens_to_rank->typeString(), "i64[ranks]");
  EXPECT_EQ(d.recv_layout_id->typeString(), "i64[id_words]");

  TensorView* combined = moeCombine(d.recv_x, d, w, tokens);
  EXPECT_EQ(combined->definition()->toString(),
            "MoeCombine(expert_out=T3, recv_src_rank=T4, recv_src_token=T5, "
            "recv_src_k=T6, recv_expert_counts=T8, n_tokens_to_rank=T9, "
            "n_tokens_from_rank=T10, recv_layout_id=T11, topk_weights=T2, "
            "num_tokens=tokens, num_experts=8, backend=collective) -> (T12)\n");
  EXPECT_EQ(combined->typeString(), "bf16[tokens, 64]");

  TensorView* y = groupedMatmul(
      d.recv_x, makeTensor({4, 64, 32}, DataType::BFloat16, "expert_w"),
      d.recv_expert_counts);
  EXPECT_EQ(y->definition()->toInlineString(),
            "T14 = GroupedMatmul(x=T3, weights=T13, group_counts=T8)");
}

TEST_F(MoeIr, DispatchWithoutWeightsHasNoRecvWeights) {
  TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
  TensorView* idx = makeSymbolicTensor(2, DataType::Int32, "topk_idx");
  const MoeDispatchResult d = moeDispatch(x, idx, nullptr, 4, MoeBackend::Cuda);
  const auto* node = d.recv_x->definition()->as<MoeDispatch>();
  EXPECT_EQ(node->toInlineString(),
            "MoeDispatch(x=T0, topk_idx=T1, num_experts=4, backend=cuda) -> "
            "(recv_x=T2, recv_src_rank=T3, recv_src_token=T4, recv_src_k=T5, "
            "recv_expert_counts=T6, n_tokens_to_rank=T7, "
            "n_tokens_from_rank=T8, recv_layout_id=T9)");
  EXPECT_EQ(d.recv_weights, nullptr);
  EXPECT_EQ(node->recvWeights(), nullptr);
  EXPECT_EQ(node->topkWeights(), nullptr);
  EXPECT_EQ(node->recvExpertCounts(), d.recv_expert_counts);
  EXPECT_EQ(node->nTokensFromRank(), d.n_tokens_from_rank);
  EXPECT_EQ(node->numExperts(), 4);
  EXPECT_EQ(node->backend(), MoeBackend::Cuda);
}

TEST_F(MoeIr, CapacityIsPrintedOnlyWhenSetAndOnlyForTheCudaBackend) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "topk_idx");
  const MoeDispatchResult d =
      moeDispatch(x, idx, nullptr, 4, MoeBackend::Cuda, 96);
  const auto* node = d.recv_x->definition()->as<MoeDispatch>();
  EXPECT_EQ(node->capacity(), 96);
  EXPECT_EQ(node->toInlineString(),
            "MoeDispatch(x=T0, topk_idx=T1, num_experts=4, backend=cuda, "
            "capacity=96) -> (recv_x=T2, recv_src_rank=T3, recv_src_token=T4, "
            "recv_src_k=T5, recv_expert_counts=T6, n_tokens_to_rank=T7, "
            "n_tokens_from_rank=T8, recv_layout_id=T9)");
  const MoeDispatchResult plain = moeDispatch(x, idx, nullptr, 4);
  EXPECT_EQ(plain.recv_x->definition()->as<MoeDispatch>()->capacity(), 0);
  test::expectErrorContains(
      [&] { moeDispatch(x, idx, nullptr, 4, MoeBackend::Collective, 8); },
      {"capacity (8) does not apply to backend=collective"});
  test::expectErrorContains(
      [&] { moeDispatch(x, idx, nullptr, 4, MoeBackend::Cuda, -1); },
      {"capacity must be >= 0"});
  // The combine of a cuda dispatch knows its dispatch.
  TensorView* out = moeCombine(d.recv_x, d, nullptr, tokens);
  EXPECT_EQ(out->definition()->as<MoeCombine>()->dispatch(), node);
  // Cloning keeps the capacity.
  const std::unique_ptr<HostIrContainer> copy = program_->clone();
  EXPECT_EQ(copy->toString(), program_->toString());
}

TEST_F(MoeIr, CudaCombineNeedsTheLayoutOfOneCudaDispatch) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::BFloat16, "x");
  TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "topk_idx");
  const MoeDispatchResult a = moeDispatch(x, idx, nullptr, 4, MoeBackend::Cuda);
  const MoeDispatchResult b = moeDispatch(x, idx, nullptr, 4, MoeBackend::Cuda);
  auto combine = [&](TensorView* rows, const MoeDispatchResult& layout,
                     MoeBackend backend) {
    return IrBuilder::create<MoeCombine>(
        makeTensor({layout.recv_x->extent(0), rows->extent(1)}, rows->dtype()),
        rows, layout.recv_src_rank, layout.recv_src_token, layout.recv_src_k,
        layout.recv_expert_counts, layout.n_tokens_to_rank,
        layout.n_tokens_from_rank, layout.recv_layout_id, nullptr, tokens, 4,
        backend);
  };
  MoeDispatchResult mixed = a;
  mixed.recv_src_k = b.recv_src_k;
  test::expectErrorContains(
      [&] { combine(a.recv_x, mixed, MoeBackend::Cuda); },
      {"with backend=cuda, the layout must come from one MoeDispatch"});
  // Layout tensors that no dispatch computed.
  MoeDispatchResult inputs = a;
  inputs.recv_src_rank = makeTensor({a.recv_x->extent(0)}, DataType::Int64);
  test::expectErrorContains(
      [&] { combine(a.recv_x, inputs, MoeBackend::Cuda); },
      {"must be an output of a MoeDispatch with backend=cuda",
       "not computed by any expression"});
  // A collective combine of a cuda dispatch's layout is not checked here
  // (it can run on any layout); a cuda combine of a collective one is not.
  const MoeDispatchResult collective = moeDispatch(x, idx, nullptr, 4);
  test::expectErrorContains(
      [&] { combine(collective.recv_x, collective, MoeBackend::Cuda); },
      {"must be an output of a MoeDispatch with backend=cuda",
       "backend=collective"});
  // expert_out in another dtype or width than x.
  TensorView* wide = makeTensor({a.recv_x->extent(0), 16}, DataType::BFloat16);
  test::expectErrorContains(
      [&] { combine(wide, a, MoeBackend::Cuda); },
      {"the width of expert_out (backend=cuda) (16) must equal the hidden "
       "size H of x (8)"});
  TensorView* fp32 = makeTensor({a.recv_x->extent(0), 8}, DataType::Float);
  test::expectErrorContains([&] { combine(fp32, a, MoeBackend::Cuda); },
                            {"must have x's dtype bf16"});
  EXPECT_NO_THROW(moeCombine(a.recv_x, a, nullptr, tokens));
}

TEST_F(MoeIr, DispatchRejectsBadDtypesRanksAndSizes) {
  TensorView* x = makeTensor({5, 8}, DataType::Float, "x");
  TensorView* idx = makeTensor({5, 2}, DataType::Int64, "topk_idx");
  test::expectErrorContains(
      [&] {
        moeDispatch(makeTensor({5, 8}, DataType::Int64, "x"), idx, nullptr, 4);
      },
      {"MoeDispatch: x", "must be floating point, got i64"});
  test::expectErrorContains(
      [&] {
        moeDispatch(x, makeTensor({5, 2}, DataType::Float, "topk_idx"), nullptr,
                    4);
      },
      {"topk_idx", "must be i64 or i32, got f32"});
  test::expectErrorContains(
      [&] {
        moeDispatch(x, makeTensor({6, 2}, DataType::Int64), nullptr, 4);
      },
      {"the token count of topk_idx (6) must equal the token count T of x "
       "(5)"});
  test::expectErrorContains(
      [&] {
        moeDispatch(x, idx, makeTensor({5, 3}, DataType::Float), 4);
      },
      {"K of topk_weights (3) must equal K of topk_idx (2)"});
  test::expectErrorContains(
      [&] {
        moeDispatch(x, idx, makeTensor({5, 2}, DataType::Int32), 4);
      },
      {"topk_weights", "must be floating point, got i32"});
  test::expectErrorContains(
      [&] { moeDispatch(x, makeTensor({5}, DataType::Int64), nullptr, 4); },
      {"topk_idx", "must have rank 2, got rank 1"});
  test::expectErrorContains([&] { moeDispatch(x, idx, nullptr, 0); },
                            {"num_experts must be > 0, got 0"});
  test::expectErrorContains(
      [&] {
        moeDispatch(makeTensor({5, 8, 2}, DataType::Float), idx, nullptr, 4);
      },
      {"moeDispatch: x", "must have rank 2"});
}

TEST_F(MoeIr, CombineRejectsBadOperands) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 8}, DataType::Float, "x");
  TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "topk_idx");
  const MoeDispatchResult d = moeDispatch(x, idx, nullptr, 4);
  test::expectErrorContains(
      [&] {
        moeCombine(makeTensor({kSymbolic, 8}, DataType::Int32), d, nullptr,
                   tokens);
      },
      {"MoeCombine: expert_out", "must be floating point"});
  test::expectErrorContains(
      [&] {
        moeCombine(d.recv_x, d, nullptr,
                   makeSymbolicScalar(DataType::Double, "t"));
      },
      {"moeCombine: num_tokens", "must be an i64 scalar, got f64"});
  test::expectErrorContains(
      [&] {
        moeCombine(d.recv_x, d, makeTensor({6, 2}, DataType::Float),
                   makeConstant(int64_t{5}));
      },
      {"the token count of topk_weights (6) must equal num_tokens (5)"});
  test::expectErrorContains(
      [&] { moeCombine(d.recv_x, MoeDispatchResult{}, nullptr, tokens); },
      {"the layout must be one that moeDispatch returned"});
}

TEST_F(MoeIr, RecvWeightsWithoutTopkWeightsIsAnError) {
  TensorView* x = makeSymbolicTensor(2, DataType::Float);
  TensorView* idx = makeSymbolicTensor(2, DataType::Int64);
  auto rows = [] { return makeSymbolicTensor(1, DataType::Int64); };
  test::expectErrorContains(
      [&] {
        IrBuilder::create<MoeDispatch>(
            makeSymbolicTensor(2, DataType::Float), rows(), rows(), rows(),
            makeSymbolicTensor(1, DataType::Float), rows(), rows(), rows(),
            rows(), x, idx, nullptr, 4, MoeBackend::Collective);
      },
      {"recv_weights must be given exactly when topk_weights is"});
}

TEST_F(MoeIr, GroupedMatmulRejectsMismatchedWeights) {
  TensorView* x = makeTensor({kSymbolic, 8}, DataType::Float);
  TensorView* counts = makeTensor({2}, DataType::Int64);
  test::expectErrorContains(
      [&] {
        groupedMatmul(x, makeTensor({2, 8, 4}, DataType::BFloat16), counts);
      },
      {"GroupedMatmul: weights", "must have x's dtype f32"});
  test::expectErrorContains(
      [&] {
        groupedMatmul(x, makeTensor({2, 7, 4}, DataType::Float), counts);
      },
      {"dim 1 of weights (7) must equal the width H of x (8)"});
  test::expectErrorContains(
      [&] {
        groupedMatmul(x, makeTensor({3, 8, 4}, DataType::Float), counts);
      },
      {"the length of group_counts (2) must equal the groups of weights (3)"});
}

TEST_F(MoeIr, GroupedMatmulMultipliesEachGroupByItsWeights) {
  TensorView* x = makeTensor({kSymbolic, 8}, DataType::Float, "x");
  TensorView* w = makeTensor({3, 8, 4}, DataType::Float, "w");
  TensorView* counts = makeTensor({3}, DataType::Int64, "counts");
  program_->addInput(x);
  program_->addInput(w);
  program_->addInput(counts);
  program_->addOutput(groupedMatmul(x, w, counts));
  HostIrEvaluator evaluator(std::move(program_));
  const at::Tensor xv = test::randomTensor({7, 8}, at::kFloat, at::kCPU, 1);
  const at::Tensor wv = test::randomTensor({3, 8, 4}, at::kFloat, at::kCPU, 2);
  const at::Tensor out =
      evaluator.run({xv, wv, at::tensor({2, 0, 5}, at::kLong)})[0];
  const at::Tensor expected = at::cat({at::matmul(xv.narrow(0, 0, 2), wv[0]),
                                       at::matmul(xv.narrow(0, 2, 5), wv[2])});
  test::expectClose(out, expected, 1e-6, 1e-6);
  // Counts may cover fewer rows than x has (a cuda-backend dispatch returns
  // C rows): the rest of out is zero.
  const at::Tensor fewer =
      evaluator.run({xv, wv, at::tensor({2, 0, 4}, at::kLong)})[0];
  test::expectClose(fewer.narrow(0, 0, 6), expected.narrow(0, 0, 6), 1e-6,
                    1e-6);
  test::expectClose(fewer.narrow(0, 6, 1), at::zeros({1, 4}, at::kFloat));
  test::expectErrorContains(
      [&] {
        evaluator.run({xv, wv, at::tensor({2, 0, 6}, at::kLong)});
      },
      {"does not fit the 7 rows of x", "group 2 has 6 rows at offset 2"});
  test::expectErrorContains(
      [&] {
        evaluator.run({xv, wv, at::tensor({2, -1, 3}, at::kLong)});
      },
      {"group 1 has -1 rows"});
}

TEST_F(MoeIr, GroupedMatmulLeavesRowsPastTheCountsAsPadding) {
  // The cuda MoE backend's capacity rows: only the first sum(counts) rows
  // are valid; the host path writes zeros past them.
  TensorView* x = makeTensor({kSymbolic, 8}, DataType::Float, "x");
  TensorView* w = makeTensor({2, 8, 4}, DataType::Float, "w");
  TensorView* counts = makeTensor({2}, DataType::Int64, "counts");
  program_->addInput(x);
  program_->addInput(w);
  program_->addInput(counts);
  program_->addOutput(groupedMatmul(x, w, counts));
  HostIrEvaluator evaluator(std::move(program_));
  const at::Tensor xv = test::randomTensor({9, 8}, at::kFloat, at::kCPU, 3);
  const at::Tensor wv = test::randomTensor({2, 8, 4}, at::kFloat, at::kCPU, 4);
  const at::Tensor out =
      evaluator.run({xv, wv, at::tensor({3, 2}, at::kLong)})[0];
  test::expectClose(out.narrow(0, 0, 3), at::matmul(xv.narrow(0, 0, 3), wv[0]),
                    1e-6, 1e-6);
  test::expectClose(out.narrow(0, 3, 2), at::matmul(xv.narrow(0, 3, 2), wv[1]),
                    1e-6, 1e-6);
  test::expectClose(out.narrow(0, 5, 4), at::zeros({4, 4}));
}

// The silu-mul epilogue: printed, its output N / 2 wide, refused for an
// odd or unknown N; on the host the same bits as the product followed by
// the layer's activation fusion (makeSiluMulFusion) on its halves, padding
// rows included.
TEST_F(MoeIr, GroupedMatmulSiluMulEpilogueIsTheProductThenTheFusion) {
  TensorView* x = makeTensor({kSymbolic, 16}, DataType::BFloat16, "x");
  TensorView* w = makeTensor({3, 16, 12}, DataType::BFloat16, "w");
  TensorView* counts = makeTensor({3}, DataType::Int64, "counts");
  program_->addInput(x);
  program_->addInput(w);
  program_->addInput(counts);
  TensorView* act =
      groupedMatmul(x, w, counts, nullptr, GroupedMatmulEpilogue::SiluMul);
  EXPECT_EQ(act->extent(1)->constantInt(), 6);
  EXPECT_NE(act->definition()->toString().find(", epilogue=silu_mul)"),
            std::string::npos)
      << act->definition()->toString();
  TensorView* product = groupedMatmul(x, w, counts);
  EXPECT_EQ(product->definition()->toString().find("epilogue"),
            std::string::npos);
  TensorView* fused =
      runFusion(makeSiluMulFusion(6, DataType::BFloat16),
                {narrow(product, 1, 0, 6), narrow(product, 1, 6, 6)})
          .at(0);
  program_->addOutput(act);
  program_->addOutput(fused);
  HostIrEvaluator evaluator(std::move(program_));
  const at::Tensor xv = test::randomTensor({9, 16}, at::kBFloat16, at::kCPU, 5);
  const at::Tensor wv =
      test::randomTensor({3, 16, 12}, at::kBFloat16, at::kCPU, 6);
  const std::vector<at::Tensor> out =
      evaluator.run({xv, wv, at::tensor({2, 0, 5}, at::kLong)});
  ASSERT_EQ(out[0].sizes(), (std::vector<int64_t>{9, 6}));
  EXPECT_EQ(out[0].scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(out[0], out[1]));
  // And close to the whole computation in fp32 (group 0: rows 0-1, group
  // 2: rows 2-6).
  const at::Tensor full = at::cat(
      {at::matmul(xv.narrow(0, 0, 2).to(at::kFloat), wv[0].to(at::kFloat)),
       at::matmul(xv.narrow(0, 2, 5).to(at::kFloat), wv[2].to(at::kFloat))});
  test::expectClose(out[0].narrow(0, 0, 7).to(at::kFloat),
                    at::silu(full.narrow(1, 0, 6)) * full.narrow(1, 6, 6), 3e-2,
                    3e-2);
}

TEST_F(MoeIr, GroupedMatmulSiluMulEpilogueNeedsAnEvenKnownWidth) {
  TensorView* x = makeTensor({kSymbolic, 16}, DataType::BFloat16, "x");
  TensorView* counts = makeTensor({3}, DataType::Int64, "counts");
  test::expectErrorContains(
      [&] {
        groupedMatmul(x, makeTensor({3, 16, 11}, DataType::BFloat16), counts,
                      nullptr, GroupedMatmulEpilogue::SiluMul);
      },
      {"epilogue=silu_mul needs weights whose N", "known even number",
       "[3, 16, 11]"});
  test::expectErrorContains(
      [&] {
        groupedMatmul(x, makeTensor({3, 16, kSymbolic}, DataType::BFloat16),
                      counts, nullptr, GroupedMatmulEpilogue::SiluMul);
      },
      {"known even number"});
  EXPECT_EQ(parseGroupedMatmulEpilogue("silu_mul"),
            GroupedMatmulEpilogue::SiluMul);
  EXPECT_EQ(parseGroupedMatmulEpilogue("none"), GroupedMatmulEpilogue::None);
  EXPECT_FALSE(parseGroupedMatmulEpilogue("gelu").has_value());
  EXPECT_STREQ(toString(GroupedMatmulEpilogue::SiluMul), "silu_mul");
}

// The device path's group ends (GPU only): the kernel against the running
// sum of the clamped counts, worked out on the host in 128-bit integers,
// for group counts around the warp's 32 and counts that are negative,
// past the rows or at the largest i64.
TEST(GroupEndsKernel, MatchesTheClampedRunningSum) {
  const at::Device gpu(at::kCUDA, 0);
  HF_SKIP_IF_UNAVAILABLE(gpu);
  const cuda::DeviceScope scope(0);
  uint64_t state = 17;  // a fixed-seed linear congruential generator
  for (const int64_t groups : {1, 8, 31, 32, 33, 64, 100, 1023}) {
    for (const int64_t rows : {0, 1, 1000, 4096, 0x7fffffff}) {
      SCOPED_TRACE("groups=" + std::to_string(groups) +
                   " rows=" + std::to_string(rows));
      // Counts in [-3, 300), every 7th the largest i64, every 11th the
      // rows.
      at::Tensor counts = at::empty({groups}, at::kLong);
      for (int64_t g = 0; g < groups; ++g) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        counts[g] = g % 7 == 6 ? std::numeric_limits<int64_t>::max()
                    : g % 11 == 10
                        ? rows
                        : static_cast<int64_t>(state >> 33) % 303 - 3;
      }
      const at::Tensor device_counts = counts.to(gpu);
      at::Tensor ends =
          at::full({groups}, -1, device_counts.options().dtype(at::kInt));
      ASSERT_EQ(kernels::launchGroupEnds(
                    device_counts.const_data_ptr<int64_t>(), groups, rows,
                    ends.mutable_data_ptr<int32_t>(), cuda::currentStream(0)),
                cudaSuccess);
      const at::Tensor got = ends.cpu();
      __int128 sum = 0;
      for (int64_t g = 0; g < groups; ++g) {
        sum += std::max<int64_t>(counts[g].item<int64_t>(), 0);
        const auto expected = static_cast<int64_t>(
            std::min<__int128>(sum, static_cast<__int128>(rows)));
        ASSERT_EQ(got[g].item<int32_t>(), expected) << "group " << g;
      }
    }
  }
  // Arguments the kernel cannot take.
  EXPECT_EQ(kernels::launchGroupEnds(nullptr, 4, int64_t{1} << 31, nullptr,
                                     cuda::currentStream(0)),
            cudaErrorInvalidValue);
  EXPECT_EQ(
      kernels::launchGroupEnds(nullptr, -1, 8, nullptr, cuda::currentStream(0)),
      cudaErrorInvalidValue);
}

// The silu-mul epilogue after at::_grouped_mm: silu(gate) * up of the
// product's halves on the rows up to the last group end (clamped to the
// rows), against an fp32 reference on the CPU (expf may differ by an ulp
// there, so within one bf16 rounding); the other rows keep what they held.
TEST(SiluMulHalvesKernel, WritesTheCountedRowsOnly) {
  const at::Device gpu(at::kCUDA, 0);
  HF_SKIP_IF_UNAVAILABLE(gpu);
  const cuda::DeviceScope scope(0);
  at::manual_seed(23);
  // 4096 rows of 2048: more quads than the grid has threads, so threads
  // take several steps.
  for (const int64_t half : {4, 192, 2048}) {
    for (const int64_t rows : {0, 1, 77, 1000, 4096}) {
      for (const int32_t last_end : {-5, 0, 1, 40, 1000, 5000}) {
        SCOPED_TRACE("half=" + std::to_string(half) +
                     " rows=" + std::to_string(rows) +
                     " last end=" + std::to_string(last_end));
        const at::Tensor product =
            (at::randn({rows, 2 * half}) * 6).to(at::kBFloat16).to(gpu);
        const at::Tensor ends =
            at::tensor(std::vector<int32_t>{0, last_end / 2, last_end},
                       at::TensorOptions(at::kInt))
                .to(gpu);
        at::Tensor out = at::full({rows, half}, NAN, product.options());
        ASSERT_EQ(kernels::launchSiluMulHalves(
                      product.const_data_ptr(), rows, half,
                      ends.const_data_ptr<int32_t>(), 3, out.mutable_data_ptr(),
                      cuda::currentStream(0)),
                  cudaSuccess);
        const int64_t counted = std::clamp<int64_t>(last_end, 0, rows);
        const at::Tensor got = out.cpu().to(at::kFloat);
        const at::Tensor p = product.cpu().to(at::kFloat);
        const at::Tensor gate = p.narrow(1, 0, half);
        const at::Tensor expected =
            (gate / (1 + at::exp(-gate)) * p.narrow(1, half, half))
                .to(at::kBFloat16)
                .to(at::kFloat);
        test::expectClose(got.narrow(0, 0, counted),
                          expected.narrow(0, 0, counted), 1e-2, 1e-2);
        EXPECT_TRUE(
            got.narrow(0, counted, rows - counted).isnan().all().item<bool>());
      }
    }
  }
  // Every row without ends.
  const at::Tensor product =
      at::ones({3, 8}, at::TensorOptions(at::kBFloat16).device(gpu));
  at::Tensor out = at::full({3, 4}, NAN, product.options());
  ASSERT_EQ(kernels::launchSiluMulHalves(product.const_data_ptr(), 3, 4,
                                         nullptr, 0, out.mutable_data_ptr(),
                                         cuda::currentStream(0)),
            cudaSuccess);
  EXPECT_TRUE(at::allclose(out.cpu().to(at::kFloat),
                           at::full({3, 4}, 1 / (1 + std::exp(-1.0)))
                               .to(at::kBFloat16)
                               .to(at::kFloat)));
  // Arguments the kernel cannot take: a width not a multiple of 4, ends
  // without groups, rows not 8-byte aligned.
  const cudaStream_t stream = cuda::currentStream(0);
  EXPECT_EQ(
      kernels::launchSiluMulHalves(product.const_data_ptr(), 3, 6, nullptr, 0,
                                   out.mutable_data_ptr(), stream),
      cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launchSiluMulHalves(
                product.const_data_ptr(), 3, 4,
                reinterpret_cast<const int32_t*>(out.const_data_ptr()), 0,
                out.mutable_data_ptr(), stream),
            cudaErrorInvalidValue);
  EXPECT_EQ(kernels::launchSiluMulHalves(
                static_cast<const char*>(product.const_data_ptr()) + 2, 2, 4,
                nullptr, 0, out.mutable_data_ptr(), stream),
            cudaErrorInvalidValue);
  EXPECT_EQ(
      kernels::launchSiluMulHalves(product.const_data_ptr(), -1, 4, nullptr, 0,
                                   out.mutable_data_ptr(), stream),
      cudaErrorInvalidValue);
}

namespace {

// The rows of each group as GroupedMatmul defines them (clamped counts,
// cut at x's rows), worked out on the host: [begin, end) per group.
std::vector<std::pair<int64_t, int64_t>> groupRows(
    const std::vector<int64_t>& counts, int64_t rows) {
  std::vector<std::pair<int64_t, int64_t>> result;
  __int128 sum = 0;
  for (const int64_t count : counts) {
    const auto begin = static_cast<int64_t>(std::min<__int128>(sum, rows));
    sum += std::max<int64_t>(count, 0);
    result.emplace_back(begin,
                        static_cast<int64_t>(std::min<__int128>(sum, rows)));
  }
  return result;
}

// x [rows, k] and weights [groups, n, k] (K-major) in bf16, from fixed
// seeds, scaled so that the products are of order 1.
std::pair<at::Tensor, at::Tensor> gemmOperands(int64_t rows, int64_t n,
                                               int64_t k, int64_t groups,
                                               uint64_t seed) {
  const at::Device gpu(at::kCUDA, 0);
  return {test::randomTensor({rows, k}, at::kBFloat16, gpu, seed),
          (test::randomTensor({groups, n, k}, at::kFloat, gpu, seed + 1) /
           std::sqrt(static_cast<double>(k)))
              .to(at::kBFloat16)};
}

// Each group's rows of `out` against fp32 matmuls of the same bf16 values
// (bf16 rounding of the output apart).
void expectGroupProducts(const at::Tensor& out, const at::Tensor& x,
                         const at::Tensor& w_nk,
                         const std::vector<int64_t>& counts) {
  const auto groups = groupRows(counts, x.size(0));
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto [begin, end] = groups[g];
    if (end > begin) {
      SCOPED_TRACE("group " + std::to_string(g));
      test::expectClose(
          out.narrow(0, begin, end - begin).to(at::kFloat),
          at::matmul(x.narrow(0, begin, end - begin).to(at::kFloat),
                     w_nk[static_cast<int64_t>(g)].to(at::kFloat).t()),
          1e-2, 1e-2);
    }
  }
}

bool ownGroupedGemmRunsHere() {
  return !test::deviceUnavailable(at::Device(at::kCUDA, 0)) &&
         cuda::computeCapability(0) == std::make_pair(9, 0);
}

// A quiet-NaN bit pattern that no product of the tests' values has.
constexpr int16_t kUnwritten = 0x7FC1;

// Runs hostfuse's grouped GEMM on x [rows, k], w [groups, n, k] and
// `counts` (with `epilogue`, and `sms` for its tile choice) into an output
// of `columns` + `extra_columns` columns that holds kUnwritten before the
// call; checks that the rows past the last group and the extra columns
// still hold it, and returns the first `columns` columns.
at::Tensor runGroupedGemmKernel(const at::Tensor& x, const at::Tensor& w,
                                const std::vector<int64_t>& counts,
                                int64_t columns, int64_t extra_columns,
                                kernels::GroupedGemmEpilogue epilogue,
                                int sms) {
  const int64_t rows = x.size(0);
  const at::Tensor device_counts = at::tensor(counts, at::kLong).to(x.device());
  const int64_t stride = columns + extra_columns;
  at::Tensor out =
      at::full({rows, stride}, kUnwritten, x.options().dtype(at::kShort))
          .view(at::kBFloat16);
  kernels::GroupedGemmProblem problem;
  problem.x = x.const_data_ptr();
  problem.w = w.const_data_ptr();
  problem.counts = device_counts.const_data_ptr<int64_t>();
  problem.out = out.mutable_data_ptr();
  problem.rows = rows;
  problem.n = w.size(1);
  problem.k = w.size(2);
  problem.groups = w.size(0);
  problem.out_stride = stride;
  problem.epilogue = epilogue;
  EXPECT_STREQ(kernels::groupedGemmUnsupported(problem), "");
  EXPECT_EQ(kernels::launchGroupedGemm(problem, sms,
                                       driver::api().cuTensorMapEncodeTiled,
                                       cuda::currentStream(0)),
            cudaSuccess);
  const at::Tensor bits = out.view(at::kShort).cpu();  // waits for it
  const int64_t written = groupRows(counts, rows).back().second;
  EXPECT_TRUE(
      bits.narrow(0, written, rows - written).eq(kUnwritten).all().item<bool>())
      << "rows past the last group were written";
  if (extra_columns > 0) {
    EXPECT_TRUE(bits.narrow(1, columns, extra_columns)
                    .eq(kUnwritten)
                    .all()
                    .item<bool>())
        << "columns past the output's were written";
  }
  return out.narrow(1, 0, columns);
}

// A problem the kernel refuses for the field the test changes: otherwise
// valid, with aligned addresses that are never read.
kernels::GroupedGemmProblem refusedProblem() {
  kernels::GroupedGemmProblem problem;
  problem.x = problem.w = problem.out = reinterpret_cast<void*>(uintptr_t{256});
  problem.counts = reinterpret_cast<const int64_t*>(uintptr_t{256});
  problem.rows = 8;
  problem.n = 64;
  problem.k = 64;
  problem.groups = 2;
  problem.out_stride = 64;
  return problem;
}

}  // namespace

// hostfuse's sm_90a grouped GEMM (compute capability 9.0 only): every
// group's rows against fp32 matmuls, for counts that are irregular,
// negative, empty, past the rows or the largest i64, K not a multiple of
// the 64-wide K step, N not a multiple of any tile width, up to 256
// groups; and every row and column it must not write (rows past the last
// group, the columns past n of a wider output) keeps its NaN pattern.
TEST(GroupedGemmKernel, MatchesPerGroupMatmulsAndWritesNothingElse) {
  if (!ownGroupedGemmRunsHere()) {
    GTEST_SKIP() << "needs a GPU of compute capability 9.0";
  }
  const cuda::DeviceScope scope(0);
  const auto encode = driver::api().cuTensorMapEncodeTiled;
  ASSERT_NE(encode, nullptr);
  struct Case {
    int64_t rows, n, k;
    std::vector<int64_t> counts;
    int64_t extra_columns;
  };
  std::vector<Case> cases = {
      {256, 256, 64, {128, 128}, 0},
      {700, 136, 200, {0, 1, 200, -3, 300, 77}, 8},
      {300, 520, 128, {100, 500, 50}, 0},
      {64, 1000, 8, {std::numeric_limits<int64_t>::max(), 5}, 16},
      {1024, 4096, 1024, {128, 128, 128, 128, 128, 128, 128, 128}, 0},
      {1500, 7168, 256, {700, 20, 0, 300, 129, 127, 1, 200}, 0},
      // Groups of 9 and 11 row tiles: a full band of 8 and a partial one.
      {2500, 264, 72, {1100, 1300, 0, 90}, 8},
  };
  // 33 and 256 groups with counts in [-3, 40) from a fixed-seed generator.
  uint64_t state = 5;
  for (const int64_t groups : {33, 256}) {
    std::vector<int64_t> counts;
    int64_t sum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      counts.push_back(static_cast<int64_t>(state >> 33) % 43 - 3);
      sum += std::max<int64_t>(counts.back(), 0);
    }
    cases.push_back({sum + 5, 96, 96, counts, 0});
  }
  uint64_t seed = 100;
  for (const Case& c : cases) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) +
                 " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
                 " groups=" + std::to_string(c.counts.size()));
    const auto groups = static_cast<int64_t>(c.counts.size());
    const auto [x, w] = gemmOperands(c.rows, c.n, c.k, groups, seed += 2);
    const at::Tensor out = runGroupedGemmKernel(
        x, w, c.counts, c.n, c.extra_columns,
        kernels::GroupedGemmEpilogue::kNone, cuda::multiprocessorCount(0));
    expectGroupProducts(out, x, w, c.counts);
  }
  // Problems the kernel refuses, naming why; the launch refuses them too.
  kernels::GroupedGemmProblem bad = refusedProblem();
  bad.k = 60;
  EXPECT_NE(std::string(kernels::groupedGemmUnsupported(bad)).find("k must"),
            std::string::npos);
  EXPECT_EQ(kernels::launchGroupedGemm(bad, 132, encode, nullptr),
            cudaErrorInvalidValue);
  bad.k = 64;
  bad.groups = 257;
  EXPECT_NE(
      std::string(kernels::groupedGemmUnsupported(bad)).find("groups must"),
      std::string::npos);
  bad.groups = 2;
  bad.out = reinterpret_cast<void*>(uintptr_t{258});
  EXPECT_NE(
      std::string(kernels::groupedGemmUnsupported(bad)).find("16-byte aligned"),
      std::string::npos);
}

// The kernel's silu-mul epilogue (compute capability 9.0 only): each
// group's rows against silu(gate) * up of fp32 matmuls, gate and up rounded
// to bf16 first, for output widths that fill tiles or end inside one, with
// each tile width (the `sms` given decide it under launchGroupedGemm's
// cost rule: the width noted per case; sms = 1 runs every tile in one
// block), and the rows and columns it must not write keep their NaN
// pattern.
TEST(GroupedGemmKernel, SiluMulEpilogueMatchesTheActivatedProducts) {
  if (!ownGroupedGemmRunsHere()) {
    GTEST_SKIP() << "needs a GPU of compute capability 9.0";
  }
  const cuda::DeviceScope scope(0);
  ASSERT_NE(driver::api().cuTensorMapEncodeTiled, nullptr);
  const int all_sms = cuda::multiprocessorCount(0);
  struct Case {
    int64_t rows, intermediate, k;
    std::vector<int64_t> counts;
    int64_t extra_columns;
    int sms;
  };
  const std::vector<Case> cases = {
      // 128 wide (on any GPU of 4 SMs or more).
      {256, 128, 64, {128, 128}, 0, all_sms},
      // 224, every output tile full.
      {700, 112, 200, {0, 1, 200, -3, 300, 77}, 8, 1},
      // 128, the last output tile 8 of 64 columns wide.
      {300, 136, 72, {100, 500, 50}, 16, 3},
      // 256: the layer's first GEMM at T = 128 on one rank (K shortened).
      {1024, 2048, 512, {128, 128, 128, 128, 128, 128, 128, 128}, 0, 132},
      // 224: I = 3584, 8 row tiles on 132 SMs.
      {1000, 3584, 128, {300, 200, 0, 500}, 0, 132},
      // 128, groups of 9 and 11 row tiles (partial bands).
      {2500, 104, 64, {1100, 1300, 0, 90}, 8, all_sms},
      // 256 with a partial last tile (240 = 128 + 112 columns): its gate
      // box reads up rows and its up box the next group's rows or past
      // the weights (zeros).
      {128, 240, 64, {50, 78}, 8, 1},
      // 224 with a partial last tile (200 = 112 + 88 columns).
      {128, 200, 64, {60, 68}, 0, 1},
  };
  uint64_t seed = 300;
  for (const Case& c : cases) {
    SCOPED_TRACE("rows=" + std::to_string(c.rows) +
                 " I=" + std::to_string(c.intermediate) +
                 " k=" + std::to_string(c.k) + " sms=" + std::to_string(c.sms));
    const int64_t n = 2 * c.intermediate;
    const auto groups = static_cast<int64_t>(c.counts.size());
    const auto [x, w] = gemmOperands(c.rows, n, c.k, groups, seed += 2);
    const at::Tensor out =
        runGroupedGemmKernel(x, w, c.counts, c.intermediate, c.extra_columns,
                             kernels::GroupedGemmEpilogue::kSiluMul, c.sms);
    const auto rows = groupRows(c.counts, c.rows);
    for (size_t g = 0; g < rows.size(); ++g) {
      const auto [begin, end] = rows[g];
      if (end == begin) {
        continue;
      }
      SCOPED_TRACE("group " + std::to_string(g));
      const at::Tensor product =
          at::matmul(x.narrow(0, begin, end - begin).to(at::kFloat),
                     w[static_cast<int64_t>(g)].to(at::kFloat).t());
      auto rounded = [&](int64_t start) {
        return product.narrow(1, start, c.intermediate)
            .to(at::kBFloat16)
            .to(at::kFloat);
      };
      test::expectClose(out.narrow(0, begin, end - begin).to(at::kFloat),
                        at::silu(rounded(0)) * rounded(c.intermediate), 2e-2,
                        2e-2);
    }
  }
  // The epilogue needs n a multiple of 16 and a stride of n / 2.
  kernels::GroupedGemmProblem bad = refusedProblem();
  bad.n = 72;
  bad.out_stride = 40;
  bad.epilogue = kernels::GroupedGemmEpilogue::kSiluMul;
  EXPECT_NE(std::string(kernels::groupedGemmUnsupported(bad))
                .find("multiple of 16 (silu-mul epilogue)"),
            std::string::npos);
  bad.n = 64;
  bad.out_stride = 24;
  EXPECT_NE(std::string(kernels::groupedGemmUnsupported(bad)).find(">= n / 2"),
            std::string::npos);
  bad.out_stride = 32;
  EXPECT_STREQ(kernels::groupedGemmUnsupported(bad), "");
}

// GroupedMatmul on K-major bf16 weights on the GPU: hostfuse's kernel (on
// compute capability 9.0) and at::_grouped_mm (HOSTFUSE_TORCH_GROUPED_GEMM=1)
// both give each group's products; with the silu-mul epilogue (in the
// kernel, or launchSiluMulHalves after _grouped_mm, bit for bit there)
// both give what the layer's activation fusion makes of the product, on
// the rows the counts cover.
TEST_F(MoeIr, GroupedMatmulOnKMajorWeightsMatchesOnEitherKernel) {
  const at::Device gpu(at::kCUDA, 0);
  HF_SKIP_IF_UNAVAILABLE(gpu);
  if (!groupedMatmulRunsOnDevice(at::kBFloat16, gpu, 512, 384, 4)) {
    GTEST_SKIP() << "GroupedMatmul has no device path on this GPU";
  }
  TensorView* x = makeTensor({kSymbolic, 512}, DataType::BFloat16, "x");
  TensorView* w = makeTensor({4, 512, 384}, DataType::BFloat16, "w");
  TensorView* counts = makeTensor({4}, DataType::Int64, "counts");
  program_->addInput(x);
  program_->addInput(w);
  program_->addInput(counts);
  TensorView* product = groupedMatmul(x, w, counts);
  program_->addOutput(product);
  program_->addOutput(
      groupedMatmul(x, w, counts, nullptr, GroupedMatmulEpilogue::SiluMul));
  program_->addOutput(
      runFusion(makeSiluMulFusion(192, DataType::BFloat16),
                {narrow(product, 1, 0, 192), narrow(product, 1, 192, 192)},
                counts)
          .at(0));
  HostIrEvaluator evaluator(std::move(program_));
  const std::vector<int64_t> count_values = {100, 0, 300, 57};
  const auto [xv, w_nk] = gemmOperands(500, 384, 512, 4, 40);
  const at::Tensor k_major = w_nk.transpose(1, 2);  // [4, 512, 384] view
  const at::Tensor cv = at::tensor(count_values, at::kLong).to(gpu);
  for (const char* torch_gemm : {"0", "1"}) {
    SCOPED_TRACE(std::string("HOSTFUSE_TORCH_GROUPED_GEMM=") + torch_gemm);
    const test::ScopedEnvironment env("HOSTFUSE_TORCH_GROUPED_GEMM",
                                      torch_gemm);
    // On compute capability 9.0 the first pass runs hostfuse's kernel.
    EXPECT_EQ(groupedMatmulUsesOwnKernel(k_major),
              ownGroupedGemmRunsHere() && std::string(torch_gemm) == "0");
    const std::vector<at::Tensor> out = evaluator.run({xv, k_major, cv});
    expectGroupProducts(out[0], xv, w_nk, count_values);
    ASSERT_EQ(out[1].sizes(), (std::vector<int64_t>{500, 192}));
    // 457 rows hold tokens; the rest are padding.
    test::expectClose(out[1].narrow(0, 0, 457).to(at::kFloat),
                      out[2].narrow(0, 0, 457).to(at::kFloat), 1e-2, 1e-2);
    if (std::string(torch_gemm) == "1") {
      // After _grouped_mm the epilogue reads the same product the fusion
      // reads, and rounds as it does: the same bits.
      EXPECT_TRUE(
          at::equal(out[1].narrow(0, 0, 457), out[2].narrow(0, 0, 457)));
    }
  }
}

TEST_F(MoeIr, GroupedMatmulSaysWhichOperandsRunOnTheDevice) {
  std::string why;
  EXPECT_FALSE(
      groupedMatmulRunsOnDevice(at::kBFloat16, at::kCPU, 64, 64, 4, &why));
  EXPECT_NE(why.find("runs on cpu"), std::string::npos) << why;
  const at::Device gpu(at::kCUDA, 0);
  EXPECT_FALSE(groupedMatmulRunsOnDevice(at::kFloat, gpu, 64, 64, 4, &why));
  EXPECT_NE(why.find("not bf16"), std::string::npos) << why;
  EXPECT_FALSE(groupedMatmulRunsOnDevice(at::kBFloat16, gpu, 60, 64, 4, &why));
  EXPECT_NE(why.find("H = 60 is not a multiple of 8"), std::string::npos)
      << why;
  EXPECT_FALSE(groupedMatmulRunsOnDevice(at::kBFloat16, gpu, 64, 12, 4, &why));
  EXPECT_NE(why.find("N = 12"), std::string::npos) << why;
  EXPECT_FALSE(
      groupedMatmulRunsOnDevice(at::kBFloat16, gpu, 64, 64, 1024, &why));
  EXPECT_NE(why.find("1024 groups"), std::string::npos) << why;
}

TEST_F(MoeIr, DequantizeFp8PrintsChecksAndMatchesTheFormula) {
  TensorView* x = makeTensor({kSymbolic, 256}, DataType::Float8E4M3, "x");
  TensorView* scales = makeTensor({kSymbolic, 2}, DataType::Float, "scales");
  program_->addInput(x);
  program_->addInput(scales);
  TensorView* out = dequantizeFp8(x, scales, DataType::BFloat16);
  program_->addOutput(out);
  EXPECT_NE(program_->toString().find(out->toString() + " = dequantize_fp8(" +
                                      x->toString() +
                                      ", scales=" + scales->toString() + ")"),
            std::string::npos)
      << program_->toString();
  test::expectErrorContains(
      [&] { dequantizeFp8(scales, scales, DataType::BFloat16); },
      {"DequantizeFp8: x", "must be f8e4m3"});
  test::expectErrorContains(
      [&] {
        dequantizeFp8(x, makeTensor({kSymbolic, 2}, DataType::BFloat16),
                      DataType::BFloat16);
      },
      {"scales", "f32"});
  test::expectErrorContains(
      [&] {
        dequantizeFp8(x, makeTensor({kSymbolic, 3}, DataType::Float),
                      DataType::BFloat16);
      },
      {"the width 256", "not a multiple of the 3 scales per row"});
  test::expectErrorContains([&] { dequantizeFp8(x, scales, DataType::Int64); },
                            {"out", "floating"});

  // The function itself names what is wrong with its tensors.
  const at::Tensor fp8_rows =
      at::zeros({2, 256}, at::TensorOptions().dtype(at::kFloat8_e4m3fn));
  test::expectErrorContains(
      [] {
        dequantizeFp8Rows(at::zeros({2, 256}, at::kByte), at::ones({2, 2}),
                          at::kBFloat16);
      },
      {"the rows x must be a 2-D Float8_e4m3fn tensor, got Byte"});
  test::expectErrorContains(
      [&] {
        dequantizeFp8Rows(fp8_rows, at::ones({2, 2}, at::kDouble),
                          at::kBFloat16);
      },
      {"the scales (Double of sizes [2, 2]) must be f32"});
  test::expectErrorContains(
      [&] {
        dequantizeFp8Rows(fp8_rows, at::ones({2, 3}), at::kBFloat16);
      },
      {"one per row and block of channels of the rows x [2, 256]"});
  test::expectErrorContains(
      [&] {
        dequantizeFp8Rows(fp8_rows, at::ones({2, 2}), at::kInt);
      },
      {"the output dtype must be f64, f32, bf16 or f16, got Int"});

  HostIrEvaluator evaluator(std::move(program_));
  for (const at::Device& device : test::testDevices()) {
    if (test::deviceUnavailable(device)) {
      continue;
    }
    SCOPED_TRACE(device.str());
    at::Generator generator = at::detail::createCPUGenerator(7);
    at::Tensor codes = at::randint(0, 254, {5, 256}, generator,
                                   at::TensorOptions().dtype(at::kByte));
    codes += (codes >= 0x7f).to(at::kByte);  // no NaN codes
    const at::Tensor scale_values = at::rand({5, 2}, generator) + 0.5;
    const at::Tensor got = evaluator
                               .run({codes.view(at::kFloat8_e4m3fn).to(device),
                                     scale_values.to(device)})[0]
                               .cpu();
    const at::Tensor expected = (codes.view(at::kFloat8_e4m3fn).to(at::kFloat) *
                                 scale_values.repeat_interleave(128, 1))
                                    .to(at::kBFloat16);
    EXPECT_TRUE(at::equal(got, expected));
  }
}

// With fp8 dispatch, the layer dequantizes the received rows once, for
// both matmuls that read them.
TEST(MoeLayerProgram, Fp8RowsAreDequantizedOnce) {
  MoeLayerConfig config;
  config.hidden = 256;
  config.intermediate = 64;
  config.num_experts = 4;
  config.local_experts = 4;
  config.topk = 2;
  config.quantize = MoeDispatchQuant::Fp8E4M3;
  const std::string text = makeMoeLayerProgram(config)->toString();
  auto occurrences = [&](const std::string& what) {
    int count = 0;
    for (size_t at = text.find(what); at != std::string::npos;
         at = text.find(what, at + 1)) {
      ++count;
    }
    return count;
  };
  EXPECT_EQ(occurrences("dequantize_fp8("), 1) << text;
  EXPECT_EQ(occurrences("x_scales="), 0) << text;
  EXPECT_EQ(occurrences("GroupedMatmul("), 3) << text;
}

TEST(MoeLayerProgram, FastestModesDependOnGpusAndRanks) {
  struct Case {
    bool on_gpu;
    int64_t ranks;
    MoeCombineReduce reduce;
  };
  for (const Case& c : {Case{true, 4, MoeCombineReduce::PerRank},
                        Case{true, 2, MoeCombineReduce::PerRank},
                        Case{true, 1, MoeCombineReduce::PerPick},
                        Case{false, 4, MoeCombineReduce::PerPick}}) {
    SCOPED_TRACE(std::string(c.on_gpu ? "GPUs, " : "CPUs, ") +
                 std::to_string(c.ranks) + " ranks");
    MoeLayerConfig config;
    config.quantize = MoeDispatchQuant::Fp8E4M3;
    config.reduce = MoeCombineReduce::PerRank;
    useFastestModes(config, c.on_gpu, c.ranks);
    EXPECT_TRUE(config.fused_gate_up);
    EXPECT_EQ(config.fused_activation, c.on_gpu);
    EXPECT_EQ(config.reduce, c.reduce);
    // Quantization is the caller's choice: it changes the numbers.
    EXPECT_EQ(config.quantize, MoeDispatchQuant::Fp8E4M3);
  }
  MoeLayerConfig config;
  test::expectErrorContains([&] { useFastestModes(config, true, 0); },
                            {"ranks must be >= 1, got 0"});
}

TEST(MoeLayerProgram, ModeWordsOverrideTheFastestModes) {
  MoeLayerConfig config;
  // Every word "auto" (gate and up fused): the fastest modes.
  useMoeLayerModes(config, /*on_gpu=*/true, 2, MoeLayerModeWords{});
  EXPECT_TRUE(config.fused_gate_up);
  EXPECT_TRUE(config.fused_activation);
  EXPECT_EQ(config.reduce, MoeCombineReduce::PerRank);
  // Named modes win; the activation's "auto" follows gate and up.
  useMoeLayerModes(config, true, 2, {"per_pick", "separate", "auto"});
  EXPECT_FALSE(config.fused_gate_up);
  EXPECT_FALSE(config.fused_activation);
  EXPECT_EQ(config.reduce, MoeCombineReduce::PerPick);
  useMoeLayerModes(config, true, 1, {"per_rank", "fused", "fusion"});
  EXPECT_TRUE(config.fused_gate_up);
  EXPECT_FALSE(config.fused_activation);
  EXPECT_EQ(config.reduce, MoeCombineReduce::PerRank);
  useMoeLayerModes(config, /*on_gpu=*/false, 1, {"auto", "fused", "epilogue"});
  EXPECT_TRUE(config.fused_activation);
  EXPECT_EQ(config.reduce, MoeCombineReduce::PerPick);

  EXPECT_EQ(moeLayerModeWordsProblem({"auto", "separate", "epilogue"}),
            "--activation epilogue needs --gate-up fused");
  EXPECT_EQ(moeLayerModeWordsProblem({"per_token", "fused", "auto"}),
            "--reduce must be auto, per_pick or per_rank, got 'per_token'");
  EXPECT_EQ(moeLayerModeWordsProblem({"auto", "both", "auto"}),
            "--gate-up must be fused or separate, got 'both'");
  EXPECT_EQ(moeLayerModeWordsProblem({"auto", "fused", "silu"}),
            "--activation must be auto, fusion or epilogue, got 'silu'");
  const MoeLayerConfig before = config;
  test::expectErrorContains(
      [&] {
        useMoeLayerModes(config, true, 1, {"auto", "separate", "epilogue"});
      },
      {"useMoeLayerModes: --activation epilogue needs --gate-up fused"});
  EXPECT_EQ(config.fused_gate_up, before.fused_gate_up);
  EXPECT_EQ(config.fused_activation, before.fused_activation);
}

// The GPU path of dequantizeFp8Rows (one kernel, reading strided views in
// place) against the formula in plain ATen on the CPU: each product of an
// e4m3 value and its block's scale rounded to fp32, then to the dtype.
TEST(Fp8Rows, DequantizeOnTheGpuMatchesTheFormulaBitForBit) {
  const at::Device gpu(at::kCUDA, 0);
  HF_SKIP_IF_UNAVAILABLE(gpu);
  // Where the scales are: in each row after its H e4m3 values, as the cuda
  // backend's recv_scales (a strided view); a tensor of their own; one row
  // broadcast to all (row stride 0).
  enum class Scales { kPacked, kSeparate, kBroadcast };
  struct Case {
    int64_t rows, hidden, blocks, row_bytes, byte_offset;
    Scales scales;
  };
  // Packed as MoeDispatch's rows (one scale per 128 channels), one row,
  // a row stride that is no multiple of 8 (the one-channel path), block
  // widths and offsets that take the one-channel path, broadcast scales,
  // no rows.
  const Case cases[] = {{37, 512, 4, 512 + 16, 0, Scales::kPacked},
                        {5, 7168, 56, 7168 + 224, 0, Scales::kPacked},
                        {1, 256, 2, 256 + 8, 0, Scales::kPacked},
                        {6, 64, 1, 64 + 4, 0, Scales::kPacked},
                        {9, 12, 3, 12, 0, Scales::kSeparate},
                        {6, 64, 2, 72, 1, Scales::kSeparate},
                        {7, 256, 2, 256, 0, Scales::kBroadcast},
                        {0, 128, 1, 128, 0, Scales::kSeparate}};
  for (const Case& c : cases) {
    SCOPED_TRACE("rows " + std::to_string(c.rows) + ", H " +
                 std::to_string(c.hidden) + ", blocks " +
                 std::to_string(c.blocks) + ", row bytes " +
                 std::to_string(c.row_bytes) + ", offset " +
                 std::to_string(c.byte_offset) + ", scales mode " +
                 std::to_string(static_cast<int>(c.scales)));
    at::Generator generator = at::detail::createCPUGenerator(c.rows + c.hidden);
    // Every e4m3 code but the two NaNs (0x7f, 0xff), checked below.
    at::Tensor codes = at::randint(0, 254, {c.rows, c.hidden}, generator,
                                   at::TensorOptions().dtype(at::kByte));
    codes += (codes >= 0x7f).to(at::kByte);
    at::Tensor scales = at::rand({c.rows, c.blocks}, generator) * 3 + 1e-3;
    if (c.scales == Scales::kBroadcast) {
      scales = scales.narrow(0, 0, 1).expand({c.rows, c.blocks});
    }
    // The rows inside a wider byte buffer, as strided views.
    at::Tensor buffer = at::zeros({c.rows * c.row_bytes + c.byte_offset + 8},
                                  at::TensorOptions().dtype(at::kByte));
    at::Tensor rows_view = buffer.narrow(0, c.byte_offset, c.rows * c.row_bytes)
                               .view({c.rows, c.row_bytes});
    rows_view.narrow(1, 0, c.hidden).copy_(codes);
    if (c.scales == Scales::kPacked) {
      rows_view.narrow(1, c.hidden, 4 * c.blocks)
          .copy_(scales.contiguous().view(at::kByte));
    }
    const at::Tensor on_gpu = buffer.to(gpu);
    const at::Tensor gpu_rows =
        on_gpu.narrow(0, c.byte_offset, c.rows * c.row_bytes)
            .view({c.rows, c.row_bytes});
    const at::Tensor q =
        gpu_rows.narrow(1, 0, c.hidden).view(at::kFloat8_e4m3fn);
    const at::Tensor gpu_scales =
        c.scales == Scales::kPacked
            ? gpu_rows.narrow(1, c.hidden, 4 * c.blocks).view(at::kFloat)
        : c.scales == Scales::kBroadcast
            ? scales.narrow(0, 0, 1).to(gpu).expand({c.rows, c.blocks})
            : scales.to(gpu);
    if (c.rows > 1 && c.scales != Scales::kSeparate) {
      ASSERT_NE(gpu_scales.stride(0), c.blocks);  // not a dense copy
    }
    const at::Tensor expected_f32 =
        codes.view(at::kFloat8_e4m3fn).to(at::kFloat) *
        scales.repeat_interleave(c.hidden / c.blocks, 1);
    for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
      const at::Tensor got = dequantizeFp8Rows(q, gpu_scales, dtype).cpu();
      ASSERT_EQ(got.scalar_type(), dtype);
      ASSERT_EQ(got.sizes(), at::IntArrayRef({c.rows, c.hidden}));
      EXPECT_TRUE(at::equal(got, expected_f32.to(dtype)))
          << c10::toString(dtype) << ": max difference "
          << (c.rows > 0
                  ? (got.to(at::kFloat) - expected_f32.to(dtype).to(at::kFloat))
                        .abs()
                        .max()
                        .item<float>()
                  : 0.0f);
    }
  }
  // A NaN code stays NaN; the other values of its row are untouched.
  at::Tensor codes =
      at::full({2, 16}, 0x38, at::TensorOptions().dtype(at::kByte));
  codes[1][3] = 0x7f;
  const at::Tensor got =
      dequantizeFp8Rows(codes.to(gpu).view(at::kFloat8_e4m3fn),
                        at::full({2, 1}, 2.0f, at::TensorOptions().device(gpu)),
                        at::kBFloat16)
          .to(at::kFloat)
          .cpu();
  EXPECT_TRUE(std::isnan(got[1][3].item<float>()));
  EXPECT_EQ(got[1][4].item<float>(), 2.0f);  // 0x38 is 1.0
  EXPECT_EQ(got[0][3].item<float>(), 2.0f);
}

// With row counts (a dispatch's recv_expert_counts), the kernel writes the
// rows they cover, bit for bit as without them, and no other: the output
// is filled first, through the kernel's own entry point.
TEST(Fp8Rows, RowCountsLimitTheRowsTheKernelWrites) {
  const at::Device gpu(at::kCUDA, 0);
  HF_SKIP_IF_UNAVAILABLE(gpu);
  const int64_t rows = 300;
  const int64_t hidden = 256;
  at::Generator generator = at::detail::createCPUGenerator(5);
  at::Tensor codes = at::randint(0, 0x7f, {rows, hidden}, generator,
                                 at::TensorOptions().dtype(at::kByte));
  const at::Tensor q = codes.to(gpu).view(at::kFloat8_e4m3fn);
  const at::Tensor scales = (at::rand({rows, 2}, generator) + 0.5).to(gpu);
  const at::Tensor all = dequantizeFp8Rows(q, scales, at::kBFloat16).cpu();
  for (const std::vector<int64_t>& given :
       {std::vector<int64_t>{40, -3, 77}, {0}, {299, 5}, {}}) {
    SCOPED_TRACE("counts " + c10::str(given));
    int64_t covered = 0;
    for (const int64_t count : given) {
      covered = std::min(rows, covered + std::clamp<int64_t>(count, 0, rows));
    }
    const at::Tensor counts = at::tensor(given, at::kLong).to(gpu);
    at::Tensor out =
        at::full({rows, hidden}, 7.0,
                 at::TensorOptions().dtype(at::kBFloat16).device(gpu));
    ASSERT_EQ(kernels::launchDequantizeFp8Rows(
                  q.const_data_ptr(), hidden, scales.const_data_ptr<float>(), 2,
                  rows, hidden, 2, kernels::DequantOut::kBFloat16,
                  out.mutable_data_ptr(), cuda::currentStream(0),
                  counts.const_data_ptr<int64_t>(), counts.numel()),
              cudaSuccess);
    const at::Tensor got = out.cpu();
    EXPECT_TRUE(
        at::equal(got.narrow(0, 0, covered), all.narrow(0, 0, covered)));
    EXPECT_TRUE(at::equal(got.narrow(0, covered, rows - covered),
                          at::full({rows - covered, hidden}, 7.0,
                                   at::TensorOptions().dtype(at::kBFloat16))))
        << "rows past " << covered << " were written";
    // The op's entry point with the same counts: the counted rows.
    const at::Tensor op =
        dequantizeFp8Rows(q, scales, at::kBFloat16, counts).cpu();
    EXPECT_TRUE(at::equal(op.narrow(0, 0, covered), all.narrow(0, 0, covered)));
  }
  // Counts the kernel cannot take.
  EXPECT_EQ(kernels::launchDequantizeFp8Rows(
                q.const_data_ptr(), hidden, scales.const_data_ptr<float>(), 2,
                rows, hidden, 2, kernels::DequantOut::kBFloat16, nullptr,
                cuda::currentStream(0), nullptr, 3),
            cudaErrorInvalidValue);
}

// DequantizeFp8 with row_counts: printed, checked, and on the CPU every
// row computed.
TEST_F(MoeIr, DequantizeFp8TakesRowCounts) {
  TensorView* x = makeTensor({kSymbolic, 256}, DataType::Float8E4M3, "x");
  TensorView* scales = makeTensor({kSymbolic, 2}, DataType::Float, "scales");
  TensorView* counts = makeTensor({kSymbolic}, DataType::Int64, "counts");
  program_->addInput(x);
  program_->addInput(scales);
  program_->addInput(counts);
  TensorView* out = dequantizeFp8(x, scales, DataType::BFloat16, counts);
  program_->addOutput(out);
  EXPECT_EQ(out->definition()->toInlineString(),
            out->toString() + " = dequantize_fp8(" + x->toString() +
                ", scales=" + scales->toString() +
                ", row_counts=" + counts->toString() + ")");
  test::expectErrorContains(
      [&] {
        dequantizeFp8(x, scales, DataType::BFloat16,
                      makeTensor({4}, DataType::Int32, "i32"));
      },
      {"row_counts", "i64"});
  HostIrEvaluator evaluator(std::move(program_));
  const at::Tensor codes =
      at::full({3, 256}, 0x38, at::TensorOptions().dtype(at::kByte));
  const at::Tensor got =
      evaluator
          .run({codes.view(at::kFloat8_e4m3fn), at::full({3, 2}, 2.0f),
                at::tensor({1}, at::kLong)})
          .at(0);
  EXPECT_TRUE(at::equal(got, at::full({3, 256}, 2.0, at::kBFloat16)));
}

TEST_F(MoeIr, ClonedProgramPrintsTheSame) {
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 16}, DataType::Float, "x");
  TensorView* idx = makeTensor({tokens, 2}, DataType::Int64, "topk_idx");
  TensorView* w = makeTensor({tokens, 2}, DataType::Float, "topk_weights");
  program_->addInput(x);
  program_->addInput(idx);
  program_->addInput(w);
  const MoeDispatchResult d = moeDispatch(x, idx, w, 6);
  program_->addOutput(moeCombine(relu(d.recv_x), d, w, tokens));
  const std::unique_ptr<HostIrContainer> copy = program_->clone();
  EXPECT_EQ(copy->toString(), program_->toString());
  EXPECT_NE(program_->toString().find("MoeDispatch(x=T0"), std::string::npos)
      << program_->toString();
}

// ---------------------------------------------------------------------------
// A world of one rank: no launcher, an in-process store.

std::unique_ptr<HostIrContainer> roundTripProgram(int64_t picks, bool weighted,
                                                  MoeBackend backend) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  Scalar* tokens = makeSymbolicScalar(DataType::Int64, "tokens");
  TensorView* x = makeTensor({tokens, 16}, DataType::BFloat16, "x");
  TensorView* idx = makeTensor({tokens, picks}, DataType::Int64, "topk_idx");
  TensorView* w =
      weighted ? makeTensor({tokens, picks}, DataType::Float, "topk_weights")
               : nullptr;
  program->addInput(x);
  program->addInput(idx);
  if (w != nullptr) {
    program->addInput(w);
  }
  const MoeDispatchResult d = moeDispatch(x, idx, w, 4, backend);
  program->addOutput(moeCombine(d.recv_x, d, w, tokens));
  return program;
}

TEST(MoeWorldOfOne, RoundTripReturnsX) {
  ASSERT_EQ(Communicator::getInstance().size(), 1);
  const at::Tensor x = test::randomTensor({9, 16}, at::kBFloat16, at::kCPU, 3);
  // K = 1, no weights: exactly x.
  HostIrEvaluator top_one(roundTripProgram(1, false, MoeBackend::Collective));
  const at::Tensor idx =
      at::tensor({0, 3, 1, 2, 2, 0, 1, 3, 0}, at::kLong).reshape({9, 1});
  test::expectClose(top_one.run({x, idx})[0], x);
  // K = 2 with weights that sum to 1: x up to rounding.
  HostIrEvaluator top_two(roundTripProgram(2, true, MoeBackend::Collective));
  const at::Tensor idx2 =
      at::stack({idx.squeeze(1), (idx.squeeze(1) + 1) % 4}, 1);
  const at::Tensor w = at::full({9, 2}, 0.5, at::kFloat);
  test::expectClose(top_two.run({x, idx2, w})[0], x, 1e-2, 1e-2);
}

TEST(MoeWorldOfOne, NoPicksSendNothingAndCombineToZero) {
  auto program = std::make_unique<HostIrContainer>();
  {
    FusionGuard guard(program.get());
    TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
    TensorView* idx = makeSymbolicTensor(2, DataType::Int64, "topk_idx");
    TensorView* w = makeSymbolicTensor(2, DataType::Float, "topk_weights");
    program->addInput(x);
    program->addInput(idx);
    program->addInput(w);
    const MoeDispatchResult d = moeDispatch(x, idx, w, 2);
    program->addOutput(moeCombine(d.recv_x, d, w, x->extent(0)));
    program->addOutput(d.recv_x);
  }
  HostIrEvaluator evaluator(std::move(program));
  const at::Tensor x = test::randomTensor({3, 4}, at::kFloat, at::kCPU, 5);
  // Every pick masked: nothing is sent, and every token combines to 0.
  const std::vector<at::Tensor> out = evaluator.run(
      {x, at::full({3, 2}, -1, at::kLong), at::ones({3, 2}, at::kFloat)});
  test::expectClose(out[0], at::zeros({3, 4}, at::kFloat));
  EXPECT_EQ(out[1].size(0), 0);
  // K = 0 is refused (on both backends alike), naming topk_idx.
  test::expectErrorContains(
      [&] {
        evaluator.run(
            {x, at::empty({3, 0}, at::kLong), at::empty({3, 0}, at::kFloat)});
      },
      {"bad input on rank 0 of 1: topk_idx has K = 0 columns; K must be > "
       "0"});
}

TEST(MoeWorldOfOne, CudaBackendRejectsCpuTensorsNamingTheNode) {
  HostIrEvaluator evaluator(roundTripProgram(1, false, MoeBackend::Cuda));
  const at::Tensor x = test::randomTensor({2, 16}, at::kBFloat16, at::kCPU, 3);
  test::expectErrorContains(
      [&] {
        evaluator.run({x, at::zeros({2, 1}, at::kLong)});
      },
      {"MoeDispatch(x=T0, topk_idx=T1, num_experts=4, backend=cuda)",
       "x is on the CPU, but backend=cuda needs it on that rank's own GPU "
       "(its communicator's device)"});
}

TEST(MoeWorldOfOne, CommunicatorRefusesWorkAfterShutdown) {
  Communicator communicator(CommunicatorConfig{});
  EXPECT_EQ(communicator.size(), 1);
  EXPECT_EQ(communicator.launcher(), Launcher::None);
  communicator.barrier();
  communicator.shutdown();
  EXPECT_TRUE(communicator.isShutDown());
  communicator.shutdown();  // a second call does nothing
  test::expectErrorContains([&] { communicator.backend(c10::DeviceType::CPU); },
                            {"the communicator is shut down"});
}

// ---------------------------------------------------------------------------
// The launcher's variables.

// Sets environment variables for one test and restores them after it.
class ScopedEnv {
 public:
  explicit ScopedEnv(
      std::initializer_list<std::pair<const char*, const char*>> variables) {
    for (const std::string& name : kAll) {
      const char* old = std::getenv(name.c_str());
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
      ::unsetenv(name.c_str());
    }
    for (const auto& [name, value] : variables) {
      ::setenv(name, value, 1);
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      set(name, value);
    }
  }

 private:
  static void set(const std::string& name,
                  const std::optional<std::string>& value) {
    if (value.has_value()) {
      ::setenv(name.c_str(), value->c_str(), 1);
    } else {
      ::unsetenv(name.c_str());
    }
  }

  // Every variable the communicator reads, cleared for the test.
  inline static const std::vector<std::string> kAll = {
      "RANK",
      "WORLD_SIZE",
      "LOCAL_RANK",
      "LOCAL_WORLD_SIZE",
      "MASTER_ADDR",
      "MASTER_PORT",
      "TORCHELASTIC_USE_AGENT_STORE",
      "OMPI_COMM_WORLD_RANK",
      "OMPI_COMM_WORLD_SIZE",
      "OMPI_COMM_WORLD_LOCAL_RANK",
      "OMPI_COMM_WORLD_LOCAL_SIZE",
      "HOSTFUSE_COMM_TIMEOUT_S",
      "HOSTFUSE_SHARE_GPUS"};
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST(CommunicatorEnvironment, ReadsTorchrunVariables) {
  ScopedEnv env({{"RANK", "2"},
                 {"WORLD_SIZE", "4"},
                 {"LOCAL_RANK", "0"},
                 {"LOCAL_WORLD_SIZE", "2"},
                 {"MASTER_ADDR", "node7"},
                 {"MASTER_PORT", "31337"},
                 {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                 {"HOSTFUSE_COMM_TIMEOUT_S", "9"},
                 {"HOSTFUSE_SHARE_GPUS", "1"}});
  const CommunicatorConfig config = CommunicatorConfig::fromEnvironment();
  EXPECT_EQ(config.launcher, Launcher::Torchrun);
  EXPECT_EQ(config.rank, 2);
  EXPECT_EQ(config.size, 4);
  EXPECT_EQ(config.local_rank, 0);
  EXPECT_EQ(config.local_size, 2);
  EXPECT_EQ(config.master_addr, "node7");
  EXPECT_EQ(config.master_port, 31337);
  EXPECT_TRUE(config.store_is_external);
  EXPECT_EQ(config.timeout, std::chrono::seconds(9));
  EXPECT_TRUE(config.share_gpus);
}

TEST(CommunicatorEnvironment, ReadsOpenMpiVariablesWithDefaults) {
  ScopedEnv env({{"OMPI_COMM_WORLD_RANK", "1"},
                 {"OMPI_COMM_WORLD_SIZE", "3"},
                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                 {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}});
  const CommunicatorConfig config = CommunicatorConfig::fromEnvironment();
  EXPECT_EQ(config.launcher, Launcher::OpenMpi);
  EXPECT_EQ(config.rank, 1);
  EXPECT_EQ(config.size, 3);
  EXPECT_EQ(config.local_rank, 1);
  EXPECT_EQ(config.master_addr, "127.0.0.1");
  EXPECT_EQ(config.master_port, CommunicatorConfig::kDefaultMasterPort);
  EXPECT_FALSE(config.store_is_external);
}

TEST(CommunicatorEnvironment, NoLauncherIsAWorldOfOne) {
  ScopedEnv env({});
  const CommunicatorConfig config = CommunicatorConfig::fromEnvironment();
  EXPECT_EQ(config.launcher, Launcher::None);
  EXPECT_EQ(config.rank, 0);
  EXPECT_EQ(config.size, 1);
  EXPECT_FALSE(config.share_gpus);
}

TEST(CommunicatorEnvironment, BadVariablesAreNamed) {
  {
    ScopedEnv env({{"RANK", "0"}});
    test::expectErrorContains([] { CommunicatorConfig::fromEnvironment(); },
                              {"WORLD_SIZE is not set, but RANK is"});
  }
  {
    ScopedEnv env({{"RANK", "zero"}, {"WORLD_SIZE", "2"}});
    test::expectErrorContains(
        [] { CommunicatorConfig::fromEnvironment(); },
        {"environment variable RANK=zero is not an integer"});
  }
  {
    ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "2"}});
    test::expectErrorContains([] { CommunicatorConfig::fromEnvironment(); },
                              {"RANK must be in [0, WORLD_SIZE = 2), got 2"});
  }
  {
    ScopedEnv env({{"OMPI_COMM_WORLD_RANK", "0"},
                   {"OMPI_COMM_WORLD_SIZE", "1"},
                   {"MASTER_PORT", "70000"}});
    test::expectErrorContains([] { CommunicatorConfig::fromEnvironment(); },
                              {"MASTER_PORT must be a port number"});
  }
}

}  // namespace
}  // namespace hostfuse
