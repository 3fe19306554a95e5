// Every HOSTFUSE_* environment variable that the library reads, declared
// once: its name, type, default, allowed range and one line of doc.
//
//   const int64_t blocks = options::getInt(Option::MoeBlocks);  // or default
//
// A variable that is set but empty counts as unset. A set value that does
// not parse as its type, or lies outside its range, is refused with an error
// naming the variable, the value and what is allowed; it is never rounded,
// clamped or ignored. Values are read at each call, so a test may change
// them between calls.
//
// docs/options.md lists the table; `print_options --markdown` prints it from
// this one place, and a test checks that the page matches.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace hostfuse {

namespace options {
// Every timeout, from a variable below or from a C++ field that takes
// precedence over it (CudaMoeConfig::timeout_s, CommunicatorConfig::timeout),
// is a number of seconds in [kMinTimeoutSeconds, kMaxTimeoutSeconds]: not
// 0, which would be a wait that fails at once, nor infinite, nor so long
// that a hung peer goes unnoticed for more than a day.
constexpr double kMinTimeoutSeconds = 1e-3;
constexpr double kMaxTimeoutSeconds = 86400;
}  // namespace options

// X(enumerator, variable, type, default, min, max, doc). Numbers: `min` and
// `max` bound the value (inclusive); booleans accept 0/1, true/false, on/off,
// yes/no. A default of "" means "decided by the caller" (the doc line says
// how), and the getter returns nullopt when the variable is unset.
#define HOSTFUSE_OPTIONS(X)                                                    \
  X(CommTimeoutS, "HOSTFUSE_COMM_TIMEOUT_S", Number, "60",                     \
    options::kMinTimeoutSeconds, options::kMaxTimeoutSeconds,                  \
    "Seconds a collective of the communicator (Gloo, NCCL, the store) may "    \
    "wait for a peer before it fails.")                                        \
  X(ShareGpus, "HOSTFUSE_SHARE_GPUS", Bool, "0", 0, 1,                         \
    "On a host with fewer GPUs than ranks, put local rank i on GPU i mod the " \
    "GPU count instead of on the CPU. NCCL then refuses CUDA tensors; the "    \
    "cuda MoE backend works (for tests on small machines, never for speed).")  \
  X(DumpKernels, "HOSTFUSE_DUMP_KERNELS", Bool, "0", 0, 1,                     \
    "Print the CUDA source of every fusion kernel when it is compiled.")       \
  X(TorchGroupedGemm, "HOSTFUSE_TORCH_GROUPED_GEMM", Bool, "0", 0, 1,          \
    "Run GroupedMatmul on at::_grouped_mm even where hostfuse's own sm_90a "   \
    "grouped GEMM takes the operands (to compare the two).")                   \
  X(MoeBlocks, "HOSTFUSE_MOE_BLOCKS", Integer, "", 1, 1e6,                     \
    "Blocks per cuda-backend MoE kernel; unset: one per SM that fits. "        \
    "Clamped to [R, what fits on the GPU at once].")                           \
  X(MoePushBlocks, "HOSTFUSE_MOE_PUSH_BLOCKS", Integer, "", 1, 1e6,            \
    "Of those, the blocks that push rows to peers; unset: 32 x (R - 1). "      \
    "Rounded down to a multiple of R - 1, at least one per peer, and below "   \
    "the block count.")                                                        \
  X(MoeGridRouteMinTokens, "HOSTFUSE_MOE_GRID_ROUTE_MIN_TOKENS", Integer, "0", \
    0, 1e15,                                                                   \
    "From this many tokens on, the cuda dispatch counts picks over the "       \
    "whole grid instead of in every block; 0: only T x K > 4096 decides.")     \
  X(MoeStagedPush, "HOSTFUSE_MOE_STAGED_PUSH", Bool, "0", 0, 1,                \
    "Make every cuda MoE workspace push rows before the peers' counts are "    \
    "in (CudaMoeConfig::staged_push); every rank must set the same.")          \
  X(MoeTimeoutS, "HOSTFUSE_MOE_TIMEOUT_S", Number, "30",                       \
    options::kMinTimeoutSeconds, options::kMaxTimeoutSeconds,                  \
    "Seconds a cuda-backend MoE kernel waits for a peer before it records a "  \
    "timeout naming that peer.")                                               \
  X(MoeDebug, "HOSTFUSE_MOE_DEBUG", Bool, "0", 0, 1,                           \
    "Log the cuda MoE workspaces' set-up and every call's status to stderr.")  \
  X(MoeCooperative, "HOSTFUSE_MOE_COOPERATIVE", Bool, "1", 0, 1,               \
    "Launch the cuda MoE kernels cooperatively (co-resident blocks); 0 is "    \
    "for diagnosis only.")                                                     \
  X(MoeProfile, "HOSTFUSE_MOE_PROFILE", Bool, "0", 0, 1,                       \
    "Record per-phase timestamps in the cuda MoE kernels "                     \
    "(CudaMoeWorkspace::profileReport).")                                      \
  X(MoeMaskFailedRanks, "HOSTFUSE_MOE_MASK_FAILED_RANKS", Bool, "0", 0, 1,     \
    "After Communicator::recover(), keep the first world's expert placement "  \
    "and mask the experts of the ranks that did not survive (their picks "     \
    "act as -1); HostIrEvaluatorParams::mask_failed_ranks takes precedence.")

enum class Option {
#define HF_OPTION_ENUMERATOR_(name, ...) name,
  HOSTFUSE_OPTIONS(HF_OPTION_ENUMERATOR_)
#undef HF_OPTION_ENUMERATOR_
};

namespace options {

enum class Type { Bool, Integer, Number };

struct Spec {
  Option option;
  const char* variable;
  Type type;
  const char* default_text;  // "" when the caller decides
  double min;
  double max;
  const char* doc;
};

// The declaration of `option`.
const Spec& spec(Option option);

// Every option, in declaration order.
const Spec* begin();
const Spec* end();

// The value of `option`'s variable, or nullopt when it is unset. Throws
// hostfuse::Error when it is set to something its spec refuses, or when the
// getter does not match the option's type.
std::optional<bool> getBool(Option option);
std::optional<int64_t> getInt(Option option);
std::optional<double> getNumber(Option option);

// Reads `option` with the getter of its type: throws as they do when the
// value set now is refused, does nothing when it is valid or unset.
void check(Option option);

// Same, with the declared default (for options that have one).
bool boolOr(Option option);
int64_t intOr(Option option);
double numberOr(Option option);

// Throws unless `seconds` is in [kMinTimeoutSeconds, kMaxTimeoutSeconds]
// (so finite); `what` names the field it came from.
void checkTimeout(const char* what, double seconds);

// Strict parsers for any environment variable (the launcher's RANK,
// WORLD_SIZE, ... use them too): the whole text must be the value.
// `variable` names it in the error.
int64_t parseInteger(const char* variable, const std::string& text);
double parseNumber(const char* variable, const std::string& text);
bool parseBool(const char* variable, const std::string& text);

// The value of environment variable `variable`; nullopt when unset or empty.
std::optional<std::string> environment(const char* variable);

// The table of every option as Markdown (variable, type, default, range,
// doc), as docs/options.md shows it.
std::string markdownTable();

}  // namespace options
}  // namespace hostfuse
