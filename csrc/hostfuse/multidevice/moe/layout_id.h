// The identity a MoE layout carries: which dispatch made it (MoeLayout::id,
// runtime.h). Compiles in host and device code and includes neither torch
// nor the CUDA runtime, like status.h: the collective backend's CPU path,
// its kernels and the cuda backend's kernels share it.
//
// A layout's id is [R + 1] i64:
//   word 0      the dispatch's number: for the collective backend its call
//               number among the communicator's collective MoE calls (the
//               same on every rank); for the cuda backend the epoch of the
//               site's dispatch (1, 2, ...), written by the kernel;
//   words 1..R  the collective backend: the fingerprint of the rows this
//               rank sent to rank r in that dispatch (0 for none); the cuda
//               backend: 0 (its combine routes rows by its own metadata,
//               never by the layout's values).
// A fingerprint is the sum over rows of layoutRowHash(expert, token, pick):
// order-insensitive, so the sender (rows by expert, then token) and the
// receiver (expert-major) compute it alike. Each hash is below 2^31 and a
// rank holds fewer than 2^31 rows, so the sum never overflows an int64.
// Rows swapped inside one expert's segment keep the sum; the combine
// catches those by the segment's order (kStatusLayoutOutOfOrder).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HOSTFUSE_HOST_DEVICE __host__ __device__
#else
#define HOSTFUSE_HOST_DEVICE
#endif

namespace hostfuse::moe {

// Word 0 of a layout id, then one fingerprint per rank.
constexpr int64_t kLayoutIdCallWord = 0;
constexpr int64_t kLayoutIdFirstFingerprint = 1;

namespace detail {

constexpr uint64_t kHashMask = (uint64_t{1} << 31) - 1;

// One xor-shift-multiply round on 31 bits (the multiplier is below 2^27,
// so nothing overflows on the way).
HOSTFUSE_HOST_DEVICE inline uint64_t mixRound(uint64_t h) {
  return ((h ^ (h >> 16)) * 0x45d9f3bu) & kHashMask;
}

// All 64 bits of `value` mixed (splitmix64's finalizer, unsigned: it wraps
// by definition), then cut to 31, so that values which differ anywhere (a
// pick of 2^31 + 1 and one of 0, of 2^62 and of 1) hash apart.
HOSTFUSE_HOST_DEVICE inline uint64_t fold(int64_t value) {
  uint64_t z = static_cast<uint64_t>(value);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return (z ^ (z >> 31)) & kHashMask;
}

}  // namespace detail

// A 31-bit hash of one row: its global expert, source token and pick. Not
// linear in any argument, so swapping tokens (or picks, or source ranks)
// between rows of different experts changes the sum of the hashes.
HOSTFUSE_HOST_DEVICE inline int64_t layoutRowHash(int64_t expert, int64_t token,
                                                  int64_t pick) {
  uint64_t h = detail::mixRound(detail::fold(expert));
  h = detail::mixRound(h ^ detail::fold(token));
  h = detail::mixRound(h ^ detail::fold(pick));
  return static_cast<int64_t>(h);
}

}  // namespace hostfuse::moe
