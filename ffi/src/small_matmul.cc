// See small_matmul.h. One tile routine per layout, written once over an ISA's vector type (Avx512,
// Avx2 below; the scalar level and the tails are plain loops); small_matmul() picks the ISA from simd_level() and splits W into panels
// (column panels of [K, N], row panels of [N, K]) over the thread pool. Each output element is one
// task's FMA chain over k in order, so results do not depend on the thread count.
#include "small_matmul.h"

#include <algorithm>

#include "bf16.h"
#include "shape_text.h"
#include "simd_vec.h"
#include "thread_pool.h"

namespace pigjax {

namespace {

constexpr int kRows = 4;  // [N, K]: rows of x per register tile (more run in groups over the cached W tile)
// [K, N]: W rows prefetched this far ahead. The panel reads each row's segment at a stride of N,
// which the hardware prefetchers follow poorly: 30 chained 576x1536 + 1536x576 products at batch
// 4 ran at 10-11 GB/s without it and 12-14 GB/s with it (2-core Xeon, 17 GB/s streaming read);
// 16 rows ahead was no better. The panel takes W 8 rows at a time (4 rows: 7.3 vs 9.3-10.9 GB/s
// at batch 8, fewer loads and stores of the output rows per FMA).
constexpr int64_t kAhead = 8;

#if PIGJAX_X86
struct Avx512 {
  using V = __m512;
  static constexpr int kWidth = 16;
  template <typename W>
  PIGJAX_TARGET_AVX512 static inline V load(const W* p) { return load16(p); }
  PIGJAX_TARGET_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  PIGJAX_TARGET_AVX512 static inline V set1(float x) { return _mm512_set1_ps(x); }
  PIGJAX_TARGET_AVX512 static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PIGJAX_TARGET_AVX512 static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  PIGJAX_TARGET_AVX512 static inline float sum(V v) { return _mm512_reduce_add_ps(v); }
  template <typename W>
  static inline void prefetch(const W* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

struct Avx2 {
  using V = __m256;
  static constexpr int kWidth = 8;
  template <typename W>
  PIGJAX_TARGET_AVX2 static inline V load(const W* p) { return load8(p); }
  PIGJAX_TARGET_AVX2 static inline V zero() { return _mm256_setzero_ps(); }
  PIGJAX_TARGET_AVX2 static inline V set1(float x) { return _mm256_set1_ps(x); }
  PIGJAX_TARGET_AVX2 static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  PIGJAX_TARGET_AVX2 static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  PIGJAX_TARGET_AVX2 static inline float sum(V v) { return hsum8(v); }
  template <typename W>
  static inline void prefetch(const W* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};
#endif

// The tile routines, once per ISA: each function carries its ISA's target attribute (simd.h), which
// a template parameter cannot supply, hence the macro.
#define PIGJAX_SMALL_MATMUL(ISA, TARGET)                                                           \
  /* W [K, N]: out[:, c0 .. c1) += x[:, k0 .. k0+KR) . W[k0 .. k0+KR, c0 .. c1), c1 - c0 a */      \
  /* multiple of the width. W's KR rows stream in address order, prefetched kAhead rows ahead; */  \
  /* out's M rows of the panel stay in L1/L2. (Hoisting x's broadcasts into registers, in groups */ \
  /* of 4 rows, was slower at 4-16 rows in a C++ A/B: more passes over the panel.) */              \
  template <typename W, int KR>                                                                    \
  TARGET void kn_rows_##ISA(const float* x, const W* w, int64_t M, int64_t K, int64_t N,           \
                            int64_t k0, int64_t c0, int64_t c1, float* out) {                      \
    constexpr int Wd = ISA::kWidth;                                                                \
    for (int64_t c = c0; c < c1; c += Wd) {                                                        \
      typename ISA::V wv[KR];                                                                      \
      for (int r = 0; r < KR; ++r) wv[r] = ISA::load(w + (k0 + r) * N + c);                        \
      for (int r = 0; r < KR; ++r)                                                                 \
        ISA::prefetch(w + std::min<int64_t>(k0 + r + kAhead, K - 1) * N + c);                      \
      for (int64_t m = 0; m < M; ++m) {                                                            \
        const float* xm = x + m * K + k0;                                                          \
        typename ISA::V acc = ISA::load(out + m * N + c);                                          \
        for (int r = 0; r < KR; ++r) acc = ISA::fma(ISA::set1(xm[r]), wv[r], acc);                 \
        ISA::store(out + m * N + c, acc);                                                          \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  template <typename W>                                                                            \
  TARGET void kn_panel_##ISA(const float* x, const W* w, int64_t M, int64_t K, int64_t N,          \
                             int64_t c0, int64_t c1, float* out) {                                 \
    int64_t k = 0;                                                                                 \
    for (; k + 8 <= K; k += 8) kn_rows_##ISA<W, 8>(x, w, M, K, N, k, c0, c1, out);                 \
    for (; k + 4 <= K; k += 4) kn_rows_##ISA<W, 4>(x, w, M, K, N, k, c0, c1, out);                 \
    for (; k < K; ++k) kn_rows_##ISA<W, 1>(x, w, M, K, N, k, c0, c1, out);                         \
  }                                                                                                \
  /* W [N, K]: out[m, n0 .. n0+4) = x[m] . W[n] for MR rows of x; k in whole vectors, then the */  \
  /* scalar tail. */                                                                               \
  template <typename W, int MR>                                                                    \
  TARGET void nk_tile_##ISA(const float* x, const W* w, int64_t K, int64_t N, int64_t n0,          \
                            float* out) {                                                          \
    constexpr int NR = 4, Wd = ISA::kWidth;                                                        \
    typename ISA::V acc[MR][NR];                                                                   \
    for (int m = 0; m < MR; ++m)                                                                   \
      for (int r = 0; r < NR; ++r) acc[m][r] = ISA::zero();                                        \
    const int64_t kv = K - K % Wd;                                                                 \
    for (int64_t k = 0; k < kv; k += Wd) {                                                         \
      typename ISA::V wv[NR];                                                                      \
      for (int r = 0; r < NR; ++r) wv[r] = ISA::load(w + (n0 + r) * K + k);                        \
      for (int m = 0; m < MR; ++m) {                                                               \
        const typename ISA::V xv = ISA::load(x + m * K + k);                                       \
        for (int r = 0; r < NR; ++r) acc[m][r] = ISA::fma(xv, wv[r], acc[m][r]);                   \
      }                                                                                            \
    }                                                                                              \
    for (int m = 0; m < MR; ++m)                                                                   \
      for (int r = 0; r < NR; ++r) {                                                               \
        float s = ISA::sum(acc[m][r]);                                                             \
        for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * ld(w + (n0 + r) * K, k);              \
        out[m * N + n0 + r] = s;                                                                   \
      }                                                                                            \
  }                                                                                                \
  template <typename W>                                                                            \
  TARGET void nk_rows_##ISA(const float* x, const W* w, int64_t M, int64_t K, int64_t N,           \
                            int64_t n0, float* out) {                                              \
    for (int64_t m = 0; m < M; m += kRows) {                                                       \
      const float* xm = x + m * K;                                                                 \
      float* om = out + m * N;                                                                     \
      switch (std::min<int64_t>(kRows, M - m)) {                                                   \
        case 1: nk_tile_##ISA<W, 1>(xm, w, K, N, n0, om); break;                                   \
        case 2: nk_tile_##ISA<W, 2>(xm, w, K, N, n0, om); break;                                   \
        case 3: nk_tile_##ISA<W, 3>(xm, w, K, N, n0, om); break;                                   \
        default: nk_tile_##ISA<W, 4>(xm, w, K, N, n0, om); break;                                  \
      }                                                                                            \
    }                                                                                              \
  }

#if PIGJAX_X86
PIGJAX_SMALL_MATMUL(Avx512, PIGJAX_TARGET_AVX512)
PIGJAX_SMALL_MATMUL(Avx2, PIGJAX_TARGET_AVX2)
#endif

// Scalar: columns [c0, c1) of out (W [K, N]) or its rows' dot products (W [N, K]), any count.
template <typename W>
void kn_scalar(const float* x, const W* w, int64_t M, int64_t K, int64_t N, int64_t c0, int64_t c1,
               float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = c0; c < c1; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * ld(w + k * N, c);
      out[m * N + c] = s;
    }
}

template <typename W>
void nk_scalar(const float* x, const W* w, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
               float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * ld(w + n * K, k);
      out[m * N + n] = s;
    }
}

int vector_width(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return 16;
    case SimdLevel::kAvx2: return 8;
    default: return 0;
  }
}

// Output columns [c0, c1): the vector part by the ISA's routine, the rest (a tail, or everything
// at the scalar level) by the scalar loops.
template <typename W>
void panel(SimdLevel level, const SmallMatmulShape& sh, const float* x, const W* w, int64_t c0,
           int64_t c1, float* out) {
  const int wd = vector_width(level);
  int64_t c = c0;
#if PIGJAX_X86
  if (wd > 0 && sh.w_nk) {
    for (; c + 4 <= c1; c += 4) {
      if (level == SimdLevel::kAvx512) nk_rows_Avx512(x, w, sh.M, sh.K, sh.N, c, out);
      else nk_rows_Avx2(x, w, sh.M, sh.K, sh.N, c, out);
    }
  } else if (wd > 0) {
    c = c0 + (c1 - c0) / wd * wd;
    for (int64_t m = 0; m < sh.M; ++m) std::fill(out + m * sh.N + c0, out + m * sh.N + c, 0.0f);
    if (level == SimdLevel::kAvx512) kn_panel_Avx512(x, w, sh.M, sh.K, sh.N, c0, c, out);
    else kn_panel_Avx2(x, w, sh.M, sh.K, sh.N, c0, c, out);
  }
#endif
  if (c < c1) {
    if (sh.w_nk) nk_scalar(x, w, sh.M, sh.K, sh.N, c, c1, out);
    else kn_scalar(x, w, sh.M, sh.K, sh.N, c, c1, out);
  }
}

// Columns per panel: about two panels per thread, a multiple of 64 (whole vectors, whole [N, K]
// tiles), and for [K, N] at most 32 KB of output rows per panel (they are re-read for every k).
int64_t panel_columns(const SmallMatmulShape& sh, int threads) {
  constexpr int64_t kAlign = 64;
  int64_t per = (sh.N + 2 * threads - 1) / (2 * threads);
  if (!sh.w_nk) per = std::min<int64_t>(per, (32 << 10) / (4 * std::max<int64_t>(sh.M, 1)));
  return std::max<int64_t>(kAlign, (per + kAlign - 1) / kAlign * kAlign);
}

}  // namespace

std::string plan_small_matmul(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                              const std::vector<int64_t>& out, bool w_nk, SmallMatmulShape* shape) {
  if (x.size() != 2) return "x must be [M, K], got " + shape_text(x);
  if (w.size() != 2) return std::string("w must be ") + (w_nk ? "[N, K]" : "[K, N]") + ", got " + shape_text(w);
  const int64_t K = w_nk ? w[1] : w[0], N = w_nk ? w[0] : w[1];
  if (x[1] != K)
    return "x " + shape_text(x) + " and w " + shape_text(w) + " disagree on K (" + std::to_string(x[1]) +
           " vs " + std::to_string(K) + (w_nk ? ", w is [N, K])" : ", w is [K, N])");
  const std::vector<int64_t> want = {x[0], N};
  if (out != want) return "out must be " + shape_text(want) + ", got " + shape_text(out);
  *shape = {x[0], K, N, w_nk};
  return "";
}

template <typename W>
void small_matmul(const SmallMatmulShape& sh, const float* x, const W* w, float* out) {
  if (sh.M == 0 || sh.N == 0) return;
  const SimdLevel level = simd_level();
  const int64_t per = panel_columns(sh, get_num_threads());
  parallel_for((sh.N + per - 1) / per, [&](int64_t p) {
    panel(level, sh, x, w, p * per, std::min(sh.N, (p + 1) * per), out);
  });
}

template void small_matmul<float>(const SmallMatmulShape&, const float*, const float*, float*);
template void small_matmul<uint16_t>(const SmallMatmulShape&, const float*, const uint16_t*, float*);

}  // namespace pigjax
