// Generated kernels on a GPU: every fusion of the catalog against the ATen
// reference, for sizes that are not multiples of any block size, for
// contiguous, transposed and sliced inputs, and for both index widths.
// Every test skips itself on machines without a GPU.
//
// To see the generated code of a failing case:
//   HOSTFUSE_DUMP_KERNELS=1 ./test_kernel_gpu --gtest_filter='*softmax_bf16'
#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/ir/evaluation.h>
#include <hostfuse/kernel/analysis.h>
#include <hostfuse/kernel/executor.h>
#include <hostfuse/kernel/kernel_cache.h>
#include <hostfuse/kernel/launch.h>
#include <hostfuse/utils/driver_api.h>
#include <hostfuse/utils/torch_cuda.h>
#include "kernel_cases.h"

namespace hostfuse {
namespace {

const at::Device kCuda(at::kCUDA, 0);

struct ProblemSize {
  int64_t rows;
  int64_t cols;
};

// Rows and columns chosen so that no size is a multiple of a block or a
// vector: a middle size, many short rows (more rows than one grid covers,
// rows shorter than a warp), few long rows (a full 512-thread block per
// row), and a single row.
const ProblemSize kSizes[] = {{37, 1001}, {20011, 35}, {3, 7001}, {1, 513}};
const test::Layout kLayouts[] = {test::Layout::kContiguous,
                                 test::Layout::kTransposed,
                                 test::Layout::kSliced};

std::string describe(const ProblemSize& size, test::Layout layout,
                     const char* options) {
  return "rows=" + std::to_string(size.rows) +
         " cols=" + std::to_string(size.cols) +
         " layout=" + test::toString(layout) + " options=" + options;
}

class KernelGpuCatalog : public testing::TestWithParam<size_t> {};

TEST_P(KernelGpuCatalog, MatchesAtenReference) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const test::FusionCase& c = test::fusionCases()[GetParam()];
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  for (const ProblemSize& size : kSizes) {
    for (test::Layout layout : kLayouts) {
      SCOPED_TRACE(describe(size, layout, "default"));
      const std::vector<c10::IValue> inputs =
          test::makeInputs(c, size.rows, size.cols, layout, kCuda);
      test::expectOutputsClose(runFusionOnCuda(*fusion, inputs),
                               evaluateFusion(*fusion, inputs),
                               c.float_tolerance);
    }
  }
  // Pitched rows, where every dtype's widest vector (1001 above would not)
  // or only a narrower one (40 for 1-byte types) divides the row.
  for (const ProblemSize& size :
       {ProblemSize{37, 1024}, ProblemSize{4099, 40}}) {
    SCOPED_TRACE(describe(size, test::Layout::kPitched, "default"));
    const std::vector<c10::IValue> inputs = test::makeInputs(
        c, size.rows, size.cols, test::Layout::kPitched, kCuda);
    test::expectOutputsClose(runFusionOnCuda(*fusion, inputs),
                             evaluateFusion(*fusion, inputs),
                             c.float_tolerance);
    // The vector kernel ran where dense inputs would get one: pitched rows
    // (or contiguous, for a fusion of one loop dim).
    const FusionAnalysis analysis(*fusion);
    const InputSignature dense =
        setUpLaunch(*fusion, analysis.plan(),
                    test::makeInputs(c, size.rows, size.cols,
                                     test::Layout::kContiguous, kCuda),
                    kCuda, {})
            .signature;
    const InputSignature pitched =
        setUpLaunch(*fusion, analysis.plan(), inputs, kCuda, {}).signature;
    EXPECT_EQ(pitched.contiguous || pitched.pitched_rows, dense.contiguous)
        << pitched.toString();
  }
  const ProblemSize size = kSizes[0];
  const std::vector<c10::IValue> inputs = test::makeInputs(
      c, size.rows, size.cols, test::Layout::kContiguous, kCuda);
  {
    SCOPED_TRACE(
        describe(size, test::Layout::kContiguous, "independent reference"));
    test::expectOutputsClose(runFusionOnCuda(*fusion, inputs),
                             c.reference(inputs), c.float_tolerance);
  }
  {
    SCOPED_TRACE(describe(size, test::Layout::kContiguous, "64-bit index"));
    KernelOptions options;
    options.force_64bit_index = true;
    test::expectOutputsClose(runFusionOnCuda(*fusion, inputs, options),
                             evaluateFusion(*fusion, inputs),
                             c.float_tolerance);
  }
  {
    SCOPED_TRACE(describe(size, test::Layout::kContiguous, "strided path"));
    KernelOptions options;
    options.contiguous_fast_path = false;
    test::expectOutputsClose(runFusionOnCuda(*fusion, inputs, options),
                             evaluateFusion(*fusion, inputs),
                             c.float_tolerance);
  }
}

// Row-limited kernels on the GPU: the rows the counts cover match the
// reference (which rows are left unwritten is checked on the CPU, in
// test_kernel_emulation.cpp, where the outputs can be filled first).
TEST_P(KernelGpuCatalog, RowLimitedKernelsComputeTheCountedRows) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const test::FusionCase& c = test::fusionCases()[GetParam()];
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  if (!FusionAnalysis(*fusion).plan().rowsCanBeLimited()) {
    GTEST_SKIP() << "a reduction, or an output without the first loop dim";
  }
  for (const test::Layout layout :
       {test::Layout::kContiguous, test::Layout::kPitched,
        test::Layout::kSliced}) {
    SCOPED_TRACE(describe(ProblemSize{4099, 40}, layout, "row-limited"));
    const std::vector<c10::IValue> inputs =
        test::makeInputs(c, 4099, 40, layout, kCuda);
    const std::vector<at::Tensor> want = evaluateFusion(*fusion, inputs);
    const at::Tensor counts = at::tensor({1000, -5, 1049}, at::kLong).to(kCuda);
    const std::vector<at::Tensor> got =
        runFusionOnCuda(*fusion, inputs, {}, counts);
    ASSERT_EQ(got.size(), want.size());
    std::vector<at::Tensor> got_rows;
    std::vector<at::Tensor> want_rows;
    for (size_t o = 0; o < got.size(); ++o) {
      const int64_t rows = std::min<int64_t>(2049, got[o].size(0));
      got_rows.push_back(got[o].narrow(0, 0, rows));
      want_rows.push_back(want[o].narrow(0, 0, rows));
    }
    test::expectOutputsClose(got_rows, want_rows, c.float_tolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(Fusions, KernelGpuCatalog,
                         testing::Range<size_t>(0, test::fusionCases().size()),
                         test::caseName);

// Takes a C string: g++ 13 warns about a returned reference when an
// argument is a temporary std::string, though the result refers to the
// catalog, not to the argument.
const test::FusionCase& findCase(const char* name) {
  for (const test::FusionCase& c : test::fusionCases()) {
    if (c.name == name) {
      return c;
    }
  }
  throw std::runtime_error(std::string("no fusion case ") + name);
}

TEST(KernelGpu, EvaluatorCompilesOnceAndLaunches) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const test::FusionCase& c = findCase("rmsnorm_bf16");
  HostIrEvaluator evaluator(test::programRunning(test::buildFusion(c)));
  KernelCache::global().clear();
  const int64_t before = KernelCache::global().numCompiles();
  for (int run = 0; run < 3; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    const std::vector<c10::IValue> inputs =
        test::makeInputs(c, 64 + run, 1000, test::Layout::kContiguous, kCuda);
    test::expectOutputsClose(evaluator.run(inputs), c.reference(inputs));
    EXPECT_EQ(KernelCache::global().numCompiles(), before + 1)
        << "the first run compiles; later runs of the same signature hit "
           "the cache";
  }
}

TEST(KernelGpu, UnsupportedFusionFallsBackToAten) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const std::shared_ptr<Fusion> fusion = test::matmulReluFusion();
  ASSERT_TRUE(kernelUnsupportedReason(*fusion).has_value());
  HostIrEvaluator evaluator(test::programRunning(fusion));
  const at::Tensor a = test::randomTensor({33, 17}, at::kFloat, kCuda, 1);
  const at::Tensor b = test::randomTensor({17, 9}, at::kFloat, kCuda, 2);
  const int64_t before = KernelCache::global().numCompiles();
  const std::vector<at::Tensor> outputs = evaluator.run({a, b});
  EXPECT_EQ(KernelCache::global().numCompiles(), before);
  ASSERT_EQ(outputs.size(), 1u);
  EXPECT_TRUE(outputs[0].is_cuda());
  test::expectClose(outputs[0], at::relu(at::matmul(a, b)), 1e-5, 1e-5);
}

// a + b where every size is its own symbolic extent: ATen broadcasting
// decides at run time, and so must the kernel.
std::shared_ptr<Fusion> looseAddFusion() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* a = makeSymbolicTensor(2, DataType::Float, "a");
  TensorView* b = makeSymbolicTensor(2, DataType::Float, "b");
  fusion->addInput(a);
  fusion->addInput(b);
  fusion->addOutput(add(a, b));
  fusion->addOutput(relu(b));
  return fusion;
}

TEST(KernelGpu, BroadcastsDimsOfSizeOneAtRunTime) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const std::shared_ptr<Fusion> fusion = looseAddFusion();
  const at::Tensor a = test::randomTensor({45, 301}, at::kFloat, kCuda, 1);
  for (const std::vector<int64_t>& b_sizes :
       std::vector<std::vector<int64_t>>{{1, 301}, {45, 1}, {1, 1}}) {
    SCOPED_TRACE("b sizes " + c10::str(at::IntArrayRef(b_sizes)));
    const at::Tensor b = test::randomTensor(b_sizes, at::kFloat, kCuda, 2);
    const std::vector<at::Tensor> outputs = runFusionOnCuda(*fusion, {a, b});
    ASSERT_EQ(outputs.size(), 2u);
    test::expectClose(outputs[0], a + b, 1e-6, 1e-6);
    test::expectClose(outputs[1], at::relu(b), 0.0, 0.0);
  }
}

TEST(KernelGpu, ReportsSizesThatDoNotBroadcast) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const std::shared_ptr<Fusion> fusion = looseAddFusion();
  const at::Tensor a = test::randomTensor({4, 5}, at::kFloat, kCuda, 1);
  const at::Tensor b = test::randomTensor({3, 5}, at::kFloat, kCuda, 2);
  test::expectErrorContains(
      [&] {
        runFusionOnCuda(*fusion, {a, b});
      },
      {"input 1 (T1 'b') has size 3 in dim 0", "input 0 (T0 'a') has size 4"});
}

TEST(KernelGpu, HandlesEmptyTensors) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const test::FusionCase& c = findCase("sum_max_inner_f32");
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  const std::vector<c10::IValue> no_rows =
      test::makeInputs(c, 0, 17, test::Layout::kContiguous, kCuda);
  test::expectOutputsClose(runFusionOnCuda(*fusion, no_rows),
                           evaluateFusion(*fusion, no_rows));
  // Summing empty rows gives zeros; max of an empty row is an error, as in
  // ATen.
  const test::FusionCase& sum_case = findCase("row_scale_without_keep_dim_f32");
  const std::shared_ptr<Fusion> sum_fusion = test::buildFusion(sum_case);
  const std::vector<c10::IValue> no_cols =
      test::makeInputs(sum_case, 6, 0, test::Layout::kContiguous, kCuda);
  test::expectOutputsClose(runFusionOnCuda(*sum_fusion, no_cols),
                           evaluateFusion(*sum_fusion, no_cols));
  const std::vector<c10::IValue> max_no_cols =
      test::makeInputs(c, 6, 0, test::Layout::kContiguous, kCuda);
  test::expectErrorContains([&] { runFusionOnCuda(*fusion, max_no_cols); },
                            {"size 0"});
}

TEST(KernelGpu, MisalignedContiguousInputsUseNarrowerVectors) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const test::FusionCase& c = findCase("silu_mul_add_bf16");
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  // Windows of a flat buffer that start 1, 2 and 4 elements in: contiguous,
  // but only aligned to 2, 4 and 8 bytes.
  const at::Tensor buffer =
      test::randomTensor({3 * 4100}, at::kBFloat16, kCuda, 5);
  for (int64_t shift : {1, 2, 4}) {
    SCOPED_TRACE("shifted by " + std::to_string(shift));
    std::vector<c10::IValue> inputs;
    for (int64_t i = 0; i < 3; ++i) {
      inputs.emplace_back(
          buffer.narrow(0, i * 4100 + shift, 4003).view({1, 4003}));
    }
    test::expectOutputsClose(runFusionOnCuda(*fusion, inputs),
                             evaluateFusion(*fusion, inputs));
  }
}

TEST(KernelGpu, RunsOnTheDeviceOfItsInputs) {
  if (cuda::deviceCount() < 2) {
    GTEST_SKIP() << "needs two CUDA devices";
  }
  const test::FusionCase& c = findCase("softmax_bf16");
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  const at::Device second(at::kCUDA, 1);
  const std::vector<c10::IValue> inputs =
      test::makeInputs(c, 37, 1001, test::Layout::kContiguous, second);
  const std::vector<at::Tensor> outputs = runFusionOnCuda(*fusion, inputs);
  ASSERT_EQ(outputs.size(), 1u);
  EXPECT_EQ(outputs[0].device(), second);
  test::expectOutputsClose(outputs, evaluateFusion(*fusion, inputs));
}

TEST(KernelGpu, LoadsTheDriverApi) {
  HF_SKIP_IF_UNAVAILABLE(kCuda);
  const driver::Api& cu = driver::api();
  EXPECT_NE(cu.cuLaunchKernel, nullptr);
  EXPECT_NE(cu.cuMemCreate, nullptr);
  int value = 0;
  CUdevice device = 0;
  HF_CU_CHECK(cu.cuDeviceGet(&device, 0));
  HF_CU_CHECK(cu.cuDeviceGetAttribute(
      &value, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device));
  EXPECT_GT(value, 0);
  test::expectErrorContains(
      [&] { HF_CU_CHECK(cu.cuDeviceGet(&device, 1 << 20)); },
      {"cuDeviceGet", "CUDA_ERROR_INVALID_DEVICE"});
}

}  // namespace
}  // namespace hostfuse
