#include <hostfuse/multidevice/moe/fp8_packing.h>

#include <ATen/ATen.h>

#include <hostfuse/multidevice/moe/fp8.h>
#include <hostfuse/utils/exceptions.h>

namespace hostfuse::moe {

at::Tensor quantizeFp8Packed(const at::Tensor& x) {
  const int64_t tokens = x.size(0);
  const int64_t hidden = x.size(1);
  const int64_t blocks = hidden / kFp8Block;
  const at::Tensor values =
      x.to(at::kFloat).reshape({tokens, blocks, kFp8Block});
  // Separate ATen ops, each rounded once: the kernel's order. Divisors are
  // tensors: ATen divides by a scalar as a product with its reciprocal.
  const at::Tensor amax = values.abs().amax(-1).clamp_min(kFp8MinAmax);
  const at::Tensor scales = amax / at::full_like(amax, kFp8Max);
  const at::Tensor q = (values / scales.unsqueeze(-1))
                           .clamp(-kFp8Max, kFp8Max)
                           .to(at::kFloat8_e4m3fn)
                           .reshape({tokens, hidden});
  return at::cat({q.view(at::kByte), scales.contiguous().view(at::kByte)}, 1);
}

std::pair<at::Tensor, at::Tensor> unpackFp8(const at::Tensor& packed,
                                            int64_t hidden) {
  HF_CHECK(hidden > 0 && hidden % kFp8Block == 0 && packed.dim() == 2 &&
               packed.scalar_type() == at::kByte &&
               packed.size(1) == fp8PackedRowBytes(hidden),
           "unpackFp8: packed rows of ", hidden, " channels must be [N, ",
           fp8PackedRowBytes(hidden), "] uint8 (H a multiple of ", kFp8Block,
           "), got ", packed.scalar_type(), " of sizes ", packed.sizes());
  const int64_t blocks = hidden / kFp8Block;
  return {packed.narrow(1, 0, hidden).view(at::kFloat8_e4m3fn),
          packed.narrow(1, hidden, blocks * 4).view(at::kFloat)};
}

}  // namespace hostfuse::moe
