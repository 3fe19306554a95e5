// Running fusions: generated kernels for CUDA tensors, the ATen reference
// for CPU tensors and for what codegen cannot handle.
//
//   std::vector<at::Tensor> outputs = executeFusion(fusion, {x, w});
//
// The launch path (runFusionOnCuda once a kernel is compiled and loaded)
// never synchronizes with the host and allocates only the outputs, through
// libtorch's caching allocator, so it can be captured in a CUDA graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <optional>
#include <string>
#include <vector>

#include <hostfuse/ir/container.h>
#include <hostfuse/kernel/launch.h>

namespace hostfuse {

// Runs `fusion` with its generated kernel on the current stream of the
// device of its inputs, which must all be CUDA tensors on one device.
// Compiles once per fusion and signature. Throws hostfuse::Error when
// codegen cannot handle the fusion or the inputs do not fit it. With
// `row_counts` (i64 [groups] on the same device), only the first rows of
// loop dim 0 that the counts add up to are computed (negative counts as
// 0, at most the dim's size; InputSignature::row_limited), and the rest of
// the outputs is left unwritten.
std::vector<at::Tensor> runFusionOnCuda(
    const Fusion& fusion, const std::vector<c10::IValue>& inputs,
    const KernelOptions& options = {},
    const at::Tensor& row_counts = at::Tensor());

// Why codegen cannot handle `fusion`, or nullopt when it can.
std::optional<std::string> kernelUnsupportedReason(const Fusion& fusion);

// Runs `fusion` where its inputs live: with its kernel when they are CUDA
// tensors and codegen handles it; otherwise with the ATen reference
// (evaluateFusion). A fallback on CUDA is reported on stderr when
// HOSTFUSE_DUMP_KERNELS=1. `row_counts` as for runFusionOnCuda; the ATen
// reference computes every row (the rows past the limit are unspecified,
// so that is allowed).
std::vector<at::Tensor> executeFusion(
    const Fusion& fusion, const std::vector<c10::IValue>& inputs,
    const at::Tensor& row_counts = at::Tensor());

}  // namespace hostfuse
