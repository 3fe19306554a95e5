// Runs generated kernels on the CPU, so that CI checks what they compute
// without a GPU: the CUDA source is compiled with the host compiler
// against a small shim (one thread per CUDA thread of a block, the blocks
// one after the other, barriers for __syncthreads, emulated warp
// shuffles) and launched with the real host-side setup: sizes, signature,
// parameter values and grid (with a one-SM grid, so that the grid-stride
// loops over elements and rows run).
//
// What this cannot see: anything the GPU does differently from the host
// (alignment faults, memory ordering between blocks, NVRTC's math). The
// GPU tests (test_kernel_gpu.cpp) cover those.
//
// The host compiler is $HOSTFUSE_HOST_CXX, else c++; without one the tests
// skip.
#include <dlfcn.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include <hostfuse/ir/evaluation.h>
#include <hostfuse/kernel/analysis.h>
#include <hostfuse/kernel/codegen.h>
#include <hostfuse/kernel/launch.h>
#include "kernel_cases.h"

namespace hostfuse {
namespace {

const char* kShim = R"(
#include <math.h>
#include <cstring>
#include <cstdint>
#include <thread>
#include <vector>
#include <cstdlib>
#include <mutex>
#include <condition_variable>

struct hf_dim3 { unsigned x = 0, y = 1, z = 1; };
static thread_local hf_dim3 threadIdx;
static thread_local hf_dim3 blockIdx;
static hf_dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, 8); return f; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float hf_host_half_to_float(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
inline unsigned short hf_host_float_to_half(float f) { _Float16 h = (_Float16)f; unsigned short b; std::memcpy(&b, &h, 2); return b; }

class HfBarrier {
 public:
  explicit HfBarrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == count_) { arrived_ = 0; ++generation_; cv_.notify_all(); return; }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }
 private:
  std::mutex mutex_; std::condition_variable cv_;
  int count_; int arrived_ = 0; long generation_ = 0;
};
struct HfWarp { HfBarrier barrier{32}; long long slots[32]; };
static HfBarrier* hf_block_barrier = nullptr;
static std::vector<HfWarp>* hf_warps = nullptr;
inline void __syncthreads() { hf_block_barrier->wait(); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int offset) {
  if (mask != 0xffffffffu) { std::abort(); }
  HfWarp& warp = (*hf_warps)[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&warp.slots[lane], &x, sizeof(T));
  warp.barrier.wait();
  T other; std::memcpy(&other, &warp.slots[lane ^ offset], sizeof(T));
  warp.barrier.wait();
  return other;
}
)";

const char* kRunner = R"(
extern "C" void hf_emulate(unsigned grid, unsigned block, void** args) {
  if (block % 32 != 0) { std::abort(); }
  gridDim.x = grid;
  blockDim.x = block;
  HfBarrier barrier(block);
  std::vector<HfWarp> warps(block / 32);
  hf_block_barrier = &barrier;
  hf_warps = &warps;
  // One thread per CUDA thread of a block; the blocks run one after the
  // other, separated by a barrier so that shared memory is reused safely.
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([t, grid, args, &barrier] {
      threadIdx.x = t;
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        hf_call(args);
        barrier.wait();
      }
    });
  }
  for (std::thread& thread : threads) { thread.join(); }
}
)";

void replaceAll(std::string& text, const std::string& from,
                const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos;
       at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
}

// A host translation unit for `source`, with hf_call(args) unpacking the
// parameter array as cuLaunchKernel would.
std::string hostSource(std::string source) {
  replaceAll(source,
             "asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(result) : \"h\"(x.bits));",
             "result = hf_host_half_to_float(x.bits);");
  replaceAll(source,
             "asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(result.bits) : "
             "\"f\"(x));",
             "result.bits = hf_host_float_to_half(x);");
  // The parameter list: one per line after "hostfuse_fusion(".
  std::istringstream lines(source.substr(source.find("hostfuse_fusion(\n")));
  std::string text;
  std::getline(lines, text);
  std::vector<std::string> types;
  while (std::getline(lines, text)) {
    const bool last = text.find(") {") != std::string::npos;
    text = text.substr(0, text.find_first_of(",)"));
    std::string param = text.substr(0, text.find_last_of(' '));
    replaceAll(param, "__restrict__", "");
    types.push_back(param);
    if (last) {
      break;
    }
  }
  std::ostringstream call;
  call << "extern \"C\" void hf_call(void** args) {\n  hostfuse_fusion(";
  for (size_t i = 0; i < types.size(); ++i) {
    call << (i == 0 ? "" : ", ") << "*reinterpret_cast<" << types[i]
         << "*>(args[" << i << "])";
  }
  call << ");\n}\n";
  return std::string(kShim) + source + call.str() + kRunner;
}

using Emulate = void (*)(unsigned, unsigned, void**);

std::string hostCompiler() {
  const char* compiler = std::getenv("HOSTFUSE_HOST_CXX");
  return compiler != nullptr && compiler[0] != '\0' ? compiler : "c++";
}

bool haveHostCompiler() {
  static const bool have =
      std::system((hostCompiler() + " --version > /dev/null 2>&1").c_str()) ==
      0;
  return have;
}

// Compiles the host version of `source` into a shared library and returns
// its launcher; each source once per process.
Emulate compileForHost(const std::string& source) {
  static std::map<std::string, Emulate> cache;
  auto it = cache.find(source);
  if (it != cache.end()) {
    return it->second;
  }
  const std::string base = "/tmp/hostfuse_emulation_" +
                           std::to_string(getpid()) + "_" +
                           std::to_string(cache.size());
  std::ofstream(base + ".cpp") << hostSource(source);
  const std::string command = hostCompiler() +
                              " -std=c++17 -O0 -shared -fPIC -pthread -o " +
                              base + ".so " + base + ".cpp 2> " + base + ".log";
  const bool compiled = std::system(command.c_str()) == 0;
  std::stringstream log;
  log << std::ifstream(base + ".log").rdbuf();
  void* library = compiled
                      ? dlopen((base + ".so").c_str(), RTLD_NOW | RTLD_LOCAL)
                      : nullptr;
  for (const char* suffix : {".cpp", ".so", ".log"}) {
    std::remove((base + suffix).c_str());
  }
  if (!compiled) {
    ADD_FAILURE() << "the host compile of a generated kernel failed:\n"
                  << log.str();
    return nullptr;
  }
  if (library == nullptr) {
    ADD_FAILURE() << "dlopen failed: " << dlerror();
    return nullptr;
  }
  auto emulate = reinterpret_cast<Emulate>(dlsym(library, "hf_emulate"));
  cache.emplace(source, emulate);
  return emulate;
}

// The outputs of the kernel that setUpLaunch chooses for `inputs`, run on
// the host; `signature` (if given) receives its signature. With
// `row_counts`, a row-limited kernel, whose outputs start as `unwritten`,
// so that rows it must not write can be seen.
std::vector<at::Tensor> emulate(const Fusion& fusion,
                                const std::vector<c10::IValue>& inputs,
                                const KernelOptions& options, int64_t sm_count,
                                InputSignature* signature = nullptr,
                                const at::Tensor& row_counts = at::Tensor(),
                                int unwritten = 0) {
  const FusionAnalysis analysis(fusion);
  LaunchSetup setup = setUpLaunch(fusion, analysis.plan(), inputs, at::kCPU,
                                  options, row_counts);
  if (signature != nullptr) {
    *signature = setup.signature;
  }
  if (row_counts.defined()) {
    for (at::Tensor& output : setup.outputs) {
      output.fill_(unwritten);
    }
  }
  if (setup.nothing_to_launch) {
    return setup.outputs;
  }
  const GeneratedKernel kernel = generateKernel(analysis, setup.signature);
  KernelArgs args(fusion, analysis.plan(), kernel, setup);
  // As if an SM held 2048 threads in at most 32 blocks.
  const LaunchConfig config = launchConfig(
      kernel, setup, sm_count,
      [](int64_t block) { return std::min<int64_t>(2048 / block, 32); });
  EXPECT_LE(config.block, kernel.max_block_size);
  const Emulate run = compileForHost(kernel.source);
  if (run != nullptr) {
    run(static_cast<unsigned>(config.grid), static_cast<unsigned>(config.block),
        args.pointers());
  }
  return setup.outputs;
}

class KernelEmulation : public testing::TestWithParam<size_t> {};

TEST_P(KernelEmulation, MatchesAtenReference) {
  if (!haveHostCompiler()) {
    GTEST_SKIP() << "no host compiler (" << hostCompiler() << ")";
  }
  const test::FusionCase& c = test::fusionCases()[GetParam()];
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  struct Run {
    int64_t rows;
    int64_t cols;
    test::Layout layout;
    KernelOptions options;
    const char* what;
  };
  KernelOptions index64;
  index64.force_64bit_index = true;
  KernelOptions strided;
  strided.contiguous_fast_path = false;
  // More rows than the one-SM grid has blocks for short rows (256); rows
  // of one warp, of four warps (700 / 8 elements per thread), and a single
  // row.
  const Run runs[] = {
      {37, 101, test::Layout::kContiguous, {}, "default"},
      {37, 101, test::Layout::kContiguous, index64, "64-bit index"},
      {37, 101, test::Layout::kContiguous, strided, "strided path"},
      {37, 101, test::Layout::kTransposed, {}, "default"},
      {37, 101, test::Layout::kSliced, {}, "default"},
      {300, 20, test::Layout::kContiguous, {}, "default"},
      {3, 700, test::Layout::kContiguous, {}, "default"},
      {1, 9, test::Layout::kSliced, {}, "default"},
      // Rows of unit stride inside wider rows: the pitched-rows kernel
      // where the width divides the row (64, 48: every dtype's widest
      // vector; 20: narrower ones), strided where it cannot (101).
      {37, 64, test::Layout::kPitched, {}, "default"},
      {300, 20, test::Layout::kPitched, {}, "default"},
      {5, 48, test::Layout::kPitched, index64, "64-bit index"},
      {3, 101, test::Layout::kPitched, {}, "default"},
  };
  // Whether the dense inputs of 37 x 101 get the contiguous kernel.
  bool dense_is_contiguous = false;
  for (const Run& run : runs) {
    SCOPED_TRACE("rows=" + std::to_string(run.rows) +
                 " cols=" + std::to_string(run.cols) + " layout=" +
                 test::toString(run.layout) + " options=" + run.what);
    const std::vector<c10::IValue> inputs =
        test::makeInputs(c, run.rows, run.cols, run.layout, at::kCPU);
    InputSignature signature;
    test::expectOutputsClose(
        emulate(*fusion, inputs, run.options, 1, &signature),
        evaluateFusion(*fusion, inputs), c.float_tolerance);
    if (run.layout == test::Layout::kContiguous && run.cols == 101 &&
        run.what == std::string("default")) {
      dense_is_contiguous = signature.contiguous;
    }
    // Where dense inputs get vectors, 64-element rows 80 apart get them
    // too (as one row of contiguous elements with one loop dim).
    if (run.layout == test::Layout::kPitched && run.cols == 64) {
      EXPECT_EQ(signature.pitched_rows || signature.contiguous,
                dense_is_contiguous)
          << signature.toString();
      EXPECT_EQ(signature.vector_width > 1, dense_is_contiguous)
          << signature.toString();
    }
  }
}

// Row-limited kernels: the rows the counts cover match the reference, the
// others keep what the outputs held. Every layout's kernel (strided,
// contiguous with its tail, pitched rows), counts that are negative, past
// the rows, or none at all.
TEST_P(KernelEmulation, RowLimitedKernelsWriteOnlyTheCountedRows) {
  if (!haveHostCompiler()) {
    GTEST_SKIP() << "no host compiler (" << hostCompiler() << ")";
  }
  const test::FusionCase& c = test::fusionCases()[GetParam()];
  const std::shared_ptr<Fusion> fusion = test::buildFusion(c);
  if (!FusionAnalysis(*fusion).plan().rowsCanBeLimited()) {
    GTEST_SKIP() << "a reduction, or an output without the first loop dim: "
                    "row limits do not apply (the signature check refuses "
                    "them; test_kernel.cpp)";
  }
  struct Run {
    test::Layout layout;
    std::vector<int64_t> counts;
  };
  const Run runs[] = {
      {test::Layout::kContiguous, {5, -2, 9}},
      {test::Layout::kContiguous, {0, 40}},
      {test::Layout::kSliced, {3, 3}},
      {test::Layout::kPitched, {11, std::numeric_limits<int64_t>::max()}},
      {test::Layout::kPitched, {1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 2}},
      {test::Layout::kPitched, {20}},
      {test::Layout::kContiguous, {}},
  };
  // The values the outputs start as: 7, and for bool outputs (where 7 is
  // true) false as well, so that no stray write can match them all.
  std::vector<int> starts = {7};
  for (const Val* output : fusion->outputs()) {
    if (output->dtype() == DataType::Bool && starts.size() == 1) {
      starts.push_back(0);
    }
  }
  for (const int unwritten : starts) {
    for (const Run& run : runs) {
      const at::Tensor counts = at::tensor(run.counts, at::kLong);
      const std::vector<c10::IValue> inputs =
          test::makeInputs(c, 37, 64, run.layout, at::kCPU);
      const std::vector<at::Tensor> want = evaluateFusion(*fusion, inputs);
      // The rows the counts cover: each count in [0, the first dim's size],
      // their sum at most that size.
      int64_t size = 1;
      for (const at::Tensor& output : want) {
        size = std::max(size, output.size(0));
      }
      int64_t covered = 0;
      for (const int64_t count : run.counts) {
        covered = std::min(size, covered + std::clamp<int64_t>(count, 0, size));
      }
      SCOPED_TRACE("layout=" + std::string(test::toString(run.layout)) +
                   " counts=" + c10::str(run.counts) + ": rows " +
                   std::to_string(covered) + " of " + std::to_string(size) +
                   ", outputs starting as " + std::to_string(unwritten));
      InputSignature signature;
      const std::vector<at::Tensor> got =
          emulate(*fusion, inputs, {}, 1, &signature, counts, unwritten);
      EXPECT_TRUE(signature.row_limited) << signature.toString();
      ASSERT_EQ(got.size(), want.size());
      std::vector<at::Tensor> got_rows;
      std::vector<at::Tensor> want_rows;
      for (size_t o = 0; o < got.size(); ++o) {
        // An output of one row along the first dim (it broadcasts there) is
        // written once any row is covered.
        const int64_t rows = got[o].size(0);
        ASSERT_TRUE(rows == size || rows == 1) << "output " << o;
        const int64_t written = std::min(covered, rows);
        got_rows.push_back(got[o].narrow(0, 0, written));
        want_rows.push_back(want[o].narrow(0, 0, written));
        const at::Tensor rest = got[o].narrow(0, written, rows - written);
        EXPECT_TRUE(at::equal(rest, at::full_like(rest, unwritten)))
            << "output " << o << " was written past row " << written;
      }
      test::expectOutputsClose(got_rows, want_rows, c.float_tolerance);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fusions, KernelEmulation,
                         testing::Range<size_t>(0, test::fusionCases().size()),
                         test::caseName);

}  // namespace
}  // namespace hostfuse
