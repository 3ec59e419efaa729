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

// One block of 8 tokens (or the `count` first of a partial one), any ISA the caller compiles for.
#define PIGJAX_SKETCH_BLOCK(POPCOUNT)                                              \
  for (int64_t t = 0; t < count; ++t) {                                            \
    uint32_t dist = 0;                                                             \
    for (int64_t w = 0; w < W; ++w) dist += POPCOUNT(blk[w * kSketchBlock + t] ^ q[w]); \
    est[t] = norms[t] * cos_table[dist];                                           \
  }

void score_scalar(const uint64_t* sketch, int64_t n, int64_t W, const uint64_t* q,
                  const float* norms, const float* cos_table, float* est) {
  for (int64_t b = 0; b < n; b += kSketchBlock, norms += kSketchBlock, est += kSketchBlock) {
    const uint64_t* blk = sketch + b * W;
    const int64_t count = n - b < kSketchBlock ? n - b : kSketchBlock;
    PIGJAX_SKETCH_BLOCK(__builtin_popcountll)
  }
}

#if PIGJAX_X86
__attribute__((target("popcnt")))
void score_popcnt(const uint64_t* sketch, int64_t n, int64_t W, const uint64_t* q,
                  const float* norms, const float* cos_table, float* est) {
  for (int64_t b = 0; b < n; b += kSketchBlock, norms += kSketchBlock, est += kSketchBlock) {
    const uint64_t* blk = sketch + b * W;
    const int64_t count = n - b < kSketchBlock ? n - b : kSketchBlock;
    PIGJAX_SKETCH_BLOCK(__builtin_popcountll)
  }
}

// Eight tokens per step: word w of the block's 8 tokens is one load, XORed with the query's
// word w broadcast; the per-token bit counts accumulate in the 8 lanes.
PIGJAX_TARGET_AVX512VPOPCNT
void score_avx512(const uint64_t* sketch, int64_t n, int64_t W, const uint64_t* q,
                  const float* norms, const float* cos_table, float* est) {
  const int64_t whole = n / kSketchBlock * kSketchBlock;
  for (int64_t b = 0; b < whole; b += kSketchBlock) {
    const uint64_t* blk = sketch + b * W;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t w = 0; w < W; ++w) {
      const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(blk + w * kSketchBlock),
                                         _mm512_set1_epi64(static_cast<long long>(q[w])));
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
    }
    const __m256 cosv = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), 0xFF, acc, cos_table, 4);
    _mm256_storeu_ps(est + b, _mm256_mul_ps(_mm256_loadu_ps(norms + b), cosv));
  }
  if (whole < n) score_popcnt(sketch + whole * W, n - whole, W, q, norms + whole, cos_table, est + whole);
}
#endif

#undef PIGJAX_SKETCH_BLOCK

}  // namespace

SketchScoreFn sketch_score_kernel(SimdLevel level) {
#if PIGJAX_X86
  if (level >= SimdLevel::kAvx512 && cpu_features().avx512_vpopcntdq) return score_avx512;
  if (level >= SimdLevel::kAvx2) return score_popcnt;
#endif
  (void)level;
  return score_scalar;
}

}  // namespace pigjax
