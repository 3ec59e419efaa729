// See prefill_attention.h. The tile products are small register-blocked kernels per ISA level
// (scalar, AVX2+FMA, AVX-512); the softmax's exponentials are the row kernels' exp_sum
// (row_kernels.h), so decode and prefill attention share one exp.
#include "prefill_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "bf16.h"
#include "row_kernels.h"
#include "shape_text.h"
#include "simd.h"
#include "simd_vec.h"
#include "thread_pool.h"

namespace pigjax {

namespace {

constexpr int64_t kQueryTile = 64;  // positions per task (times G query heads: the tile's rows)
constexpr int64_t kKeyTile = 64;    // keys per online-softmax step (a multiple of 16)

// s[r][j] = sum_c qs[r][c] kt[c][j] for r < R and j < kKeyTile (kt is the key tile transposed,
// [d][kKeyTile], so each step is a broadcast of one query element against whole key vectors).
using ScoreTileFn = void (*)(const float* qs, int64_t R, int64_t d, const float* kt, float* s);
// o[r][c] += sum_{j < nk} p[r][j] v[j][c] for r < R, c < d (p at stride kKeyTile, v rows at stride d).
template <typename T>
using ValueTileFn = void (*)(const float* p, int64_t R, int64_t nk, const T* v, int64_t d, float* o);

void score_tile_scalar(const float* qs, int64_t R, int64_t d, const float* kt, float* s) {
  for (int64_t r = 0; r < R; ++r) {
    float acc[kKeyTile] = {};
    for (int64_t c = 0; c < d; ++c) {
      const float x = qs[r * d + c];
      for (int64_t j = 0; j < kKeyTile; ++j) acc[j] += x * kt[c * kKeyTile + j];
    }
    std::copy(acc, acc + kKeyTile, s + r * kKeyTile);
  }
}

template <typename T>
void value_tile_scalar(const float* p, int64_t R, int64_t nk, const T* v, int64_t d, float* o) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < nk; ++j) {
      const float w = p[r * kKeyTile + j];
      const T* row = v + j * d;
      for (int64_t c = 0; c < d; ++c) o[r * d + c] += w * ld(row, c);
    }
}

using ExpSumFn = float (*)(float*, int64_t, float);

// One row's online-softmax step over its tile scores sr[kKeyTile], of which the first `visible`
// count: the running max *m and sum *l updated, sr turned into the weights exp(s - max) (0 past
// `visible`), and the row's output o[d] rescaled when the max rose.
using RowStepFn = void (*)(float* sr, int64_t visible, float* m, float* l, float* o, int64_t d, ExpSumFn exp_sum);

void row_step_scalar(float* sr, int64_t visible, float* m, float* l, float* o, int64_t d, ExpSumFn exp_sum) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, sr[j]);
  const float m_new = std::max(*m, mx);
  const float alpha = m_new == *m ? 1.0f : std::exp(*m - m_new);  // 0 while the row has no key yet
  *l = *l * alpha + exp_sum(sr, visible, m_new);
  std::fill(sr + visible, sr + kKeyTile, 0.0f);
  if (alpha != 1.0f)
    for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
  *m = m_new;
}

#if PIGJAX_X86
PIGJAX_TARGET_AVX512 void row_step_avx512(float* sr, int64_t visible, float* m, float* l, float* o, int64_t d,
                                          ExpSumFn exp_sum) {
  constexpr int kV = kKeyTile / 16;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 mask[kV];
  __m512 mx = ninf;
  for (int u = 0; u < kV; ++u) {
    const int64_t left = visible - 16 * u;
    mask[u] = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, mask[u], sr + 16 * u));
  }
  const float m_new = std::max(*m, _mm512_reduce_max_ps(mx));
  const float alpha = m_new == *m ? 1.0f : std::exp(*m - m_new);
  *l = *l * alpha + exp_sum(sr, visible, m_new);
  if (visible < kKeyTile)
    for (int u = 0; u < kV; ++u) _mm512_storeu_ps(sr + 16 * u, _mm512_maskz_loadu_ps(mask[u], sr + 16 * u));
  if (alpha != 1.0f) {
    const __m512 f = _mm512_set1_ps(alpha);
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(f, _mm512_loadu_ps(o + c)));
    for (; c < d; ++c) o[c] *= alpha;
  }
  *m = m_new;
}

PIGJAX_TARGET_AVX2 void row_step_avx2(float* sr, int64_t visible, float* m, float* l, float* o, int64_t d,
                                      ExpSumFn exp_sum) {
  if (visible < kKeyTile) std::fill(sr + visible, sr + kKeyTile, -std::numeric_limits<float>::infinity());
  __m256 x = _mm256_loadu_ps(sr);
  for (int64_t j = 8; j < kKeyTile; j += 8) x = _mm256_max_ps(x, _mm256_loadu_ps(sr + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 0x55));
  const float m_new = std::max(*m, _mm_cvtss_f32(h));
  const float alpha = m_new == *m ? 1.0f : std::exp(*m - m_new);
  *l = *l * alpha + exp_sum(sr, visible, m_new);
  std::fill(sr + visible, sr + kKeyTile, 0.0f);
  if (alpha != 1.0f) {
    const __m256 f = _mm256_set1_ps(alpha);
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(f, _mm256_loadu_ps(o + c)));
    for (; c < d; ++c) o[c] *= alpha;
  }
  *m = m_new;
}

// AVX-512, d a multiple of 16: a full key tile rows[32][d] (stride d) transposed into kt[d][32],
// 16x16 blocks in registers (unpack, then in-lane and 128-bit-lane shuffles).
template <typename T>
PIGJAX_TARGET_AVX512 void transpose_keys_avx512(const T* rows, int64_t d, float* kt) {
  for (int64_t jb = 0; jb < kKeyTile; jb += 16)
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = load16(rows + (jb + i) * d + c0);
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int g = 0; g < 16; g += 4) {
        r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
        r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
        r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
      }
      for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
      }
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (c0 + i) * kKeyTile + jb, r[i]);
    }
}

// AVX-512: a row's kKeyTile scores are kV vectors; kRows rows at a time (24 accumulators).
PIGJAX_TARGET_AVX512 void score_tile_avx512(const float* qs, int64_t R, int64_t d, const float* kt, float* s) {
  constexpr int kV = kKeyTile / 16, kRows = 24 / kV;
  int64_t r = 0;
  for (; r + kRows <= R; r += kRows) {
    __m512 a[kRows][kV];
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kV; ++u) a[i][u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      __m512 kv[kV];
      for (int u = 0; u < kV; ++u) kv[u] = _mm512_loadu_ps(kt + c * kKeyTile + 16 * u);
      for (int i = 0; i < kRows; ++i) {
        const __m512 x = _mm512_set1_ps(qs[(r + i) * d + c]);
        for (int u = 0; u < kV; ++u) a[i][u] = _mm512_fmadd_ps(x, kv[u], a[i][u]);
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kV; ++u) _mm512_storeu_ps(s + (r + i) * kKeyTile + 16 * u, a[i][u]);
  }
  for (; r < R; ++r) {
    __m512 a[kV];
    for (int u = 0; u < kV; ++u) a[u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      const __m512 x = _mm512_set1_ps(qs[r * d + c]);
      for (int u = 0; u < kV; ++u) a[u] = _mm512_fmadd_ps(x, _mm512_loadu_ps(kt + c * kKeyTile + 16 * u), a[u]);
    }
    for (int u = 0; u < kV; ++u) _mm512_storeu_ps(s + r * kKeyTile + 16 * u, a[u]);
  }
}

// AVX-512, d a multiple of 64: 64 output columns (4 vectors) of 4 rows at a time (16 accumulators).
template <typename T>
PIGJAX_TARGET_AVX512 void value_tile_avx512(const float* p, int64_t R, int64_t nk, const T* v, int64_t d, float* o) {
  constexpr int kRows = 4;
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    int64_t r = 0;
    for (; r + kRows <= R; r += kRows) {
      __m512 a[kRows][4];
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < 4; ++u) a[i][u] = _mm512_loadu_ps(o + (r + i) * d + c0 + 16 * u);
      for (int64_t j = 0; j < nk; ++j) {
        const T* row = v + j * d + c0;
        const __m512 x0 = load16(row), x1 = load16(row + 16), x2 = load16(row + 32), x3 = load16(row + 48);
        for (int i = 0; i < kRows; ++i) {
          const __m512 w = _mm512_set1_ps(p[(r + i) * kKeyTile + j]);
          a[i][0] = _mm512_fmadd_ps(w, x0, a[i][0]);
          a[i][1] = _mm512_fmadd_ps(w, x1, a[i][1]);
          a[i][2] = _mm512_fmadd_ps(w, x2, a[i][2]);
          a[i][3] = _mm512_fmadd_ps(w, x3, a[i][3]);
        }
      }
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o + (r + i) * d + c0 + 16 * u, a[i][u]);
    }
    for (; r < R; ++r) {
      __m512 a[4];
      for (int u = 0; u < 4; ++u) a[u] = _mm512_loadu_ps(o + r * d + c0 + 16 * u);
      for (int64_t j = 0; j < nk; ++j) {
        const __m512 w = _mm512_set1_ps(p[r * kKeyTile + j]);
        for (int u = 0; u < 4; ++u) a[u] = _mm512_fmadd_ps(w, load16(v + j * d + c0 + 16 * u), a[u]);
      }
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o + r * d + c0 + 16 * u, a[u]);
    }
  }
}

// AVX2: a row's kKeyTile scores are kV vectors; kRows rows at a time (12 accumulators, or one
// row of kV).
PIGJAX_TARGET_AVX2 void score_tile_avx2(const float* qs, int64_t R, int64_t d, const float* kt, float* s) {
  constexpr int kV = kKeyTile / 8, kRows = kV >= 12 ? 1 : 12 / kV;
  for (int64_t r = 0; r < R; r += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, R - r));
    __m256 a[kRows][kV];
    for (int i = 0; i < kRows; ++i)
      for (int u = 0; u < kV; ++u) a[i][u] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; ++c) {
      const float* kc = kt + c * kKeyTile;
      for (int i = 0; i < rows; ++i) {
        const __m256 x = _mm256_set1_ps(qs[(r + i) * d + c]);
        for (int u = 0; u < kV; ++u) a[i][u] = _mm256_fmadd_ps(x, _mm256_loadu_ps(kc + 8 * u), a[i][u]);
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int u = 0; u < kV; ++u) _mm256_storeu_ps(s + (r + i) * kKeyTile + 8 * u, a[i][u]);
  }
}

// AVX2, d a multiple of 32: 32 output columns (4 vectors) of 3 rows at a time (12 accumulators).
template <typename T>
PIGJAX_TARGET_AVX2 void value_tile_avx2(const float* p, int64_t R, int64_t nk, const T* v, int64_t d, float* o) {
  constexpr int kRows = 3;
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    int64_t r = 0;
    for (; r + kRows <= R; r += kRows) {
      __m256 a[kRows][4];
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < 4; ++u) a[i][u] = _mm256_loadu_ps(o + (r + i) * d + c0 + 8 * u);
      for (int64_t j = 0; j < nk; ++j) {
        const T* row = v + j * d + c0;
        const __m256 x0 = load8(row), x1 = load8(row + 8), x2 = load8(row + 16), x3 = load8(row + 24);
        for (int i = 0; i < kRows; ++i) {
          const __m256 w = _mm256_set1_ps(p[(r + i) * kKeyTile + j]);
          a[i][0] = _mm256_fmadd_ps(w, x0, a[i][0]);
          a[i][1] = _mm256_fmadd_ps(w, x1, a[i][1]);
          a[i][2] = _mm256_fmadd_ps(w, x2, a[i][2]);
          a[i][3] = _mm256_fmadd_ps(w, x3, a[i][3]);
        }
      }
      for (int i = 0; i < kRows; ++i)
        for (int u = 0; u < 4; ++u) _mm256_storeu_ps(o + (r + i) * d + c0 + 8 * u, a[i][u]);
    }
    for (; r < R; ++r) {
      __m256 a[4];
      for (int u = 0; u < 4; ++u) a[u] = _mm256_loadu_ps(o + r * d + c0 + 8 * u);
      for (int64_t j = 0; j < nk; ++j) {
        const __m256 w = _mm256_set1_ps(p[r * kKeyTile + j]);
        for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(w, load8(v + j * d + c0 + 8 * u), a[u]);
      }
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(o + r * d + c0 + 8 * u, a[u]);
    }
  }
}
#endif

template <typename T>
struct TileKernels {
  ScoreTileFn score = score_tile_scalar;
  ValueTileFn<T> value = value_tile_scalar<T>;
  RowStepFn row_step = row_step_scalar;
  ExpSumFn exp_sum = nullptr;
  void (*transpose)(const T* rows, int64_t d, float* kt) = nullptr;  // a full key tile; else a loop
};

// The kernels of `level`; the value tile falls back to a lower level where d does not fill its
// vectors (AVX-512: d % 64, AVX2: d % 32).
template <typename T>
TileKernels<T> tile_kernels(SimdLevel level, int64_t d) {
  TileKernels<T> k;
  k.exp_sum = row_kernels<float>(level).exp_sum;
#if PIGJAX_X86
  if (level >= SimdLevel::kAvx2) {
    k.score = score_tile_avx2;
    k.row_step = row_step_avx2;
    if (d % 32 == 0) k.value = value_tile_avx2<T>;
  }
  if (level >= SimdLevel::kAvx512) {
    k.score = score_tile_avx512;
    k.row_step = row_step_avx512;
    if (d % 16 == 0) k.transpose = transpose_keys_avx512<T>;
    if (d % 64 == 0) k.value = value_tile_avx512<T>;
  }
#else
  (void)d;
#endif
  return k;
}

// One task: KV head kvh of row b, the positions [t0, t0 + nq). Rows r = g * nq + i of the tile are
// query head kvh * G + g at position t0 + i.
template <typename T>
void tile_task(const PrefillAttentionShape& sh, const TileKernels<T>& kn, const float* q, const T* k,
               const T* v, float* out, int64_t b, int64_t kvh, int64_t t0) {
  const int64_t d = sh.d, G = sh.Hq / sh.Hkv, nq = std::min(kQueryTile, sh.T - t0), R = G * nq;
  thread_local std::vector<float> qs, kt, s, o, m, l;
  qs.resize(static_cast<size_t>(R * d));
  kt.resize(static_cast<size_t>(d * kKeyTile));
  s.resize(static_cast<size_t>(R * kKeyTile));
  o.assign(static_cast<size_t>(R * d), 0.0f);
  m.assign(static_cast<size_t>(R), -std::numeric_limits<float>::infinity());
  l.assign(static_cast<size_t>(R), 0.0f);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < nq; ++i) {
      const float* src = q + ((b * sh.T + t0 + i) * sh.Hq + kvh * G + g) * d;
      float* dst = &qs[static_cast<size_t>((g * nq + i) * d)];
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * scale;
    }
  const T* kb = k + (b * sh.Hkv + kvh) * sh.S * d;
  const T* vb = v + (b * sh.Hkv + kvh) * sh.S * d;
  const int64_t end = t0 + nq;  // the tile's last position sees keys [0, end)
  for (int64_t j0 = 0; j0 < end; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, end - j0);
    if (kn.transpose != nullptr && nk == kKeyTile) {
      kn.transpose(kb + j0 * d, d, kt.data());
    } else {
      for (int64_t j = 0; j < kKeyTile; ++j)
        for (int64_t c = 0; c < d; ++c)
          kt[static_cast<size_t>(c * kKeyTile + j)] = j < nk ? ld(kb, (j0 + j) * d + c) : 0.0f;
    }
    kn.score(qs.data(), R, d, kt.data(), s.data());
    const bool diagonal = j0 + kKeyTile > t0;  // some key of the tile lies after some row's position
    for (int64_t r = 0; r < R; ++r) {
      float* sr = &s[static_cast<size_t>(r * kKeyTile)];
      const int64_t visible = diagonal ? std::min(nk, t0 + r % nq + 1 - j0) : kKeyTile;
      if (visible <= 0) {  // no key of this tile is visible to the row: it adds nothing
        std::fill(sr, sr + kKeyTile, 0.0f);
        continue;
      }
      kn.row_step(sr, visible, &m[static_cast<size_t>(r)], &l[static_cast<size_t>(r)],
                  &o[static_cast<size_t>(r * d)], d, kn.exp_sum);
    }
    kn.value(s.data(), R, nk, vb + j0 * d, d, o.data());
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t r = g * nq + i;
      float* dst = out + ((b * sh.T + t0 + i) * sh.Hq + kvh * G + g) * d;
      const float inv = 1.0f / l[static_cast<size_t>(r)];  // l >= 1: the row's own position is visible
      for (int64_t c = 0; c < d; ++c) dst[c] = o[static_cast<size_t>(r * d + c)] * inv;
    }
}

constexpr int64_t kInlineWork = int64_t{1} << 19;  // multiply-adds below which no pool is used

}  // namespace

std::string plan_prefill_attention(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                   const std::vector<int64_t>& v, const std::vector<int64_t>& out,
                                   PrefillAttentionShape* shape) {
  if (q.size() != 4) return "q must be [B, T, Hq, d], got " + shape_text(q);
  if (k.size() != 4) return "k must be [B, Hkv, S, d], got " + shape_text(k);
  if (v != k) return "v must have k's shape " + shape_text(k) + ", got " + shape_text(v);
  if (k[0] != q[0] || k[3] != q[3])
    return "k " + shape_text(k) + " does not match q " + shape_text(q) + " (batch and head size)";
  if (k[1] < 1 || q[2] % k[1] != 0)
    return "query heads (" + std::to_string(q[2]) + ") must be a multiple of KV heads (" +
           std::to_string(k[1]) + ")";
  if (k[2] < q[1])
    return "the cache's " + std::to_string(k[2]) + " slots cannot hold the " + std::to_string(q[1]) +
           " prefill positions";
  if (out != q) return "out must have q's shape " + shape_text(q) + ", got " + shape_text(out);
  *shape = {q[0], q[1], q[2], k[1], k[2], q[3]};
  return "";
}

template <typename T>
void prefill_attention(const PrefillAttentionShape& sh, const float* q, const T* k, const T* v, float* out) {
  const int64_t tiles = (sh.T + kQueryTile - 1) / kQueryTile, heads = sh.B * sh.Hkv;
  const TileKernels<T> kn = tile_kernels<T>(simd_level(), sh.d);
  // Task t: the longest tiles first (tile tiles-1 of every head, then tiles-2, ...), so the
  // pool's last tasks are short.
  const auto task = [&](int64_t t) {
    const int64_t bh = t % heads, tile = tiles - 1 - t / heads;
    tile_task(sh, kn, q, k, v, out, bh / sh.Hkv, bh % sh.Hkv, tile * kQueryTile);
  };
  if (sh.B * sh.Hq * sh.T * sh.T / 2 * sh.d <= kInlineWork) {
    for (int64_t t = 0; t < tiles * heads; ++t) task(t);
  } else {
    parallel_for(tiles * heads, task);
  }
}

template void prefill_attention<float>(const PrefillAttentionShape&, const float*, const float*, const float*, float*);
template void prefill_attention<uint16_t>(const PrefillAttentionShape&, const float*, const uint16_t*,
                                          const uint16_t*, float*);

}  // namespace pigjax
