// The per-token code sketch of a ranked store (docs/algorithm.md §2.9): the codes of the first
// `tables` hash tables of a token packed into W = ceil(tables K / 64) words, and the scan that
// turns sketches into the ranked query's candidates. Pure C++17: no XLA, no Python.
//
// Layout of a (slot, KV head)'s sketches: blocks of 8 tokens, each [W][8] uint64 (word w of
// token t at w * 8 + t), so one 512-bit load holds word w of 8 tokens; a partial last block is
// padded. Bit l K + j of a token's sketch is bit j of its code in table l.
//
// A token's score estimate for a query sketch q: e = norm * cos_table[D], D = the number of bits
// by which the two sketches differ (cos_table[D] = cos(pi D / B), B = tables K: each bit is a
// random hyperplane, so D / B estimates the angle between key and query).
#pragma once

#include <cstdint>
#include <utility>

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

// Where a scan appends the (estimate, token) pairs at or above a bound; past `cap` it only
// sets `overflow` (the caller then scans again with room for every token).
struct Candidates {
  std::pair<float, int32_t>* items = nullptr;
  int64_t cap = 0, count = 0;
  bool overflow = false;
  void add(float e, int32_t i) {
    if (count < cap) items[count++] = {e, i};
    else overflow = true;
  }
};

// For each of G query sketches q[g * W, (g + 1) W) and tokens i in [begin, end) (begin a
// multiple of kSketchBlock): out[g].add(e, i) for every estimate e >= bounds[g], in token order.
// Each block's sketch words are loaded once for all G queries. norms: the tokens' key norms
// (norms[i] for token i). Same candidates at every SIMD level.
using SketchScanFn = void (*)(const uint64_t* sketch, int64_t begin, int64_t end, int64_t W,
                              const uint64_t* q, int64_t G, const float* norms,
                              const float* cos_table, const float* bounds, Candidates* out);
// The kernel for a level: AVX-512 with VPOPCNTDQ where the CPU has it, else the POPCNT
// instruction (every AVX2 CPU has it), scalar code at kScalar.
SketchScanFn sketch_scan_kernel(SimdLevel level);

}  // namespace pigjax
