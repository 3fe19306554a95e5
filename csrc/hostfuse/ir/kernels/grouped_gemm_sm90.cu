#include "group_rows.cuh"
#include "grouped_gemm_sm90.h"
#include "silu_mul.cuh"

#include <cuda_bf16.h>

// How it works. A persistent kernel: one block per SM takes tiles of 128
// rows x BN output columns of one group in turn. Tiles are numbered group
// by group, and within a group the tiles of one column range (one slice of
// the group's weights) are consecutive, so the blocks that read the same
// weight slice run at the same time and HBM serves it once; groups of
// many rows go in bands of 8 row tiles (placeOfTile).
//
// A block has three warpgroups. The first is the producer: one thread
// loads the x tile (128 rows x 64) and the weight tile (BN x 64) of every
// K step into a ring of shared-memory stages with TMA, each stage
// signalled full by an mbarrier that counts the loaded bytes. The other
// two are consumers, 64 rows each: they wait for a stage, multiply it on
// the tensor cores (wgmma, operands read from shared memory in the 128-byte
// swizzled layout TMA writes), and mark it empty. After the last K step
// the consumers write their accumulators, rounded to bf16, straight to
// `out`, keeping only the rows of the tile's group and the output's
// columns (n_out).
// Rows of x past the group (the next group's, or past x: TMA fills zeros)
// are multiplied and dropped.
//
// The silu-mul epilogue: a tile's BN weight rows are two boxes of BN/2,
// gate rows [j0, j0 + BN/2) and the up rows n/2 further, so each thread's
// accumulators hold gate and up of the same output columns (fragment
// column c and c + BN/16); it writes silu(gate) * up for BN/2 columns.

namespace hostfuse::kernels {

namespace {

constexpr int kTileM = 128;  // two consumer warpgroups of 64 rows
constexpr int kTileK = 64;   // 128 bytes of bf16: one swizzled row
constexpr int kThreads = 384;
constexpr int kConsumerThreads = 256;

template <int BN>
struct Tile {
  static constexpr int kABytes = kTileM * kTileK * 2;
  static constexpr int kBBytes = BN * kTileK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kStages = BN >= 224 ? 4 : 6;
  static constexpr int kTableInts =
      4 * static_cast<int>(kGroupedGemmMaxGroups) + 1;
  // 1024 bytes of slack to align the stages (the swizzle pattern repeats
  // every 1024 bytes and the descriptors assume tiles start on one).
  static constexpr int kSmemBytes =
      1024 + kStages * kStageBytes + 2 * kStages * 8 + kTableInts * 4;
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0);
  static_assert(kSmemBytes <= 227 * 1024);
};

struct Params {
  const int64_t* counts;
  __nv_bfloat16* out;
  int64_t out_stride;
  int rows;
  int n;      // weight rows per group (the product's columns)
  int n_out;  // output columns: n, or n / 2 with the silu-mul epilogue
  int groups;
  int n_tiles;
  int k_blocks;
};

__device__ __forceinline__ uint32_t sharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void barrierInit(uint64_t* barrier, uint32_t count) {
  asm volatile(
      "mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sharedAddress(barrier)),
      "r"(count));
}

// One arrival that also expects `bytes` from TMA loads in this phase.
__device__ __forceinline__ void barrierArriveExpecting(uint64_t* barrier,
                                                       uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                   sharedAddress(barrier)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void barrierArrive(uint64_t* barrier) {
  asm volatile(
      "mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sharedAddress(barrier))
      : "memory");
}

// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void barrierWait(uint64_t* barrier,
                                            uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(sharedAddress(barrier)),
      "r"(parity)
      : "memory");
}

// TMA: the box at (c0 along the contiguous dim, c1) of `map` into `dst`,
// completing bytes on `barrier`.
__device__ __forceinline__ void loadBox(void* dst, const CUtensorMap* map,
                                        int c0, int c1, uint64_t* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::"
      "bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(sharedAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1),
      "r"(sharedAddress(barrier))
      : "memory");
}

// wgmma's descriptor of a K-major tile in shared memory as TMA writes it
// with 128-byte swizzling: rows of 128 bytes, 8-row groups 1024 bytes
// apart (the stride field), the leading-dimension field unused for this
// layout (1 by convention), swizzle mode 1 (128 bytes) in bits 62-63.
// Adding 2 to a descriptor moves its start 32 bytes: the next 16 K.
__device__ __forceinline__ uint64_t tileDescriptor(const void* tile) {
  const uint64_t address = sharedAddress(tile);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void mmaFence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void mmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
// Waits until at most `pending` committed groups of wgmma are in flight.
template <int pending>
__device__ __forceinline__ void mmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(pending) : "memory");
}

// Keeps the compiler from moving reads of the accumulators above the wait
// for the wgmma that writes them.
template <int N>
__device__ __forceinline__ void pinAccumulators(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    asm volatile("" : "+f"(d[i])::"memory");
  }
}

// d (64 x N, fp32, wgmma's fragment layout) += or = A (64 x 16, descriptor
// a) times B^T (N x 16, descriptor b); `accumulate` 0 overwrites d.
// clang-format off
__device__ __forceinline__ void mmaM64N256(float* d, uint64_t a, uint64_t b,
                                            uint32_t accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void mmaM64N224(float* d, uint64_t a, uint64_t b,
                                            uint32_t accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %114, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n224k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111"
      "}, %112, %113, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
      : "l"(a), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void mmaM64N128(float* d, uint64_t a, uint64_t b,
                                            uint32_t accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}
// clang-format on

template <int BN>
__device__ __forceinline__ void mma(float* d, uint64_t a, uint64_t b,
                                    uint32_t accumulate) {
  if constexpr (BN == 256) {
    mmaM64N256(d, a, b, accumulate);
  } else if constexpr (BN == 224) {
    mmaM64N224(d, a, b, accumulate);
  } else {
    static_assert(BN == 128);
    mmaM64N128(d, a, b, accumulate);
  }
}

// The group of tile `tile`: the last g with first_tile[g] <= tile (groups
// without tiles share their first tile with the next group, so the last
// such g is the one that has it).
__device__ __forceinline__ int groupOfTile(const int* first_tile, int groups,
                                           int tile) {
  int low = 0;
  int high = groups - 1;
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (first_tile[mid] <= tile) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  return low;
}

// Within a group, tiles go in bands of up to kBandTiles row tiles: all the
// column tiles of a band, row tile fastest, then the next band. Blocks
// that run at the same time then share a few row tiles of x and a few
// slices of weights, both held in L2. (Row tile fastest over the whole
// group made every block of a wave read other rows of x, read again from
// HBM for every column tile once a group has more rows than L2 holds: at
// 4096 rows per group the gate-and-up GEMM took 3935 us against
// at::_grouped_mm's 2544 on an H100, docs/perf_log.md.)
constexpr int kBandTiles = 8;

struct TilePlace {
  int m;  // row tile in the group
  int n;  // column tile
};

__device__ __forceinline__ TilePlace placeOfTile(int local, int m_tiles,
                                                 int n_tiles) {
  const int band = local / (kBandTiles * n_tiles);
  const int in_band = local - band * kBandTiles * n_tiles;
  const int band_rows = min(kBandTiles, m_tiles - band * kBandTiles);
  return {band * kBandTiles + in_band % band_rows, in_band / band_rows};
}

template <int BN, bool kSiluMul>
__global__ void __launch_bounds__(kThreads, 1)
    groupedGemmKernel(const __grid_constant__ CUtensorMap x_map,
                      const __grid_constant__ CUtensorMap w_map,
                      const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Tile<BN>;
  // Output columns of a tile.
  constexpr int kTileN = kSiluMul ? BN / 2 : BN;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* const stages = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* const full =
      reinterpret_cast<uint64_t*>(stages + T::kStages * T::kStageBytes);
  uint64_t* const empty = full + T::kStages;
  int* const row_begin = reinterpret_cast<int*>(empty + T::kStages);
  int* const row_end = row_begin + kGroupedGemmMaxGroups;
  int* const m_tiles = row_end + kGroupedGemmMaxGroups;
  int* const first_tile = m_tiles + kGroupedGemmMaxGroups;  // [groups + 1]

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  // The group table, by warp 0: each group's rows (groupRowsOfLane, as
  // launchGroupEnds reads the counts), its number of row tiles and its
  // first tile.
  if (warp == 0) {
    int64_t row_carry = 0;
    int tile_carry = 0;
    for (int base = 0; base < p.groups; base += 32) {
      const int g = base + lane;
      const GroupRows group =
          groupRowsOfLane(p.counts, p.groups, p.rows, base, lane, row_carry);
      const int tiles =
          static_cast<int>((group.end - group.begin + kTileM - 1) / kTileM) *
          p.n_tiles;
      const int tile_sum = warpInclusiveSum(tiles, lane);
      if (g < p.groups) {
        row_begin[g] = static_cast<int>(group.begin);
        row_end[g] = static_cast<int>(group.end);
        m_tiles[g] = tiles / p.n_tiles;
        first_tile[g] = tile_carry + tile_sum - tiles;
      }
      row_carry = __shfl_sync(kFullWarpMask, group.end, 31);
      tile_carry += __shfl_sync(kFullWarpMask, tile_sum, 31);
    }
    if (lane == 0) {
      first_tile[p.groups] = tile_carry;
      for (int s = 0; s < T::kStages; ++s) {
        barrierInit(&full[s], 1);
        barrierInit(&empty[s], kConsumerThreads);
      }
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
  }
  __syncthreads();
  const int total_tiles = first_tile[p.groups];

  if (warp < 4) {
    // Producer warpgroup: one thread issues every load.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < total_tiles;
           tile += static_cast<int>(gridDim.x)) {
        const int g = groupOfTile(first_tile, p.groups, tile);
        const TilePlace place =
            placeOfTile(tile - first_tile[g], m_tiles[g], p.n_tiles);
        const int row0 = row_begin[g] + place.m * kTileM;
        const int w_row0 = g * p.n + place.n * kTileN;
        for (int kb = 0; kb < p.k_blocks; ++kb) {
          barrierWait(&empty[stage], phase ^ 1);
          uint8_t* const a = stages + stage * T::kStageBytes;
          barrierArriveExpecting(&full[stage], T::kStageBytes);
          loadBox(a, &x_map, kb * kTileK, row0, &full[stage]);
          loadBox(a + T::kABytes, &w_map, kb * kTileK, w_row0, &full[stage]);
          if constexpr (kSiluMul) {
            // The up rows of the same columns, after the gate rows (BN/2
            // rows of 128 bytes: a multiple of the swizzle's 1024).
            loadBox(a + T::kABytes + kTileN * kTileK * 2, &w_map, kb * kTileK,
                    w_row0 + p.n / 2, &full[stage]);
          }
          if (++stage == T::kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    return;
  }

  // Consumer warpgroups: rows [64 c, 64 c + 64) of each tile.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int consumer = warp / 4 - 1;
  float acc[BN / 2];
  int stage = 0;
  uint32_t phase = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < total_tiles;
       tile += static_cast<int>(gridDim.x)) {
    const int g = groupOfTile(first_tile, p.groups, tile);
    const TilePlace place =
        placeOfTile(tile - first_tile[g], m_tiles[g], p.n_tiles);
    const int row0 = row_begin[g] + place.m * kTileM;
    const int col0 = place.n * kTileN;
    // The multiplies of one stage stay in flight while the next stage's
    // are issued; a stage is released once its multiplies are done.
    int in_flight = -1;
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      barrierWait(&full[stage], phase);
      const uint8_t* const a =
          stages + stage * T::kStageBytes + consumer * 64 * kTileK * 2;
      const uint64_t a_desc = tileDescriptor(a);
      const uint64_t b_desc =
          tileDescriptor(stages + stage * T::kStageBytes + T::kABytes);
      mmaFence();
#pragma unroll
      for (int kk = 0; kk < kTileK / 16; ++kk) {
        mma<BN>(acc, a_desc + 2 * kk, b_desc + 2 * kk,
                (kb > 0 || kk > 0) ? 1u : 0u);
      }
      mmaCommit();
      if (in_flight >= 0) {
        mmaWait<1>();
        barrierArrive(&empty[in_flight]);
      }
      in_flight = stage;
      if (++stage == T::kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    mmaWait<0>();
    pinAccumulators<BN / 2>(acc);
    barrierArrive(&empty[in_flight]);
    // Fragment layout of d: value 4 c + i of a thread is row
    // 16 (warp % 4) + lane / 4 + 8 (i / 2), column 8 c + 2 (lane % 4) + i % 2.
    // With the silu-mul epilogue, fragment column c is gate and c + BN/16
    // the up value of the same output column.
    const int row = row0 + consumer * 64 + (warp % 4) * 16 + lane / 4;
    const int end = row_end[g];
#pragma unroll
    for (int c = 0; c < kTileN / 8; ++c) {
      const int col = col0 + c * 8 + 2 * (lane % 4);
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (kSiluMul) {
          v[i] = siluMul(acc[4 * c + i], acc[4 * (c + BN / 16) + i]);
        } else {
          v[i] = acc[4 * c + i];
        }
      }
      if (col < p.n_out) {
        if (row < end) {
          *reinterpret_cast<__nv_bfloat162*>(
              p.out + static_cast<int64_t>(row) * p.out_stride + col) =
              __floats2bfloat162_rn(v[0], v[1]);
        }
        if (row + 8 < end) {
          *reinterpret_cast<__nv_bfloat162*>(
              p.out + static_cast<int64_t>(row + 8) * p.out_stride + col) =
              __floats2bfloat162_rn(v[2], v[3]);
        }
      }
    }
  }
#else
  // Built for another architecture than sm_90a: fail loudly, never return
  // unwritten rows as a result.
  __trap();
#endif
}

bool encodeMap(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap* map,
               const void* data, int64_t inner, int64_t outer,
               uint32_t box_outer) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner),
                              static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(inner) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kTileK), box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                const_cast<void*>(data), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool hasSiluMul(const GroupedGemmProblem& problem) {
  return problem.epilogue == GroupedGemmEpilogue::kSiluMul;
}

// The output's columns.
int64_t outputColumns(const GroupedGemmProblem& problem) {
  return hasSiluMul(problem) ? problem.n / 2 : problem.n;
}

// Column tiles of a problem for tiles of `width` weight rows.
int64_t columnTiles(const GroupedGemmProblem& problem, int width) {
  const int64_t tile_columns = hasSiluMul(problem) ? width / 2 : width;
  return (outputColumns(problem) + tile_columns - 1) / tile_columns;
}

template <int BN, bool kSiluMul>
cudaError_t launchTiles(const GroupedGemmProblem& problem, int sms,
                        PFN_cuTensorMapEncodeTiled_v12000 encode,
                        cudaStream_t stream) {
  CUtensorMap x_map;
  CUtensorMap w_map;
  // With the silu-mul epilogue a tile's weights are two boxes of BN/2 rows.
  if (!encodeMap(encode, &x_map, problem.x, problem.k, problem.rows, kTileM) ||
      !encodeMap(encode, &w_map, problem.w, problem.k,
                 problem.groups * problem.n, kSiluMul ? BN / 2 : BN)) {
    return cudaErrorInvalidValue;
  }
  Params params;
  params.counts = problem.counts;
  params.out = static_cast<__nv_bfloat16*>(problem.out);
  params.out_stride = problem.out_stride;
  params.rows = static_cast<int>(problem.rows);
  params.n = static_cast<int>(problem.n);
  params.n_out = static_cast<int>(outputColumns(problem));
  params.groups = static_cast<int>(problem.groups);
  params.n_tiles = static_cast<int>(columnTiles(problem, BN));
  params.k_blocks = static_cast<int>((problem.k + kTileK - 1) / kTileK);
  // At most one block per tile there can be: every group's rows in full
  // tiles, plus one partial tile per group.
  const int64_t most_tiles =
      params.n_tiles * ((problem.rows + kTileM - 1) / kTileM + problem.groups);
  const int blocks = static_cast<int>(most_tiles < sms ? most_tiles : sms);
  const cudaError_t attribute = cudaFuncSetAttribute(
      groupedGemmKernel<BN, kSiluMul>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<BN>::kSmemBytes);
  if (attribute != cudaSuccess) {
    return attribute;
  }
  groupedGemmKernel<BN, kSiluMul>
      <<<blocks, kThreads, Tile<BN>::kSmemBytes, stream>>>(x_map, w_map,
                                                           params);
  return cudaGetLastError();
}

template <bool kSiluMul>
cudaError_t launchWidth(int width, const GroupedGemmProblem& problem, int sms,
                        PFN_cuTensorMapEncodeTiled_v12000 encode,
                        cudaStream_t stream) {
  switch (width) {
    case 256:
      return launchTiles<256, kSiluMul>(problem, sms, encode, stream);
    case 224:
      return launchTiles<224, kSiluMul>(problem, sms, encode, stream);
    default:
      return launchTiles<128, kSiluMul>(problem, sms, encode, stream);
  }
}

}  // namespace

const char* groupedGemmUnsupported(const GroupedGemmProblem& problem) {
  auto misaligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 != 0;
  };
  if (problem.k <= 0 || problem.k % 8 != 0) {
    return "k must be a positive multiple of 8";
  }
  if (problem.epilogue != GroupedGemmEpilogue::kNone &&
      problem.epilogue != GroupedGemmEpilogue::kSiluMul) {
    return "the epilogue is not one of GroupedGemmEpilogue's";
  }
  if (problem.n <= 0 || problem.n % (hasSiluMul(problem) ? 16 : 8) != 0) {
    return hasSiluMul(problem)
               ? "n must be a positive multiple of 16 (silu-mul epilogue)"
               : "n must be a positive multiple of 8";
  }
  if (problem.out_stride < outputColumns(problem) ||
      problem.out_stride % 8 != 0) {
    return hasSiluMul(problem) ? "the output's row stride must be >= n / 2 and "
                                 "a multiple of 8"
                               : "the output's row stride must be >= n and a "
                                 "multiple of 8";
  }
  if (problem.groups < 1 || problem.groups > kGroupedGemmMaxGroups) {
    return "the number of groups must be in [1, 256]";
  }
  if (problem.rows < 0 || problem.rows > (int64_t{1} << 31) - 256 ||
      problem.groups * problem.n >= (int64_t{1} << 31)) {
    return "rows must be at most 2^31 - 256 and groups * n below 2^31";
  }
  if (misaligned(problem.x) || misaligned(problem.w) ||
      misaligned(problem.out)) {
    return "x, w and out must be 16-byte aligned";
  }
  if (problem.counts == nullptr) {
    return "counts is null";
  }
  return "";
}

cudaError_t launchGroupedGemm(const GroupedGemmProblem& problem, int sms,
                              PFN_cuTensorMapEncodeTiled_v12000 encode,
                              cudaStream_t stream) {
  if (*groupedGemmUnsupported(problem) != '\0' || sms < 1 ||
      encode == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (problem.rows == 0) {
    return cudaSuccess;
  }
  // The tile width with the least work on the busiest SM: waves of tiles
  // (rows estimated as full tiles) times the tile's width; ties go to the
  // wider tile (fewer reloads of x).
  const int64_t m_tiles = (problem.rows + kTileM - 1) / kTileM;
  int best = 0;
  int64_t best_cost = 0;
  for (const int width : {256, 224, 128}) {
    const int64_t tiles = columnTiles(problem, width) * m_tiles;
    const int64_t cost = (tiles + sms - 1) / sms * width;
    if (best == 0 || cost < best_cost) {
      best = width;
      best_cost = cost;
    }
  }
  return hasSiluMul(problem)
             ? launchWidth<true>(best, problem, sms, encode, stream)
             : launchWidth<false>(best, problem, sms, encode, stream);
}

}  // namespace hostfuse::kernels
