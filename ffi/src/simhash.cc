// simhash_codes: the blocked, multi-threaded kernels (scalar / AVX2 / AVX-512, dispatched on
// simd_level()), today's single-thread kernels kept as the legacy path, and the batched shape
// plan of the FFI handler. See simhash.h.
#include "simhash.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "shape_text.h"
#include "simd.h"
#include "thread_pool.h"

// AVX-512 tile shape (rows x 16-float vectors); overridable at build time for tuning.
#ifndef PIGJAX_SIMHASH_MR
#define PIGJAX_SIMHASH_MR 8
#endif
#ifndef PIGJAX_SIMHASH_NRV
#define PIGJAX_SIMHASH_NRV 3
#endif

#if PIGJAX_X86
#include <immintrin.h>
#endif

namespace pigjax {

// ===================================================================================== legacy
// The single-thread kernels as of commit 4ac4b4a (one row block of 4 at a time, proj read in
// place, scalar bit packing). Kept for benchmarks (scripts/bench_simhash.py) and as a
// bit-for-bit check of the blocked kernels.
namespace legacy {
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

void codes_at(SimdLevel level, const float* x, int64_t n, int64_t d, const float* proj, int K,
              int64_t L, int32_t* codes) {
  if (n <= 0 || L <= 0) return;
#if PIGJAX_X86
  if (level == SimdLevel::kAvx512) return simhash_avx512(x, n, d, proj, K, L, codes);
  if (level == SimdLevel::kAvx2) return simhash_avx2(x, n, d, proj, K, L, codes);
#else
  (void)level;
#endif
  simhash_scalar(x, n, d, proj, K, L, codes);
}

}  // namespace legacy

void simhash_codes_legacy_at(SimdLevel level, const float* x, int64_t n, int64_t d,
                             const float* proj, int K, int64_t L, int32_t* codes) {
  legacy::codes_at(level, x, n, d, proj, K, L, codes);
}

// ==================================================================================== blocked
// A blocked matrix product x [n, d] @ proj [d, M] (M = K*L) that keeps no float results: a
// tile of MR rows x NR columns accumulates in registers over the whole of d (index order,
// starting from 0, FMA on the SIMD levels: the same operations, in the same order, as the
// legacy kernels, so the codes are bit-identical to them at each level), then is compared
// with 0 into one bit per dot product (8 or more bits per byte store; no [n, M] float array).
// proj is read in place as column panels of NR columns; the last rows of a chunk use a tile
// with fewer rows. Rows are split over the engine's thread pool in chunks; every row's result
// is independent of the chunking and the thread count.
namespace {

// Codes of one row from its dot-product sign bits (bit c = dots[c] > 0, LSB first per byte).
// `bits` must have 8 readable bytes from the byte holding bit K*(L-1).
inline void codes_from_bits(const uint8_t* bits, int K, int64_t L, int32_t* codes) {
  const uint64_t mask = (uint64_t{1} << K) - 1u;  // K <= 16
  for (int64_t l = 0; l < L; ++l) {
    const int64_t pos = l * K;
    const uint8_t* b = bits + (pos >> 3);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t w;
    std::memcpy(&w, b, sizeof(w));
#else
    const uint64_t w = uint64_t(b[0]) | (uint64_t(b[1]) << 8) | (uint64_t(b[2]) << 16);
#endif
    codes[l] = static_cast<int32_t>((w >> (pos & 7)) & mask);
  }
}

// One tile: rows x[0..MR) (row stride d) times one panel (row i of the panel at p + i * ps).
// Writes NR bits per row at bits + r * bstride (NR is a multiple of 8). kMasked: only the
// first w columns of the panel exist (the rest read as 0, never loaded).
using TileFn = void (*)(const float* x, int64_t d, const float* p, int64_t ps, int w,
                        uint8_t* bits, int64_t bstride);

constexpr int kMaxTileRows = 12, kMaxTileVectors = 4;

// Tiles of each row count 1..mr: full[r] reads a whole panel (nr = nrv vectors of `lanes`
// columns); tail[r][v] the last panel, w < nr columns, with v = ceil(w / lanes) vectors (the
// columns past w are never loaded and give 0 bits).
struct Kernel {
  int mr = 1;
  int nrv = 1;
  int lanes = 8;
  int nr = 8;
  TileFn full[kMaxTileRows + 1] = {};
  TileFn tail[kMaxTileRows + 1][kMaxTileVectors + 1] = {};
  void (*extract)(const uint8_t* bits, int K, int64_t L, int32_t* codes) = codes_from_bits;
};

template <int R, int... V, typename Make>
void fill_tails(std::integer_sequence<int, V...>, Make make, Kernel* k) {
  ((k->tail[R][V + 1] = make.template get<R, V + 1, true>()), ...);
}

template <int NRV, int... R, typename Make>
void fill_tiles(std::integer_sequence<int, R...>, Make make, Kernel* k) {
  ((k->full[R + 1] = make.template get<R + 1, NRV, false>()), ...);
  (fill_tails<R + 1>(std::make_integer_sequence<int, NRV>(), make, k), ...);
}

// ---- scalar: separate multiply and add (as the legacy scalar kernel), 4 x 16 tiles.
template <int MR, int NR, bool kMasked>
void tile_scalar(const float* x, int64_t d, const float* p, int64_t ps, int w, uint8_t* bits,
                 int64_t bstride) {
  float acc[MR][NR] = {};
  float pv[NR];
  const int cols = kMasked ? w : NR;
  for (int64_t i = 0; i < d; ++i) {
    const float* pi = p + i * ps;
    for (int j = 0; j < NR; ++j) pv[j] = j < cols ? pi[j] : 0.0f;
    for (int r = 0; r < MR; ++r) {
      const float xv = x[r * d + i];
      for (int j = 0; j < NR; ++j) acc[r][j] += xv * pv[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NR / 8; ++b) {
      uint32_t byte = 0;
      for (int j = 0; j < 8; ++j) byte |= static_cast<uint32_t>(acc[r][b * 8 + j] > 0.0f) << j;
      bits[r * bstride + b] = static_cast<uint8_t>(byte);
    }
}

#if PIGJAX_X86

// ---- AVX2 + FMA: 8 floats per vector; MR x NRV vectors of accumulators (6 x 2 = 12 of 16
// registers, as in BLIS's Haswell kernel).
template <int MR, int NRV, bool kMasked>
PIGJAX_TARGET_AVX2 void tile_avx2(const float* x, int64_t d, const float* p, int64_t ps, int w,
                                  uint8_t* bits, int64_t bstride) {
  alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};
  __m256i m[NRV];
  if (kMasked)
    for (int v = 0; v < NRV; ++v) {
      const int c = std::max(0, std::min(8, w - 8 * v));
      m[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - c));
    }
  __m256 acc[MR][NRV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    const float* pi = p + i * ps;
    __m256 pv[NRV];
    for (int v = 0; v < NRV; ++v)
      pv[v] = kMasked ? _mm256_maskload_ps(pi + 8 * v, m[v]) : _mm256_loadu_ps(pi + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * d + i);
      for (int v = 0; v < NRV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, pv[v], acc[r][v]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v)
      bits[r * bstride + v] =
          static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[r][v], zero, _CMP_GT_OQ)));
}

// ---- AVX-512: 16 floats per vector; MR x NRV vectors of accumulators.
template <int MR, int NRV, bool kMasked>
PIGJAX_TARGET_AVX512 void tile_avx512(const float* x, int64_t d, const float* p, int64_t ps,
                                      int w, uint8_t* bits, int64_t bstride) {
  __mmask16 m[NRV];
  if (kMasked)
    for (int v = 0; v < NRV; ++v) {
      const int c = std::max(0, std::min(16, w - 16 * v));
      m[v] = static_cast<__mmask16>((1u << c) - 1u);
    }
  __m512 acc[MR][NRV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; ++i) {
    const float* pi = p + i * ps;
    __m512 pv[NRV];
    for (int v = 0; v < NRV; ++v)
      pv[v] = kMasked ? _mm512_maskz_loadu_ps(m[v], pi + 16 * v) : _mm512_loadu_ps(pi + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * d + i]);
      for (int v = 0; v < NRV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, pv[v], acc[r][v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v) {
      const uint16_t mk = static_cast<uint16_t>(_mm512_cmp_ps_mask(acc[r][v], zero, _CMP_GT_OQ));
      std::memcpy(bits + r * bstride + 2 * v, &mk, 2);
    }
}

// Codes of one row, 16 at a time: for tables l0..l0+15 (l0 a multiple of 16, so bit l0*K is
// at byte 2*K*(l0/16)), 32-bit lane j gathers (vpermw) the two 16-bit words holding bits
// j*K .. j*K+K-1 of the 64 bytes loaded there, shifts and masks. Reads up to 64 bytes past
// byte M/8 of the row.
PIGJAX_TARGET_AVX512 void codes_from_bits_avx512(const uint8_t* bits, int K, int64_t L,
                                                 int32_t* codes) {
  const __m512i pos = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(K));
  // (maskz forms: GCC 12's unmasked shift intrinsics warn -Wuninitialized, GCC bug 105593)
  const __mmask16 all = 0xFFFF;
  const __m512i word = _mm512_maskz_srli_epi32(all, pos, 4);  // lane j: words word, word + 1
  const __m512i vidx = _mm512_or_si512(
      word, _mm512_maskz_slli_epi32(all, _mm512_add_epi32(word, _mm512_set1_epi32(1)), 16));
  const __m512i vsh = _mm512_and_si512(pos, _mm512_set1_epi32(15));
  const __m512i vmask = _mm512_set1_epi32((1 << K) - 1);
  for (int64_t l0 = 0; l0 < L; l0 += 16) {
    const __m512i v = _mm512_loadu_si512(bits + (l0 / 16) * 2 * K);
    const __m512i c =
        _mm512_and_si512(_mm512_maskz_srlv_epi32(all, _mm512_permutexvar_epi16(vidx, v), vsh), vmask);
    const int64_t left = L - l0;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    _mm512_mask_storeu_epi32(codes + l0, m, c);
  }
}

#endif  // PIGJAX_X86

constexpr int kScalarMR = 4, kScalarNR = 16;
constexpr int kAvx2MR = 6, kAvx2NRV = 2;
constexpr int kAvx512MR = PIGJAX_SIMHASH_MR, kAvx512NRV = PIGJAX_SIMHASH_NRV;

struct MakeScalar {
  template <int R, int V, bool M> TileFn get() const { return tile_scalar<R, V * kScalarNR, M>; }
};
#if PIGJAX_X86
struct MakeAvx2 {
  template <int R, int V, bool M> TileFn get() const { return tile_avx2<R, V, M>; }
};
struct MakeAvx512 {
  template <int R, int V, bool M> TileFn get() const { return tile_avx512<R, V, M>; }
};
#endif

template <int MR, int NRV, typename Make>
Kernel make_kernel(int lanes, Make make) {
  static_assert(MR <= kMaxTileRows && NRV <= kMaxTileVectors, "tile shape");
  Kernel k;
  k.mr = MR;
  k.nrv = NRV;
  k.lanes = lanes;
  k.nr = NRV * lanes;
  fill_tiles<NRV>(std::make_integer_sequence<int, MR>(), make, &k);
  return k;
}

Kernel make_kernel(SimdLevel level) {
#if PIGJAX_X86
  if (level == SimdLevel::kAvx512) {
    Kernel k = make_kernel<kAvx512MR, kAvx512NRV>(16, MakeAvx512());
    k.extract = codes_from_bits_avx512;
    return k;
  }
  if (level == SimdLevel::kAvx2) return make_kernel<kAvx2MR, kAvx2NRV>(8, MakeAvx2());
#else
  (void)level;
#endif
  return make_kernel<kScalarMR, 1>(kScalarNR, MakeScalar());
}

const Kernel& kernel_for(SimdLevel level) {
  static const Kernel kernels[3] = {make_kernel(SimdLevel::kScalar), make_kernel(SimdLevel::kAvx2),
                                    make_kernel(SimdLevel::kAvx512)};
  return kernels[static_cast<int>(level)];
}

// proj [d, M] is read in place as column panels of nr columns: panel q's row i starts at
// proj + i * M + q * nr; the last panel (M - q * nr < nr columns) is read with masked loads.
// (Packing proj panel-major first was measured no faster on this Zen 5, whose L2 holds proj at
// d = 128, M = 1500, and it costs about 20 rows' work per call.)
//
// Codes of rows [0, n) of x (row stride d) into codes (row stride L), on the calling thread.
void run_rows(const Kernel& k, const float* x, int64_t n, int64_t d, const float* proj, int K,
              int64_t L, int32_t* codes) {
  const int64_t M = static_cast<int64_t>(K) * L;
  const int64_t np = (M + k.nr - 1) / k.nr;
  const int64_t bstride = np * k.nr / 8 + 64;  // bytes per row, with slack for k.extract
  std::vector<uint8_t> bits(static_cast<size_t>(k.mr * bstride), 0);
  for (int64_t r0 = 0; r0 < n; r0 += k.mr) {
    const int rows = static_cast<int>(std::min<int64_t>(k.mr, n - r0));
    const float* xb = x + r0 * d;
    for (int64_t q = 0; q < np; ++q) {
      const int64_t w = std::min<int64_t>(k.nr, M - q * k.nr);
      uint8_t* b = bits.data() + q * k.nr / 8;
      if (w == k.nr)
        k.full[rows](xb, d, proj + q * k.nr, M, k.nr, b, bstride);
      else
        k.tail[rows][(w + k.lanes - 1) / k.lanes](xb, d, proj + q * k.nr, M,
                                                  static_cast<int>(w), b, bstride);
    }
    for (int r = 0; r < rows; ++r)
      k.extract(bits.data() + r * bstride, K, L, codes + (r0 + r) * L);
  }
}

// Smallest task, in multiply-adds (about 0.1 ms on one core): smaller calls are not split.
constexpr int64_t kMinTaskFma = int64_t{1} << 22;
// Largest task, in rows: keeps several tasks per thread for balance on a busy machine.
constexpr int64_t kMaxTaskRows = 2048;

void run_plan(SimdLevel level, const SimhashPlan& p, const float* x, const float* proj,
              int32_t* codes) {
  if (p.num_batches == 0 || p.rows == 0 || p.L == 0) return;
  if (p.d == 0) {  // every dot product is 0 (and x / proj may be null)
    std::fill(codes, codes + p.num_batches * p.rows * p.L, 0);
    return;
  }
  const Kernel& k = kernel_for(level);
  const int64_t M = static_cast<int64_t>(p.K) * p.L;

  // Chunks of rows within each batch element.
  const int64_t fma_per_row = std::max<int64_t>(1, p.d * M);
  const int threads = get_num_threads();
  int64_t chunk = (p.rows + 8 * threads - 1) / (8 * threads);
  chunk = std::max(chunk, (kMinTaskFma + fma_per_row - 1) / fma_per_row);
  chunk = std::min(chunk, kMaxTaskRows);
  chunk = std::max<int64_t>(k.mr, (chunk + k.mr - 1) / k.mr * k.mr);
  const int64_t per_batch = (p.rows + chunk - 1) / chunk;
  const size_t nb = p.batch_shape.size();
  const int64_t tasks = p.num_batches * per_batch;
  const auto task = [&](int64_t t) {
    const int64_t b = t / per_batch, c = t % per_batch;
    int64_t xoff = 0, poff = 0, rem = b;
    for (size_t j = nb; j-- > 0;) {  // batch index b -> offsets (last dim fastest)
      const int64_t idx = rem % p.batch_shape[j];
      rem /= p.batch_shape[j];
      xoff += idx * p.x_batch_stride[j];
      poff += idx * p.proj_batch_stride[j];
    }
    const int64_t r0 = c * chunk, rows = std::min(chunk, p.rows - r0);
    run_rows(k, x + xoff + r0 * p.d, rows, p.d, proj + poff, p.K, p.L,
             codes + (b * p.rows + r0) * p.L);
  };
  if (p.num_batches * p.rows * fma_per_row < kMinTaskFma) {  // e.g. many tiny vmap batches
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    parallel_for(tasks, task);
  }
}

}  // namespace

void simhash_codes_at(SimdLevel level, const float* x, int64_t n, int64_t d, const float* proj,
                      int K, int64_t L, int32_t* codes) {
  SimhashPlan p;
  p.d = d;
  p.L = L;
  p.K = K;
  p.rows = n;
  run_plan(level, p, x, proj, codes);
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

void simhash_codes_planned(const SimhashPlan& plan, const float* x, const float* proj,
                           int32_t* codes) {
  run_plan(simd_level(), plan, x, proj, codes);
}
}  // namespace pigjax
