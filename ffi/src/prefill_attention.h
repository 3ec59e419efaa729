// Exact causal attention of a fresh prefill over a dense cache, fused (docs/algorithm.md §4,
// "Prefill attention on the CPU"). Pure C++17: no XLA, no Python.
//
// q [B, T, Hq, d] f32 at positions 0..T-1 of every row; k, v [B, Hkv, S, d] (T = float, or
// uint16_t for bf16), S >= T, slot s holding position s. Query head h reads KV head h / (Hq / Hkv).
//   out[b, t, h] = sum_{s <= t} softmax_s(q.k_s / sqrt(d)) v_s, computed in f32.
// Work is split over (row, KV head, tile of 64 positions) on the engine's thread pool. A task
// keeps its tile's G·64 query rows, their scores against a tile of 64 keys and their
// output in cache (flash-attention style: online softmax over key tiles), so the score matrix is
// never written out, and key tiles above the diagonal are never read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

struct PrefillAttentionShape {
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, S = 0, d = 0;
};

// "" when q [B,T,Hq,d], k and v [B,Hkv,S,d] with S >= T, and out [B,T,Hq,d] fit together (Hq a
// multiple of Hkv), else what is wrong. Fills *shape.
std::string plan_prefill_attention(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                   const std::vector<int64_t>& v, const std::vector<int64_t>& out,
                                   PrefillAttentionShape* shape);

// Runs it. T = float or uint16_t (bf16).
template <typename T>
void prefill_attention(const PrefillAttentionShape& shape, const float* q, const T* k, const T* v, float* out);

}  // namespace pigjax
