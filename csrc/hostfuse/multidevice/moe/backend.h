// The MoE backends: how MoeDispatch / MoeCombine move rows, and what each
// backend promises. The nodes print, validate and report capturability by
// asking moeBackendInfo(); the evaluator creates each backend's runtime
// through it. moeBackendInfo() is the one place that names every backend:
// docs/architecture.md, "Add a MoE backend", says how to add one.
#pragma once

#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace hostfuse {

class Communicator;
class MoeRuntime;

// collective  c10d alltoall_base (Gloo for CPU tensors, NCCL for CUDA
//             tensors) with exact row counts; the counts go through the
//             host, so it cannot be captured in a CUDA graph.
// cuda        symmetric-memory kernels on one node, C rows of capacity, no
//             host synchronization after a node's first run.
// docs/moe.md, "Backends", compares them.
enum class MoeBackend { Collective, Cuda };

// How MoeCombine sums a token's picks (docs/moe.md, "Combine modes"); every
// backend implements both, bit-identically to each other.
// per_pick  every pick's row goes back to the token's rank, which sums the
//           weighted rows in pick order in fp32 and rounds once.
// per_rank  the expert's rank first sums the weighted rows of the picks a
//           token has there (pick order, fp32, one rounding to the row
//           dtype) and sends one row per (token, rank); the token's rank
//           sums those in rank order in fp32 and rounds once more. Fewer
//           rows travel (one per rank a token picks instead of one per
//           pick), at the cost of that extra rounding. The weights are the
//           ones dispatch carried to the expert's rank (recv_weights).
enum class MoeCombineReduce { PerPick, PerRank };

// How MoeDispatch sends the rows (docs/moe.md, "fp8 dispatch").
// none      as x, in x's dtype.
// fp8_e4m3  quantized on the way: e4m3 values with one fp32 scale per 128
//           channels (moe/fp8.h); recv_x is fp8 and recv_scales holds the
//           scales: H + H / 32 bytes a row, about 0.52 of a bf16 row.
enum class MoeDispatchQuant { None, Fp8E4M3 };

struct MoeBackendInfo {
  MoeBackend backend;
  // As printed in the IR and parsed from text: "collective", "cuda".
  const char* name;
  // Why a program with this backend's nodes cannot be captured into a CUDA
  // graph; nullptr when it can.
  const char* capture_problem;
  // MoeDispatch returns C rows (its capacity attribute, 0: the worst case)
  // with the valid counts on the device. Otherwise it returns exactly the
  // rows received, and the capacity attribute must be 0.
  bool fixed_capacity;
  // MoeCombine's layout inputs must be the outputs of one MoeDispatch of
  // this backend, whose state holds the rows' metadata.
  bool combine_needs_its_dispatch;
  // The runtime that runs this backend's nodes for one evaluator.
  std::unique_ptr<MoeRuntime> (*create_runtime)(Communicator& communicator);
};

// What `backend` is. Throws hostfuse::InternalError for a value that is not
// an enumerator.
const MoeBackendInfo& moeBackendInfo(MoeBackend backend);

// Every backend, in enumerator order.
std::vector<MoeBackend> allMoeBackends();

const char* toString(MoeBackend backend);

// The backend named `name` ("collective", "cuda"); nullopt for another name.
std::optional<MoeBackend> parseMoeBackend(std::string_view name);

// "none", "fp8_e4m3".
const char* toString(MoeDispatchQuant quantize);
std::optional<MoeDispatchQuant> parseMoeDispatchQuant(std::string_view name);

// "per_pick", "per_rank".
const char* toString(MoeCombineReduce reduce);
// The mode named `name`; nullopt for another name.
std::optional<MoeCombineReduce> parseMoeCombineReduce(std::string_view name);

}  // namespace hostfuse
