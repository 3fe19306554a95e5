// Kernel codegen and compilation, and the CPU path of fusions. Everything
// here runs without a GPU: NVRTC compiles the generated code to PTX for
// compute_90. test_kernel_gpu.cpp runs the same catalog on a GPU.
#include <algorithm>
#include <cmath>
#include <limits>

#include <hostfuse/host_ir/evaluator.h>
#include <hostfuse/kernel/analysis.h>
#include <hostfuse/kernel/c_types.h>
#include <hostfuse/kernel/codegen.h>
#include <hostfuse/kernel/compile.h>
#include <hostfuse/kernel/executor.h>
#include <hostfuse/kernel/kernel_cache.h>
#include <hostfuse/kernel/launch.h>
#include <hostfuse/utils/driver_api.h>
#include <hostfuse/utils/torch_cuda.h>
#include "kernel_cases.h"

namespace hostfuse {
namespace {

const CompileTarget kPtx90{90, /*cubin=*/false};

// The signatures a fusion's kernel can be specialized for: strided with
// either index width, and where possible contiguous with the widest vectors
// and without vectors, pitched rows with the widest vectors and 64-bit
// indices, and each of those row-limited.
std::vector<InputSignature> signaturesFor(const FusionAnalysis& analysis) {
  std::vector<InputSignature> signatures = {
      {/*contiguous=*/false, /*vector_width=*/1, /*index32=*/true},
      {/*contiguous=*/false, /*vector_width=*/1, /*index32=*/false}};
  if (analysis.plan().contiguous_possible) {
    const int64_t widest = analysis.plan().max_vector_width;
    signatures.push_back({true, widest, true});
    signatures.push_back({true, 1, false});
    if (analysis.numLoopDims() >= 2) {
      signatures.push_back({false, widest, false, /*pitched_rows=*/true});
    }
  }
  if (analysis.plan().rowsCanBeLimited()) {
    const size_t unlimited = signatures.size();
    for (size_t s = 0; s < unlimited; ++s) {
      signatures.push_back(signatures[s]);
      signatures.back().row_limited = true;
    }
  }
  return signatures;
}

class KernelCatalog : public testing::TestWithParam<size_t> {
 protected:
  const test::FusionCase& fusionCase() const {
    return test::fusionCases()[GetParam()];
  }
};

TEST_P(KernelCatalog, GeneratesAndCompilesToPtx) {
  const std::shared_ptr<Fusion> fusion = test::buildFusion(fusionCase());
  EXPECT_EQ(kernelUnsupportedReason(*fusion), std::nullopt);
  const FusionAnalysis analysis(*fusion);
  for (const InputSignature& signature : signaturesFor(analysis)) {
    SCOPED_TRACE(signature.toString());
    const GeneratedKernel kernel = generateKernel(analysis, signature);
    const CompiledBinary binary = compileCudaSource(kernel.source, kPtx90);
    EXPECT_NE(binary.image.find(".entry hostfuse_fusion"), std::string::npos);
    EXPECT_EQ(binary.log, "") << "NVRTC warned about:\n"
                              << numberedSource(kernel.source);
  }
}

TEST_P(KernelCatalog, CpuPathMatchesReference) {
  const test::FusionCase& c = fusionCase();
  HostIrEvaluator evaluator(test::programRunning(test::buildFusion(c)));
  const std::vector<c10::IValue> inputs = test::makeInputs(
      c, /*rows=*/5, /*cols=*/33, test::Layout::kContiguous, at::kCPU);
  const int64_t compiles = KernelCache::global().numCompiles();
  test::expectOutputsClose(evaluator.run(inputs), c.reference(inputs),
                           c.float_tolerance);
  EXPECT_EQ(KernelCache::global().numCompiles(), compiles)
      << "CPU inputs must not compile kernels";
}

INSTANTIATE_TEST_SUITE_P(Fusions, KernelCatalog,
                         testing::Range<size_t>(0, test::fusionCases().size()),
                         test::caseName);

std::shared_ptr<Fusion> reluAddFusion() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* a = makeSymbolicTensor(1, DataType::Float, "a");
  TensorView* b = makeTensor({a->extent(0)}, DataType::Float, "b");
  fusion->addInput(a);
  fusion->addInput(b);
  // One statement each: argument order would make the names depend on the
  // compiler.
  TensorView* positive = relu(a);
  TensorView* doubled = mul(b, 2.0);
  fusion->addOutput(add(positive, doubled));
  return fusion;
}

TEST(KernelCodegen, SourceIsReadableAndDeterministic) {
  const InputSignature signature{false, 1, true};
  const std::string source = generateCudaSource(*reluAddFusion(), signature);
  EXPECT_EQ(source, generateCudaSource(*reluAddFusion(), signature));
  EXPECT_NE(source.find("//     T4 = add(T2, T3)\n"), std::string::npos)
      << source;
  EXPECT_NE(source.find("hf_block_reduce"), std::string::npos)
      << "the device helpers come first";
  const std::string kernel = source.substr(source.find("using index_t"));
  EXPECT_EQ(kernel, R"(using index_t = int;

extern "C" __global__ void __launch_bounds__(256)
hostfuse_fusion(
    const float* __restrict__ T0,
    index_t T0_stride0,
    const float* __restrict__ T1,
    index_t T1_stride0,
    float* __restrict__ out0,
    index_t out0_stride0,
    index_t numel) {
  const index_t first =
      static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t index = first; index < numel; index += step) {
    const index_t i0 = index;
    float t0 = T0[i0 * T0_stride0];
    float t1 = T1[i0 * T1_stride0];
    float t2 = hf_relu(t0);
    float t3 = t1 * 2.0f;
    float t4 = t2 + t3;
    out0[i0 * out0_stride0] = t4;
  }
}
)");
}

TEST(KernelCodegen, WritesConstantsAsExactLiterals) {
  using gen::CType;
  using gen::literal;
  EXPECT_EQ(literal(ScalarValue(2.0), CType::kFloat), "2.0f");
  EXPECT_EQ(literal(ScalarValue(1e-5), CType::kFloat), "9.99999975e-06f");
  EXPECT_EQ(literal(ScalarValue(0.1), CType::kDouble), "0.10000000000000001");
  EXPECT_EQ(literal(ScalarValue(int64_t{-3}), CType::kFloat), "(-3.0f)");
  EXPECT_EQ(literal(ScalarValue(int64_t{-3}), CType::kInt64), "(-3ll)");
  EXPECT_EQ(
      literal(ScalarValue(std::numeric_limits<int64_t>::min()), CType::kInt64),
      "(-9223372036854775807ll - 1)");
  EXPECT_EQ(literal(ScalarValue(std::numeric_limits<double>::infinity()),
                    CType::kFloat),
            "__uint_as_float(0x7f800000u)");
  EXPECT_EQ(literal(ScalarValue(-std::numeric_limits<double>::infinity()),
                    CType::kDouble),
            "(-__longlong_as_double(0x7ff0000000000000ll))");
  EXPECT_EQ(literal(ScalarValue(std::nan("")), CType::kFloat),
            "__uint_as_float(0x7fc00000u)");
  EXPECT_EQ(literal(ScalarValue(1e40), CType::kFloat),
            "__uint_as_float(0x7f800000u)")
      << "out of float range: inf, as the conversion gives";
  EXPECT_EQ(literal(ScalarValue(true), CType::kFloat), "1.0f");
  EXPECT_EQ(literal(ScalarValue(int64_t{0}), CType::kBool), "false");
}

TEST(KernelCodegen, RejectsMatmulNamingTheExpression) {
  const std::shared_ptr<Fusion> fusion = test::matmulReluFusion();
  const std::optional<std::string> reason = kernelUnsupportedReason(*fusion);
  ASSERT_TRUE(reason.has_value());
  EXPECT_NE(reason->find("does not support MatmulOp (T2 = matmul(T0, T1))"),
            std::string::npos)
      << *reason;
  test::expectErrorContains(
      [&] { generateCudaSource(*fusion, InputSignature{}); },
      {"MatmulOp", "matmul(T0, T1)"});
}

TEST(KernelCodegen, RejectsReductionsOutsideTheInnermostDim) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
  fusion.addInput(x);
  fusion.addOutput(sum(x, 0));
  test::expectErrorContains([&] { FusionAnalysis analysis(fusion); },
                            {"innermost", "T1 = sum(T0, dim=0)"});
}

TEST(KernelCodegen, RejectsReductionsOfDifferentDims) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
  fusion.addInput(x);
  // Both are innermost for their operand, but they reduce different dims
  // of the iteration space.
  fusion.addOutput(sum(sum(x, 1), 0));
  test::expectErrorContains([&] { FusionAnalysis analysis(fusion); },
                            {"reduce the same dim"});
}

TEST(KernelCodegen, RejectsAValueBroadcastInTwoLayouts) {
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeSymbolicTensor(1, DataType::Float, "x");
  fusion.addInput(x);
  fusion.addOutput(
      mul(broadcast(x, {false, true}), broadcast(x, {true, false})));
  test::expectErrorContains([&] { FusionAnalysis analysis(fusion); },
                            {"two dims of", "line up with one loop dim"});
}

// silu(a) * b in bf16, computed in fp32: the MoE layer's activation.
std::shared_ptr<Fusion> siluMulFusion(int64_t rank) {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* a = makeSymbolicTensor(rank, DataType::BFloat16, "a");
  TensorView* b = makeSymbolicTensor(rank, DataType::BFloat16, "b");
  fusion->addInput(a);
  fusion->addInput(b);
  fusion->addOutput(
      cast(mul(silu(cast(a, DataType::Float)), cast(b, DataType::Float)),
           DataType::BFloat16));
  return fusion;
}

// The signature setUpLaunch picks for `inputs`, and the pitch parameters
// of the kernel generated for it, in order.
std::pair<InputSignature, std::vector<int64_t>> signatureAndPitches(
    const Fusion& fusion, const std::vector<at::Tensor>& inputs) {
  const FusionAnalysis analysis(fusion);
  const LaunchSetup setup = setUpLaunch(
      fusion, analysis.plan(), {inputs.begin(), inputs.end()}, at::kCPU, {});
  const GeneratedKernel kernel = generateKernel(analysis, setup.signature);
  KernelArgs args(fusion, analysis.plan(), kernel, setup);
  std::vector<int64_t> pitches;
  for (size_t k = 0; k < kernel.params.size(); ++k) {
    const KernelParam::Kind kind = kernel.params[k].kind;
    if (kind == KernelParam::Kind::kInputPitch ||
        kind == KernelParam::Kind::kOutputPitch) {
      pitches.push_back(setup.signature.index32
                            ? *static_cast<const int32_t*>(args.pointers()[k])
                            : *static_cast<const int64_t*>(args.pointers()[k]));
    }
  }
  return {setup.signature, pitches};
}

TEST(KernelLaunch, SlicesOfTheLastDimGetPitchedRowsWithVectors) {
  const std::shared_ptr<Fusion> fusion = siluMulFusion(2);
  const at::TensorOptions bf16 = at::TensorOptions().dtype(at::kBFloat16);
  struct Case {
    const char* what;
    at::Tensor a, b;
    std::string signature;
    std::vector<int64_t> pitches;  // a, b, the output
  };
  const at::Tensor dense = at::randn({64, 256}, bf16);
  const at::Tensor wide = at::randn({64, 512}, bf16);  // gate | up
  const at::Tensor odd = at::randn({64, 513}, bf16);   // starts 1 in
  const at::Tensor pitch260 = at::randn({64, 260}, bf16);
  const Case cases[] = {
      {"dense", dense, dense.clone(), "contiguous, vector 8", {}},
      {"the two halves of [64, 512]",
       wide.narrow(1, 0, 256),
       wide.narrow(1, 256, 256),
       "pitched rows, vector 8",
       {512, 512, 256}},
      {"a half and a dense tensor",
       wide.narrow(1, 256, 256),
       dense,
       "pitched rows, vector 8",
       {512, 256, 256}},
      {"rows 260 elements apart (not a multiple of 8)",
       pitch260.narrow(1, 0, 256),
       dense,
       "pitched rows, vector 4",
       {260, 256, 256}},
      {"a start one element in (2-byte aligned)",
       odd.narrow(1, 1, 256),
       dense,
       "strided",
       {}},
      {"a transposed input",
       at::randn({256, 64}, bf16).t(),
       dense,
       "strided",
       {}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const auto [signature, pitches] = signatureAndPitches(*fusion, {c.a, c.b});
    EXPECT_EQ(signature.toString(), c.signature + ", 32-bit indices");
    EXPECT_EQ(pitches, c.pitches);
  }
  // Rows of 100 elements: a multiple of 4 but not of 8.
  const auto [narrow_rows, pitches] = signatureAndPitches(
      *fusion, {wide.narrow(1, 0, 100), wide.narrow(1, 256, 100)});
  EXPECT_EQ(narrow_rows.toString(), "pitched rows, vector 4, 32-bit indices");
  EXPECT_EQ(pitches, (std::vector<int64_t>{512, 512, 100}));
}

TEST(KernelLaunch, PitchedRowsNeedDimsThatCollapseIntoRows) {
  const std::shared_ptr<Fusion> fusion = siluMulFusion(3);
  const at::TensorOptions bf16 = at::TensorOptions().dtype(at::kBFloat16);
  const at::Tensor wide = at::randn({2, 8, 512}, bf16);
  // [2, 8] collapses into 16 rows 512 elements apart.
  const auto [collapsing, pitches] = signatureAndPitches(
      *fusion, {wide.narrow(2, 0, 256), wide.narrow(2, 256, 256)});
  EXPECT_EQ(collapsing.toString(), "pitched rows, vector 8, 32-bit indices");
  EXPECT_EQ(pitches, (std::vector<int64_t>{512, 512, 256}));
  // 8 of 9 rows per outer index: the outer stride is 9 rows, not 8.
  const at::Tensor taller = at::randn({2, 9, 512}, bf16);
  const at::Tensor gappy = taller.narrow(1, 0, 8).narrow(2, 0, 256);
  EXPECT_EQ(signatureAndPitches(*fusion, {gappy, gappy}).first.toString(),
            "strided, 32-bit indices");
  // A dim of size 1 in between takes no part.
  const at::Tensor single = at::randn({2, 1, 512}, bf16).narrow(2, 0, 256);
  const auto [with_one, one_pitches] =
      signatureAndPitches(*fusion, {single, single});
  EXPECT_EQ(with_one.toString(), "pitched rows, vector 8, 32-bit indices");
  EXPECT_EQ(one_pitches, (std::vector<int64_t>{512, 512, 256}));
}

TEST(KernelLaunch, RowCountsMakeARowLimitedKernel) {
  const std::shared_ptr<Fusion> fusion = siluMulFusion(2);
  const FusionAnalysis analysis(*fusion);
  const at::Tensor a = at::randn({64, 256}, at::kBFloat16);
  const std::vector<c10::IValue> inputs = {a, a.clone()};
  const LaunchSetup setup =
      setUpLaunch(*fusion, analysis.plan(), inputs, at::kCPU, {},
                  at::tensor({3, 4}, at::kLong));
  EXPECT_EQ(setup.signature.toString(),
            "contiguous, vector 8, 32-bit indices, row-limited");
  const GeneratedKernel kernel = generateKernel(analysis, setup.signature);
  EXPECT_NE(kernel.source.find("row_counts[g]"), std::string::npos)
      << kernel.source;
  EXPECT_NE(kernel.source.find("const index_t numel = hf_rows * (numel_all / "
                               "size0);"),
            std::string::npos)
      << kernel.source;
  // What the counts must be.
  test::expectErrorContains(
      [&] {
        setUpLaunch(*fusion, analysis.plan(), inputs, at::kCPU, {},
                    at::tensor({3, 4}, at::kInt));
      },
      {"row_counts must be an i64 tensor of rank 1, got Int"});
  test::expectErrorContains(
      [&] {
        setUpLaunch(*fusion, analysis.plan(), inputs, at::kCPU, {},
                    at::zeros({2, 2}, at::kLong));
      },
      {"row_counts must be an i64 tensor of rank 1", "[2, 2]"});
}

TEST(KernelCodegen, RowLimitsNeedAPointwiseFusionOverTheRows) {
  // A row reduction: refused.
  auto reduction = std::make_shared<Fusion>();
  {
    FusionGuard guard(reduction.get());
    TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
    reduction->addInput(x);
    reduction->addOutput(sum(x, 1));
  }
  InputSignature limited;
  limited.row_limited = true;
  test::expectErrorContains(
      [&] { generateCudaSource(*reduction, limited); },
      {"row_limited, for a fusion that cannot have it (a reduction"});
  // An output with no first loop dim (x's columns, broadcast over the
  // rows of y): refused.
  auto columns = std::make_shared<Fusion>();
  {
    FusionGuard guard(columns.get());
    TensorView* x = makeSymbolicTensor(1, DataType::Float, "x");
    TensorView* y = makeSymbolicTensor(2, DataType::Float, "y");
    columns->addInput(x);
    columns->addInput(y);
    columns->addOutput(add(broadcast(x, {true, false}), y));
    columns->addOutput(relu(x));
  }
  test::expectErrorContains(
      [&] { generateCudaSource(*columns, limited); },
      {"row_limited, for a fusion that cannot have it",
       "an output whose dim 0 is not the first loop dim"});
  // Without row_limited both generate.
  EXPECT_NO_THROW(generateCudaSource(*columns, InputSignature{}));
  // A launch given row counts for such a fusion computes every row (the
  // rows past a limit are unspecified, so that is allowed).
  const FusionAnalysis analysis(*columns);
  EXPECT_FALSE(analysis.plan().rowsCanBeLimited());
  const std::vector<c10::IValue> inputs = {at::randn({8}), at::randn({5, 8})};
  const LaunchSetup setup =
      setUpLaunch(*columns, analysis.plan(), inputs, at::kCPU, {},
                  at::tensor({2}, at::kLong));
  EXPECT_FALSE(setup.signature.row_limited) << setup.signature.toString();
}

TEST(KernelCompile, ErrorShowsNumberedSourceAndLog) {
  const std::string broken =
      "extern \"C\" __global__ void hostfuse_fusion() {\n"
      "  int x = undefined_name;\n"
      "}\n";
  test::expectErrorContains(
      [&] { compileCudaSource(broken, kPtx90); },
      {"NVRTC could not compile", "NVRTC log:", "undefined_name",
       "   2    int x = undefined_name;", "   1  extern \"C\""});
}

TEST(KernelCompile, TargetsTheDeviceArchitecture) {
  EXPECT_EQ(compileTargetFor(9, 0).toString(), "sm_90");
  // An architecture NVRTC does not know gets PTX for the newest one below.
  EXPECT_EQ(compileTargetFor(9, 9).toString(), "compute_90");
}

TEST(KernelCache, CompilesOncePerFusionAndSignature) {
  KernelCache cache;
  const std::shared_ptr<Fusion> first = reluAddFusion();
  const std::shared_ptr<Fusion> second = reluAddFusion();
  const std::shared_ptr<const FusionEntry> entry = cache.entry(*first);
  EXPECT_EQ(cache.entry(*second), entry) << "equal fusions share an entry";
  const InputSignature signature{false, 1, true};
  const std::shared_ptr<const FusionKernel> kernel =
      cache.kernel(*first, *entry, signature, kPtx90);
  EXPECT_EQ(cache.numCompiles(), 1);
  EXPECT_EQ(cache.kernel(*second, *entry, signature, kPtx90), kernel);
  EXPECT_EQ(cache.numCompiles(), 1) << "a hit compiles nothing";
  InputSignature wider = signature;
  wider.index32 = false;
  EXPECT_NE(cache.kernel(*first, *entry, wider, kPtx90), kernel);
  EXPECT_EQ(cache.numCompiles(), 2);
}

TEST(KernelCache, RemembersWhyAFusionIsUnsupported) {
  KernelCache cache;
  Fusion fusion;
  FusionGuard guard(&fusion);
  TensorView* x = makeSymbolicTensor(2, DataType::Float, "x");
  fusion.addInput(x);
  fusion.addOutput(sum(x, 0));
  const std::shared_ptr<const FusionEntry> entry = cache.entry(fusion);
  EXPECT_NE(entry->unsupported.find("innermost"), std::string::npos);
  EXPECT_EQ(cache.entry(fusion), entry);
}

TEST(KernelExecutor, CpuInputsRunTheAtenReference) {
  // executeFusion runs even fusions codegen rejects, on CPU.
  const std::shared_ptr<Fusion> fusion = test::matmulReluFusion();
  const at::Tensor av = test::randomTensor({4, 3}, at::kFloat, at::kCPU, 1);
  const at::Tensor bv = test::randomTensor({3, 5}, at::kFloat, at::kCPU, 2);
  const std::vector<at::Tensor> outputs = executeFusion(*fusion, {av, bv});
  ASSERT_EQ(outputs.size(), 1u);
  test::expectClose(outputs[0], at::relu(at::matmul(av, bv)), 1e-6, 1e-6);
}

TEST(KernelExecutor, RunFusionOnCudaRejectsCpuTensors) {
  const std::shared_ptr<Fusion> fusion = reluAddFusion();
  const at::Tensor a = test::randomTensor({8}, at::kFloat, at::kCPU, 1);
  test::expectErrorContains(
      [&] {
        runFusionOnCuda(*fusion, {a, a});
      },
      {"input 0 (T0 'a') is on cpu", "one CUDA device"});
}

TEST(DriverApi, ReportsAMissingDriverClearly) {
  if (cuda::isAvailable()) {
    GTEST_SKIP() << "a GPU is present; test_kernel_gpu loads the driver";
  }
  test::expectErrorContains([] { driver::api(); }, {"CUDA driver"});
}

}  // namespace
}  // namespace hostfuse
