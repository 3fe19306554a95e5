#include "moe_reference.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>

#include <hostfuse/utils/torch_cuda.h>

namespace hostfuse::test {

Communicator& communicator() { return Communicator::getInstance(); }
int64_t worldSize() { return communicator().size(); }
int64_t myRank() { return communicator().rank(); }

bool lacksGpuPerRank() {
  return !cuda::isAvailable() ||
         communicator().localSize() > cuda::deviceCount();
}

bool lacksGpuForCudaBackend() { return !communicator().device().is_cuda(); }

namespace {

// allgather of equally sized tensors through the c10d backend directly.
std::vector<at::Tensor> allGatherEqual(const at::Tensor& tensor) {
  Communicator& comm = communicator();
  c10d::Backend& backend = comm.backend(tensor.device().type());
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < comm.size(); ++r) {
    outputs[0].push_back(at::empty_like(tensor));
  }
  std::vector<at::Tensor> inputs = {tensor.contiguous()};
  backend.allgather(outputs, inputs)->wait();
  return outputs[0];
}

}  // namespace

std::vector<at::Tensor> allGatherRows(const at::Tensor& tensor) {
  const at::Tensor rows =
      at::full({1}, tensor.size(0), tensor.options().dtype(at::kLong));
  int64_t most = 0;
  std::vector<int64_t> counts;
  for (const at::Tensor& count : allGatherEqual(rows)) {
    counts.push_back(count.item<int64_t>());
    most = std::max(most, counts.back());
  }
  std::vector<int64_t> padded_sizes = tensor.sizes().vec();
  padded_sizes[0] = most;
  at::Tensor padded = at::zeros(padded_sizes, tensor.options());
  padded.narrow(0, 0, tensor.size(0)).copy_(tensor);
  std::vector<at::Tensor> gathered = allGatherEqual(padded);
  for (size_t r = 0; r < gathered.size(); ++r) {
    gathered[r] = gathered[r].narrow(0, 0, counts[r]).cpu();
  }
  return gathered;
}

ExpectedDispatch referenceDispatch(const std::vector<at::Tensor>& xs,
                                   const std::vector<at::Tensor>& idxs,
                                   const std::vector<at::Tensor>& weights,
                                   int64_t num_experts, int64_t rank) {
  const auto world_size = static_cast<int64_t>(xs.size());
  const int64_t local = num_experts / world_size;
  // (local expert, source rank, token, pick) of every row `rank` gets.
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> rows;
  std::vector<int64_t> to_rank(world_size, 0);
  std::vector<int64_t> from_rank(world_size, 0);
  for (int64_t src = 0; src < world_size; ++src) {
    const at::Tensor idx = idxs[src].to(at::kLong).cpu();
    for (int64_t t = 0; t < idx.size(0); ++t) {
      for (int64_t k = 0; k < idx.size(1); ++k) {
        const int64_t expert = idx[t][k].item<int64_t>();
        if (expert < 0) {
          continue;
        }
        const int64_t dst = expert / local;
        if (src == rank) {
          ++to_rank[dst];
        }
        if (dst == rank) {
          ++from_rank[src];
          rows.emplace_back(expert % local, src, t, k);
        }
      }
    }
  }
  std::sort(rows.begin(), rows.end());

  ExpectedDispatch expected;
  const int64_t hidden = xs[rank].size(1);
  const auto n = static_cast<int64_t>(rows.size());
  expected.recv_x = at::empty({n, hidden}, xs[rank].options().device(at::kCPU));
  std::vector<int64_t> src_rank, src_token, src_k;
  std::vector<int64_t> counts(local, 0);
  std::vector<at::Tensor> recv_weights;
  for (int64_t i = 0; i < n; ++i) {
    const auto [expert, src, t, k] = rows[i];
    expected.recv_x[i].copy_(xs[src][t]);
    src_rank.push_back(src);
    src_token.push_back(t);
    src_k.push_back(k);
    ++counts[expert];
    if (!weights.empty()) {
      recv_weights.push_back(weights[src][t][k]);
    }
  }
  auto longs = [](const std::vector<int64_t>& v) {
    return at::tensor(v, at::kLong);
  };
  expected.src_rank = longs(src_rank);
  expected.src_token = longs(src_token);
  expected.src_k = longs(src_k);
  expected.expert_counts = longs(counts);
  expected.n_tokens_to_rank = longs(to_rank);
  expected.n_tokens_from_rank = longs(from_rank);
  if (!weights.empty()) {
    expected.recv_weights =
        n == 0 ? at::empty({0}, weights[rank].options().device(at::kCPU))
               : at::stack(recv_weights);
  }
  return expected;
}

at::Tensor scaleByExpert(int64_t expert, const at::Tensor& rows) {
  return (rows.to(at::kFloat) * (1.0 + 0.25 * static_cast<double>(expert)))
      .to(rows.scalar_type());
}

at::Tensor applyExperts(const at::Tensor& rows, const at::Tensor& counts,
                        int64_t first_expert, const ExpertFn& fn) {
  at::Tensor out = at::empty_like(rows);
  const at::Tensor host_counts = counts.cpu();
  int64_t offset = 0;
  for (int64_t l = 0; l < host_counts.size(0); ++l) {
    const int64_t n = host_counts[l].item<int64_t>();
    out.narrow(0, offset, n)
        .copy_(fn(first_expert + l, rows.narrow(0, offset, n)));
    offset += n;
  }
  return out;
}

at::Tensor referenceCombine(const at::Tensor& x, const at::Tensor& idx,
                            const at::Tensor& weights, const ExpertFn& fn) {
  const at::Tensor x_cpu = x.cpu();
  const at::Tensor idx_cpu = idx.to(at::kLong).cpu();
  at::Tensor sum = at::zeros({x.size(0), x.size(1)}, at::kDouble);
  for (int64_t t = 0; t < x.size(0); ++t) {
    for (int64_t k = 0; k < idx_cpu.size(1); ++k) {
      const int64_t expert = idx_cpu[t][k].item<int64_t>();
      if (expert < 0) {
        continue;
      }
      const double w = weights.defined() ? weights[t][k].item<double>() : 1.0;
      sum[t] += w * fn(expert, x_cpu.narrow(0, t, 1))[0].to(at::kDouble);
    }
  }
  return sum.to(x.scalar_type());
}

namespace {

// Per pick k: w[t, k] * fn(idx[t, k], x[t]) in fp32 for every token t (w =
// 1 without weights; 0 where the pick is masked), one rounded product.
std::vector<at::Tensor> weightedPickOutputs(const at::Tensor& x,
                                            const at::Tensor& idx_cpu,
                                            const at::Tensor& weights,
                                            const ExpertFn& fn) {
  const at::Tensor x_cpu = x.cpu();
  const int64_t tokens = x.size(0);
  std::vector<at::Tensor> terms;
  for (int64_t k = 0; k < idx_cpu.size(1); ++k) {
    at::Tensor out = at::zeros({tokens, x.size(1)}, at::kFloat);
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t expert = idx_cpu[t][k].item<int64_t>();
      if (expert >= 0) {
        out[t].copy_(fn(expert, x_cpu.narrow(0, t, 1))[0].to(at::kFloat));
      }
    }
    terms.push_back(
        weights.defined()
            ? out * weights.cpu().select(1, k).to(at::kFloat).unsqueeze(1)
            : out);
  }
  return terms;
}

}  // namespace

at::Tensor referenceCombineInPickOrder(const at::Tensor& x,
                                       const at::Tensor& idx,
                                       const at::Tensor& weights,
                                       const ExpertFn& fn) {
  const at::Tensor idx_cpu = idx.to(at::kLong).cpu();
  const std::vector<at::Tensor> terms =
      weightedPickOutputs(x, idx_cpu, weights, fn);
  at::Tensor acc = at::zeros({x.size(0), x.size(1)}, at::kFloat);
  for (int64_t k = 0; k < idx_cpu.size(1); ++k) {
    acc = at::where((idx_cpu.select(1, k) >= 0).unsqueeze(1), acc + terms[k],
                    acc);
  }
  return acc.to(x.scalar_type());
}

at::Tensor referenceCombinePerRank(const at::Tensor& x, const at::Tensor& idx,
                                   const at::Tensor& weights,
                                   const ExpertFn& fn, int64_t num_experts,
                                   int64_t world_size) {
  const at::Tensor idx_cpu = idx.to(at::kLong).cpu();
  const int64_t tokens = x.size(0);
  const int64_t local = num_experts / world_size;
  const std::vector<at::Tensor> terms =
      weightedPickOutputs(x, idx_cpu, weights, fn);
  at::Tensor acc = at::zeros({tokens, x.size(1)}, at::kFloat);
  for (int64_t r = 0; r < world_size; ++r) {
    at::Tensor partial = at::zeros({tokens, x.size(1)}, at::kFloat);
    at::Tensor has_picks = at::zeros({tokens}, at::kBool);
    for (int64_t k = 0; k < idx_cpu.size(1); ++k) {
      const at::Tensor expert = idx_cpu.select(1, k);
      const at::Tensor on_r =
          at::logical_and(expert >= 0, at::div(expert, local, "floor") == r);
      partial = at::where(on_r.unsqueeze(1), partial + terms[k], partial);
      has_picks = at::logical_or(has_picks, on_r);
    }
    const at::Tensor rounded = partial.to(x.scalar_type()).to(at::kFloat);
    acc = at::where(has_picks.unsqueeze(1), acc + rounded, acc);
  }
  return acc.to(x.scalar_type());
}

namespace {

// The value of e4m3 code `code` (sign bit, 4 exponent bits with bias 7, 3
// mantissa bits; exponent 0 subnormal; 0x7f and 0xff are NaN).
float e4m3Value(int code) {
  const int exponent = (code >> 3) & 0xf;
  const int mantissa = code & 0x7;
  const float magnitude =
      exponent == 0 ? std::ldexp(static_cast<float>(mantissa) / 8.0f, -6)
                    : std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f,
                                 exponent - 7);
  return (code & 0x80) != 0 ? -magnitude : magnitude;
}

// The code of the e4m3 value nearest to v (|v| <= 448), ties to the even
// code.
uint8_t nearestE4m3(float v) {
  int best = 0;
  double best_distance = 1e30;
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) {
      continue;  // NaN
    }
    const double distance = std::fabs(static_cast<double>(e4m3Value(code)) - v);
    if (distance < best_distance ||
        (distance == best_distance && (code & 1) == 0 && (best & 1) == 1)) {
      best = code;
      best_distance = distance;
    }
  }
  if (best == 0x80 && !std::signbit(v)) {
    best = 0;  // +0 for +0 (and tiny positives): -0 only for negatives
  }
  if (best == 0 && std::signbit(v)) {
    best = 0x80;
  }
  return static_cast<uint8_t>(best);
}

}  // namespace

Fp8Rows referenceQuantizeFp8(const at::Tensor& x) {
  const at::Tensor values = x.to(at::kFloat).cpu().contiguous();
  const int64_t rows = values.size(0);
  const int64_t hidden = values.size(1);
  const int64_t blocks = hidden / 128;
  Fp8Rows out;
  out.bytes = at::empty({rows, hidden}, at::kByte);
  out.scales = at::empty({rows, blocks}, at::kFloat);
  const float* in = values.const_data_ptr<float>();
  uint8_t* bytes = out.bytes.mutable_data_ptr<uint8_t>();
  float* scales = out.scales.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* block = in + r * hidden + b * 128;
      float amax = 0.0f;
      for (int i = 0; i < 128; ++i) {
        amax = std::max(amax, std::fabs(block[i]));
      }
      // volatile: each operation rounded to float on its own.
      volatile float scale = std::max(amax, 1e-4f);
      scale = scale / 448.0f;
      scales[r * blocks + b] = scale;
      for (int i = 0; i < 128; ++i) {
        volatile float quotient = block[i] / scale;
        const float q = quotient;
        const float clamped = std::min(448.0f, std::max(-448.0f, q));
        bytes[r * hidden + b * 128 + i] = nearestE4m3(clamped);
      }
    }
  }
  return out;
}

at::Tensor randomWeights(int64_t tokens, int64_t picks, at::ScalarType dtype,
                         const at::Device& device, uint64_t seed) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  return (at::rand({tokens, picks}, generator, at::dtype(at::kFloat)) + 0.1)
      .to(dtype)
      .to(device);
}

std::string toString(Routing routing) {
  switch (routing) {
    case Routing::Uniform:
      return "uniform";
    case Routing::Skewed:
      return "skewed";
    case Routing::IdleRank:
      return "idle_rank";
    case Routing::EmptyRank:
      return "empty_rank";
    case Routing::Masked:
      return "masked";
    case Routing::VaryingTokens:
      return "varying_tokens";
  }
  return "unknown";
}

int64_t tokensFor(Routing routing, int64_t rank) {
  switch (routing) {
    case Routing::EmptyRank:
      return rank == 0 ? 0 : 6;
    case Routing::VaryingTokens:
      return 2 + 5 * rank;
    default:
      return 7;
  }
}

at::Tensor makeRouting(Routing routing, int64_t tokens, int64_t picks,
                       int64_t num_experts, int64_t world_size, int64_t rank,
                       uint64_t seed) {
  std::mt19937_64 rng(seed * 7919 + static_cast<uint64_t>(rank));
  const int64_t local = num_experts / world_size;
  // The experts this routing may pick, and the one every token takes first.
  int64_t allowed = num_experts;
  if (routing == Routing::IdleRank && world_size > 1) {
    allowed = num_experts - local;
  }
  const int64_t hot = num_experts - 1;
  at::Tensor idx = at::full({tokens, picks}, -1, at::kLong);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int64_t> experts(allowed);
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    if (routing == Routing::Skewed) {
      std::iter_swap(experts.begin(),
                     std::find(experts.begin(), experts.end(), hot));
    }
    std::vector<int64_t> slots(picks);
    std::iota(slots.begin(), slots.end(), 0);
    if (routing != Routing::Skewed) {
      std::shuffle(slots.begin(), slots.end(), rng);
    }
    const int64_t used = std::min(picks, allowed);
    for (int64_t i = 0; i < used; ++i) {
      const bool masked = routing == Routing::Masked && (rng() % 10) < 4;
      idx[t][slots[i]] = masked ? -1 : experts[i];
    }
  }
  return idx;
}

}  // namespace hostfuse::test
