// The checks of MoE dispatch and combine inputs that both backends run, so
// that the same bad input gives the same status (multidevice/moe/status.h),
// hence the same message, on both.
//
// A rank with bad input must not throw on its own where its peers would
// then wait for it: the collective backend sends each rank's status words
// to every rank with the row counts, and every rank raises the same error.
// Statuses are computed without a host synchronization: shape and dtype
// checks on the host (HostStatus), value checks as device tensors
// (DeviceStatus).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include <hostfuse/multidevice/moe/runtime.h>
#include <hostfuse/multidevice/moe/status.h>

namespace hostfuse::moe {

// The first failed check found on the host.
class HostStatus {
 public:
  // Records `code` unless an earlier check failed already.
  void fail(StatusCode code, int64_t d0 = 0, int64_t d1 = 0, int64_t d2 = 0,
            int64_t d3 = 0);
  bool ok() const { return words_[0] == kStatusOk; }
  const int64_t* words() const { return words_; }
  // The status words as an i64 tensor [kStatusWords] on `device`, copied
  // without synchronizing the device with the host.
  at::Tensor toDevice(const at::Device& device) const;

 private:
  int64_t words_[kStatusWords] = {kStatusOk, 0, 0, 0, 0};
};

// Status words on the device, [kStatusWords] i64, that value checks update
// without reading anything back.
class DeviceStatus {
 public:
  explicit DeviceStatus(at::Tensor words) : words_(std::move(words)) {}
  // Where no check failed yet and `bad` (a 0-dim bool tensor) holds, sets
  // `code` (a 0-dim i64 tensor) and the details d0 .. d3 (d3 0 if not
  // given).
  void failIf(const at::Tensor& bad, const at::Tensor& code,
              const at::Tensor& d0, const at::Tensor& d1, const at::Tensor& d2,
              const at::Tensor& d3 = at::Tensor());
  const at::Tensor& words() const { return words_; }

 private:
  at::Tensor words_;
};

// Row dtypes of x and expert_out: Float, Double, BFloat16 and Half, those
// that a backend moves (the collective one all four; the cuda one refuses
// Double with kStatusUnsupported). Anything else (fp8, fp4, integers,
// complex) neither handles, and both refuse it here.
bool isRowDtype(at::ScalarType dtype);

// Dtypes of topk_weights: the row dtypes and the fp8 ones, which both
// backends convert to fp32 exactly. Not fp4 (Float4_e2m1fn_x2 packs two
// values per element and converts to nothing).
bool isWeightDtype(at::ScalarType dtype);

// Dispatch's inputs, from what needs no device values: ranks, dtypes, H and
// K positive (T may be 0), T and K agreeing, one device (`device`), num_experts
// a positive multiple of world_size.
// With fp8_e4m3, also x's dtype and H for the quantization.
HostStatus checkDispatchInputs(
    const at::Tensor& x, const at::Tensor& topk_idx,
    const std::optional<at::Tensor>& topk_weights, int64_t num_experts,
    int64_t world_size, const at::Device& device,
    MoeDispatchQuant quantize = MoeDispatchQuant::None);

// Expert ids in range and no expert twice in one token, into `status`: the
// first bad (token, pick) in row-major order, the order in which the cuda
// kernels report it. `idx` [T, K] i64.
void checkExpertIds(DeviceStatus& status, const at::Tensor& idx,
                    int64_t num_experts);

// Combine's inputs, from what needs no device values: ranks, dtypes, H'
// positive, the layout's lengths, num_tokens and the weights' rows.
// With reduce=per_rank the weights are `recv_weights` [rows]
// (MoeCombineArgs).
HostStatus checkCombineInputs(const MoeCombineArgs& args, int64_t world_size,
                              const at::Device& device);

// The layout's values agree with each other and with expert_out's `rows`,
// no (rank, token, pick) is named twice (firstRepeatedRow), and each
// expert's rows are in order (firstUnorderedRow). Returns the rows' local
// experts (rowLocalExperts), which the order check needs and the caller's
// fingerprints too.
at::Tensor checkLayoutValues(DeviceStatus& status, const MoeLayout& layout,
                             int64_t rows, int64_t world_size);

// [rows] i64 on the layout's device: the local expert of each row, from
// recv_expert_counts (L for rows past their sum).
at::Tensor rowLocalExperts(const MoeLayout& layout);

// 0-dim i64 on the layout's device: the first row that, in the segment of
// its local expert (`expert`, rowLocalExperts), does not follow the row
// before it in (source rank, source token) order; the number of rows if
// none. Rows swapped inside one expert, which keep every count and every
// fingerprint, break this order.
at::Tensor firstUnorderedRow(const MoeLayout& layout, const at::Tensor& expert);

// Adds layoutRowHash(expert[i], token[i], pick[i]) (layout_id.h) to
// fingerprints[rank[i]] for every row i whose rank is in range.
// `fingerprints` [R] i64 on the CPU; the others [N] on the CPU.
void addFingerprints(at::Tensor& fingerprints, const at::Tensor& rank,
                     const at::Tensor& expert, const at::Tensor& token,
                     const at::Tensor& pick);

// A new layout id [R + 1] on `device` (layout_id.h): word 0 `call`, the
// fingerprints 0.
at::Tensor newLayoutId(int64_t call, int64_t world_size,
                       const at::Device& device);

// 0-dim i64 on the layout's device: the first row whose (src_rank,
// src_token, src_k) an earlier row names too, the number of rows if none.
// Three stable sorts, no host synchronization.
at::Tensor firstRepeatedRow(const MoeLayout& layout);

// The dtype code of `t` as status words carry it (at::ScalarType), -1 for
// an undefined tensor.
int64_t dtypeCode(const at::Tensor& t);

// Rank tables: [R, W] i64 on the host, row r what rank r sent. Both
// backends' tables start with the same header: the status words, then
// these.
enum HeaderWord : int64_t {
  kNumExpertsWord = kStatusWords,  // E
  kHiddenWord,        // H of x (dispatch) or of expert_out (combine)
  kDtypeWord,         // dtype of x / expert_out
  kWeightsDtypeWord,  // dtype of topk_weights, -1 without
  kTokensWord,        // T
  kPicksWord,         // K, -1 when unknown
  kHeaderWords,
};

// The header words after the status, [kHeaderWords - kStatusWords] i64 on
// the CPU.
at::Tensor headerWords(int64_t num_experts, int64_t hidden, int64_t dtype,
                       int64_t weights_dtype, int64_t tokens, int64_t picks);

// Throws, on every rank alike, when a rank's dispatch inputs are bad or the
// ranks disagree on E, H, the dtype of x, K or topk_weights (in that order).
// `backend` names the backend in what it cannot do.
void checkDispatchTable(const at::Tensor& table, const char* backend);

// Throws, on every rank alike, the error of the lowest rank whose status is
// bad (naming every bad rank). Column `num_experts_word` holds each rank's
// E.
void throwIfAnyStatusBad(const at::Tensor& table, const char* op,
                         const char* backend, int64_t num_experts_word);

// Throws unless column `word` is the same on every rank; `what` names it in
// the message, and `is_dtype` prints its values as dtypes (-1: not given).
void checkAgreed(const at::Tensor& table, int64_t word, const char* op,
                 const char* what, bool is_dtype);

}  // namespace hostfuse::moe
