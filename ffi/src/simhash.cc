// simhash_codes: scalar / AVX2 / AVX-512 kernels (dispatched on simd_level()) and the batched
// shape plan of the FFI handler. See simhash.h.
#include "simhash.h"

#include <algorithm>
#include <string>

#include "shape_text.h"
#include "simd.h"

#if PIGJAX_X86
#include <immintrin.h>
#endif

namespace pigjax {
namespace {

// codes[l] from the K*L dot products of one row.
inline void pack_codes(const float* dots, int K, int64_t L, int32_t* codes) {
  for (int64_t l = 0; l < L; ++l) {
    const float* t = dots + l * K;
    uint32_t code = 0;
    for (int j = 0; j < K; ++j) code |= static_cast<uint32_t>(t[j] > 0.0f) << j;
    codes[l] = static_cast<int32_t>(code);
  }
}

void simhash_scalar(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                    int32_t* codes) {
  const int64_t M = static_cast<int64_t>(K) * L;
  std::vector<float> acc(static_cast<size_t>(M));
  for (int64_t r = 0; r < n; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const float* xr = x + r * d;
    for (int64_t i = 0; i < d; ++i) {
      const float xi = xr[i];
      const float* p = proj + i * M;
      for (int64_t c = 0; c < M; ++c) acc[c] += xi * p[c];
    }
    pack_codes(acc.data(), K, L, codes + r * L);
  }
}

// Shared driver: blocks of kRows rows through `rows_fn`, which writes the
// [rows, M] dot products into `dots`; then packs them.
template <int kRows, typename Fn4, typename Fn3, typename Fn2, typename Fn1>
void simhash_blocked(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                     int32_t* codes, Fn4 f4, Fn3 f3, Fn2 f2, Fn1 f1) {
  static_assert(kRows == 4, "driver is written for 4-row blocks");
  const int64_t M = static_cast<int64_t>(K) * L;
  std::vector<float> dots(static_cast<size_t>(kRows * M));
  int64_t r = 0;
  for (; r + kRows <= n; r += kRows) {
    f4(x + r * d, d, proj, M, dots.data());
    for (int k = 0; k < kRows; ++k) pack_codes(dots.data() + k * M, K, L, codes + (r + k) * L);
  }
  const int64_t rest = n - r;
  if (rest == 3) f3(x + r * d, d, proj, M, dots.data());
  if (rest == 2) f2(x + r * d, d, proj, M, dots.data());
  if (rest == 1) f1(x + r * d, d, proj, M, dots.data());
  for (int64_t k = 0; k < rest; ++k) pack_codes(dots.data() + k * M, K, L, codes + (r + k) * L);
}

#if PIGJAX_X86

// ---- AVX2 + FMA: 8 floats per vector; 16-column blocks x R rows of accumulators.
template <int R>
PIGJAX_TARGET_AVX2 void avx2_rows(const float* x, int64_t d, const float* proj, int64_t M,
                                  float* out) {
  int64_t c = 0;
  for (; c + 16 <= M; c += 16) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
    for (int64_t i = 0; i < d; ++i) {
      const float* p = proj + i * M + c;
      const __m256 p0 = _mm256_loadu_ps(p);
      const __m256 p1 = _mm256_loadu_ps(p + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * d + i);
        a0[r] = _mm256_fmadd_ps(xv, p0, a0[r]);
        a1[r] = _mm256_fmadd_ps(xv, p1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(out + r * M + c, a0[r]);
      _mm256_storeu_ps(out + r * M + c + 8, a1[r]);
    }
  }
  if (c < M) {  // 1..15 columns left: one or two (masked) vectors
    alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
    for (; c < M; c += 8) {
      const int64_t w = std::min<int64_t>(8, M - c);
      const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - w));
      __m256 a[R];
      for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; ++i) {
        const __m256 p = _mm256_maskload_ps(proj + i * M + c, m);
        for (int r = 0; r < R; ++r)
          a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * d + i), p, a[r]);
      }
      for (int r = 0; r < R; ++r) _mm256_maskstore_ps(out + r * M + c, m, a[r]);
    }
  }
}

void simhash_avx2(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                  int32_t* codes) {
  simhash_blocked<4>(x, n, d, proj, K, L, codes, avx2_rows<4>, avx2_rows<3>, avx2_rows<2>,
                     avx2_rows<1>);
}

// ---- AVX-512: 16 floats per vector; 64-column blocks x R rows, masked tail.
template <int R>
PIGJAX_TARGET_AVX512 void avx512_rows(const float* x, int64_t d, const float* proj, int64_t M,
                                      float* out) {
  int64_t c = 0;
  for (; c + 64 <= M; c += 64) {
    __m512 a0[R], a1[R], a2[R], a3[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps();
      a2[r] = _mm512_setzero_ps(); a3[r] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < d; ++i) {
      const float* p = proj + i * M + c;
      const __m512 p0 = _mm512_loadu_ps(p);
      const __m512 p1 = _mm512_loadu_ps(p + 16);
      const __m512 p2 = _mm512_loadu_ps(p + 32);
      const __m512 p3 = _mm512_loadu_ps(p + 48);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * d + i]);
        a0[r] = _mm512_fmadd_ps(xv, p0, a0[r]);
        a1[r] = _mm512_fmadd_ps(xv, p1, a1[r]);
        a2[r] = _mm512_fmadd_ps(xv, p2, a2[r]);
        a3[r] = _mm512_fmadd_ps(xv, p3, a3[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* o = out + r * M + c;
      _mm512_storeu_ps(o, a0[r]);
      _mm512_storeu_ps(o + 16, a1[r]);
      _mm512_storeu_ps(o + 32, a2[r]);
      _mm512_storeu_ps(o + 48, a3[r]);
    }
  }
  for (; c < M; c += 16) {  // 16-column steps, the last one masked
    const int64_t w = std::min<int64_t>(16, M - c);
    const __mmask16 m = static_cast<__mmask16>((1u << w) - 1u);
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; ++i) {
      const __m512 p = _mm512_maskz_loadu_ps(m, proj + i * M + c);
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * d + i]), p, a[r]);
    }
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * M + c, m, a[r]);
  }
}

void simhash_avx512(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                    int32_t* codes) {
  simhash_blocked<4>(x, n, d, proj, K, L, codes, avx512_rows<4>, avx512_rows<3>, avx512_rows<2>,
                     avx512_rows<1>);
}

#endif  // PIGJAX_X86

}  // namespace

void simhash_codes_at(SimdLevel level, const float* x, int64_t n, int64_t d, const float* proj,
                      int K, int64_t L, int32_t* codes) {
  if (n <= 0 || L <= 0) return;
#if PIGJAX_X86
  if (level == SimdLevel::kAvx512) return simhash_avx512(x, n, d, proj, K, L, codes);
  if (level == SimdLevel::kAvx2) return simhash_avx2(x, n, d, proj, K, L, codes);
#else
  (void)level;
#endif
  simhash_scalar(x, n, d, proj, K, L, codes);
}

void simhash_codes(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                   int32_t* codes) {
  simhash_codes_at(simd_level(), x, n, d, proj, K, L, codes);
}

std::string plan_simhash(const std::vector<int64_t>& x_dims, const std::vector<int64_t>& proj_dims,
                         const std::vector<int64_t>& out_dims, int64_t K, SimhashPlan* plan) {
  const size_t prank = proj_dims.size(), xrank = x_dims.size();
  if (prank < 2) {
    return "proj must have shape [d, K*L] (rank 2), got rank " + std::to_string(prank) + " shape " +
           shape_text(proj_dims);
  }
  if (xrank < 1) return "x must have shape [..., d] (rank >= 1), got a scalar";
  const size_t pb = prank - 2;  // proj batch dims (only produced by jax.vmap)
  const int64_t d = proj_dims[pb], M = proj_dims[pb + 1];
  if (x_dims.back() != d) {
    return "x's last dim (" + std::to_string(x_dims.back()) + ") must equal proj's row count d (" +
           std::to_string(d) + "); x " + shape_text(x_dims) + ", proj " + shape_text(proj_dims);
  }
  if (K < 1 || K > kMaxSimhashBits) {
    return "K must be in [1, " + std::to_string(kMaxSimhashBits) + "], got " + std::to_string(K);
  }
  if (M % K != 0) {
    return "proj has " + std::to_string(M) + " columns, which is not a multiple of K=" + std::to_string(K);
  }
  const int64_t L = M / K;
  if (pb > xrank - 1) {
    return "proj " + shape_text(proj_dims) + " has " + std::to_string(pb) + " batch dim(s) but x " +
           shape_text(x_dims) + " has only " + std::to_string(xrank - 1) + " leading dim(s)";
  }
  if (out_dims.size() != xrank || out_dims.back() != L) {
    return "output shape " + shape_text(out_dims) + " does not match x " + shape_text(x_dims) + " with L=" +
           std::to_string(L) + " (expected x's leading dims followed by L)";
  }
  SimhashPlan p;
  p.d = d;
  p.L = L;
  p.K = static_cast<int>(K);
  int64_t xstride = d, pstride = d * M;  // strides of the dim after the current one
  std::vector<int64_t> xs(xrank - 1), ps(pb);
  for (size_t i = xrank - 1; i-- > 0;) { xs[i] = xstride; xstride *= x_dims[i]; }
  for (size_t i = pb; i-- > 0;) { ps[i] = pstride; pstride *= proj_dims[i]; }
  for (size_t i = 0; i < pb; ++i) {
    const int64_t xi = x_dims[i], pi = proj_dims[i], b = out_dims[i];
    const int64_t want = xi == 1 ? pi : xi;
    if ((xi != 1 && pi != 1 && xi != pi) || b != want) {
      return "batch dim " + std::to_string(i) + " does not broadcast: x " + shape_text(x_dims) + ", proj " +
             shape_text(proj_dims) + ", output " + shape_text(out_dims);
    }
    p.batch_shape.push_back(b);
    p.x_batch_stride.push_back(xi == 1 ? 0 : xs[i]);
    p.proj_batch_stride.push_back(pi == 1 ? 0 : ps[i]);
    p.num_batches *= b;
  }
  p.rows = 1;
  for (size_t i = pb; i + 1 < xrank; ++i) {
    if (out_dims[i] != x_dims[i]) {
      return "output shape " + shape_text(out_dims) + " does not match x " + shape_text(x_dims) +
             " with L=" + std::to_string(L) + " (expected x's leading dims followed by L)";
    }
    p.rows *= x_dims[i];
  }
  *plan = std::move(p);
  return std::string();
}

void simhash_codes_planned(const SimhashPlan& p, const float* x, const float* proj,
                           int32_t* codes) {
  if (p.num_batches == 0 || p.rows == 0 || p.L == 0) return;
  const SimdLevel level = simd_level();
  const size_t nb = p.batch_shape.size();
  std::vector<int64_t> idx(nb, 0);
  int64_t xoff = 0, poff = 0;
  for (int64_t b = 0; b < p.num_batches; ++b) {
    simhash_codes_at(level, x + xoff, p.rows, p.d, proj + poff, p.K, p.L,
                     codes + b * p.rows * p.L);
    // Odometer over the batch dims (last dim fastest), keeping offsets in step.
    for (size_t k = nb; k-- > 0;) {
      xoff += p.x_batch_stride[k];
      poff += p.proj_batch_stride[k];
      if (++idx[k] < p.batch_shape[k]) break;
      xoff -= p.x_batch_stride[k] * p.batch_shape[k];
      poff -= p.proj_batch_stride[k] * p.batch_shape[k];
      idx[k] = 0;
    }
  }
}

}  // namespace pigjax
