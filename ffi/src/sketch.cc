// See sketch.h.
#include "sketch.h"

#if PIGJAX_X86
#include <immintrin.h>
#endif

namespace pigjax {

void pack_sketch(const int32_t* codes, int64_t tables, int K, uint64_t* words, int64_t stride) {
  const int64_t W = sketch_words(tables, K);
  for (int64_t w = 0; w < W; ++w) words[w * stride] = 0;
  for (int64_t l = 0; l < tables; ++l) {
    const uint64_t code = static_cast<uint32_t>(codes[l]) & ((uint64_t{1} << K) - 1);
    const int64_t bit = l * K, w = bit / 64, at = bit % 64;
    words[w * stride] |= code << at;
    if (at + K > 64) words[(w + 1) * stride] |= code >> (64 - at);
  }
}

namespace {

// The portable scan, one token and one query at a time. Inlined into each caller, so
// __builtin_popcountll compiles to the caller's ISA (the POPCNT instruction in scan_popcnt).
__attribute__((always_inline)) inline void scan_tokens(const uint64_t* sketch, int64_t begin, int64_t end,
                                                       int64_t W, const uint64_t* q, int64_t G, const float* norms,
                                                       const float* cos_table, const float* bounds, Candidates* out) {
  for (int64_t b = begin; b < end; b += kSketchBlock) {
    const uint64_t* blk = sketch + b * W;
    const int64_t count = end - b < kSketchBlock ? end - b : kSketchBlock;
    for (int64_t g = 0; g < G; ++g) {
      const uint64_t* qg = q + g * W;
      for (int64_t t = 0; t < count; ++t) {
        uint32_t dist = 0;
        for (int64_t w = 0; w < W; ++w) dist += __builtin_popcountll(blk[w * kSketchBlock + t] ^ qg[w]);
        const float e = norms[b + t] * cos_table[dist];
        if (e >= bounds[g]) out[g].add(e, static_cast<int32_t>(b + t));
      }
    }
  }
}

void scan_scalar(const uint64_t* sketch, int64_t begin, int64_t end, int64_t W, const uint64_t* q, int64_t G,
                 const float* norms, const float* cos_table, const float* bounds, Candidates* out) {
  scan_tokens(sketch, begin, end, W, q, G, norms, cos_table, bounds, out);
}

#if PIGJAX_X86
__attribute__((target("popcnt")))
void scan_popcnt(const uint64_t* sketch, int64_t begin, int64_t end, int64_t W, const uint64_t* q, int64_t G,
                 const float* norms, const float* cos_table, const float* bounds, Candidates* out) {
  scan_tokens(sketch, begin, end, W, q, G, norms, cos_table, bounds, out);
}

// Eight tokens per step: word w of a block's 8 tokens is one load, XORed with the query's word w
// broadcast; the per-token bit counts accumulate in the 8 lanes. A block with no estimate at or
// above the bound (most of them) costs one compare.
PIGJAX_TARGET_AVX512VPOPCNT
void scan_avx512(const uint64_t* sketch, int64_t begin, int64_t end, int64_t W, const uint64_t* q, int64_t G,
                 const float* norms, const float* cos_table, const float* bounds, Candidates* out) {
  const int64_t whole = begin + (end - begin) / kSketchBlock * kSketchBlock;
  alignas(32) float est[kSketchBlock];
  for (int64_t b = begin; b < whole; b += kSketchBlock) {
    const uint64_t* blk = sketch + b * W;
    const __m256 nv = _mm256_loadu_ps(norms + b);
    for (int64_t g = 0; g < G; ++g) {
      const uint64_t* qg = q + g * W;
      __m512i acc = _mm512_setzero_si512();
      for (int64_t w = 0; w < W; ++w) {
        const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(blk + w * kSketchBlock),
                                           _mm512_set1_epi64(static_cast<long long>(qg[w])));
        acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
      }
      const __m256 e = _mm256_mul_ps(nv, _mm512_mask_i64gather_ps(_mm256_setzero_ps(), 0xFF, acc, cos_table, 4));
      unsigned mask = _mm256_cmp_ps_mask(e, _mm256_set1_ps(bounds[g]), _CMP_GE_OQ);
      if (mask == 0) continue;
      _mm256_store_ps(est, e);
      for (; mask; mask &= mask - 1) {
        const int t = __builtin_ctz(mask);
        out[g].add(est[t], static_cast<int32_t>(b + t));
      }
    }
  }
  if (whole < end) scan_popcnt(sketch, whole, end, W, q, G, norms, cos_table, bounds, out);
}
#endif


}  // namespace

SketchScanFn sketch_scan_kernel(SimdLevel level) {
#if PIGJAX_X86
  if (level >= SimdLevel::kAvx512 && cpu_features().avx512_vpopcntdq) return scan_avx512;
  if (level >= SimdLevel::kAvx2) return scan_popcnt;
#endif
  (void)level;
  return scan_scalar;
}

}  // namespace pigjax
