// See decode_attention.h. Dot products and value sums are the LSH query's row kernels
// (row_kernels.h), so both attention paths share one set of SIMD code.
#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "shape_text.h"
#include "simd.h"
#include "thread_pool.h"

namespace pigjax {

namespace {

// Rows per task: enough work to hide a task's overhead, few enough that a batch-1 step at 2k
// slots gives every thread several tasks. A block's keys and values (256 rows of d floats) stay
// in L2 between the score pass and the value pass.
constexpr int64_t kBlockRows = 256;
constexpr int kHeadChunk = 8;  // query heads scored together (the bf16 query preparation's limit)

// One block's partial softmax for the G query heads of a KV head: acc[g][d] = sum exp(s - mx[g]) v,
// sums[g] = sum exp(s - mx[g]).
template <typename T>
void block_part(const RowKernels<T>& kern, const float* qh, int64_t G, int64_t d, const T* k,
                const T* v, int64_t n, float* mx, float* sums, float* acc) {
  thread_local std::vector<float> score;
  thread_local std::vector<const T*> rows;
  thread_local std::vector<uint16_t> qprep;
  score.resize(static_cast<size_t>(kHeadChunk * n));
  rows.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) rows[i] = v + i * d;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  std::fill(acc, acc + G * d, 0.0f);
  for (int64_t g0 = 0; g0 < G; g0 += kHeadChunk) {
    const int gc = static_cast<int>(std::min<int64_t>(kHeadChunk, G - g0));
    const float* qdot = qh + g0 * d;
    if (kern.prep != nullptr) {
      qprep.resize(static_cast<size_t>(2 * gc * d) + 2);
      kern.prep(qh + g0 * d, gc, d, qprep.data());
      qdot = reinterpret_cast<const float*>(qprep.data());
    }
    kern.scores(k, n, qdot, gc, d, score.data());
    for (int j = 0; j < gc; ++j) {
      float* sc = &score[j * n];
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) m = std::max(m, sc[i] *= scale);
      mx[g0 + j] = m;
      sums[g0 + j] = kern.exp_sum(sc, n, m);
      kern.vsum(rows.data(), sc, static_cast<int>(n), d, acc + (g0 + j) * d);
    }
  }
}

}  // namespace

std::string plan_decode_attention(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                  const std::vector<int64_t>& v, const std::vector<int64_t>& lengths,
                                  const std::vector<int64_t>& out, DecodeAttentionShape* shape) {
  if (q.size() != 3) return "q must be [B, Hq, d], got " + shape_text(q);
  if (k.size() != 4) return "k must be [B, Hkv, S, d], got " + shape_text(k);
  if (v != k) return "v must have k's shape " + shape_text(k) + ", got " + shape_text(v);
  if (k[0] != q[0] || k[3] != q[2])
    return "k " + shape_text(k) + " does not match q " + shape_text(q) + " (batch and head size)";
  if (k[1] < 1 || q[1] % k[1] != 0)
    return "query heads (" + std::to_string(q[1]) + ") must be a multiple of KV heads (" +
           std::to_string(k[1]) + ")";
  if (lengths.size() != 1 || lengths[0] != q[0])
    return "lengths must be [B] = [" + std::to_string(q[0]) + "], got " + shape_text(lengths);
  if (out != q) return "out must have q's shape " + shape_text(q) + ", got " + shape_text(out);
  *shape = {q[0], q[1], k[1], k[2], q[2]};
  return "";
}

constexpr int64_t kInlineWork = int64_t{1} << 19;  // multiply-adds of q.k below which no pool is used

template <typename T>
std::string decode_attention(const DecodeAttentionShape& sh, const float* q, const T* k, const T* v,
                             const int32_t* lengths, float* out, float* lse) {
  const int64_t B = sh.B, Hq = sh.Hq, Hkv = sh.Hkv, S = sh.S, d = sh.d, G = Hq / Hkv;
  // Tasks: for each (row, KV head) its blocks up to the row's length; first[i] = first task of
  // (row, KV head) i.
  std::vector<int64_t> first(static_cast<size_t>(B * Hkv + 1), 0);
  int64_t slots = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (lengths[b] < 0 || lengths[b] > S)
      return "lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]) + " is outside [0, " +
             std::to_string(S) + "] (the cache's slots)";
    slots += lengths[b];
    const int64_t blocks = (lengths[b] + kBlockRows - 1) / kBlockRows;
    for (int64_t h = 0; h < Hkv; ++h) first[b * Hkv + h + 1] = first[b * Hkv + h] + blocks;
  }
  const int64_t tasks = first.back();
  // Per task and query head of its group: max, sum, then d accumulators.
  const int64_t part = G * (d + 2);
  std::vector<float> parts(static_cast<size_t>(tasks * part));
  const RowKernels<T>& kern = row_kernels<T>(simd_level());
  const auto block = [&](int64_t t) {
    const int64_t bh = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t b = bh / Hkv, lo = (t - first[bh]) * kBlockRows;
    const int64_t n = std::min<int64_t>(kBlockRows, lengths[b] - lo);
    const int64_t at = (bh * S + lo) * d;
    float* p = &parts[static_cast<size_t>(t * part)];
    block_part(kern, q + (b * Hq + (bh % Hkv) * G) * d, G, d, k + at, v + at, n, p, p + G, p + 2 * G);
  };
  // A small call (MagicPIG's window: ~100 slots) runs on the calling thread: waking the pool
  // between XLA's ops cost more than the work (a decode step's window calls took ~170 us each
  // through the pool, ~25 us of work).
  if (slots * Hq * d <= kInlineWork) {
    for (int64_t t = 0; t < tasks; ++t) block(t);
  } else {
    parallel_for(tasks, block);
  }
  // Merge each (row, query head)'s blocks by log-sum-exp.
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    for (int64_t g = 0; g < G; ++g) {
      float* o = out + (bh * G + g) * d;
      std::fill(o, o + d, 0.0f);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t t = first[bh]; t < first[bh + 1]; ++t) m = std::max(m, parts[t * part + g]);
      double total = 0.0;
      for (int64_t t = first[bh]; t < first[bh + 1]; ++t) {
        const float* p = &parts[static_cast<size_t>(t * part)];
        const float f = std::exp(p[g] - m);
        total += static_cast<double>(f) * p[G + g];
        const float* acc = p + 2 * G + g * d;
        for (int64_t c = 0; c < d; ++c) o[c] += f * acc[c];
      }
      if (total > 0)
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(o[c] / total);
      if (lse != nullptr)
        lse[bh * G + g] = total > 0 ? static_cast<float>(m + std::log(total)) : -std::numeric_limits<float>::infinity();
    }
  }
  return "";
}

template std::string decode_attention<float>(const DecodeAttentionShape&, const float*, const float*,
                                             const float*, const int32_t*, float*, float*);
template std::string decode_attention<uint16_t>(const DecodeAttentionShape&, const float*, const uint16_t*,
                                                const uint16_t*, const int32_t*, float*, float*);

}  // namespace pigjax
