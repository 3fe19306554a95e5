// The parts of benchmarks/peers/nccl_ep_bench that need no NCCL EP (its
// dump reader, expected rows, output checks and limits:
// benchmarks/peers/nccl_ep_dump.h) and the peers CSV writer of the CUDA
// benchmarks (benchmarks/peers/peers_csv.h), on a small dump written here
// in bench_peers.py's format (python_tests/test_perf_tools.py checks that
// bench_peers.py writes that format).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../benchmarks/peers/nccl_ep_dump.h"
#include "../../benchmarks/peers/peers_csv.h"

namespace hostfuse::peers {
namespace {

// A fresh folder under /tmp, removed at the end. (POSIX, not
// std::filesystem: the test links libtorch, whose own std::filesystem
// symbols would bind here.)
class TempDir {
 public:
  TempDir() {
    std::string pattern = "/tmp/peers_dumpXXXXXX";
    const char* made = mkdtemp(pattern.data());
    if (made == nullptr) {
      throw std::runtime_error(std::string("mkdtemp in /tmp failed: ") +
                               std::strerror(errno));
    }
    path_ = made;
  }
  ~TempDir() {
    if (std::system(("rm -rf '" + path_ + "'").c_str()) != 0) {
      std::fprintf(stderr, "test_peers_dump: could not remove %s\n",
                   path_.c_str());
    }
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// mkdir -p of `path`'s parent folders.
void makeParents(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos;
       slash = path.find('/', slash + 1)) {
    mkdir(path.substr(0, slash).c_str(), 0755);
  }
}

// What `fn` throws (the dump reader's std::runtime_error), or "".
template <typename Fn>
std::string errorOf(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

template <typename T>
void writeArray(const std::string& path, const std::vector<T>& values) {
  makeParents(path);
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(values.data()),
            static_cast<std::streamsize>(values.size() * sizeof(T)));
}

// 2 ranks, E = 4 (L = 2), K = 2, H = 8, T = 3: rank r's token t has the
// bf16 value (10 r + t + 1) in every channel, so every row is distinct.
constexpr int64_t kRanks = 2, kExperts = 4, kTopk = 2, kHidden = 8, kTokens = 3;
const std::vector<int64_t> kIdx[kRanks] = {{0, 3, 1, 2, 2, 0},
                                           {1, 0, 3, 2, 0, 2}};

uint16_t bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  return static_cast<uint16_t>(word >> 16);  // exact for small integers
}

std::vector<uint16_t> rowOf(int64_t rank, int64_t token) {
  return std::vector<uint16_t>(kHidden, bf16(10.0f * rank + token + 1));
}

void writeDump(const std::string& dir) {
  std::ofstream meta(dir + "/meta.tsv");
  meta << "config\thidden\t" << kHidden << "\nconfig\ttopk\t" << kTopk
       << "\nconfig\texperts\t" << kExperts << "\nconfig\tranks\t" << kRanks
       << "\nconfig\tdevice\tcpu (gloo)\nconfig\tnew_key\t7\ntokens\t"
       << kTokens << "\ntime\t3\ttorch a2a\tdispatch\t10.50"
       << "\ntime\t3\thostfuse cuda (graph)\tdispatch\t2.25"
       << "\ntime\t3\ttorch a2a\tcombine\t12.00\n";
  for (int64_t r = 0; r < kRanks; ++r) {
    const std::string base = dir + "/T3/rank" + std::to_string(r);
    std::vector<uint16_t> x;
    for (int64_t t = 0; t < kTokens; ++t) {
      const std::vector<uint16_t> row = rowOf(r, t);
      x.insert(x.end(), row.begin(), row.end());
    }
    writeArray(base + "/x.bin", x);
    writeArray(base + "/idx.bin", kIdx[r]);
    writeArray(base + "/w.bin", std::vector<float>(kTokens * kTopk, 0.5f));
    // Picks of expert 2r and 2r + 1 from both ranks.
    std::vector<int64_t> counts(2, 0);
    for (const auto& idx : kIdx) {
      for (const int64_t e : idx) {
        if (e / 2 == r) {
          ++counts[e % 2];
        }
      }
    }
    writeArray(base + "/counts.bin", counts);
    writeArray(base + "/out.bin",
               std::vector<uint16_t>(kTokens * kHidden, bf16(1.0f)));
  }
}

TEST(PeersDump, ReadsWhatBenchPeersWrites) {
  TempDir dir;
  writeDump(dir.path());
  const Meta m = readMeta(dir.path());
  EXPECT_EQ(m.hidden, kHidden);
  EXPECT_EQ(m.topk, kTopk);
  EXPECT_EQ(m.experts, kExperts);
  EXPECT_EQ(m.ranks, kRanks) << "an unknown key must not land in ranks";
  EXPECT_EQ(m.device, "cpu (gloo)");
  EXPECT_EQ(m.tokens, std::vector<int64_t>{kTokens});
  ASSERT_EQ(m.order.size(), 3u);
  EXPECT_EQ(std::get<1>(m.order[1]), "hostfuse cuda (graph)");
  EXPECT_EQ(m.times.at({3, "torch a2a", "combine"}), 12.0);

  const RankData mine = readRank(dir.path(), m, kTokens, 1, true);
  EXPECT_EQ(mine.idx, kIdx[1]);
  EXPECT_EQ(mine.counts.size(), 2u);
  EXPECT_EQ(mine.out.size(), static_cast<size_t>(kTokens * kHidden));
  const RankData other = readRank(dir.path(), m, kTokens, 0, false);
  EXPECT_EQ(other.x.size(), static_cast<size_t>(kTokens * kHidden));
  EXPECT_TRUE(other.out.empty()) << "another rank's outputs are not needed";

  const std::string missing = errorOf([&] { readMeta(dir.path() + "/no"); });
  EXPECT_NE(missing.find("/no/meta.tsv: run bench_peers.py with --dump"),
            std::string::npos)
      << missing;
  writeArray(dir.path() + "/T3/rank1/w.bin", std::vector<float>(5, 0.0f));
  const std::string short_file =
      errorOf([&] { readRank(dir.path(), m, kTokens, 1, true); });
  EXPECT_NE(short_file.find("rank1/w.bin holds 20 bytes, expected 24"),
            std::string::npos)
      << short_file;
}

// The multiset check: any order of an expert's rows passes; a wrong row, a
// wrong count or a combined value out of tolerance fails, saying which.
TEST(PeersDump, ChecksRowsAsMultisetsAndTheCombinedOutput) {
  TempDir dir;
  writeDump(dir.path());
  const Meta m = readMeta(dir.path());
  std::vector<RankData> all;
  for (int r = 0; r < kRanks; ++r) {
    all.push_back(readRank(dir.path(), m, kTokens, r, true));
  }
  // Rank 0 holds experts 0 and 1: expert 0 gets rank 0's tokens 0 and 2
  // and rank 1's tokens 0 and 2; expert 1 rank 0's token 1 and rank 1's 0.
  const std::vector<std::vector<uint64_t>> expected =
      expectedRows(all, m, kTokens, 0);
  ASSERT_EQ(expected.size(), 2u);
  ASSERT_EQ(expected[0].size(), 4u);
  ASSERT_EQ(expected[1].size(), 2u);
  auto rows = [](std::vector<std::pair<int64_t, int64_t>> sources) {
    std::vector<uint16_t> flat;
    for (const auto& [rank, token] : sources) {
      const std::vector<uint16_t> row = rowOf(rank, token);
      flat.insert(flat.end(), row.begin(), row.end());
    }
    return flat;
  };
  std::vector<std::vector<uint16_t>> received = {
      rows({{1, 2}, {0, 0}, {1, 0}, {0, 2}}),  // arrival order
      rows({{1, 0}, {0, 1}})};
  const std::vector<int64_t> counts = {4, 2};
  ASSERT_EQ(all[0].counts, counts);
  std::vector<uint16_t> combined = all[0].out;
  EXPECT_EQ(check(received, counts, combined, all[0], expected, m), "");

  std::vector<std::vector<uint16_t>> wrong = received;
  wrong[1] = rows({{1, 1}, {0, 1}});
  EXPECT_EQ(check(wrong, counts, combined, all[0], expected, m),
            "local expert 1 received other rows than the inputs send it");
  EXPECT_EQ(check(received, {3, 2}, combined, all[0], expected, m),
            "local expert 0 received 3 rows, hostfuse 4");
  // |a - b| <= 0.02 + 0.02 |b|: 0.04 around hostfuse's 1.
  combined[kHidden + 5] = bf16(1.0625f);
  EXPECT_NE(check(received, counts, combined, all[0], expected, m)
                .find("combined output [1, 5] = 1.062500, hostfuse 1.000000"),
            std::string::npos);
  combined[kHidden + 5] = bf16(1.03125f);
  EXPECT_EQ(check(received, counts, combined, all[0], expected, m), "")
      << "1.03125 is within 0.04 of 1";
  EXPECT_EQ(median({5, 1, 3}), 3);
  EXPECT_EQ(median({4, 1, 3, 2}), 2.5);
}

TEST(PeersDump, NamesTheLimitsOfEachNcclEpMode) {
  Meta m;
  m.hidden = 7168;
  m.topk = 8;
  m.experts = 32;
  m.ranks = 4;
  EXPECT_EQ(unsupported("ll", m, 128), "");
  EXPECT_EQ(unsupported("ht", m, 4096), "");
  EXPECT_NE(unsupported("ll", m, 8192).find("up to 4096 tokens"),
            std::string::npos);
  EXPECT_NE(unsupported("ht", m, 8193).find("at most 8192 tokens"),
            std::string::npos);
  Meta odd = m;
  odd.hidden = 1000;
  EXPECT_NE(unsupported("ll", odd, 128).find("LL takes H in"),
            std::string::npos);
  odd.hidden = 7168;
  odd.topk = 10;
  EXPECT_NE(unsupported("ll", odd, 128).find("at most 9 picks"),
            std::string::npos);
  odd.topk = 8;
  odd.experts = 2;
  odd.ranks = 1;
  EXPECT_NE(unsupported("ht", odd, 128).find("L x ranks to be a multiple"),
            std::string::npos);
}

TEST(PeersCsv, WritesTheHeaderOnceAndQuotesFields) {
  TempDir dir;
  const std::string path = dir.path() + "/peers.csv";
  ASSERT_TRUE(appendCsv(path, {}));  // checks, writes nothing
  CsvRow row{"GPU, v2",      4,          128,  7168, 8,  32,
             "NVLink floor", "dispatch", 10.0, 1e6,  "-"};
  ASSERT_TRUE(appendCsv(path, {row}));
  row.phase = "combine";
  row.row = "say \"hi\"";
  ASSERT_TRUE(appendCsv(path, {row}));
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    lines.push_back(line);
  }
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0],
            "date,device,ranks,tokens,hidden,topk,experts,row,phase,"
            "median_us,bytes,gbps,check");
  EXPECT_NE(lines[1].find(",\"GPU, v2\",4,128,7168,8,32,NVLink floor,"
                          "dispatch,10.00,1000000,100.000,-"),
            std::string::npos)
      << lines[1];
  EXPECT_NE(lines[2].find(",\"say \"\"hi\"\"\",combine,"), std::string::npos)
      << lines[2];
  EXPECT_FALSE(appendCsv(dir.path() + "/missing/peers.csv", {row}));
}

}  // namespace
}  // namespace hostfuse::peers
