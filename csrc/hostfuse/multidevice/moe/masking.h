// Rank masking (docs/moe.md, "Rank masking"; like NCCL EP's enable_mask):
// after Communicator::recover(), the MoE calls keep the expert placement of
// the first world (R0 ranks, L = E / R0 experts each) and treat the experts
// of every rank that did not survive as masked: a pick of one acts as -1.
//
// MaskingMoeRuntime decorates the survivors' runtime of either backend; no
// kernel knows of it. It renumbers on the device, so it stays capturable:
//
//   dispatch  topk_idx e -> e' = new_rank(e / L) * L + e % L for a
//             surviving rank, -1 for a masked one; ids outside [0, E) are
//             left as they are, so the backend refuses them naming the
//             value. The backend runs with E' = R' x L over the R'
//             survivors; its outputs come back in the first world's
//             numbering: recv_src_rank holds first-world ranks,
//             n_tokens_to_rank and n_tokens_from_rank have R0 entries, 0 at
//             every masked rank. recv_expert_counts ([L]) needs nothing;
//             recv_layout_id stays the backend's ([R' + 1], survivors'
//             numbering), and combine hands it back as it is.
//   combine   the layout goes the other way before the backend's combine.
//
// Cost: a few element-wise ops on topk_idx and on the [rows] and [R]
// layout tensors per call, no host synchronization, no extra collective.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <hostfuse/multidevice/moe/backend.h>
#include <hostfuse/multidevice/moe/runtime.h>

namespace hostfuse {

class Communicator;

// The ranks of `communicator`'s first world (Communicator::originalRanks)
// that did not survive, ascending; empty when none was lost.
std::vector<int64_t> failedRanks(const Communicator& communicator);

// Whether MoE calls mask failed ranks: `requested` when set, else
// HOSTFUSE_MOE_MASK_FAILED_RANKS (default off).
bool maskFailedRanks(std::optional<bool> requested);

// The runtime of `backend` over `communicator`; with `mask_failed_ranks` and
// a communicator that lost ranks, decorated by a MaskingMoeRuntime. Without
// lost ranks it is the plain runtime: masking costs nothing then.
std::unique_ptr<MoeRuntime> createMoeRuntime(MoeBackend backend,
                                             Communicator& communicator,
                                             bool mask_failed_ranks);

class MaskingMoeRuntime : public MoeRuntime {
 public:
  // `inner` runs over the survivors; `survivors[r]` is the first-world rank
  // of its rank r (ascending, distinct, in [0, world_size)), `world_size`
  // the first world's R0.
  MaskingMoeRuntime(std::unique_ptr<MoeRuntime> inner,
                    std::vector<int64_t> survivors, int64_t world_size);

  MoeDispatchOutput dispatch(const MoeDispatchArgs& args) override;
  at::Tensor combine(const MoeCombineArgs& args) override;
  void checkStatus() override;
  void publishFailure(const at::Device& device) noexcept override {
    inner_->publishFailure(device);
  }

  // The first-world ranks that are masked, ascending.
  const std::vector<int64_t>& maskedRanks() const { return masked_; }

 private:
  // The lookup tables on `device`, made once per device (before any
  // capture: a node's first call is eager).
  struct Tables {
    at::Tensor survivors;  // [R'] i64: survivors' rank -> first-world rank
    at::Tensor new_rank;   // [R0] i64: first-world rank -> survivors' or -1
  };
  const Tables& tables(const at::Device& device);
  // [E] i64: first-world expert -> the survivors' expert, -1 when masked.
  const at::Tensor& expertTable(const at::Device& device, int64_t num_experts);
  // The survivors' E' for the program's E; 0 (which the backend refuses on
  // every rank alike) when E is not a positive multiple of R0.
  int64_t survivorsExperts(int64_t num_experts) const;
  // [R0] counts in the first world's numbering <-> [R'] survivors' counts.
  at::Tensor countsToFirstWorld(const at::Tensor& counts);
  at::Tensor countsToSurvivors(const at::Tensor& counts);

  std::unique_ptr<MoeRuntime> inner_;
  std::vector<int64_t> survivors_;
  std::vector<int64_t> masked_;
  int64_t world_size_;
  // Keyed by the device's name (and E).
  std::map<std::string, Tables> tables_;
  std::map<std::pair<std::string, int64_t>, at::Tensor> expert_tables_;
};

}  // namespace hostfuse
