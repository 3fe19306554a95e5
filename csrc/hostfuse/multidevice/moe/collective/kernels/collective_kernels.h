// The collective backend's device steps on CUDA tensors, as kernels: the
// work around its all-to-alls (input checks, row counts, the rank-table row,
// the metadata of sent and received rows, the combine's sum in pick order)
// that would otherwise take a hundred small ATen operations per call, each
// with its own launch. CPU tensors take the ATen path of
// dispatch_combine.cpp, which computes the same values; tests compare the
// two.
//
// Plain C++ and CUDA runtime types only: no torch here (the layering of
// docs/architecture.md). Every pointer is device memory; every launch is
// queued on `stream` and returns the launch's error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hostfuse::moe::collective {

// The words at the start of every rank-table row: the status words; E, H,
// dtype, weights dtype, T, K (moe::kHeaderWords in input_checks.h); the op
// and the call number (dispatch_combine.cpp).
constexpr int kTableHeaderWords = 13;

// Words of a rank-table row for R ranks: the header, five per-rank vectors
// (combine: rows to, rows from, largest token, largest pick, held
// fingerprint from each rank), then the layout's id [R + 1]
// (multidevice/moe/layout_id.h). Both ops' rows have this width.
constexpr int64_t kTableVectors = 5;
constexpr int64_t tableWidth(int64_t world_size) {
  return kTableHeaderWords + kTableVectors * world_size + world_size + 1;
}

enum class RowType : int32_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// The largest world size the check kernels take (their per-rank counters
// live in shared memory, 24 bytes per rank in the combine's).
constexpr int64_t kMaxWorldSize = 2048;

// Dispatch step 1: checks topk_idx (ids in [-1, E), no expert twice in a
// token; the first bad (token, pick) in row-major order) and counts the
// rows for each rank. Writes the dispatch table row [header, rows to rank
// 0 .. R-1, zeros] into each of the R rows of `table_row` ([R,
// tableWidth(R)], as wide as combine's: what this rank sends to every
// rank), and the
// sort key of each (token, pick): its expert, E for a masked pick.
struct DispatchCheckArgs {
  bool valid = false;              // the host checks passed
  const void* topk_idx = nullptr;  // [T, K] when valid
  bool idx_is_int64 = true;
  int64_t tokens = 0;
  int64_t picks = 0;
  int64_t num_experts = 0;
  int64_t local_experts = 1;
  int64_t world_size = 1;
  int64_t header[kTableHeaderWords] = {};  // host status and words
  int64_t* table_row = nullptr;
  int64_t* sort_key = nullptr;  // [T * K]
};
cudaError_t launchDispatchCheck(const DispatchCheckArgs& args,
                                cudaStream_t stream);

// Dispatch step 3: the metadata of the sent rows, [N, 4] i64 (token, pick,
// expert, the weight's bits or 0), for the pairs `order` [N] names (flat
// indices t * K + k); adds each row's layoutRowHash to the fingerprint of
// its destination rank, fingerprints[expert / L].
struct DispatchMetaArgs {
  const int64_t* order = nullptr;
  int64_t count = 0;
  const void* topk_idx = nullptr;
  bool idx_is_int64 = true;
  int64_t picks = 0;
  const void* topk_weights = nullptr;  // [T, K] or nullptr
  int weight_bytes = 0;                // 2, 4 or 8
  int64_t local_experts = 1;
  int64_t* meta = nullptr;
  int64_t* fingerprints = nullptr;  // [R], summed into
};
cudaError_t launchDispatchMeta(const DispatchMetaArgs& args,
                               cudaStream_t stream);

// Dispatch step 4: the layout of the received rows. Row i of the outputs
// is received row perm[i] (i without perm); its source rank is found from
// the per-source counts `from_rank` (element r at from_rank[r * stride]).
// expert_counts must be zero on entry.
struct DispatchLayoutArgs {
  const int64_t* meta = nullptr;  // [N, 4] as received
  const int64_t* perm = nullptr;  // [N] or nullptr
  int64_t count = 0;
  const int64_t* from_rank = nullptr;
  int64_t from_rank_stride = 1;
  int64_t world_size = 1;
  int64_t first_expert = 0;  // this rank's first expert, rank * L
  int64_t local_experts = 1;
  int weight_bytes = 0;  // 0 without weights
  int64_t* src_rank = nullptr;
  int64_t* src_token = nullptr;
  int64_t* src_k = nullptr;
  void* weights = nullptr;
  int64_t* expert_counts = nullptr;  // [L]
};
cudaError_t launchDispatchLayout(const DispatchLayoutArgs& args,
                                 cudaStream_t stream);

// Combine step 1: checks the layout's values against each other and the
// `rows` of expert_out (sums of the counts, source ranks in range and as
// many per rank as n_tokens_from_rank says, no negative token or pick, no
// (rank, token, pick) twice: `first_repeated_row` from
// launchFirstRepeatedRow; each expert's rows in (rank, token) order,
// moe::firstUnorderedRow), sums the fingerprint of the rows held from each
// rank, and writes the combine table row [header, rows to each rank, rows
// from each rank, largest token, largest pick, fingerprint from each rank,
// the layout's id] into each of the R rows of `table_row` ([R,
// tableWidth(R)]).
struct CombineCheckArgs {
  // When not valid (the host checks failed), the layout is not read.
  bool valid = false;
  const int64_t* src_rank = nullptr;
  const int64_t* src_token = nullptr;
  const int64_t* src_k = nullptr;
  const int64_t* expert_counts = nullptr;
  const int64_t* to_rank = nullptr;
  const int64_t* from_rank = nullptr;
  const int64_t* first_repeated_row = nullptr;  // 0-dim, -1 for none
  const int64_t* row_expert = nullptr;          // [rows] moe::rowLocalExperts
  const int64_t* layout_id = nullptr;           // [R + 1]
  int64_t* fingerprints = nullptr;              // [R] zeros, summed into
  int64_t rows = 0;
  int64_t first_expert = 0;  // this rank's first expert, rank * L
  int64_t local_experts = 1;
  int64_t world_size = 1;
  int64_t header[kTableHeaderWords] = {};
  int64_t* table_row = nullptr;
};
cudaError_t launchCombineCheck(const CombineCheckArgs& args,
                               cudaStream_t stream);

// Combine step 3 on R > 1 ranks: `order` [rows] lists the layout's rows
// grouped by source rank (rank 0's first), each rank's in layout order: the
// permutation of a stable sort by src_rank, without a sort. The layout has
// passed launchCombineCheck (through the table), so each expert's rows are
// in (rank, token) order and a rank's rows are one run per expert: `runs`
// [2, L, R] scratch gets each run's first row (binary search) and where it
// goes. `from_rank` [R] the rows held from each rank (n_tokens_from_rank),
// `row_expert` [rows] moe::rowLocalExperts.
struct SourceOrderArgs {
  const int64_t* src_rank = nullptr;
  const int64_t* expert_counts = nullptr;  // [L]
  const int64_t* from_rank = nullptr;
  const int64_t* row_expert = nullptr;
  int64_t rows = 0;
  int64_t local_experts = 1;
  int64_t world_size = 1;
  int64_t* runs = nullptr;
  int64_t* order = nullptr;
};
cudaError_t launchSourceOrder(const SourceOrderArgs& args, cudaStream_t stream);

// Combine step 1, before launchCombineCheck: the first row of the layout
// that names the (src_rank, src_token, src_k) of an earlier row, as
// moe::firstRepeatedRow finds it with three sorts, here with one pass of
// the whole grid over an open-addressing table. `seen` [slots + 1] i64,
// every word -1 at launch, slots = repeatSlots(rows); its last word becomes
// that row, or stays -1 when no row repeats.
cudaError_t launchFirstRepeatedRow(const int64_t* src_rank,
                                   const int64_t* src_token,
                                   const int64_t* src_k, int64_t rows,
                                   int64_t* seen, cudaStream_t stream);

// The table slots of launchFirstRepeatedRow for `rows` rows: the power of
// two >= 2 x rows (at least 2), so that a probe ends within a few slots.
int64_t repeatSlots(int64_t rows);

// Combine step 4: out[t] = the sum, over the returned rows of token t in
// ascending pick order, of w[t, k] * row, in fp32 (fp64 for fp64 rows),
// every product and every sum rounded on its own (no fused multiply-add),
// then rounded once to the rows' type; w = 1 without weights. The cuda
// backend's order, so both backends give the same bits. The weights are in
// the accumulation type already. Tokens are in [0, tokens) and, with
// weights, picks in [0, picks) (checked from the combine table). Token t's
// rows are found one of two ways:
//   - `slots` [tokens, picks] (always with topk_weights): the row of
//     (t, k), -1 where none came back, -2 where two rows name (t, k)
//     (token t's output is then NaN); launchCombineSlots fills it. No
//     sort, and the scratch is the size of topk_weights; row (t, k) is
//     weighted by topk_weights[t, k];
//   - else `order` lists the rows by (token, pick) and token t's rows are
//     order[token_start[t] .. token_start[t + 1]): a dense list, so that no
//     scratch is sized by a pick a peer names (without weights, picks are
//     any non-negative number). Row i is weighted by row_weights[i]
//     (reduce=per_rank's partials on the experts' rank), or not at all.
struct CombineSumArgs {
  const void* rows = nullptr;  // [N, H] returned rows
  int64_t count = 0;
  int64_t hidden = 0;
  RowType type = RowType::kFloat32;
  const void* topk_weights = nullptr;  // [T, K] fp32 (fp64 rows: fp64)
  int64_t picks = 0;                   // K of topk_weights
  const void* row_weights = nullptr;   // [N], same type, or null
  int64_t tokens = 0;
  const int64_t* slots = nullptr;        // [T, picks], or null: order is used
  const int64_t* order = nullptr;        // [N]
  const int64_t* token_start = nullptr;  // [T + 1]
  void* out = nullptr;                   // [T, H]
};
cudaError_t launchCombineSum(const CombineSumArgs& args, cudaStream_t stream);

// CombineSumArgs::slots from the returned rows' tokens and picks (row i's
// at token[i * token_stride] and pick[i * pick_stride]): slots[t * picks +
// k] = the row naming (t, k). `slots` [tokens, picks] is all -1 at launch;
// a (t, k) that two rows name is set to -2.
cudaError_t launchCombineSlots(const int64_t* token, int64_t token_stride,
                               const int64_t* pick, int64_t pick_stride,
                               int64_t count, int64_t picks, int64_t* slots,
                               cudaStream_t stream);

}  // namespace hostfuse::moe::collective
