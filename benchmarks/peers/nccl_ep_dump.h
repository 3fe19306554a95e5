// What nccl_ep_bench reads and checks, apart from NCCL EP itself (std only,
// so CI compiles and tests it: tests/cpp/test_peers_dump.cpp): the dump
// of bench_peers.py --dump, the rows each rank must receive, the checks
// of NCCL EP's outputs against hostfuse's, and NCCL EP's limits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace hostfuse::peers {

// ---------------------------------------------------------------------------
// The dump bench_peers.py --dump writes: DIR/meta.tsv (the shape, the token
// counts, the times of its rows) and DIR/T<T>/rank<r>/{x, idx, w, counts,
// out}.bin, raw little-endian arrays.

struct Meta {
  int64_t hidden = 0, topk = 0, experts = 0, ranks = 0;
  std::string device;
  std::vector<int64_t> tokens;
  // (T, row, phase) -> median us, as bench_peers.py measured them; and
  // those keys in its order, for printing.
  std::map<std::tuple<int64_t, std::string, std::string>, double> times;
  std::vector<std::tuple<int64_t, std::string, std::string>> order;
};

inline std::vector<std::string> splitTabs(const std::string& line) {
  std::vector<std::string> fields;
  std::stringstream stream(line);
  std::string field;
  while (std::getline(stream, field, '\t')) {
    fields.push_back(field);
  }
  return fields;
}

inline Meta readMeta(const std::string& dir) {
  const std::string path = dir + "/meta.tsv";
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error("cannot read " + path +
                             ": run bench_peers.py with --dump " + dir +
                             " first");
  }
  Meta meta;
  std::string line;
  while (std::getline(in, line)) {
    const std::vector<std::string> f = splitTabs(line);
    if (f.size() == 3 && f[0] == "config") {
      if (f[1] == "device") {
        meta.device = f[2];
      } else if (f[1] == "hidden") {
        meta.hidden = std::stoll(f[2]);
      } else if (f[1] == "topk") {
        meta.topk = std::stoll(f[2]);
      } else if (f[1] == "experts") {
        meta.experts = std::stoll(f[2]);
      } else if (f[1] == "ranks") {
        meta.ranks = std::stoll(f[2]);
      }  // a key of a later bench_peers.py: not needed here
    } else if (f.size() == 2 && f[0] == "tokens") {
      meta.tokens.push_back(std::stoll(f[1]));
    } else if (f.size() == 5 && f[0] == "time") {
      meta.times[{std::stoll(f[1]), f[2], f[3]}] = std::stod(f[4]);
      meta.order.emplace_back(std::stoll(f[1]), f[2], f[3]);
    }
  }
  if (meta.hidden <= 0 || meta.topk <= 0 || meta.experts <= 0 ||
      meta.ranks <= 0 || meta.tokens.empty()) {
    throw std::runtime_error(path + " lacks the shape or the token counts");
  }
  return meta;
}

template <typename T>
inline std::vector<T> readArray(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    throw std::runtime_error("cannot read " + path);
  }
  const size_t bytes = static_cast<size_t>(in.tellg());
  if (bytes != count * sizeof(T)) {
    throw std::runtime_error(path + " holds " + std::to_string(bytes) +
                             " bytes, expected " +
                             std::to_string(count * sizeof(T)));
  }
  std::vector<T> values(count);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()),
          static_cast<std::streamsize>(bytes));
  return values;
}

// One rank's inputs and hostfuse's outputs at T tokens (of another rank:
// its inputs x and idx only, which expectedRows needs).
struct RankData {
  std::vector<uint16_t> x;      // [T, H] bf16 bits
  std::vector<int64_t> idx;     // [T, K]
  std::vector<float> w;         // [T, K]
  std::vector<int64_t> counts;  // [L] hostfuse's recv_expert_counts
  std::vector<uint16_t> out;    // [T, H] hostfuse's combine, bf16 bits
};

inline RankData readRank(const std::string& dir, const Meta& m, int64_t tokens,
                         int rank, bool mine) {
  const std::string base = dir + "/T" + std::to_string(tokens) + "/rank" +
                           std::to_string(rank) + "/";
  const size_t T = tokens, H = m.hidden, K = m.topk, L = m.experts / m.ranks;
  RankData d;
  d.x = readArray<uint16_t>(base + "x.bin", T * H);
  d.idx = readArray<int64_t>(base + "idx.bin", T * K);
  if (!mine) {
    return d;
  }
  d.w = readArray<float>(base + "w.bin", T * K);
  d.counts = readArray<int64_t>(base + "counts.bin", L);
  d.out = readArray<uint16_t>(base + "out.bin", T * H);
  return d;
}

// A row's identity for the multiset check: 64 bits of its bytes.
inline uint64_t rowHash(const uint16_t* row, int64_t hidden) {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (int64_t i = 0; i < hidden; ++i) {
    h ^= row[i] + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
  }
  return h ^ (h >> 33);
}

// Per local expert of `rank`, the sorted hashes of the rows every rank's
// inputs send there (one per pick).
inline std::vector<std::vector<uint64_t>> expectedRows(
    const std::vector<RankData>& all, const Meta& m, int64_t tokens, int rank) {
  const int64_t L = m.experts / m.ranks;
  std::vector<std::vector<uint64_t>> rows(L);
  for (const RankData& source : all) {
    for (int64_t t = 0; t < tokens; ++t) {
      std::optional<uint64_t> hash;
      for (int64_t k = 0; k < m.topk; ++k) {
        const int64_t e = source.idx[t * m.topk + k];
        if (e >= rank * L && e < (rank + 1) * L) {
          if (!hash) {
            hash = rowHash(&source.x[t * m.hidden], m.hidden);
          }
          rows[e - rank * L].push_back(*hash);
        }
      }
    }
  }
  for (auto& r : rows) {
    std::sort(r.begin(), r.end());
  }
  return rows;
}

inline float bf16ToFloat(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// The checks of the file comment; "" when they hold, else what failed.
inline std::string check(
    const std::vector<std::vector<uint16_t>>& rows_of_expert,
    const std::vector<int64_t>& counts, const std::vector<uint16_t>& combined,
    const RankData& mine, const std::vector<std::vector<uint64_t>>& expected,
    const Meta& m) {
  const int64_t L = static_cast<int64_t>(expected.size());
  for (int64_t e = 0; e < L; ++e) {
    if (counts[e] != mine.counts[e]) {
      return "local expert " + std::to_string(e) + " received " +
             std::to_string(counts[e]) + " rows, hostfuse " +
             std::to_string(mine.counts[e]);
    }
    std::vector<uint64_t> got;
    for (int64_t i = 0; i < counts[e]; ++i) {
      got.push_back(rowHash(&rows_of_expert[e][i * m.hidden], m.hidden));
    }
    std::sort(got.begin(), got.end());
    if (got != expected[e]) {
      return "local expert " + std::to_string(e) +
             " received other rows than the inputs send it";
    }
  }
  for (size_t i = 0; i < combined.size(); ++i) {
    const float a = bf16ToFloat(combined[i]), b = bf16ToFloat(mine.out[i]);
    if (!(std::fabs(a - b) <= 2e-2f + 2e-2f * std::fabs(b))) {
      return "combined output [" + std::to_string(i / m.hidden) + ", " +
             std::to_string(i % m.hidden) + "] = " + std::to_string(a) +
             ", hostfuse " + std::to_string(b);
    }
  }
  return "";
}

// Why NCCL EP cannot run `mode` on this workload, from the limits its
// source asserts (an assert ends the process instead of returning an
// error); "" if it can. The same on every rank: it depends on the dump's
// shape only.
inline std::string unsupported(const std::string& mode, const Meta& m,
                               int64_t tokens) {
  const int64_t L = m.experts / m.ranks;
  if (mode == "ll") {
    const int64_t hiddens[] = {2048, 2560, 4096, 5120, 6144, 7168, 8192};
    if (std::find(std::begin(hiddens), std::end(hiddens), m.hidden) ==
        std::end(hiddens)) {
      return "LL takes H in {2048, 2560, 4096, 5120, 6144, 7168, 8192}";
    }
    if (m.topk > 9) {
      return "LL takes at most 9 picks per token";
    }
    if (tokens * L % 4 != 0) {
      return "LL needs T x L to be a multiple of 4";
    }
    if (tokens > 4096) {
      return "LL is for small batches (its completion count needs T well "
             "below 16384): run here up to 4096 tokens";
    }
    return "";
  }
  if (tokens > 8192) {
    return "HT takes at most 8192 tokens per rank";
  }
  if (m.hidden % 8 != 0) {
    return "HT needs H to be a multiple of 8";
  }
  if (L * m.ranks % 4 != 0 || L > 64) {
    return "HT needs L x ranks to be a multiple of 4 and L <= 64";
  }
  if (tokens * m.topk % 4 != 0) {
    return "HT needs T x K to be a multiple of 4";
  }
  return "";
}

}  // namespace hostfuse::peers
