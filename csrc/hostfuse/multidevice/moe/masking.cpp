#include <hostfuse/multidevice/moe/masking.h>

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

#include <hostfuse/multidevice/comm/communicator.h>
#include <hostfuse/utils/exceptions.h>
#include <hostfuse/utils/options.h>

namespace hostfuse {

std::vector<int64_t> failedRanks(const Communicator& communicator) {
  const std::vector<int64_t> alive = communicator.originalRanks();
  std::vector<int64_t> failed;
  for (int64_t r = 0; r < communicator.originalSize(); ++r) {
    if (std::find(alive.begin(), alive.end(), r) == alive.end()) {
      failed.push_back(r);
    }
  }
  return failed;
}

bool maskFailedRanks(std::optional<bool> requested) {
  return requested.has_value() ? *requested
                               : options::boolOr(Option::MoeMaskFailedRanks);
}

std::unique_ptr<MoeRuntime> createMoeRuntime(MoeBackend backend,
                                             Communicator& communicator,
                                             bool mask_failed_ranks) {
  std::unique_ptr<MoeRuntime> runtime =
      moeBackendInfo(backend).create_runtime(communicator);
  if (!mask_failed_ranks || failedRanks(communicator).empty()) {
    return runtime;
  }
  return std::make_unique<MaskingMoeRuntime>(std::move(runtime),
                                             communicator.originalRanks(),
                                             communicator.originalSize());
}

namespace {

// topk_idx may be i64 or i32; the layout's tensors are i64.
bool isIndexTensor(const at::Tensor& t, int64_t dims, bool int32_too = false) {
  return t.defined() && t.dim() == dims &&
         (t.scalar_type() == at::kLong ||
          (int32_too && t.scalar_type() == at::kInt));
}

// `values` through the i64 lookup table `table` where they index it, and
// unchanged elsewhere (out-of-range values stay for the backend's checks to
// name). Device ops only: no host synchronization.
at::Tensor lookUp(const at::Tensor& values, const at::Tensor& table) {
  const int64_t n = table.size(0);
  const at::Tensor ids = values.to(at::kLong);
  const at::Tensor inside = ids.ge(0).logical_and(ids.lt(n));
  const at::Tensor mapped =
      table.index_select(0, ids.clamp(0, n - 1).reshape({-1}))
          .view(ids.sizes());
  return at::where(inside, mapped, ids);
}

}  // namespace

MaskingMoeRuntime::MaskingMoeRuntime(std::unique_ptr<MoeRuntime> inner,
                                     std::vector<int64_t> survivors,
                                     int64_t world_size)
    : inner_(std::move(inner)),
      survivors_(std::move(survivors)),
      world_size_(world_size) {
  HF_ERROR(inner_ != nullptr, "no runtime to mask ranks of");
  HF_ERROR(!survivors_.empty() &&
               std::is_sorted(survivors_.begin(), survivors_.end()) &&
               std::adjacent_find(survivors_.begin(), survivors_.end()) ==
                   survivors_.end() &&
               survivors_.front() >= 0 && survivors_.back() < world_size_,
           "the surviving ranks ", fmt::format("{}", survivors_),
           " are not distinct ascending ranks of ", world_size_);
  for (int64_t r = 0; r < world_size_; ++r) {
    if (!std::binary_search(survivors_.begin(), survivors_.end(), r)) {
      masked_.push_back(r);
    }
  }
}

const MaskingMoeRuntime::Tables& MaskingMoeRuntime::tables(
    const at::Device& device) {
  Tables& tables = tables_[device.str()];
  if (!tables.survivors.defined()) {
    std::vector<int64_t> new_rank(world_size_, -1);
    for (size_t r = 0; r < survivors_.size(); ++r) {
      new_rank[survivors_[r]] = static_cast<int64_t>(r);
    }
    tables.survivors = at::tensor(survivors_, at::kLong).to(device);
    tables.new_rank = at::tensor(new_rank, at::kLong).to(device);
  }
  return tables;
}

const at::Tensor& MaskingMoeRuntime::expertTable(const at::Device& device,
                                                 int64_t num_experts) {
  at::Tensor& table = expert_tables_[{device.str(), num_experts}];
  if (!table.defined()) {
    const int64_t local = num_experts / world_size_;
    std::vector<int64_t> values(num_experts, -1);
    for (size_t r = 0; r < survivors_.size(); ++r) {
      for (int64_t l = 0; l < local; ++l) {
        values[survivors_[r] * local + l] = static_cast<int64_t>(r) * local + l;
      }
    }
    table = at::tensor(values, at::kLong).to(device);
  }
  return table;
}

int64_t MaskingMoeRuntime::survivorsExperts(int64_t num_experts) const {
  if (num_experts <= 0 || num_experts % world_size_ != 0) {
    return 0;
  }
  return static_cast<int64_t>(survivors_.size()) * (num_experts / world_size_);
}

at::Tensor MaskingMoeRuntime::countsToFirstWorld(const at::Tensor& counts) {
  const Tables& t = tables(counts.device());
  return at::zeros({world_size_}, counts.options())
      .index_copy(0, t.survivors, counts);
}

at::Tensor MaskingMoeRuntime::countsToSurvivors(const at::Tensor& counts) {
  if (!isIndexTensor(counts, 1)) {
    return counts;  // the backend refuses its rank or dtype
  }
  if (counts.size(0) != world_size_) {
    // A length the backend refuses on every rank alike (it expects R').
    return counts.narrow(0, 0, 0);
  }
  return counts.index_select(0, tables(counts.device()).survivors);
}

namespace {

// Runs `fn`; a hostfuse::Error out of it says in which numbering its ranks
// and experts are. `num_experts` is the program's E, 0 when unknown (a
// status checked after graph replays).
template <typename Fn>
auto sayingTheNumbering(const std::vector<int64_t>& survivors,
                        const std::vector<int64_t>& masked, int64_t world_size,
                        int64_t num_experts, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error& e) {
    const std::string experts =
        num_experts > 0
            ? fmt::format(
                  " (num_experts = {} here, over the first world's {} "
                  "ranks)",
                  num_experts, world_size)
            : std::string();
    HF_THROW(fmt::format("with rank masking (ranks {} of the first world's {} "
                         "are masked) the call ran over the {} surviving "
                         "ranks: rank r below is first-world rank {}[r], and "
                         "num_experts below counts the survivors' experts{}: ",
                         fmt::join(masked, ", "), world_size, survivors.size(),
                         survivors, experts),
             e.what());
  }
}

}  // namespace

void MaskingMoeRuntime::checkStatus() {
  sayingTheNumbering(survivors_, masked_, world_size_, 0,
                     [&] { inner_->checkStatus(); });
}

MoeDispatchOutput MaskingMoeRuntime::dispatch(const MoeDispatchArgs& args) {
  const int64_t experts = survivorsExperts(args.num_experts);
  MoeDispatchArgs masked = args;
  masked.num_experts = experts;
  if (experts > 0 && isIndexTensor(args.topk_idx, 2, /*int32_too=*/true)) {
    masked.topk_idx = lookUp(
        args.topk_idx, expertTable(args.topk_idx.device(), args.num_experts));
  }
  MoeDispatchOutput out =
      sayingTheNumbering(survivors_, masked_, world_size_, args.num_experts,
                         [&] { return inner_->dispatch(masked); });
  const Tables& t = tables(out.layout.src_rank.device());
  out.layout.src_rank = lookUp(out.layout.src_rank, t.survivors);
  out.layout.n_tokens_to_rank = countsToFirstWorld(out.layout.n_tokens_to_rank);
  out.layout.n_tokens_from_rank =
      countsToFirstWorld(out.layout.n_tokens_from_rank);
  return out;
}

at::Tensor MaskingMoeRuntime::combine(const MoeCombineArgs& args) {
  const int64_t experts = survivorsExperts(args.num_experts);
  MoeCombineArgs masked = args;
  masked.num_experts = experts;
  if (isIndexTensor(args.layout.src_rank, 1)) {
    // Masked ranks become -1, which the backend refuses like any rank out
    // of range: no row comes from a masked rank.
    masked.layout.src_rank = lookUp(
        args.layout.src_rank, tables(args.layout.src_rank.device()).new_rank);
  }
  masked.layout.n_tokens_to_rank =
      countsToSurvivors(args.layout.n_tokens_to_rank);
  masked.layout.n_tokens_from_rank =
      countsToSurvivors(args.layout.n_tokens_from_rank);
  return sayingTheNumbering(survivors_, masked_, world_size_, args.num_experts,
                            [&] { return inner_->combine(masked); });
}

}  // namespace hostfuse
