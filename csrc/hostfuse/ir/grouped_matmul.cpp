#include <hostfuse/ir/grouped_matmul.h>

#include <ATen/ATen.h>

#include <hostfuse/ir/container.h>
#include <hostfuse/ir/fp8_rows.h>
#include <hostfuse/ir/kernels/group_ends.h>
#include <hostfuse/ir/kernels/grouped_gemm_sm90.h>
#include <hostfuse/ir/kernels/silu_mul_halves.h>
#include <hostfuse/ir/operand_checks.h>
#include <hostfuse/ir/ops.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/driver_api.h>
#include <hostfuse/utils/options.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

const char* toString(GroupedMatmulEpilogue epilogue) {
  switch (epilogue) {
    case GroupedMatmulEpilogue::None:
      return "none";
    case GroupedMatmulEpilogue::SiluMul:
      return "silu_mul";
  }
  return "unknown";
}

std::optional<GroupedMatmulEpilogue> parseGroupedMatmulEpilogue(
    std::string_view name) {
  for (const GroupedMatmulEpilogue epilogue :
       {GroupedMatmulEpilogue::None, GroupedMatmulEpilogue::SiluMul}) {
    if (name == toString(epilogue)) {
      return epilogue;
    }
  }
  return std::nullopt;
}

GroupedMatmul::GroupedMatmul(TensorView* out, TensorView* x,
                             TensorView* weights, TensorView* group_counts,
                             TensorView* x_scales,
                             GroupedMatmulEpilogue epilogue) {
  // The epilogue goes in first, before any input: pushed after the
  // optional x_scales, GCC 12 warns (-Wmaybe-uninitialized, a false
  // positive in std::variant's move) and -Werror stops the build.
  addDataAttribute(static_cast<int64_t>(epilogue));
  addOutput(out);
  addInput(x);
  addInput(weights);
  addInput(group_counts);
  if (x_scales != nullptr) {
    addInput(x_scales);
  }
}

std::string GroupedMatmul::toInlineString() const {
  return out()->toString() + " = GroupedMatmul(x=" + x()->toString() +
         (xScales() != nullptr ? ", x_scales=" + xScales()->toString() : "") +
         ", weights=" + weights()->toString() +
         ", group_counts=" + groupCounts()->toString() +
         (epilogue() != GroupedMatmulEpilogue::None
              ? std::string(", epilogue=") + hostfuse::toString(epilogue())
              : std::string()) +
         ")";
}

void GroupedMatmul::validate() const {
  checkFloating(this, "weights", weights(), 3);
  if (xScales() != nullptr) {
    checkTensor(
        this, "x", x(), 2, [](DataType d) { return d == DataType::Float8E4M3; },
        "f8e4m3 (it has x_scales)");
    checkTensor(
        this, "x_scales", xScales(), 2,
        [](DataType d) { return d == DataType::Float; }, "f32");
    checkSameExtent(this, x()->extent(0), "the rows of x", xScales()->extent(0),
                    "the rows of x_scales");
  } else {
    checkFloating(this, "x", x(), 2);
    HF_CHECK(weights()->dtype() == x()->dtype(), "GroupedMatmul: weights ",
             weights()->toDeclString(), " must have x's dtype ", x()->dtype());
  }
  checkSameExtent(this, x()->extent(1), "the width H of x",
                  weights()->extent(1), "dim 1 of weights");
  checkInt64(this, "group_counts", groupCounts(), 1);
  checkSameExtent(this, weights()->extent(0), "the groups of weights",
                  groupCounts()->extent(0), "the length of group_counts");
  checkFloating(this, "out", out(), 2);
  HF_CHECK(out()->dtype() == weights()->dtype(), "GroupedMatmul: out ",
           out()->toDeclString(), " must have the weights' dtype ",
           weights()->dtype());
  if (epilogue() == GroupedMatmulEpilogue::SiluMul) {
    const std::optional<int64_t> n = weights()->extent(2)->constantInt();
    HF_CHECK(n.has_value() && *n % 2 == 0,
             "GroupedMatmul: epilogue=silu_mul "
             "needs weights whose N (dim 2) is a known even number (gate and "
             "up halves), got ",
             weights()->toDeclString());
    HF_CHECK(out()->extent(1)->constantInt() == *n / 2, "GroupedMatmul: out ",
             out()->toDeclString(), " must have N / 2 = ", *n / 2,
             " columns with epilogue=silu_mul");
  } else {
    HF_CHECK(epilogue() == GroupedMatmulEpilogue::None,
             "GroupedMatmul: unknown epilogue ",
             static_cast<int64_t>(epilogue()));
  }
}

bool groupedMatmulRunsOnDevice(at::ScalarType dtype, const at::Device& device,
                               int64_t hidden, int64_t n, int64_t groups,
                               std::string* why_not) {
  // Plain string concatenation, no stream: this runs for every
  // GroupedMatmul of every capture check.
  std::string reason;
  if (!device.is_cuda()) {
    reason = "it runs on " + device.str() + ", not on a GPU";
  } else if (dtype != at::kBFloat16) {
    reason = std::string("its dtype is ") + c10::toString(dtype) + ", not bf16";
  } else if (hidden >= 0 && hidden % 8 != 0) {
    reason = "H = " + std::to_string(hidden) + " is not a multiple of 8";
  } else if (n >= 0 && n % 8 != 0) {
    reason = "N = " + std::to_string(n) + " is not a multiple of 8";
  } else if (groups >= 1024) {
    reason = "it has " + std::to_string(groups) + " groups (at most 1023)";
  } else if (cuda::isAvailable()) {
    const int index =
        device.has_index() ? device.index() : cuda::currentDevice();
    const auto [major, minor] = cuda::computeCapability(index);
    if (major != 9 && major != 10) {
      reason = "GPU " + std::to_string(index) + " has compute capability " +
               std::to_string(major) + "." + std::to_string(minor) +
               " (at::_grouped_mm needs 9.x or 10.x)";
    }
  }
  if (why_not != nullptr) {
    *why_not = reason;
  }
  return reason.empty();
}

namespace {

// Makes `t` contiguous with a 16-byte aligned start (TMA loads need both).
// Weights stored K-major (the last two dims transposed) are kept as they
// are: at::_grouped_mm takes them so.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor result =
      t.dim() == 3 && t.transpose(1, 2).is_contiguous() ? t : t.contiguous();
  if (reinterpret_cast<uintptr_t>(result.data_ptr()) % 16 != 0) {
    result = result.clone();
  }
  return result;
}

}  // namespace

bool groupedMatmulUsesOwnKernel(const at::Tensor& weights) {
  if (!weights.is_cuda() || weights.dim() != 3 ||
      weights.scalar_type() != at::kBFloat16 ||
      options::boolOr(Option::TorchGroupedGemm)) {
    return false;
  }
  const int64_t hidden = weights.size(1);
  const int64_t n = weights.size(2);
  return cuda::computeCapability(weights.device().index()) ==
             std::make_pair(9, 0) &&
         weights.stride(1) == 1 && weights.stride(2) == hidden &&
         weights.stride(0) == hidden * n &&
         driver::api().cuTensorMapEncodeTiled != nullptr;
}

namespace {

// The SiluMul epilogue as ATen ops on `product` [rows, N]: each half as it
// is (in the product's dtype), the activation in fp32, then rounded. The
// same ops, in the same order, as makeSiluMulFusion on the host. (The
// device path uses launchSiluMulHalves instead.)
at::Tensor siluMulOfHalves(const at::Tensor& product) {
  const int64_t half = product.size(1) / 2;
  return at::silu(product.narrow(1, 0, half).to(at::kFloat))
      .mul(product.narrow(1, half, half).to(at::kFloat))
      .to(product.scalar_type());
}

int64_t outputColumns(int64_t n, GroupedMatmulEpilogue epilogue) {
  return epilogue == GroupedMatmulEpilogue::SiluMul ? n / 2 : n;
}

// hostfuse's sm_90a grouped GEMM for these operands, or an undefined
// tensor where it does not apply (groupedMatmulUsesOwnKernel, at most
// kOwnGroupedGemmMaxRowsPerGroup rows of x per group, x contiguous, and
// what the kernel itself accepts).
at::Tensor ownGroupedGemm(const at::Tensor& x, const at::Tensor& weights,
                          const at::Tensor& counts,
                          GroupedMatmulEpilogue epilogue) {
  if (!groupedMatmulUsesOwnKernel(weights) || !x.is_contiguous() ||
      x.size(0) > kOwnGroupedGemmMaxRowsPerGroup * weights.size(0)) {
    return {};
  }
  const int device = x.device().index();
  const int64_t hidden = weights.size(1);
  const int64_t n = weights.size(2);
  const int64_t columns = outputColumns(n, epilogue);
  at::Tensor out = at::empty({x.size(0), columns}, x.options());
  kernels::GroupedGemmProblem problem;
  problem.x = x.const_data_ptr();
  problem.w = weights.const_data_ptr();
  problem.counts = counts.const_data_ptr<int64_t>();
  problem.out = out.mutable_data_ptr();
  problem.rows = x.size(0);
  problem.n = n;
  problem.k = hidden;
  problem.groups = weights.size(0);
  problem.out_stride = columns;
  problem.epilogue = epilogue == GroupedMatmulEpilogue::SiluMul
                         ? kernels::GroupedGemmEpilogue::kSiluMul
                         : kernels::GroupedGemmEpilogue::kNone;
  if (*kernels::groupedGemmUnsupported(problem) != '\0') {
    return {};
  }
  HF_CUDA_CHECK(kernels::launchGroupedGemm(
      problem, cuda::multiprocessorCount(device),
      driver::api().cuTensorMapEncodeTiled, cuda::currentStream(device)));
  return out;
}

at::Tensor groupedMatmulOnDevice(const at::Tensor& x, const at::Tensor& weights,
                                 const at::Tensor& counts,
                                 GroupedMatmulEpilogue epilogue) {
  const int64_t rows = x.size(0);
  if (rows == 0) {
    return at::empty({0, outputColumns(weights.size(2), epilogue)},
                     x.options());
  }
  const at::Tensor long_counts = counts.to(at::kLong).contiguous();
  const int device = x.device().index();
  const cuda::DeviceScope scope(device);
  if (at::Tensor out = ownGroupedGemm(x, weights, long_counts, epilogue);
      out.defined()) {
    return out;
  }
  // Group ends on the device, made monotone and cut at x's rows so that no
  // count can make the kernel read or write past x or out.
  at::Tensor ends =
      at::empty({long_counts.size(0)}, long_counts.options().dtype(at::kInt));
  HF_CUDA_CHECK(kernels::launchGroupEnds(
      long_counts.const_data_ptr<int64_t>(), long_counts.size(0), rows,
      ends.mutable_data_ptr<int32_t>(), cuda::currentStream(device)));
  const at::Tensor product =
      at::_grouped_mm(aligned(x), aligned(weights), ends);
  if (epilogue != GroupedMatmulEpilogue::SiluMul) {
    return product;
  }
  // The epilogue in one pass over the counted rows (bf16 here, N % 8 == 0:
  // groupedMatmulRunsOnDevice), the same bits as hostfuse's GEMM gives.
  HF_ERROR(product.is_contiguous() && product.scalar_type() == at::kBFloat16,
           "at::_grouped_mm returned a ", product.scalar_type(),
           " product with strides ", product.strides(),
           "; the device path expects contiguous bf16");
  const int64_t half = product.size(1) / 2;
  at::Tensor out = at::empty({rows, half}, product.options());
  if (ends.size(0) == 0) {
    return out;  // no groups: no row is counted
  }
  HF_CUDA_CHECK(kernels::launchSiluMulHalves(
      product.const_data_ptr(), rows, half, ends.const_data_ptr<int32_t>(),
      ends.size(0), out.mutable_data_ptr(), cuda::currentStream(device)));
  return out;
}

}  // namespace

std::vector<std::string> GroupedMatmul::captureProblems(
    const at::Device& device) const {
  auto size = [](const Scalar* extent) {
    return extent->constantInt().value_or(-1);
  };
  std::string why_not;
  if (groupedMatmulRunsOnDevice(
          toScalarType(weights()->dtype()), device, size(x()->extent(1)),
          size(weights()->extent(2)), size(weights()->extent(0)), &why_not)) {
    return {};
  }
  return {
      "reads group_counts on the host (a device synchronization), "
      "because " +
      why_not};
}

at::Tensor groupedMatmulOnTensors(const at::Tensor& x_given,
                                  const at::Tensor& weights,
                                  const at::Tensor& counts,
                                  const at::Tensor& x_scales,
                                  GroupedMatmulEpilogue epilogue) {
  HF_CHECK(x_given.defined() && weights.defined() && counts.defined(),
           "GroupedMatmul: x, weights and counts must be tensors");
  HF_CHECK(x_given.dim() == 2, "GroupedMatmul: x must be [rows, H], got ",
           x_given.sizes());
  HF_CHECK(weights.dim() == 3 && at::isFloatingType(weights.scalar_type()),
           "GroupedMatmul: weights must be floating [L, H, N], got ",
           weights.scalar_type(), " ", weights.sizes());
  HF_CHECK(counts.dim() == 1 &&
               at::isIntegralType(counts.scalar_type(), /*includeBool=*/false),
           "GroupedMatmul: counts must be an integer [L], got ",
           counts.scalar_type(), " ", counts.sizes());
  HF_CHECK(weights.device() == x_given.device(),
           "GroupedMatmul: weights are "
           "on ",
           weights.device(), " but x is on ", x_given.device(),
           ": they must be on one device");
  HF_CHECK(counts.device() == x_given.device() || counts.device().is_cpu(),
           "GroupedMatmul: counts are on ", counts.device(),
           ": they must be on x's device (", x_given.device(),
           ") or on the CPU");
  const bool fp8 = x_given.scalar_type() == at::kFloat8_e4m3fn;
  HF_CHECK(fp8 == x_scales.defined(), "GroupedMatmul: x is ",
           x_given.scalar_type(),
           fp8 ? ": pass its scales (x_scales)"
               : ", so it takes no x_scales (they go with f8e4m3 rows)");
  HF_CHECK(fp8 || x_given.scalar_type() == weights.scalar_type(),
           "GroupedMatmul: x is ", x_given.scalar_type(), " but weights are ",
           weights.scalar_type(), ": they must have the same dtype");
  HF_CHECK(
      epilogue != GroupedMatmulEpilogue::SiluMul || weights.size(2) % 2 == 0,
      "GroupedMatmul: epilogue=silu_mul needs an even N (gate and up "
      "halves), got weights ",
      weights.sizes());
  // Only the rows the counts cover are dequantized (the GEMM reads no
  // other); the counts must be i64 on the rows' device for that.
  const bool counts_fit =
      counts.scalar_type() == at::kLong && counts.device() == x_given.device();
  // fp8 rows: dequantized to the weights' dtype first (no fused scaled
  // GEMM yet).
  const at::Tensor x =
      fp8 ? dequantizeFp8Rows(x_given, x_scales, weights.scalar_type(),
                              counts_fit ? counts : at::Tensor())
          : x_given;
  HF_CHECK(counts.size(0) == weights.size(0), "GroupedMatmul: counts ",
           counts.sizes(), " do not match the ", weights.size(0),
           " groups of weights ", weights.sizes());
  HF_CHECK(weights.size(1) == x.size(1), "GroupedMatmul: weights ",
           weights.sizes(), " do not fit the width ", x.size(1), " of x");
  std::string why_not;
  if (counts.device() == x.device() && weights.device() == x.device() &&
      groupedMatmulRunsOnDevice(x.scalar_type(), x.device(), x.size(1),
                                weights.size(2), weights.size(0), &why_not)) {
    return groupedMatmulOnDevice(x, weights, counts, epilogue);
  }
  if (counts.is_cuda()) {
    HF_CHECK(
        !cuda::isCapturing(counts.device().index()),
        "GroupedMatmul cannot run inside a CUDA graph capture here: it would "
        "read group_counts on the host, because ",
        why_not.empty() ? "its operands are on different devices" : why_not);
  }
  const at::Tensor host_counts = counts.to(at::kCPU, at::kLong);
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, weights.size(2)}, x.options());
  int64_t offset = 0;
  for (int64_t g = 0; g < host_counts.size(0); ++g) {
    const int64_t group_rows = host_counts[g].item<int64_t>();
    HF_CHECK(group_rows >= 0 && offset + group_rows <= rows,
             "GroupedMatmul: group_counts ", host_counts.sizes(),
             " does not fit the ", rows, " rows of x (group ", g, " has ",
             group_rows, " rows at offset ", offset, ")");
    if (group_rows > 0) {
      at::Tensor group_out = out.narrow(0, offset, group_rows);
      at::matmul_out(group_out, x.narrow(0, offset, group_rows), weights[g]);
    }
    offset += group_rows;
  }
  if (offset < rows) {
    out.narrow(0, offset, rows - offset).zero_();
  }
  return epilogue == GroupedMatmulEpilogue::SiluMul ? siluMulOfHalves(out)
                                                    : out;
}

std::vector<c10::IValue> GroupedMatmul::evaluate(
    const std::vector<c10::IValue>& inputs) const {
  // groupedMatmulOnTensors knows the tensors, not the expression: its
  // errors get the expression's text in front, so a program's author sees
  // which GroupedMatmul failed.
  try {
    return {groupedMatmulOnTensors(
        inputs.at(0).toTensor(), inputs.at(1).toTensor(),
        inputs.at(2).toTensor(),
        inputs.size() > 3 ? inputs.at(3).toTensor() : at::Tensor(),
        epilogue())};
  } catch (const Error& e) {
    HF_THROW(toInlineString(), ": ", e.what());
  }
}

TensorView* groupedMatmul(TensorView* x, TensorView* weights,
                          TensorView* group_counts, TensorView* x_scales,
                          GroupedMatmulEpilogue epilogue) {
  HF_CHECK(x != nullptr && weights != nullptr && group_counts != nullptr,
           "groupedMatmul: an operand is null");
  HF_CHECK(x->rank() == 2, "groupedMatmul: x ", x->toDeclString(),
           " must have rank 2, got rank ", x->rank());
  HF_CHECK(weights->rank() == 3, "groupedMatmul: weights ",
           weights->toDeclString(), " must have rank 3 ([L, H, N]), got rank ",
           weights->rank());
  HF_CHECK((x_scales != nullptr) == (x->dtype() == DataType::Float8E4M3),
           "groupedMatmul: x ", x->toDeclString(),
           x_scales != nullptr ? " has x_scales, so it must be f8e4m3"
                               : " is f8e4m3: pass its scales (x_scales)");
  Scalar* columns = weights->extent(2);
  if (epilogue == GroupedMatmulEpilogue::SiluMul) {
    const std::optional<int64_t> n = columns->constantInt();
    HF_CHECK(n.has_value() && *n % 2 == 0,
             "groupedMatmul: epilogue=silu_mul needs weights whose N (dim 2) "
             "is a known even number (gate and up halves), got ",
             weights->toDeclString());
    columns = makeConstant(*n / 2);
  }
  TensorView* out = makeTensor({x->extent(0), columns}, weights->dtype());
  IrBuilder::create<GroupedMatmul>(out, x, weights, group_counts, x_scales,
                                   epilogue);
  return out;
}

HF_DEFINE_EXPR(GroupedMatmul)

}  // namespace hostfuse
