// The fusions that the kernel tests generate, compile and run: each with
// its inputs (sizes in terms of a row and a column count) and an ATen
// reference written independently of the IR.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <hostfuse/host_ir/container.h>
#include <hostfuse/host_ir/host_ir.h>
#include <hostfuse/ir/ops.h>
#include "test_utils.h"

namespace hostfuse::test {

// Size placeholders in InputSpec::sizes.
constexpr int64_t kRows = -1;
constexpr int64_t kCols = -2;

struct InputSpec {
  std::vector<int64_t> sizes;  // kRows, kCols or a literal size
  DataType dtype = DataType::Float;
  bool is_scalar = false;  // a symbolic scalar input of `dtype`
  double scalar_value = 0.0;
};

// Tolerances for comparing a generated kernel (float arithmetic, no
// rounding of intermediates) with an ATen reference, by output dtype.
struct Tolerance {
  double rtol = 0.0;
  double atol = 0.0;
};

struct FusionCase {
  std::string name;
  std::vector<InputSpec> inputs;
  // Adds the computation and the outputs; `in` are the fusion's inputs,
  // `cols` the symbolic column count.
  std::function<void(Fusion& fusion, const std::vector<Val*>& in, Scalar* cols)>
      body;
  // The outputs computed with plain ATen ops from the input values.
  std::function<std::vector<at::Tensor>(const std::vector<c10::IValue>&)>
      reference;
  // At least this tolerance for floating-point outputs, for cases whose
  // outputs are long sums (see toleranceFor for the usual ones).
  Tolerance float_tolerance{};
};

// How the GPU tests lay tensor inputs out in memory.
enum class Layout {
  kContiguous,
  kTransposed,  // the last two dims swapped in memory (rank 1: stride 2)
  kSliced,      // a window of a wider tensor, starting one element in
  kPitched,     // a window of rows 16 elements wider, starting 16 elements
                // in: aligned, with rows of unit stride
};

inline const char* toString(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kTransposed:
      return "transposed";
    case Layout::kSliced:
      return "sliced";
    case Layout::kPitched:
      return "pitched";
  }
  return "?";
}

// Builds the case's fusion in `fusion`; returns its inputs.
inline std::vector<Val*> buildFusion(const FusionCase& c, Fusion& fusion) {
  FusionGuard guard(&fusion);
  Scalar* rows = makeSymbolicScalar(DataType::Int64, "N");
  Scalar* cols = makeSymbolicScalar(DataType::Int64, "K");
  std::vector<Val*> inputs;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    const InputSpec& spec = c.inputs[i];
    const std::string name(1, static_cast<char>('a' + i));
    if (spec.is_scalar) {
      inputs.push_back(makeSymbolicScalar(spec.dtype, name));
    } else {
      std::vector<SizeSpec> sizes;
      for (int64_t size : spec.sizes) {
        sizes.push_back(size == kRows   ? SizeSpec(rows)
                        : size == kCols ? SizeSpec(cols)
                                        : SizeSpec(size));
      }
      inputs.push_back(makeTensor(sizes, spec.dtype, name));
    }
    fusion.addInput(inputs.back());
  }
  c.body(fusion, inputs, cols);
  return inputs;
}

inline std::shared_ptr<Fusion> buildFusion(const FusionCase& c) {
  auto fusion = std::make_shared<Fusion>();
  buildFusion(c, *fusion);
  return fusion;
}

// A host program that runs `fusion` once (RunFusion) on inputs declared
// like the fusion's.
inline std::unique_ptr<HostIrContainer> programRunning(
    std::shared_ptr<Fusion> fusion) {
  auto program = std::make_unique<HostIrContainer>();
  FusionGuard guard(program.get());
  std::unordered_map<const Scalar*, Scalar*> extents;
  std::vector<Val*> inputs;
  for (const Val* input : fusion->inputs()) {
    const auto* tv = dynamic_cast<const TensorView*>(input);
    if (tv == nullptr) {
      inputs.push_back(makeSymbolicScalar(input->dtype(), input->userName()));
      program->addInput(inputs.back());
      continue;
    }
    std::vector<SizeSpec> sizes;
    for (Scalar* extent : tv->extents()) {
      if (const std::optional<int64_t> size = extent->constantInt()) {
        sizes.emplace_back(*size);
        continue;
      }
      Scalar*& outer = extents[extent];
      if (outer == nullptr) {
        outer = makeSymbolicScalar(DataType::Int64, extent->toString());
      }
      sizes.emplace_back(outer);
    }
    inputs.push_back(makeTensor(sizes, tv->dtype(), tv->userName()));
    program->addInput(inputs.back());
  }
  for (TensorView* output : runFusion(std::move(fusion), inputs)) {
    program->addOutput(output);
  }
  return program;
}

// relu(a @ b): codegen rejects matmul, so this always runs with ATen.
inline std::shared_ptr<Fusion> matmulReluFusion() {
  auto fusion = std::make_shared<Fusion>();
  FusionGuard guard(fusion.get());
  TensorView* a = makeSymbolicTensor(2, DataType::Float, "a");
  TensorView* b = makeSymbolicTensor(2, DataType::Float, "b");
  fusion->addInput(a);
  fusion->addInput(b);
  fusion->addOutput(relu(matmul(a, b)));
  return fusion;
}

// A random tensor of `sizes` laid out as `layout`.
inline at::Tensor makeInput(std::vector<int64_t> sizes, at::ScalarType dtype,
                            Layout layout, const at::Device& device,
                            uint64_t seed) {
  if (layout == Layout::kContiguous || sizes.empty()) {
    return randomTensor(sizes, dtype, device, seed);
  }
  const auto rank = static_cast<int64_t>(sizes.size());
  if (layout == Layout::kTransposed && rank >= 2) {
    std::swap(sizes[rank - 1], sizes[rank - 2]);
    return randomTensor(sizes, dtype, device, seed).transpose(-1, -2);
  }
  if (layout == Layout::kTransposed) {
    const int64_t size = sizes[0];
    sizes[0] = 2 * size;
    return randomTensor(sizes, dtype, device, seed).slice(0, 0, 2 * size, 2);
  }
  const int64_t size = sizes[rank - 1];
  const int64_t start = layout == Layout::kPitched ? 16 : 1;
  sizes[rank - 1] = size + (layout == Layout::kPitched ? 16 : 3);
  return randomTensor(sizes, dtype, device, seed).narrow(-1, start, size);
}

inline std::vector<c10::IValue> makeInputs(const FusionCase& c, int64_t rows,
                                           int64_t cols, Layout layout,
                                           const at::Device& device) {
  std::vector<c10::IValue> values;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    const InputSpec& spec = c.inputs[i];
    if (spec.is_scalar) {
      if (spec.dtype == DataType::Double) {
        values.emplace_back(spec.scalar_value);
      } else {
        values.emplace_back(static_cast<int64_t>(spec.scalar_value));
      }
      continue;
    }
    std::vector<int64_t> sizes;
    for (int64_t size : spec.sizes) {
      sizes.push_back(size == kRows ? rows : size == kCols ? cols : size);
    }
    values.emplace_back(makeInput(sizes, toScalarType(spec.dtype), layout,
                                  device, /*seed=*/100 + i));
  }
  return values;
}

inline Tolerance toleranceFor(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return {1e-5, 1e-5};
    case at::kDouble:
      return {1e-10, 1e-10};
    case at::kHalf:
      return {4e-3, 5e-3};
    case at::kBFloat16:
      return {2e-2, 4e-2};
    default:
      return {0.0, 0.0};  // integers and bool: exact
  }
}

// `minimum` raises the tolerance of floating-point outputs.
inline void expectOutputsClose(const std::vector<at::Tensor>& actual,
                               const std::vector<at::Tensor>& expected,
                               Tolerance minimum = {}) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t o = 0; o < actual.size(); ++o) {
    SCOPED_TRACE("output " + std::to_string(o));
    Tolerance tolerance = toleranceFor(expected[o].scalar_type());
    if (at::isFloatingType(expected[o].scalar_type())) {
      tolerance.rtol = std::max(tolerance.rtol, minimum.rtol);
      tolerance.atol = std::max(tolerance.atol, minimum.atol);
    }
    expectClose(actual[o], expected[o], tolerance.rtol, tolerance.atol);
  }
}

// Every fusion of the catalog (kernel_case_list.h, included below).
inline const std::vector<FusionCase>& fusionCases();

inline std::string caseName(const testing::TestParamInfo<size_t>& info) {
  return fusionCases()[info.param].name;
}

}  // namespace hostfuse::test

#include "kernel_case_list.h"
