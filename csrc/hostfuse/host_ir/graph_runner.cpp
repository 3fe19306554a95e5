#include <hostfuse/host_ir/graph_runner.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <sstream>

#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/utils/cuda_utils.h>
#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse {

const char* toString(GraphRunner::Mode mode) {
  switch (mode) {
    case GraphRunner::Mode::Eager:
      return "eager";
    case GraphRunner::Mode::Capture:
      return "capture";
    case GraphRunner::Mode::Replay:
      return "replay";
  }
  return "unknown";
}

namespace {

// A key that differs when a captured graph would not fit the inputs: tensor
// dtypes, devices, sizes and strides, and scalar values (frozen in the
// graph's kernel arguments).
std::string signatureOf(const std::vector<c10::IValue>& inputs) {
  std::ostringstream ss;
  for (const c10::IValue& input : inputs) {
    if (input.isTensor()) {
      const at::Tensor& t = input.toTensor();
      if (!t.defined()) {
        ss << "undefined;";
        continue;
      }
      ss << "t" << t.scalar_type() << "@" << t.device() << t.sizes()
         << t.strides() << ";";
    } else if (input.isInt()) {
      ss << "i" << input.toInt() << ";";
    } else if (input.isDouble()) {
      const double value = input.toDouble();
      uint64_t bits = 0;
      std::memcpy(&bits, &value, sizeof(bits));
      ss << "d" << bits << ";";
    } else if (input.isBool()) {
      ss << "b" << input.toBool() << ";";
    } else {
      ss << "?" << input.tagKind() << ";";
    }
  }
  return ss.str();
}

// Copies `source` into the static buffer `buffer` on the current stream:
// one cudaMemcpyAsync when both are dense with the same strides (what
// capture() allocates for a dense input), else a copy kernel.
void copyInto(const at::Tensor& buffer, const at::Tensor& source) {
  if (source.numel() == 0 || buffer.data_ptr() == source.data_ptr()) {
    return;
  }
  if (source.is_non_overlapping_and_dense() &&
      buffer.strides() == source.strides() &&
      buffer.device() == source.device()) {
    // Dense with non-negative strides: the elements fill numel * itemsize
    // bytes from the first one, in the same order in both.
    HF_CUDA_CHECK(cudaMemcpyAsync(
        buffer.data_ptr(), source.data_ptr(),
        static_cast<size_t>(source.numel()) * source.element_size(),
        cudaMemcpyDeviceToDevice,
        cuda::currentStream(buffer.device().index())));
    return;
  }
  buffer.copy_(source);
}

std::string joinLines(const std::vector<std::string>& lines) {
  std::string text;
  for (const std::string& line : lines) {
    text += "\n  - " + line;
  }
  return text;
}

}  // namespace

std::vector<std::string> findCaptureProblems(const HostIrContainer& program,
                                             const at::Device& device) {
  std::vector<std::string> problems;
  for (const Expr* expr : program.topLevelExprs()) {
    for (const std::string& why : expr->captureProblems(device)) {
      problems.push_back(expr->toInlineString() + "\n      " + why);
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------

// The state of one input signature.
struct GraphRunner::Entry {
  int64_t calls = 0;
  at::Device device = at::kCPU;
  // Per input: the buffer the graph reads (tensors), the captured value
  // (scalars), or the caller's tensor (persistent inputs).
  std::vector<c10::IValue> static_inputs;
  std::unique_ptr<cuda::CudaGraph> graph;
  std::vector<at::Tensor> outputs;
};

GraphRunner::GraphRunner(std::unique_ptr<HostIrContainer> program,
                         HostIrEvaluatorParams params,
                         GraphRunnerOptions options)
    : params_(params),
      options_(std::move(options)),
      evaluator_(std::move(program), params) {
  for (const size_t input : options_.persistent_inputs) {
    HF_CHECK(input < evaluator_.program().inputs().size(),
             "GraphRunner: persistent input ", input,
             " is out of range: the program has ",
             evaluator_.program().inputs().size(), " inputs");
    HF_CHECK(evaluator_.program().inputs()[input]->isA<TensorView>(),
             "GraphRunner: persistent input ", input, " (",
             evaluator_.program().describeInput(input),
             ") must be a tensor input");
  }
}

GraphRunner::~GraphRunner() {
  // A replay may still run; its pool must not go back to the allocator
  // before it ends.
  for (const auto& [key, entry] : entries_) {
    if (entry->graph != nullptr) {
      try {
        cuda::synchronize(entry->device.index());
      } catch (...) {
      }
    }
  }
}

std::vector<at::Tensor> GraphRunner::run(
    const std::vector<c10::IValue>& inputs) {
  std::unique_ptr<Entry>& slot = entries_[signatureOf(inputs)];
  if (slot == nullptr) {
    slot = std::make_unique<Entry>();
  }
  Entry& entry = *slot;
  if (entry.graph != nullptr) {
    replay(entry, inputs);
    last_mode_ = Mode::Replay;
    return results(entry.outputs);
  }
  if (entry.calls == 0) {
    entry.device = checkCapturable(inputs);
    std::vector<at::Tensor> outputs = evaluator_.run(inputs);
    entry.calls = 1;
    last_mode_ = Mode::Eager;
    return outputs;
  }
  capture(entry, inputs);
  last_mode_ = Mode::Capture;
  return results(entry.outputs);
}

at::Device GraphRunner::checkCapturable(
    const std::vector<c10::IValue>& inputs) const {
  const HostIrContainer& program = evaluator_.program();
  std::vector<std::string> problems;
  std::optional<at::Device> device = params_.device;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor() || !inputs[i].toTensor().defined()) {
      continue;  // HostIrEvaluator::run reports what does not fit
    }
    const at::Device input_device = inputs[i].toTensor().device();
    if (!input_device.is_cuda()) {
      problems.push_back((i < program.inputs().size() ? program.describeInput(i)
                                                      : toString("input ", i)) +
                         " is a " + input_device.str() +
                         " tensor; a CUDA graph captures work on the GPU only");
    } else if (!device.has_value()) {
      device = input_device;
    }
  }
  if (!device.has_value()) {
    device = at::Device(at::kCPU);
  }
  if (!device->is_cuda() && problems.empty()) {
    problems.push_back("the program runs on " + device->str() +
                       "; a CUDA graph captures work on the GPU only");
  }
  if (device->is_cuda() && !device->has_index()) {
    HF_CHECK(cuda::isAvailable(), "GraphRunner: the program is set to run on ",
             device->str(), ", but no CUDA device is available");
    device = at::Device(at::kCUDA,
                        static_cast<c10::DeviceIndex>(cuda::currentDevice()));
  }
  for (std::string& problem : findCaptureProblems(program, *device)) {
    problems.push_back(std::move(problem));
  }
  HF_CHECK(problems.empty(),
           "GraphRunner: the program cannot be captured in a CUDA graph "
           "(checked before running anything):",
           joinLines(problems), "\nThe program:\n", program.toString());
  return *device;
}

bool GraphRunner::isPersistent(size_t input) const {
  for (const size_t persistent : options_.persistent_inputs) {
    if (persistent == input) {
      return true;
    }
  }
  return false;
}

void GraphRunner::capture(Entry& entry,
                          const std::vector<c10::IValue>& inputs) {
  HF_CHECK(inputs.size() == program().inputs().size(), "the program takes ",
           program().inputs().size(), " inputs, but ", inputs.size(),
           " were given");
  const c10::DeviceGuard device_guard(entry.device);
  const int device = entry.device.index();
  entry.static_inputs.clear();
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].isTensor() || isPersistent(i) ||
        !inputs[i].toTensor().defined()) {
      entry.static_inputs.push_back(inputs[i]);
      continue;
    }
    const at::Tensor& input = inputs[i].toTensor();
    // Same strides for a dense input, so that replays copy it with one
    // memcpy; a contiguous buffer for other layouts (expanded, strided).
    const at::Tensor buffer =
        input.is_non_overlapping_and_dense()
            ? at::empty_strided(input.sizes(), input.strides(), input.options())
            : at::empty(input.sizes(), input.options());
    copyInto(buffer, input);
    entry.static_inputs.push_back(buffer);
  }

  auto graph = std::make_unique<cuda::CudaGraph>();
  std::vector<at::Tensor> outputs;
  {
    // Capture needs a stream other than the default one. Thread-local mode:
    // other threads (NCCL's watchdog) may keep querying their events.
    const cuda::StreamScope side_stream(device);
    graph->captureBegin(cuda::CudaGraph::CaptureMode::ThreadLocal);
    try {
      outputs = evaluator_.run(entry.static_inputs);
      graph->captureEnd();
    } catch (const std::exception& error) {
      graph->abortCapture();
      entry.static_inputs.clear();
      HF_THROW(
          "GraphRunner: capturing the program failed, so nothing ran; the "
          "next call with these input shapes tries again, eager runs "
          "(evaluator()) still work: ",
          error.what());
    }
  }
  entry.graph = std::move(graph);
  entry.outputs = std::move(outputs);
  ++num_graphs_;
  // The capture recorded the work; this runs it, on the caller's stream.
  entry.graph->replay();
  ++num_replays_;
}

void GraphRunner::replay(Entry& entry, const std::vector<c10::IValue>& inputs) {
  // Check everything before copying anything.
  for (const size_t i : options_.persistent_inputs) {
    const at::Tensor& captured = entry.static_inputs.at(i).toTensor();
    const at::Tensor& given = inputs.at(i).toTensor();
    HF_CHECK(given.data_ptr() == captured.data_ptr(),
             "GraphRunner: ", program().describeInput(i),
             " is a persistent input (GraphRunnerOptions::persistent_inputs): "
             "the graph reads the tensor passed when it was captured (data at ",
             captured.data_ptr(), "), but this call passes another one (",
             given.data_ptr(), "); update that tensor in place instead");
  }
  const c10::DeviceGuard device_guard(entry.device);
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].isTensor() && !isPersistent(i) &&
        inputs[i].toTensor().defined()) {
      copyInto(entry.static_inputs[i].toTensor(), inputs[i].toTensor());
    }
  }
  entry.graph->replay();
  ++num_replays_;
}

std::vector<at::Tensor> GraphRunner::results(
    const std::vector<at::Tensor>& outputs) const {
  if (!options_.copy_outputs) {
    return outputs;
  }
  std::vector<at::Tensor> copies;
  copies.reserve(outputs.size());
  for (const at::Tensor& output : outputs) {
    copies.push_back(output.clone());
  }
  return copies;
}

void GraphRunner::checkStatus() {
  std::set<int> devices;
  for (const auto& [key, entry] : entries_) {
    if (entry->device.is_cuda()) {
      devices.insert(entry->device.index());
    }
  }
  for (const int device : devices) {
    cuda::synchronize(device);
  }
  evaluator_.checkStatus();
}

}  // namespace hostfuse
