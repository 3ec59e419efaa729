// The per-token code sketch of a ranked store (docs/algorithm.md §2.9): the codes of the first
// `tables` hash tables of a token packed into W = ceil(tables K / 64) words, and the kernel that
// turns sketches into score estimates for the ranked query. Pure C++17: no XLA, no Python.
//
// Layout of a (slot, KV head)'s sketches: blocks of 8 tokens, each [W][8] uint64 (word w of
// token t at w * 8 + t), so one 512-bit load holds word w of 8 tokens; a partial last block is
// padded. Bit l K + j of a token's sketch is bit j of its code in table l.
#pragma once

#include <cstdint>

#include "simd.h"

namespace pigjax {

constexpr int64_t kSketchBlock = 8;  // tokens per sketch block

inline int64_t sketch_words(int64_t tables, int K) { return (tables * K + 63) / 64; }
// uint64s of the sketches of n tokens (whole blocks).
inline int64_t sketch_size(int64_t n, int64_t words) {
  return (n + kSketchBlock - 1) / kSketchBlock * kSketchBlock * words;
}

// Packs codes[0, tables) (K bits each) into words[0, W) (W = sketch_words), with `stride`
// uint64s between consecutive words (1 for a query, kSketchBlock inside a block).
void pack_sketch(const int32_t* codes, int64_t tables, int K, uint64_t* words, int64_t stride);

// est[i] = norms[i] * cos_table[D_i] for tokens i in [0, n), D_i = the number of bits by which
// token i's sketch (blocked layout above) differs from the query's q[0, W) (the bits summed
// over tables). cos_table has tables K + 1 entries. Same results at every SIMD level.
using SketchScoreFn = void (*)(const uint64_t* sketch, int64_t n, int64_t W, const uint64_t* q,
                               const float* norms, const float* cos_table, float* est);
// The kernel for a level: AVX-512 with VPOPCNTDQ where the CPU has it, else the POPCNT
// instruction (every AVX2 CPU has it), scalar code at kScalar.
SketchScoreFn sketch_score_kernel(SimdLevel level);

}  // namespace pigjax
