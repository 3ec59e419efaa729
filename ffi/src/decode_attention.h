// Exact attention of one decode query per head over a dense KV cache, each batch row read only up
// to its own length (docs/algorithm.md §4, "Decode attention on the CPU"). Pure C++17: no XLA, no Python.
//
// q [B, Hq, d] f32; k, v [B, Hkv, S, d] (T = float, or uint16_t for bf16); lengths [B] int32 in
// [0, S]: row b sees slots 0 .. lengths[b]-1. Query head h reads KV head h / (Hq / Hkv).
//   out[b, h] = sum_s softmax_s(q.k_s / sqrt(d)) v_s, computed in f32; 0 when lengths[b] == 0.
//   lse[b, h] (when lse is not null) = log sum_s exp(q.k_s / sqrt(d)); -inf when lengths[b] == 0:
//   the partial softmax a sampled back-end merges with its other part (docs/algorithm.md §2.6).
// The work is split over (row, KV head, block of kBlockRows slots) on the engine's thread pool,
// each block a partial softmax, merged by log-sum-exp; slots past a row's length are never read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

struct DecodeAttentionShape {
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, d = 0;
};

// "" when the shapes fit together (q [B,Hq,d], k and v [B,Hkv,S,d], lengths [B], out [B,Hq,d],
// Hq a multiple of Hkv), else what is wrong. Fills *shape.
std::string plan_decode_attention(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                  const std::vector<int64_t>& v, const std::vector<int64_t>& lengths,
                                  const std::vector<int64_t>& out, DecodeAttentionShape* shape);

// Runs it; returns "" or a message for an invalid length. T = float or uint16_t (bf16).
template <typename T>
std::string decode_attention(const DecodeAttentionShape& shape, const float* q, const T* k, const T* v,
                             const int32_t* lengths, float* out, float* lse = nullptr);

}  // namespace pigjax
