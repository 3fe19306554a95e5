// Input validation of MoE dispatch/combine that every rank agrees on.
//
// A rank with bad input must not throw on its own: its peers would wait for
// it in the next collective. So each rank writes the verdict on its own
// inputs into a few status words, every rank sends its words to every rank
// together with the row counts (one exchange that the call makes anyway),
// and then every rank throws the same error, built from the same words,
// naming the argument and the rank whose input is bad. A status is computed
// without any host synchronization: shape and dtype checks on the host,
// value checks (expert ids in range, ...) as device tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace hostfuse::moe {

enum class Status : int64_t {
  Ok = 0,
  // MoeDispatch, found from metadata.
  XRank,
  XDtype,
  IdxRank,
  IdxDtype,
  IdxTokens,
  WeightsRank,
  WeightsDtype,
  WeightsShape,
  Device,
  NumExperts,
  // MoeDispatch, found from values.
  ExpertOutOfRange,
  DuplicateExpert,
  // MoeCombine, found from metadata.
  OutRank,
  OutDtype,
  LayoutTensor,
  LayoutLength,
  WeightsTokens,
  NumTokens,
  // MoeCombine, found from values.
  CountsSum,
  FromSum,
  SrcRankRange,
  SrcRankCounts,
  ProvenanceNegative,
};

// The status words of one rank: a code and four details whose meaning
// depends on the code.
constexpr int64_t kStatusWords = 5;

// Names of the layout tensors, for Status::LayoutTensor/LayoutLength and
// Status::Device details.
enum class LayoutArg : int64_t {
  SrcRank,
  SrcToken,
  SrcK,
  ExpertCounts,
  TokensToRank,
  TokensFromRank,
  TopkIdx,
  TopkWeights,
};
const char* toString(LayoutArg arg);

// The first failed check found on the host.
class HostStatus {
 public:
  // Records `code` unless an earlier check failed already.
  void fail(Status code, int64_t d0 = 0, int64_t d1 = 0, int64_t d2 = 0,
            int64_t d3 = 0);
  bool ok() const { return code_ == Status::Ok; }
  // The status words as an i64 tensor [kStatusWords] on `device`, copied
  // without synchronizing the device with the host.
  at::Tensor toDevice(const at::Device& device) const;

 private:
  Status code_ = Status::Ok;
  int64_t details_[kStatusWords - 1] = {0, 0, 0, 0};
};

// Status words on the device, [kStatusWords] i64, that value checks update
// without reading anything back.
class DeviceStatus {
 public:
  explicit DeviceStatus(at::Tensor words) : words_(std::move(words)) {}
  // Where no check failed yet and `bad` (a 0-dim bool tensor) holds, sets
  // the code and the details (0-dim i64 tensors; the fourth is 0).
  void failIf(const at::Tensor& bad, Status code, const at::Tensor& d0,
              const at::Tensor& d1, const at::Tensor& d2);
  const at::Tensor& words() const { return words_; }

 private:
  at::Tensor words_;
};

// The error message of `words` (one rank's status words) for the rank
// `rank` of `world_size`. `op` is "MoeDispatch" or "MoeCombine";
// `num_experts` is that rank's E.
std::string describeStatus(const char* op, int64_t rank, int64_t world_size,
                           const int64_t* words, int64_t num_experts);

}  // namespace hostfuse::moe
