#include "multidevice/moe_status.h"

#include <ATen/ATen.h>

#include <sstream>

namespace hostfuse::moe {

namespace {

std::string dtypeName(int64_t code) {
  if (code < 0 || code >= static_cast<int64_t>(at::ScalarType::NumOptions)) {
    return "an unknown dtype";
  }
  return c10::toString(static_cast<at::ScalarType>(code));
}

std::string layoutArgName(int64_t code) {
  if (code < 0 || code > static_cast<int64_t>(LayoutArg::TopkWeights)) {
    return "a layout tensor";
  }
  return toString(static_cast<LayoutArg>(code));
}

}  // namespace

const char* toString(LayoutArg arg) {
  switch (arg) {
    case LayoutArg::SrcRank:
      return "recv_src_rank";
    case LayoutArg::SrcToken:
      return "recv_src_token";
    case LayoutArg::SrcK:
      return "recv_src_k";
    case LayoutArg::ExpertCounts:
      return "recv_expert_counts";
    case LayoutArg::TokensToRank:
      return "n_tokens_to_rank";
    case LayoutArg::TokensFromRank:
      return "n_tokens_from_rank";
    case LayoutArg::TopkIdx:
      return "topk_idx";
    case LayoutArg::TopkWeights:
      return "topk_weights";
  }
  return "a layout tensor";
}

void HostStatus::fail(Status code, int64_t d0, int64_t d1, int64_t d2,
                      int64_t d3) {
  if (code_ != Status::Ok) {
    return;
  }
  code_ = code;
  details_[0] = d0;
  details_[1] = d1;
  details_[2] = d2;
  details_[3] = d3;
}

at::Tensor HostStatus::toDevice(const at::Device& device) const {
  const at::Tensor words = at::tensor({static_cast<int64_t>(code_), details_[0],
                                       details_[1], details_[2], details_[3]},
                                      at::kLong);
  // From pageable memory, a non-blocking copy is staged before it returns,
  // so `words` may go away, and the device is not synchronized.
  return words.to(device, /*non_blocking=*/true);
}

void DeviceStatus::failIf(const at::Tensor& bad, Status code,
                          const at::Tensor& d0, const at::Tensor& d1,
                          const at::Tensor& d2) {
  const at::Tensor candidate =
      at::stack({at::full_like(d0, static_cast<int64_t>(code)), d0, d1, d2,
                 at::zeros_like(d0)});
  const at::Tensor take = at::logical_and(words_[0] == 0, bad);
  words_ = at::where(take, candidate, words_);
}

std::string describeStatus(const char* op, int64_t rank, int64_t world_size,
                           const int64_t* words, int64_t num_experts) {
  const auto code = static_cast<Status>(words[0]);
  const int64_t d0 = words[1];
  const int64_t d1 = words[2];
  const int64_t d2 = words[3];
  const int64_t d3 = words[4];
  std::ostringstream ss;
  ss << op << ": bad input on rank " << rank << " of " << world_size << ": ";
  switch (code) {
    case Status::Ok:
      ss << "no error";
      break;
    case Status::XRank:
      ss << "x must be a 2-D tensor [T, H], got rank " << d0;
      break;
    case Status::XDtype:
      ss << "x must be floating point, got " << dtypeName(d0);
      break;
    case Status::IdxRank:
      ss << "topk_idx must be a 2-D tensor [T, K], got rank " << d0;
      break;
    case Status::IdxDtype:
      ss << "topk_idx must be Long (i64) or Int (i32), got " << dtypeName(d0);
      break;
    case Status::IdxTokens:
      ss << "topk_idx has " << d0 << " rows but x has " << d1
         << " tokens; they must match";
      break;
    case Status::WeightsRank:
      ss << "topk_weights must be a 2-D tensor [T, K], got rank " << d0;
      break;
    case Status::WeightsDtype:
      ss << "topk_weights must be floating point, got " << dtypeName(d0);
      break;
    case Status::WeightsShape:
      ss << "topk_weights has shape [" << d0 << ", " << d1
         << "] but topk_idx has shape [" << d2 << ", " << d3
         << "]; they must match";
      break;
    case Status::Device:
      ss << layoutArgName(d0) << " is on another device than "
         << (std::string(op) == "MoeDispatch" ? "x" : "expert_out")
         << "; all tensors of one call must be on one device";
      break;
    case Status::NumExperts:
      ss << "num_experts (" << d0
         << ") must be a positive multiple of the world size (" << d1 << ")";
      break;
    case Status::ExpertOutOfRange:
      ss << "topk_idx holds expert id " << d2 << " at token " << d0 << ", pick "
         << d1
         << ", which is out of range: expert ids must be in [0, num_experts = "
         << num_experts << ") or -1 (a masked pick)";
      break;
    case Status::DuplicateExpert:
      ss << "topk_idx names expert " << d1 << " twice in token " << d0
         << "; the picks of a token must name distinct experts";
      break;
    case Status::OutRank:
      ss << "expert_out must be a 2-D tensor [rows, H], got rank " << d0;
      break;
    case Status::OutDtype:
      ss << "expert_out must be floating point, got " << dtypeName(d0);
      break;
    case Status::LayoutTensor:
      ss << layoutArgName(d0) << " must be a 1-D Long (i64) tensor, got rank "
         << d1 << " of " << dtypeName(d2);
      break;
    case Status::LayoutLength:
      ss << layoutArgName(d0) << " has " << d1 << " entries but ";
      if (d0 == static_cast<int64_t>(LayoutArg::ExpertCounts)) {
        ss << "must have num_experts / world size = " << d2;
      } else if (d0 == static_cast<int64_t>(LayoutArg::TokensToRank) ||
                 d0 == static_cast<int64_t>(LayoutArg::TokensFromRank)) {
        ss << "must have world size = " << d2;
      } else {
        ss << "expert_out has " << d2 << " rows";
      }
      ss << "; the rows do not match their dispatch";
      break;
    case Status::WeightsTokens:
      ss << "topk_weights has " << d0 << " rows but num_tokens is " << d1
         << "; they must match";
      break;
    case Status::NumTokens:
      ss << "num_tokens must be >= 0, got " << d0;
      break;
    case Status::CountsSum:
      ss << "recv_expert_counts sums to " << d0 << " but expert_out has " << d1
         << " rows; the rows do not match their dispatch";
      break;
    case Status::FromSum:
      ss << "n_tokens_from_rank sums to " << d0 << " but expert_out has " << d1
         << " rows; the rows do not match their dispatch";
      break;
    case Status::SrcRankRange:
      ss << "recv_src_rank holds rank " << d1 << " at row " << d0
         << "; ranks are in [0, " << world_size << ")";
      break;
    case Status::SrcRankCounts:
      ss << "recv_src_rank has " << d1 << " rows from rank " << d0
         << " but n_tokens_from_rank[" << d0 << "] is " << d2
         << "; the rows do not match their dispatch";
      break;
    case Status::ProvenanceNegative:
      ss << "recv_src_token or recv_src_k is negative at row " << d0
         << " (token " << d1 << ", pick " << d2 << ")";
      break;
    default:
      ss << "unknown status " << words[0];
      break;
  }
  return ss.str();
}

}  // namespace hostfuse::moe
