// Vector loads of stored rows (f32, or bf16 widened exactly to f32) and the AVX2 horizontal sum,
// shared by the kernel files that use intrinsics (row_kernels.cc, small_matmul.cc). Include it
// from .cc files only: it also silences, for the rest of the file, GCC 12's false
// -W(maybe-)uninitialized warnings from its intrinsic headers (`__m512i __Y = __Y;` placeholders,
// once inlined into our target("avx512f") functions).
#pragma once

#include <cstdint>

#include "simd.h"

#if PIGJAX_X86
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pigjax {

PIGJAX_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PIGJAX_TARGET_AVX2 inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PIGJAX_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

PIGJAX_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PIGJAX_TARGET_AVX512 inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace pigjax
#endif
