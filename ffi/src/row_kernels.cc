// See row_kernels.h. The AVX2 / AVX-512 versions are ordinary functions compiled with the
// target attributes of simd.h; only row_kernels() decides which run.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "bf16.h"
#include "simd_vec.h"

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

// Score kernels: one dots_<isa><T, G> per row, G fixed at compile time (a switch on gc).
#define PIGJAX_SCORES(NAME, TARGET, DOTS)                                                        \
  template <typename T, int G>                                                                   \
  TARGET void NAME##_g(const T* k, int64_t n, const float* q, int64_t d, float* out) {           \
    float s[G];                                                                                  \
    for (int64_t i = 0; i < n; ++i) {                                                            \
      DOTS<T, G>(k + i * d, q, d, s);                                                            \
      for (int j = 0; j < G; ++j) out[j * n + i] = s[j];                                         \
    }                                                                                            \
  }                                                                                              \
  template <typename T>                                                                          \
  TARGET void NAME(const T* k, int64_t n, const float* q, int gc, int64_t d, float* out) {       \
    switch (gc) {                                                                                \
      case 1: return NAME##_g<T, 1>(k, n, q, d, out);                                            \
      case 2: return NAME##_g<T, 2>(k, n, q, d, out);                                            \
      case 3: return NAME##_g<T, 3>(k, n, q, d, out);                                            \
      case 4: return NAME##_g<T, 4>(k, n, q, d, out);                                            \
      case 5: return NAME##_g<T, 5>(k, n, q, d, out);                                            \
      case 6: return NAME##_g<T, 6>(k, n, q, d, out);                                            \
      case 7: return NAME##_g<T, 7>(k, n, q, d, out);                                            \
      default: return NAME##_g<T, 8>(k, n, q, d, out);                                           \
    }                                                                                            \
  }

#define PIGJAX_NO_TARGET
PIGJAX_SCORES(scores_scalar, PIGJAX_NO_TARGET, dots_scalar)

float exp_shift_sum_scalar(float* x, int64_t n, float m) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += (x[i] = std::exp(x[i] - m));
  return total;
}

// acc[:] += sum_k p[k] * rows[k][:] for one query head over nb rows.
template <typename T>
void vsum_scalar(const T* const* rows, const float* p, int nb, int64_t d, float* acc) {
  for (int k = 0; k < nb; ++k)
    for (int64_t i = 0; i < d; ++i) acc[i] += p[k] * ld(rows[k], i);
}

#if PIGJAX_X86

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

PIGJAX_SCORES(scores_avx2, PIGJAX_TARGET_AVX2, dots_avx2)

// exp(y) = 2^f * p(r), f = round(y / ln 2), r = y - f ln 2 (ln 2 in two parts), p Cephes' expf
// polynomial; y is clamped to -87.3 so that 2^f stays a normal float.
#define PIGJAX_EXP_POLY(SET1, FMA, ADD, r, z, p)                                                \
  p = FMA(SET1(1.9875691500e-4f), r, SET1(1.3981999507e-3f));                                   \
  p = FMA(p, r, SET1(8.3334519073e-3f));                                                        \
  p = FMA(p, r, SET1(4.1665795894e-2f));                                                        \
  p = FMA(p, r, SET1(1.6666665459e-1f));                                                        \
  p = FMA(p, r, SET1(5.0000001201e-1f));                                                        \
  p = ADD(FMA(p, z, r), SET1(1.0f));

PIGJAX_TARGET_AVX2 static inline __m256 exp_avx2(__m256 y) {
  y = _mm256_max_ps(y, _mm256_set1_ps(-87.3f));
  const __m256 f = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(f, _mm256_set1_ps(0.693359375f), y);
  r = _mm256_fnmadd_ps(f, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 p;
  PIGJAX_EXP_POLY(_mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, r, z, p)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

PIGJAX_TARGET_AVX2 float exp_shift_sum_avx2(float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum8(acc);
  for (; i < n; ++i) total += (x[i] = std::exp(x[i] - m));
  return total;
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

PIGJAX_SCORES(scores_avx512, PIGJAX_TARGET_AVX512, dots_avx512)

PIGJAX_TARGET_AVX512 static inline __m512 exp_avx512(__m512 y) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-87.3f));
  const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(f, _mm512_set1_ps(0.693359375f), y);
  r = _mm512_fnmadd_ps(f, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 p;
  PIGJAX_EXP_POLY(_mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, r, z, p)
  return _mm512_scalef_ps(p, f);
}

PIGJAX_TARGET_AVX512 float exp_shift_sum_avx512(float* x, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(acc);
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

template <typename T, int G>
PIGJAX_TARGET_AVX512BF16 void dots_avx512bf16_t(const T* k, const float* q, int64_t d, float* out) {
  dots_avx512bf16<G>(k, q, d, out);
}
PIGJAX_SCORES(scores_avx512bf16, PIGJAX_TARGET_AVX512BF16, dots_avx512bf16_t)

#endif  // PIGJAX_X86

template <typename T>
RowKernels<T> kernels_scalar() { return {dots_scalar<T, 1>, vsum_scalar<T>, nullptr, scores_scalar<T>, exp_shift_sum_scalar}; }
#if PIGJAX_X86
template <typename T>
RowKernels<T> kernels_avx2() { return {dots_avx2<T, 1>, vsum_avx2<T>, nullptr, scores_avx2<T>, exp_shift_sum_avx2}; }
template <typename T>
RowKernels<T> kernels_avx512() { return {dots_avx512<T, 1>, vsum_avx512<T>, nullptr, scores_avx512<T>, exp_shift_sum_avx512}; }
// avx512 kernels with the AVX512_BF16 score pass (bf16 storage only).
RowKernels<uint16_t> kernels_avx512bf16() {
  return {dots_avx512bf16<1>, vsum_avx512<uint16_t>, prep_q_bf16x2, scores_avx512bf16<uint16_t>,
          exp_shift_sum_avx512};
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
