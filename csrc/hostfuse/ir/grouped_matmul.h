// GroupedMatmul: one matmul per group of consecutive rows, the per-expert
// computation of an MoE layer on dispatch's expert-major rows. A
// single-device op: it knows nothing of ranks or backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>
#include <string_view>

#include <hostfuse/ir/base_nodes.h>
#include <hostfuse/ir/values.h>

namespace hostfuse {

// What GroupedMatmul writes of each group's product.
enum class GroupedMatmulEpilogue {
  // out = the product, [rows, N].
  None,
  // out = silu(gate) * up, [rows, N / 2]: gate and up are the product's
  // halves (columns [0, N/2) and [N/2, N), as the layer's w_gate_up =
  // cat(w_gate, w_up, 2) gives them), each rounded to the weights' dtype,
  // the activation computed in fp32 (silu(g) = g / (1 + e^-g)) and
  // rounded: the values of the product followed by makeSiluMulFusion
  // (host_ir/moe_layer.h). N must be even. hostfuse's grouped GEMM
  // computes it in its epilogue (N a multiple of 16); after
  // at::_grouped_mm one small kernel applies it to the counted rows
  // (kernels/silu_mul_halves.h, the same bits but for NaN's payload); the
  // host path applies it as ATen ops (fp32 casts, silu, multiply, cast) on
  // every row.
  SiluMul,
};

// "none", "silu_mul".
const char* toString(GroupedMatmulEpilogue epilogue);
std::optional<GroupedMatmulEpilogue> parseGroupedMatmulEpilogue(
    std::string_view name);

// Runs one grouped matmul: rows [offset_l, offset_l + counts[l]) of x times
// weights[l], where offset is the exclusive cumsum of group_counts. The
// per-expert computation of an MoE layer on dispatch's expert-major rows.
// x [rows, H] floating, weights [L, H, N] of x's dtype, group_counts [L]
// i64 summing to at most rows; out [rows, N]. Rows past the sum (the
// capacity padding of the cuda MoE backend) are not read as valid: their
// output is unspecified (zeros on the host path, untouched memory on the
// device path). The epilogue (attribute 0) may apply silu(gate) * up to the
// product (GroupedMatmulEpilogue).
//
// Two paths, chosen by groupedMatmulRunsOnDevice():
//   device  no host synchronization, so it can be captured in a CUDA
//           graph. Counts are trusted there (checking them would need the
//           host): a negative count reads as 0, and groups past x's rows
//           are cut at its end. On a GPU of compute capability 9.0 with
//           weights stored K-major (the memory of [L, N, H] seen as
//           [L, H, N]), hostfuse's own grouped GEMM
//           (kernels/grouped_gemm_sm90.h) runs, reading the counts on the
//           device, if x is contiguous and has at most
//           kOwnGroupedGemmMaxRowsPerGroup rows per group (capacity
//           padding included) and there are at most 256 groups, with the
//           silu-mul epilogue in the same kernel; else, or
//           with HOSTFUSE_TORCH_GROUPED_GEMM=1,
//           at::_grouped_mm with the group ends (inclusive cumsum of the
//           counts, int32) computed by a small kernel, then the epilogue
//           by another on the counted rows.
//   host    one matmul per group; reads the counts on the host (a device
//           synchronization for CUDA counts), checks that they are >= 0 and
//           fit x's rows.
class GroupedMatmul : public Expr {
 public:
  GroupedMatmul(TensorView* out, TensorView* x, TensorView* weights,
                TensorView* group_counts, TensorView* x_scales = nullptr,
                GroupedMatmulEpilogue epilogue = GroupedMatmulEpilogue::None);
  HF_DECLARE_EXPR(GroupedMatmul)
  // Capturable on its device path only (groupedMatmulRunsOnDevice, with
  // the sizes known when the program is built).
  std::vector<std::string> captureProblems(
      const at::Device& device) const override;

  TensorView* out() const { return output(0)->as<TensorView>(); }
  TensorView* x() const { return input(0)->as<TensorView>(); }
  TensorView* weights() const { return input(1)->as<TensorView>(); }
  TensorView* groupCounts() const { return input(2)->as<TensorView>(); }
  GroupedMatmulEpilogue epilogue() const {
    return static_cast<GroupedMatmulEpilogue>(attribute<int64_t>(0));
  }
  // With f8e4m3 rows: [rows, H / B] f32, one scale per row and block of B
  // channels (row block b is x * x_scales[:, b]); else nullptr.
  TensorView* xScales() const {
    return inputs().size() > 3 ? input(3)->as<TensorView>() : nullptr;
  }

  std::string toInlineString() const override;
  void validate() const override;
  std::vector<c10::IValue> evaluate(
      const std::vector<c10::IValue>& inputs) const override;
};

// Whether GroupedMatmul takes its device path for operands of `dtype` on
// `device` with widths H (`hidden`) and N and L (`groups`): CUDA, bf16, a
// GPU of compute capability 9.x or 10.x (what at::_grouped_mm's kernels
// need), H and N multiples of 8 (16-byte rows), L < 1024. Pass -1 for a
// size that is not known (it is not checked then), and the device's
// capability is only checked when a GPU is visible. When false, `why_not`
// (if given) says which condition failed.
bool groupedMatmulRunsOnDevice(at::ScalarType dtype, const at::Device& device,
                               int64_t hidden, int64_t n, int64_t groups,
                               std::string* why_not = nullptr);

// Whether GroupedMatmul's device path may multiply by `weights` with
// hostfuse's own sm_90a grouped GEMM (rather than at::_grouped_mm): bf16
// weights stored K-major on a GPU of compute capability 9.0, and
// HOSTFUSE_TORCH_GROUPED_GEMM unset. It then does for x of at most
// kOwnGroupedGemmMaxRowsPerGroup rows per group (contiguous, at most
// kernels::kGroupedGemmMaxGroups groups).
bool groupedMatmulUsesOwnKernel(const at::Tensor& weights);

// Up to this many rows of x per group (x's rows / L, padding included)
// the own kernel was measured as fast as at::_grouped_mm or faster; with
// more rows, where the GEMM is bound by the tensor cores, slower (1 x H100,
// 8 groups of 4096 rows, H = 7168: 3355 against 2858 us; docs/perf_log.md,
// 2026-12-05, session 14), so at::_grouped_mm runs there.
inline constexpr int64_t kOwnGroupedGemmMaxRowsPerGroup = 512;

// GroupedMatmul on tensors, outside a program (hostfuse.moe.grouped_matmul
// in Python): the node's paths and checks, each failed check naming the
// argument. x [rows, H] of the weights' dtype, or f8e4m3 with x_scales
// [rows, H / B] f32 (else pass an undefined tensor); weights [L, H, N]
// floating; group_counts [L] integer. Returns [rows, N], or [rows, N / 2]
// with the silu-mul epilogue.
at::Tensor groupedMatmulOnTensors(
    const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& group_counts, const at::Tensor& x_scales = {},
    GroupedMatmulEpilogue epilogue = GroupedMatmulEpilogue::None);

// Builds a GroupedMatmul in the active container (see FusionGuard). `x`
// f8e4m3 needs `x_scales` (as MoeDispatch with quantize=fp8_e4m3 returns
// them): the rows are dequantized to the weights' dtype, then multiplied.
// The output has the weights' dtype; with the silu-mul epilogue the
// weights' N must be a known even number, and the output has N / 2
// columns.
TensorView* groupedMatmul(
    TensorView* x, TensorView* weights, TensorView* group_counts,
    TensorView* x_scales = nullptr,
    GroupedMatmulEpilogue epilogue = GroupedMatmulEpilogue::None);

}  // namespace hostfuse
