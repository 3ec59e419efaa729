// See row_kernels.h. The AVX2 / AVX-512 versions are ordinary functions compiled with the
// target attributes of simd.h; only row_kernels() decides which run.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "bf16.h"

#if PIGJAX_X86
#include <immintrin.h>
// GCC 12's intrinsic headers use `__m512i __Y = __Y;` placeholders that trigger false
// (-W(maybe-)uninitialized) warnings once inlined into our target("avx512f") functions.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pigjax {

namespace {

// dots_*: dot products of one row with G query heads (q rows contiguous, stride d; the query uses
// G = 1, one call per sampling head). vsum_*: one head's probability-weighted sum of value rows.

template <typename T, int G>
void dots_scalar(const T* k, const float* q, int64_t d, float* out) {
  float acc[G] = {};
  for (int64_t i = 0; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) acc[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = acc[j];
}

// acc[:] += sum_k p[k] * rows[k][:] for one query head over nb rows.
template <typename T>
void vsum_scalar(const T* const* rows, const float* p, int nb, int64_t d, float* acc) {
  for (int k = 0; k < nb; ++k)
    for (int64_t i = 0; i < d; ++i) acc[i] += p[k] * ld(rows[k], i);
}

#if PIGJAX_X86

PIGJAX_TARGET_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PIGJAX_TARGET_AVX2 static inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PIGJAX_TARGET_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <typename T, int G>
PIGJAX_TARGET_AVX2 void dots_avx2(const T* k, const float* q, int64_t d, float* out) {
  __m256 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 kv = load8(k + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + j * d + i), acc[j]);
  }
  float tail[G] = {};
  for (; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) tail[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = hsum8(acc[j]) + tail[j];
}

// Up to 8 column vectors of acc stay in registers over the rows (independent FMA chains).
template <typename T>
PIGJAX_TARGET_AVX2 void vsum_avx2(const T* const* rows, const float* p, int nb, int64_t d, float* acc) {
  int64_t i = 0;
  for (; i + 8 <= d; i += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(8, (d - i) / 8));
    __m256 a[8];
    for (int c = 0; c < 8; ++c) a[c] = c < nv ? _mm256_loadu_ps(acc + i + 8 * c) : _mm256_setzero_ps();
    for (int k = 0; k < nb; ++k) {
      const __m256 pk = _mm256_broadcast_ss(p + k);
      const T* v = rows[k] + i;
      if (nv == 8) {
        for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(pk, load8(v + 8 * c), a[c]);
      } else {
        for (int c = 0; c < nv; ++c) a[c] = _mm256_fmadd_ps(pk, load8(v + 8 * c), a[c]);
      }
    }
    for (int c = 0; c < nv; ++c) _mm256_storeu_ps(acc + i + 8 * c, a[c]);
    if (nv < 8) { i += 8 * nv; break; }
  }
  for (; i < d; ++i)
    for (int k = 0; k < nb; ++k) acc[i] += p[k] * ld(rows[k], i);
}

PIGJAX_TARGET_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PIGJAX_TARGET_AVX512 static inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T, int G>
PIGJAX_TARGET_AVX512 void dots_avx512(const T* k, const float* q, int64_t d, float* out) {
  __m512 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 kv = load16(k + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q + j * d + i), acc[j]);
  }
  float tail[G] = {};
  for (; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) tail[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = _mm512_reduce_add_ps(acc[j]) + tail[j];
}

template <typename T>
PIGJAX_TARGET_AVX512 void vsum_avx512(const T* const* rows, const float* p, int nb, int64_t d,
                                      float* acc) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 128) {
    const int nv = static_cast<int>(std::min<int64_t>(8, (d - i) / 16));
    __m512 a[8];
    for (int c = 0; c < 8; ++c) a[c] = c < nv ? _mm512_loadu_ps(acc + i + 16 * c) : _mm512_setzero_ps();
    for (int k = 0; k < nb; ++k) {
      const __m512 pk = _mm512_set1_ps(p[k]);
      const T* v = rows[k] + i;
      if (nv == 8) {
        for (int c = 0; c < 8; ++c) a[c] = _mm512_fmadd_ps(pk, load16(v + 16 * c), a[c]);
      } else {
        for (int c = 0; c < nv; ++c) a[c] = _mm512_fmadd_ps(pk, load16(v + 16 * c), a[c]);
      }
    }
    for (int c = 0; c < nv; ++c) _mm512_storeu_ps(acc + i + 16 * c, a[c]);
    if (nv < 8) { i += 16 * nv; break; }
  }
  for (; i < d; ++i)
    for (int k = 0; k < nb; ++k) acc[i] += p[k] * ld(rows[k], i);
}

// AVX512_BF16 score pass for bf16 keys: vdpbf16ps needs bf16 on both sides, so each query
// row is split once per chunk into hi = bf16(q) and lo = bf16(q - hi) (about 16 mantissa bits
// of q) and dot = dpbf16(k, hi) + dpbf16(k, lo) with fp32 accumulation.
// Prepared layout, per head j: hi[d] then lo[d] (uint16 bf16), i.e. 2 * gc * d uint16.
void prep_q_bf16x2(const float* q, int gc, int64_t d, uint16_t* buf) {
  for (int j = 0; j < gc; ++j) {
    const float* qj = q + j * d;
    uint16_t* hi = buf + 2 * j * d;
    uint16_t* lo = hi + d;
    for (int64_t i = 0; i < d; ++i) {
      const uint16_t h = f32_to_bf16(qj[i]);
      const float r = qj[i] - bf16_to_f32(h);
      hi[i] = h;
      lo[i] = std::isfinite(r) ? f32_to_bf16(r) : uint16_t{0};
    }
  }
}

template <int G>
PIGJAX_TARGET_AVX512BF16 void dots_avx512bf16(const uint16_t* k, const float* qprep, int64_t d,
                                              float* out) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(qprep);
  __m512 acc_hi[G], acc_lo[G];
  for (int j = 0; j < G; ++j) { acc_hi[j] = _mm512_setzero_ps(); acc_lo[j] = _mm512_setzero_ps(); }
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + i);
    for (int j = 0; j < G; ++j) {
      const uint16_t* qj = q + 2 * j * d + i;
      acc_hi[j] = _mm512_dpbf16_ps(acc_hi[j], kv, (__m512bh)_mm512_loadu_si512(qj));
      acc_lo[j] = _mm512_dpbf16_ps(acc_lo[j], kv, (__m512bh)_mm512_loadu_si512(qj + d));
    }
  }
  if (i < d) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (d - i)) - 1);
    const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(m, k + i);
    for (int j = 0; j < G; ++j) {
      const uint16_t* qj = q + 2 * j * d + i;
      acc_hi[j] = _mm512_dpbf16_ps(acc_hi[j], kv, (__m512bh)_mm512_maskz_loadu_epi16(m, qj));
      acc_lo[j] = _mm512_dpbf16_ps(acc_lo[j], kv, (__m512bh)_mm512_maskz_loadu_epi16(m, qj + d));
    }
  }
  for (int j = 0; j < G; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[j], acc_lo[j]));
}

#endif  // PIGJAX_X86

template <typename T>
RowKernels<T> kernels_scalar() { return {dots_scalar<T, 1>, vsum_scalar<T>, nullptr}; }
#if PIGJAX_X86
template <typename T>
RowKernels<T> kernels_avx2() { return {dots_avx2<T, 1>, vsum_avx2<T>, nullptr}; }
template <typename T>
RowKernels<T> kernels_avx512() { return {dots_avx512<T, 1>, vsum_avx512<T>, nullptr}; }
// avx512 kernels with the AVX512_BF16 score pass (bf16 storage only).
RowKernels<uint16_t> kernels_avx512bf16() {
  return {dots_avx512bf16<1>, vsum_avx512<uint16_t>, prep_q_bf16x2};
}
#endif

}  // namespace

template <typename T>
const RowKernels<T>& row_kernels(SimdLevel level) {
  static const RowKernels<T> scalar = kernels_scalar<T>();
#if PIGJAX_X86
  static const RowKernels<T> avx2 = kernels_avx2<T>();
  static const RowKernels<T> avx512 = kernels_avx512<T>();
  if constexpr (std::is_same_v<T, uint16_t>) {
    // bf16 keys: the dpbf16 score pass whenever the avx512 level is in use and the CPU has it.
    static const bool has_bf16 = cpu_features().avx512_bf16;
    static const RowKernels<uint16_t> avx512bf16 = kernels_avx512bf16();
    if (level >= SimdLevel::kAvx512 && has_bf16) return avx512bf16;
  }
  if (level >= SimdLevel::kAvx512) return avx512;
  if (level >= SimdLevel::kAvx2) return avx2;
#else
  (void)level;
#endif
  return scalar;
}


template const RowKernels<float>& row_kernels<float>(SimdLevel level);
template const RowKernels<uint16_t>& row_kernels<uint16_t>(SimdLevel level);

}  // namespace pigjax
