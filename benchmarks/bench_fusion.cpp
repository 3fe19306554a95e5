// Generated fusion kernels against the same computation as separate ATen
// ops, beside a device-to-device copy of the same bytes measured in the
// same run:
//   - silu(a) * b + c in bf16 on 64M elements (target: >= 80% of the copy's
//     bandwidth on an H200)
//   - a row softmax in bf16 on [16384, 4096]
// Times come from CUDA events on the current stream, after warm-up,
// averaged over many back-to-back calls. GB/s counts the bytes a fused
// kernel must move (inputs read once, outputs written once), for the ATen
// rows too, so the columns compare like with like.
//
//   build/bench_fusion [--elements N] [--rows R] [--cols C] [--iters I]
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <functional>
#include <optional>
#include <string>

#include <hostfuse/ir/ops.h>
#include <hostfuse/kernel/executor.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>
#include "../examples/cli_flags.h"
#include "event_timer.h"

namespace hostfuse {
namespace {

struct Options {
  int64_t elements = int64_t{64} << 20;
  int64_t rows = 16384;
  int64_t cols = 4096;
  int iters = 50;
  int warmup = 5;
};

cli::Flags makeFlags(Options& options) {
  cli::Flags flags(
      "bench_fusion",
      "Generated fusion kernels against the same computation as separate "
      "ATen ops, beside a device-to-device copy of the same bytes: silu(a) * "
      "b + c in bf16 (target: >= 80% of the copy's bandwidth on an H200) and "
      "a row softmax in bf16. Times from CUDA events, after warm-up, "
      "averaged over back-to-back calls. Without a GPU it says so and exits "
      "0.");
  flags.integer("--elements", "N", &options.elements, 1, cli::kMaxCount,
                "elements of each operand of silu(a) * b + c");
  flags.integer("--rows", "R", &options.rows, 1, cli::kMaxCount,
                "rows of the softmax input [R, C]");
  flags.integer("--cols", "C", &options.cols, 1, cli::kMaxCount,
                "columns of the softmax input [R, C]");
  flags.integer("--iters", "I", &options.iters, 1, cli::kMaxCount,
                "timed calls of each variant");
  return flags;
}

// Microseconds per call of `fn`, from CUDA events around `iters` calls.
double timeUs(const std::function<void()>& fn, const Options& options,
              cudaStream_t stream) {
  for (int i = 0; i < options.warmup; ++i) {
    fn();
  }
  return bench::eventTimeUs(stream, options.iters, fn);
}

std::shared_ptr<Fusion> siluMulAdd() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* a = makeSymbolicTensor(1, DataType::BFloat16, "a");
  TensorView* b = makeTensor({a->extent(0)}, DataType::BFloat16, "b");
  TensorView* c = makeTensor({a->extent(0)}, DataType::BFloat16, "c");
  fusion->addInput(a);
  fusion->addInput(b);
  fusion->addInput(c);
  fusion->addOutput(add(mul(silu(a), b), c));
  return fusion;
}

std::shared_ptr<Fusion> rowSoftmax() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* x = makeSymbolicTensor(2, DataType::BFloat16, "x");
  fusion->addInput(x);
  fusion->addOutput(softmax(x, 1));
  return fusion;
}

class Table {
 public:
  explicit Table(double copy_gbps) : copy_gbps_(copy_gbps) {
    std::printf("%-52s %11s %9s %10s %9s\n", "benchmark", "time (us)", "GB/s",
                "% of copy", "vs ATen");
  }
  // `aten_us` 0: no ATen column.
  double row(const std::string& name, double us, double bytes, double aten_us) {
    const double gbps = bytes / (us * 1e3);
    char speedup[32] = "";
    if (aten_us > 0) {
      std::snprintf(speedup, sizeof(speedup), "%.2fx", aten_us / us);
    }
    std::printf("%-52s %11.1f %9.1f %9.1f%% %9s\n", name.c_str(), us, gbps,
                100.0 * gbps / copy_gbps_, speedup);
    return gbps;
  }

 private:
  double copy_gbps_;
};

double maxDifference(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

int run(const Options& options) {
  const int device = cuda::currentDevice();
  const cudaStream_t stream = cuda::currentStream(device);
  const auto on_device = at::TensorOptions()
                             .dtype(at::kBFloat16)
                             .device(at::Device(at::kCUDA, device));
  at::manual_seed(0);

  // The copy moves the bytes of the pointwise chain: 3 reads and 1 write.
  const int64_t n = options.elements;
  const double chain_bytes = 4.0 * n * 2;
  const at::Tensor copy_source = at::empty(
      {static_cast<int64_t>(chain_bytes / 2)},
      at::TensorOptions().dtype(at::kByte).device(on_device.device()));
  const at::Tensor copy_target = at::empty_like(copy_source);
  const double copy_us = timeUs(
      [&] {
        HF_CUDA_CHECK(cudaMemcpyAsync(
            copy_target.data_ptr(), copy_source.data_ptr(), copy_source.numel(),
            cudaMemcpyDeviceToDevice, stream));
      },
      options, stream);
  const double copy_gbps = chain_bytes / (copy_us * 1e3);

  cudaDeviceProp properties{};
  HF_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  std::printf("device %d: %s, %d SMs\n\n", device, properties.name,
              properties.multiProcessorCount);
  Table table(copy_gbps);
  table.row("device-to-device copy (cudaMemcpyAsync)", copy_us, chain_bytes, 0);

  // silu(a) * b + c
  const at::Tensor a = at::randn({n}, on_device);
  const at::Tensor b = at::randn({n}, on_device);
  const at::Tensor c = at::randn({n}, on_device);
  const std::shared_ptr<Fusion> chain = siluMulAdd();
  const double chain_aten_us =
      timeUs([&] { (void)(at::silu(a) * b + c); }, options, stream);
  const double chain_us = timeUs(
      [&] {
        (void)runFusionOnCuda(*chain, {a, b, c});
      },
      options, stream);
  const std::string chain_name =
      "silu(a)*b+c bf16, " + std::to_string(n) + " elements";
  const double chain_gbps = table.row(chain_name + ": hostfuse", chain_us,
                                      chain_bytes, chain_aten_us);
  table.row(chain_name + ": ATen, 3 ops", chain_aten_us, chain_bytes, 0);

  // Row softmax
  const at::Tensor x = at::randn({options.rows, options.cols}, on_device);
  const double softmax_bytes = 2.0 * x.numel() * 2;
  const std::shared_ptr<Fusion> softmax_fusion = rowSoftmax();
  auto separate_ops = [&] {
    const at::Tensor e = (x - x.amax(1, /*keepdim=*/true)).exp();
    return e / e.sum(1, /*keepdim=*/true);
  };
  const double softmax_aten_us =
      timeUs([&] { (void)separate_ops(); }, options, stream);
  const double softmax_single_us =
      timeUs([&] { (void)at::softmax(x, 1); }, options, stream);
  const double softmax_us = timeUs(
      [&] { (void)runFusionOnCuda(*softmax_fusion, {x}); }, options, stream);
  const std::string softmax_name = "softmax bf16 [" +
                                   std::to_string(options.rows) + ", " +
                                   std::to_string(options.cols) + "]";
  table.row(softmax_name + ": hostfuse", softmax_us, softmax_bytes,
            softmax_aten_us);
  table.row(softmax_name + ": ATen, 5 ops", softmax_aten_us, softmax_bytes, 0);
  table.row(softmax_name + ": at::softmax", softmax_single_us, softmax_bytes,
            0);

  const double chain_error =
      maxDifference(runFusionOnCuda(*chain, {a, b, c})[0], at::silu(a) * b + c);
  const double softmax_error = maxDifference(
      runFusionOnCuda(*softmax_fusion, {x})[0], at::softmax(x, 1));
  HF_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::printf("\nmax |hostfuse - ATen|: silu chain %.3g, softmax %.3g (bf16)\n",
              chain_error, softmax_error);
  std::printf(
      "target: fused pointwise chain at >= 80%% of copy bandwidth: "
      "%.1f%% (%s)\n",
      100.0 * chain_gbps / copy_gbps,
      chain_gbps >= 0.8 * copy_gbps ? "met" : "missed");
  return 0;
}

}  // namespace
}  // namespace hostfuse

int main(int argc, char** argv) {
  hostfuse::Options options;
  hostfuse::cli::Flags flags = hostfuse::makeFlags(options);
  if (const std::optional<int> status = flags.parse(argc, argv)) {
    return *status;
  }
  if (!hostfuse::cuda::isAvailable()) {
    std::printf(
        "bench_fusion: no CUDA device is visible; nothing to "
        "measure.\n");
    return 0;
  }
  try {
    return hostfuse::run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_fusion failed: %s\n", e.what());
    return 1;
  }
}
