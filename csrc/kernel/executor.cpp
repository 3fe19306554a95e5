#include "kernel/executor.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <iostream>
#include <map>
#include <mutex>

#include "ir/evaluation.h"
#include "kernel/kernel_cache.h"
#include "utils/cuda_utils.h"
#include "utils/torch_cuda.h"

namespace hostfuse {

namespace {

// Pointwise grids: 8 blocks of 256 threads fill an SM (2048 threads);
// each thread then loops over the elements.
constexpr int64_t kPointwiseBlocksPerSm = 8;
// Reduction blocks grow until each thread has at most this many elements
// of a row, up to kMaxReductionBlockSize threads.
constexpr int64_t kElementsPerThread = 8;
// Threads an SM holds at once (sm_80 and later).
constexpr int64_t kThreadsPerSm = 2048;
// Indices and offsets below this fit an int with room for the grid-stride
// step of any grid we launch.
constexpr int64_t kIndex32Limit = int64_t{1} << 30;

int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DeviceInfo {
  int64_t sm_count = 0;
  CompileTarget target;
};

const DeviceInfo& deviceInfo(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = infos.find(device);
  if (it != infos.end()) {
    return it->second;
  }
  int major = 0;
  int minor = 0;
  int sm_count = 0;
  HF_CUDA_CHECK(cudaDeviceGetAttribute(
      &major, cudaDevAttrComputeCapabilityMajor, device));
  HF_CUDA_CHECK(cudaDeviceGetAttribute(
      &minor, cudaDevAttrComputeCapabilityMinor, device));
  HF_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count,
                                       cudaDevAttrMultiProcessorCount, device));
  return infos
      .emplace(device, DeviceInfo{sm_count, compileTargetFor(major, minor)})
      .first->second;
}

// The run-time size that `source` describes.
int64_t resolveSize(const SizeSource& source,
                    const std::vector<at::Tensor>& inputs) {
  int64_t size = 1;
  for (const InputDim& dim : source) {
    const int64_t input_size = inputs[dim.input].size(dim.dim);
    if (input_size != 1) {
      size = input_size;
    }
  }
  return size;
}

// A stride as kernels see it: 0 where the size is 1, so the dim broadcasts.
int64_t kernelStride(const at::Tensor& tensor, int64_t dim) {
  return tensor.size(dim) == 1 ? 0 : tensor.stride(dim);
}

// One more than the largest offset a kernel forms into `tensor`.
int64_t offsetBound(const at::Tensor& tensor) {
  int64_t bound = 1;
  for (int64_t d = 0; d < tensor.dim(); ++d) {
    if (tensor.size(d) > 1) {
      bound += (tensor.size(d) - 1) * std::abs(tensor.stride(d));
    }
  }
  return bound;
}

// The size of every loop dim, from the used inputs; checks that the input
// dims lining up in one loop dim agree (or are 1), as ATen's broadcasting
// would.
std::vector<int64_t> loopSizes(const Fusion& fusion, const KernelPlan& plan,
                               const std::vector<at::Tensor>& inputs) {
  std::vector<int64_t> sizes(plan.num_loop_dims, 1);
  std::vector<InputDim> first(plan.num_loop_dims, InputDim{-1, -1});
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!plan.input_used[i]) {
      continue;
    }
    for (int64_t d = 0; d < inputs[i].dim(); ++d) {
      const int64_t loop_dim = plan.input_loop_dims[i][d];
      const int64_t size = inputs[i].size(d);
      if (size == 1) {
        continue;
      }
      if (first[loop_dim].input < 0) {
        sizes[loop_dim] = size;
        first[loop_dim] = InputDim{static_cast<int64_t>(i), d};
        continue;
      }
      HF_CHECK(size == sizes[loop_dim], fusion.describeInput(i), " has size ",
               size, " in dim ", d, ", but ",
               fusion.describeInput(first[loop_dim].input), " has size ",
               sizes[loop_dim], " in dim ", first[loop_dim].dim,
               ", which the fusion lines up with it; sizes must match or "
               "be 1");
    }
  }
  return sizes;
}

// Whether `tensor` is dense, row-major and spans the loop dims in order.
bool spansLoopInOrder(const at::Tensor& tensor,
                      const std::vector<int64_t>& loop_dims,
                      const std::vector<int64_t>& loop_sizes) {
  if (loop_dims.size() != loop_sizes.size()) {
    return false;
  }
  for (size_t d = 0; d < loop_dims.size(); ++d) {
    if (loop_dims[d] != static_cast<int64_t>(d) ||
        tensor.size(static_cast<int64_t>(d)) != loop_sizes[d]) {
      return false;
    }
  }
  return tensor.is_contiguous();
}

InputSignature chooseSignature(const KernelPlan& plan,
                               const std::vector<at::Tensor>& inputs,
                               const std::vector<at::Tensor>& outputs,
                               const std::vector<int64_t>& loop_sizes,
                               int64_t numel, const KernelOptions& options) {
  std::vector<const at::Tensor*> tensors;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (plan.input_used[i]) {
      tensors.push_back(&inputs[i]);
    }
  }
  for (const at::Tensor& output : outputs) {
    tensors.push_back(&output);
  }
  InputSignature signature;
  signature.index32 = !options.force_64bit_index && numel < kIndex32Limit;
  for (const at::Tensor* tensor : tensors) {
    signature.index32 &= offsetBound(*tensor) < kIndex32Limit;
  }
  if (plan.has_reduction || !options.contiguous_fast_path) {
    return signature;
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (plan.input_used[i] &&
        !spansLoopInOrder(inputs[i], plan.input_loop_dims[i], loop_sizes)) {
      return signature;
    }
  }
  for (size_t o = 0; o < outputs.size(); ++o) {
    if (!spansLoopInOrder(outputs[o], plan.output_loop_dims[o], loop_sizes)) {
      return signature;
    }
  }
  signature.contiguous = true;
  // The widest vector that keeps every access within 16 bytes and every
  // pointer aligned to its access size.
  int64_t widest = 1;
  for (const at::Tensor* tensor : tensors) {
    widest = std::max<int64_t>(widest, tensor->element_size());
  }
  auto aligned = [&](int64_t width) {
    for (const at::Tensor* tensor : tensors) {
      const auto address = reinterpret_cast<uintptr_t>(tensor->data_ptr());
      if (address % (width * tensor->element_size()) != 0) {
        return false;
      }
    }
    return true;
  };
  int64_t width = 16 / widest;
  while (width > 1 && !aligned(width)) {
    width /= 2;
  }
  signature.vector_width = width;
  return signature;
}

// Parameter values of one launch, each in an 8-byte slot, and the array
// of pointers to them that cuLaunchKernel takes.
class KernelArgs {
 public:
  explicit KernelArgs(size_t count) { slots_.reserve(count); }
  void add(const void* value, size_t bytes) {
    slots_.emplace_back();
    std::memcpy(slots_.back().bytes, value, bytes);
  }
  void addIndex(int64_t value, bool index32) {
    if (index32) {
      const auto narrow = static_cast<int32_t>(value);
      add(&narrow, sizeof(narrow));
    } else {
      add(&value, sizeof(value));
    }
  }
  void addPointer(const void* pointer) { add(&pointer, sizeof(pointer)); }
  std::vector<void*> pointers() {
    std::vector<void*> result;
    for (Slot& slot : slots_) {
      result.push_back(slot.bytes);
    }
    return result;
  }

 private:
  struct Slot {
    alignas(8) unsigned char bytes[8];
  };
  std::vector<Slot> slots_;
};

std::vector<at::Tensor> runWithEntry(const Fusion& fusion,
                                     const FusionEntry& entry,
                                     const std::vector<c10::IValue>& inputs,
                                     const KernelOptions& options) {
  HF_CHECK(entry.unsupported.empty(), entry.unsupported);
  const KernelPlan& plan = entry.plan;
  ValueMap values;
  bindInputs(fusion, inputs, values);

  std::vector<at::Tensor> tensors(inputs.size());
  int device = -1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor()) {
      continue;
    }
    tensors[i] = inputs[i].toTensor();
    HF_CHECK(tensors[i].is_cuda(), "runFusionOnCuda: ", fusion.describeInput(i),
             " is on ", tensors[i].device().str(),
             "; every tensor input must be on one CUDA device");
    const int index = tensors[i].device().index();
    HF_CHECK(device < 0 || index == device,
             "runFusionOnCuda: ", fusion.describeInput(i),
             " is on cuda:", index,
             " but an earlier input is on cuda:", device);
    device = index;
  }
  HF_CHECK(device >= 0,
           "runFusionOnCuda: the fusion has no tensor input to take the "
           "device from");

  const std::vector<int64_t> loop_sizes = loopSizes(fusion, plan, tensors);
  int64_t numel = 1;
  for (int64_t size : loop_sizes) {
    numel *= size;
  }
  // With a reduction: rows are the loop dims before R, the last.
  const int64_t row_length = plan.has_reduction ? loop_sizes.back() : 1;
  int64_t rows = 1;
  for (int64_t c = 0; plan.has_reduction && c + 1 < plan.num_loop_dims; ++c) {
    rows *= loop_sizes[c];
  }
  for (size_t k = 0; k < plan.reduced_sizes.size(); ++k) {
    HF_CHECK(resolveSize(plan.reduced_sizes[k], tensors) == row_length,
             "kernel codegen: ", plan.reduction_names[k],
             " reduces a dim of size 1 that broadcasts against size ",
             row_length, " elsewhere in the fusion; this is not supported");
  }
  if (plan.has_reduction && plan.has_max_reduction) {
    HF_CHECK(row_length > 0 || rows == 0,
             "max: the reduced dim has size 0, and max has no identity");
  }

  std::vector<at::Tensor> outputs;
  for (size_t o = 0; o < fusion.outputs().size(); ++o) {
    std::vector<int64_t> sizes;
    for (const SizeSource& source : plan.output_sizes[o]) {
      sizes.push_back(resolveSize(source, tensors));
    }
    outputs.push_back(at::empty(
        sizes, at::TensorOptions()
                   .dtype(toScalarType(fusion.outputs()[o]->dtype()))
                   .device(at::Device(at::kCUDA,
                                      static_cast<c10::DeviceIndex>(device)))));
  }
  if (plan.has_reduction ? rows == 0 : numel == 0) {
    return outputs;
  }

  const InputSignature signature =
      chooseSignature(plan, tensors, outputs, loop_sizes, numel, options);
  const DeviceInfo& info = deviceInfo(device);
  const std::shared_ptr<const FusionKernel> kernel =
      KernelCache::global().kernel(fusion, entry, signature, info.target);
  const GeneratedKernel& generated = kernel->generated();

  KernelArgs args(generated.params.size());
  const bool index32 = signature.index32;
  for (const KernelParam& param : generated.params) {
    switch (param.kind) {
      case KernelParam::Kind::kInputData:
        args.addPointer(tensors[param.index].data_ptr());
        break;
      case KernelParam::Kind::kInputStride:
        args.addIndex(kernelStride(tensors[param.index], param.dim), index32);
        break;
      case KernelParam::Kind::kOutputData:
        args.addPointer(outputs[param.index].data_ptr());
        break;
      case KernelParam::Kind::kOutputStride:
        args.addIndex(kernelStride(outputs[param.index], param.dim), index32);
        break;
      case KernelParam::Kind::kLoopSize:
        args.addIndex(loop_sizes[param.index], index32);
        break;
      case KernelParam::Kind::kNumel:
        args.addIndex(numel, index32);
        break;
      case KernelParam::Kind::kNumRows:
        args.addIndex(rows, index32);
        break;
      case KernelParam::Kind::kScalar: {
        const ScalarSource& source = plan.scalars[param.index];
        const Val* input = fusion.inputs()[source.input];
        if (source.dim >= 0) {
          const int64_t size = tensors[source.input].size(source.dim);
          args.add(&size, sizeof(size));
        } else if (input->dtype() == DataType::Double) {
          const double value = values.get(input).toDouble();
          args.add(&value, sizeof(value));
        } else {
          const c10::IValue value = values.get(input);
          const int64_t number =
              value.isBool() ? int64_t{value.toBool()} : value.toInt();
          args.add(&number, sizeof(number));
        }
        break;
      }
    }
  }

  int64_t block = 0;
  int64_t grid = 0;
  if (generated.is_reduction) {
    block = 32;
    while (block < kMaxReductionBlockSize &&
           block * kElementsPerThread < row_length) {
      block *= 2;
    }
    grid = std::min(rows, info.sm_count * (kThreadsPerSm / block) * 4);
  } else {
    const int64_t work =
        signature.contiguous ? ceilDiv(numel, signature.vector_width) : numel;
    block = kPointwiseBlockSize;
    grid = std::clamp<int64_t>(ceilDiv(work, block), 1,
                               info.sm_count * kPointwiseBlocksPerSm);
  }
  std::vector<void*> pointers = args.pointers();
  kernel->launch(device, cuda::currentStream(device), grid, block,
                 pointers.data());
  return outputs;
}

bool onCuda(const std::vector<c10::IValue>& inputs) {
  for (const c10::IValue& input : inputs) {
    if (input.isTensor()) {
      return input.toTensor().is_cuda();
    }
  }
  return false;
}

}  // namespace

std::vector<at::Tensor> runFusionOnCuda(const Fusion& fusion,
                                        const std::vector<c10::IValue>& inputs,
                                        const KernelOptions& options) {
  return runWithEntry(fusion, *KernelCache::global().entry(fusion), inputs,
                      options);
}

std::optional<std::string> kernelUnsupportedReason(const Fusion& fusion) {
  const std::shared_ptr<const FusionEntry> entry =
      KernelCache::global().entry(fusion);
  if (entry->unsupported.empty()) {
    return std::nullopt;
  }
  return entry->unsupported;
}

std::vector<at::Tensor> executeFusion(const Fusion& fusion,
                                      const std::vector<c10::IValue>& inputs) {
  if (!onCuda(inputs)) {
    return evaluateFusion(fusion, inputs);
  }
  const std::shared_ptr<const FusionEntry> entry =
      KernelCache::global().entry(fusion);
  if (!entry->unsupported.empty()) {
    if (dumpKernelsEnabled() && !entry->fallback_reported.exchange(true)) {
      std::cerr << "hostfuse: this fusion runs with the ATen reference on "
                   "CUDA: "
                << entry->unsupported << "\n"
                << fusion.toString() << std::flush;
    }
    return evaluateFusion(fusion, inputs);
  }
  return runWithEntry(fusion, *entry, inputs, KernelOptions{});
}

}  // namespace hostfuse
