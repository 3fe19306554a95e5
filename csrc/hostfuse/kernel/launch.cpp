#include <hostfuse/kernel/launch.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <optional>

namespace hostfuse {

namespace {

// Reduction blocks grow until each thread has at most this many elements
// of a row, up to kMaxReductionBlockSize threads.
constexpr int64_t kElementsPerThread = 8;
// Reduction grids: this many waves of resident blocks at most; blocks that
// finish their rows early take the next ones.
constexpr int64_t kReductionWaves = 4;
// Indices and offsets below this fit an int with room for the grid-stride
// step of any grid we launch.
constexpr int64_t kIndex32Limit = int64_t{1} << 30;

int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// The elements between consecutive rows of `tensor` seen as [rows, its
// last size]: its last dim has stride 1 (or size 1) and its other dims
// collapse into one (each stride the one inside it times that dim's size,
// dims of size 1 aside). nullopt when they do not. A tensor of one row
// gets its row length. Rank 2 or more.
std::optional<int64_t> rowPitch(const at::Tensor& tensor) {
  const int64_t last = tensor.dim() - 1;
  if (tensor.size(last) != 1 && tensor.stride(last) != 1) {
    return std::nullopt;
  }
  std::optional<int64_t> pitch;
  int64_t next = 0;  // the stride the next outer dim must have
  for (int64_t d = last - 1; d >= 0; --d) {
    if (tensor.size(d) == 1) {
      continue;
    }
    if (pitch.has_value() && tensor.stride(d) != next) {
      return std::nullopt;
    }
    if (!pitch.has_value()) {
      pitch = tensor.stride(d);
    }
    next = tensor.stride(d) * tensor.size(d);
  }
  return pitch.value_or(tensor.size(last));
}

// rowPitch of a tensor that a pitched-rows kernel was chosen for.
int64_t pitchParam(const at::Tensor& tensor) {
  const std::optional<int64_t> pitch = rowPitch(tensor);
  HF_ERROR(pitch.has_value(), "a pitched-rows kernel was given a tensor of ",
           "sizes ", tensor.sizes(), " and strides ", tensor.strides(),
           ", whose rows do not collapse into one dim");
  return *pitch;
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

// Whether `tensor` is dense, row-major and of the loop's full shape.
bool isDenseFullShape(const at::Tensor& tensor,
                      const std::vector<int64_t>& loop_sizes) {
  return tensor.sizes().equals(loop_sizes) && tensor.is_contiguous();
}

// The widest vector width, from `widest` down, for which every tensor's
// start is aligned to its access size and `divides(width)` holds; 1 if
// none.
template <typename Divides>
int64_t widestAligned(const std::vector<const at::Tensor*>& tensors,
                      int64_t widest, Divides divides) {
  auto fits = [&](int64_t width) {
    for (const at::Tensor* tensor : tensors) {
      const auto address = reinterpret_cast<uintptr_t>(tensor->data_ptr());
      if (address % (width * tensor->element_size()) != 0) {
        return false;
      }
    }
    return divides(width);
  };
  int64_t width = widest;
  while (width > 1 && !fits(width)) {
    width /= 2;
  }
  return width;
}

InputSignature chooseSignature(const KernelPlan& plan, const LaunchSetup& setup,
                               const KernelOptions& options) {
  std::vector<const at::Tensor*> tensors;
  for (size_t i = 0; i < setup.inputs.size(); ++i) {
    if (plan.input_used[i]) {
      tensors.push_back(&setup.inputs[i]);
    }
  }
  for (const at::Tensor& output : setup.outputs) {
    tensors.push_back(&output);
  }
  InputSignature signature;
  signature.index32 = !options.force_64bit_index && setup.numel < kIndex32Limit;
  for (const at::Tensor* tensor : tensors) {
    signature.index32 &= offsetBound(*tensor) < kIndex32Limit;
  }
  if (!plan.contiguous_possible || !options.contiguous_fast_path) {
    return signature;
  }
  const bool dense = std::all_of(
      tensors.begin(), tensors.end(), [&](const at::Tensor* tensor) {
        return isDenseFullShape(*tensor, setup.loop_sizes);
      });
  if (dense) {
    // The widest vector that keeps every access within 16 bytes and every
    // pointer aligned to its access size.
    signature.contiguous = true;
    signature.vector_width = widestAligned(tensors, plan.max_vector_width,
                                           [](int64_t) { return true; });
    return signature;
  }
  // Pitched rows: worth it only with vectors, for which the row length and
  // every pitch must be multiples of the width.
  if (setup.loop_sizes.size() < 2) {
    return signature;
  }
  std::vector<int64_t> pitches;
  for (const at::Tensor* tensor : tensors) {
    const std::optional<int64_t> pitch = rowPitch(*tensor);
    if (!tensor->sizes().equals(setup.loop_sizes) || !pitch.has_value()) {
      return signature;
    }
    pitches.push_back(*pitch);
  }
  const int64_t row_length = setup.loop_sizes.back();
  const int64_t width =
      widestAligned(tensors, plan.max_vector_width, [&](int64_t width) {
        return row_length % width == 0 &&
               std::all_of(pitches.begin(), pitches.end(),
                           [&](int64_t pitch) { return pitch % width == 0; });
      });
  if (width > 1) {
    signature.pitched_rows = true;
    signature.vector_width = width;
  }
  return signature;
}

}  // namespace

LaunchSetup setUpLaunch(const Fusion& fusion, const KernelPlan& plan,
                        const std::vector<c10::IValue>& inputs,
                        const at::Device& device, const KernelOptions& options,
                        const at::Tensor& row_counts) {
  LaunchSetup setup;
  bindInputs(fusion, inputs, setup.values);
  setup.inputs.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].isTensor()) {
      setup.inputs[i] = inputs[i].toTensor();
    }
  }

  setup.loop_sizes = loopSizes(fusion, plan, setup.inputs);
  setup.numel = 1;
  for (int64_t size : setup.loop_sizes) {
    setup.numel *= size;
  }
  // With a reduction, rows are the loop dims before R, the last one.
  const int64_t row_length = plan.has_reduction ? setup.loop_sizes.back() : 1;
  setup.rows = 1;
  for (int64_t c = 0; plan.has_reduction && c + 1 < plan.num_loop_dims; ++c) {
    setup.rows *= setup.loop_sizes[c];
  }
  for (size_t k = 0; k < plan.reduced_sizes.size(); ++k) {
    HF_CHECK(resolveSize(plan.reduced_sizes[k], setup.inputs) == row_length,
             "kernel codegen: ", plan.reduction_names[k],
             " reduces a dim of size 1 that broadcasts against size ",
             row_length, " elsewhere in the fusion; this is not supported");
  }
  HF_CHECK(!plan.has_max_reduction || row_length > 0 || setup.rows == 0,
           "max: the reduced dim has size 0, and max has no identity");

  for (size_t o = 0; o < fusion.outputs().size(); ++o) {
    std::vector<int64_t> sizes;
    for (const SizeSource& source : plan.output_sizes[o]) {
      sizes.push_back(resolveSize(source, setup.inputs));
    }
    setup.outputs.push_back(
        at::empty(sizes, at::TensorOptions()
                             .dtype(toScalarType(fusion.outputs()[o]->dtype()))
                             .device(device)));
  }
  setup.nothing_to_launch =
      plan.has_reduction ? setup.rows == 0 : setup.numel == 0;
  if (!setup.nothing_to_launch) {
    setup.signature = chooseSignature(plan, setup, options);
  }
  if (row_counts.defined()) {
    HF_CHECK(row_counts.dim() == 1 && row_counts.scalar_type() == at::kLong,
             "row_counts must be an i64 tensor of rank 1, got ",
             row_counts.scalar_type(), " of sizes ", row_counts.sizes());
    HF_CHECK(row_counts.device() == device, "row_counts is on ",
             row_counts.device().str(), ", but the fusion runs on ",
             device.str());
    // Rows past the limit are unspecified, so a fusion whose rows cannot be
    // limited computes them all.
    if (plan.rowsCanBeLimited()) {
      setup.row_counts = row_counts.contiguous();
      setup.signature.row_limited = true;
    }
  }
  return setup;
}

KernelArgs::KernelArgs(const Fusion& fusion, const KernelPlan& plan,
                       const GeneratedKernel& kernel, const LaunchSetup& setup)
    : index32_(kernel.signature.index32) {
  slots_.reserve(kernel.params.size());
  for (const KernelParam& param : kernel.params) {
    switch (param.kind) {
      case KernelParam::Kind::kInputData: {
        const void* data = setup.inputs[param.index].data_ptr();
        add(&data, sizeof(data));
        break;
      }
      case KernelParam::Kind::kInputStride:
        addIndex(kernelStride(setup.inputs[param.index], param.dim));
        break;
      case KernelParam::Kind::kOutputData: {
        const void* data = setup.outputs[param.index].data_ptr();
        add(&data, sizeof(data));
        break;
      }
      case KernelParam::Kind::kOutputStride:
        addIndex(kernelStride(setup.outputs[param.index], param.dim));
        break;
      case KernelParam::Kind::kInputPitch:
        addIndex(pitchParam(setup.inputs[param.index]));
        break;
      case KernelParam::Kind::kOutputPitch:
        addIndex(pitchParam(setup.outputs[param.index]));
        break;
      case KernelParam::Kind::kRowCounts: {
        const void* data = setup.row_counts.data_ptr();
        add(&data, sizeof(data));
        break;
      }
      case KernelParam::Kind::kRowGroups: {
        const int64_t groups = setup.row_counts.numel();
        add(&groups, sizeof(groups));
        break;
      }
      case KernelParam::Kind::kLoopSize:
        addIndex(setup.loop_sizes[param.index]);
        break;
      case KernelParam::Kind::kNumel:
        addIndex(setup.numel);
        break;
      case KernelParam::Kind::kNumRows:
        addIndex(setup.rows);
        break;
      case KernelParam::Kind::kScalar: {
        // Scalars are double or long long parameters (codegen.cpp).
        const ScalarSource& source = plan.scalars[param.index];
        const Val* input = fusion.inputs()[source.input];
        if (source.dim >= 0) {
          const int64_t size = setup.inputs[source.input].size(source.dim);
          add(&size, sizeof(size));
        } else if (input->dtype() == DataType::Double) {
          const double value = setup.values.get(input).toDouble();
          add(&value, sizeof(value));
        } else {
          const c10::IValue value = setup.values.get(input);
          const int64_t number =
              value.isBool() ? int64_t{value.toBool()} : value.toInt();
          add(&number, sizeof(number));
        }
        break;
      }
    }
  }
  for (Slot& slot : slots_) {
    pointers_.push_back(slot.bytes);
  }
}

void KernelArgs::add(const void* value, size_t bytes) {
  HF_ERROR(bytes <= sizeof(Slot), "a parameter of ", bytes, " bytes");
  HF_ERROR(slots_.size() < slots_.capacity(),
           "more parameters than the kernel has");
  slots_.emplace_back();
  std::memcpy(slots_.back().bytes, value, bytes);
}

void KernelArgs::addIndex(int64_t value) {
  if (index32_) {
    const auto narrow = static_cast<int32_t>(value);
    add(&narrow, sizeof(narrow));
  } else {
    add(&value, sizeof(value));
  }
}

LaunchConfig launchConfig(const GeneratedKernel& kernel,
                          const LaunchSetup& setup, int64_t sm_count,
                          const ResidentBlocks& resident_blocks) {
  LaunchConfig config;
  if (kernel.is_reduction) {
    const int64_t row_length = setup.loop_sizes.back();
    config.block = 32;
    while (config.block < kMaxReductionBlockSize &&
           config.block * kElementsPerThread < row_length) {
      config.block *= 2;
    }
    config.grid = std::min(
        setup.rows, sm_count * resident_blocks(config.block) * kReductionWaves);
  } else {
    const int64_t work =
        kernel.signature.contiguous || kernel.signature.pitched_rows
            ? ceilDiv(setup.numel, kernel.signature.vector_width)
            : setup.numel;
    config.block = kPointwiseBlockSize;
    config.grid = std::clamp<int64_t>(ceilDiv(work, config.block), 1,
                                      sm_count * resident_blocks(config.block));
  }
  return config;
}

}  // namespace hostfuse
