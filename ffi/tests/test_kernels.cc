// Standalone tests of the kernel layer (no XLA, no Python). Built and run by
// scripts/sanitize_ffi.sh under ASan+UBSan (CMake option PIGJAX_SANITIZE=ON).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bf16.h"
#include "decode_attention.h"
#include "prefill_attention.h"
#include "simd.h"
#include "simhash.h"
#include "small_matmul.h"
#include "thread_pool.h"
#include "write_rows.h"

using namespace pigjax;

static int g_failures = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
    }                                                                 \
  } while (0)

static std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out = {SimdLevel::kScalar};
  if (hardware_simd_level() >= SimdLevel::kAvx2) out.push_back(SimdLevel::kAvx2);
  if (hardware_simd_level() >= SimdLevel::kAvx512) out.push_back(SimdLevel::kAvx512);
  return out;
}

static std::vector<float> randn(size_t count, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(count);
  for (float& f : v) f = dist(gen);
  return v;
}

// Double-precision reference. ambiguous[r*L*K + c] marks bits whose dot product is
// within float32 rounding of 0; those may legitimately differ between paths.
static std::vector<int32_t> reference(const std::vector<float>& x, int64_t n, int64_t d,
                                      const std::vector<float>& proj, int K, int64_t L,
                                      std::vector<bool>* ambiguous) {
  const int64_t M = K * L;
  std::vector<int32_t> codes(n * L, 0);
  ambiguous->assign(n * M, false);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < M; ++c) {
      double dot = 0, mag = 0;
      for (int64_t i = 0; i < d; ++i) {
        dot += double(x[r * d + i]) * double(proj[i * M + c]);
        mag += std::fabs(double(x[r * d + i]) * double(proj[i * M + c]));
      }
      if (dot > 0) codes[r * L + c / K] |= 1 << (c % K);
      if (std::fabs(dot) <= 1e-5 * mag && !(dot == 0 && mag == 0)) (*ambiguous)[r * M + c] = true;
    }
  return codes;
}

static void compare(const char* what, const std::vector<int32_t>& got,
                    const std::vector<int32_t>& want, const std::vector<bool>& ambiguous,
                    int64_t n, int K, int64_t L) {
  int64_t bad = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t l = 0; l < L; ++l) {
      const int32_t g = got[r * L + l], w = want[r * L + l];
      CHECK(g >= 0 && g < (1 << K), "%s: code %d out of range for K=%d", what, g, K);
      for (int j = 0; j < K; ++j)
        if (((g ^ w) >> j & 1) && !ambiguous[(r * L + l) * K + j]) ++bad;
    }
  CHECK(bad == 0, "%s: %lld bits differ from the reference (n=%lld K=%d L=%lld)", what,
        (long long)bad, (long long)n, K, (long long)L);
}

static void test_random_shapes() {
  std::mt19937 gen(1234);
  struct Case { int64_t n, d; int K; int64_t L; };
  const Case cases[] = {{0, 64, 10, 150}, {1, 1, 1, 1},   {1, 1, 16, 3},  {5, 7, 16, 5},
                        {4, 128, 10, 150}, {3, 64, 10, 7}, {13, 33, 3, 37}, {9, 128, 16, 1},
                        {2, 65, 11, 300},  {7, 2, 1, 1},   {6, 17, 5, 13}};
  for (const Case& c : cases) {
    const auto x = randn(c.n * c.d, gen), proj = randn(c.d * c.K * c.L, gen);
    std::vector<bool> amb;
    const auto want = reference(x, c.n, c.d, proj, c.K, c.L, &amb);
    std::vector<int32_t> first;
    for (SimdLevel lv : levels()) {
      std::vector<int32_t> got(c.n * c.L, -1);
      simhash_codes_at(lv, x.data(), c.n, c.d, proj.data(), c.K, c.L, got.data());
      const std::string what = std::string("random ") + simd_level_name(lv);
      compare(what.c_str(), got, want, amb, c.n, c.K, c.L);
      if (first.empty()) first = got;
    }
  }
}

static void test_edge_values() {
  // d = 1, K = 16: bits are exactly the signs of proj times x.
  const int K = 16;
  std::vector<float> proj(K * 2);
  for (int c = 0; c < K * 2; ++c) proj[c] = (c % 3 == 0) ? 1.0f : -2.0f;
  int32_t expect_pos[2] = {0, 0};
  for (int c = 0; c < K * 2; ++c)
    if (c % 3 == 0) expect_pos[c / K] |= 1 << (c % K);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {1.0f, -1.0f, 0.0f, -0.0f, nan};
  for (SimdLevel lv : levels()) {
    std::vector<int32_t> codes(5 * 2, -1);
    simhash_codes_at(lv, x.data(), 5, 1, proj.data(), K, 2, codes.data());
    const char* nm = simd_level_name(lv);
    for (int l = 0; l < 2; ++l) {
      CHECK(codes[0 * 2 + l] == expect_pos[l], "%s: x=+1 table %d: %d", nm, l, codes[l]);
      CHECK(codes[1 * 2 + l] == (0xFFFF ^ expect_pos[l]), "%s: x=-1 table %d: %d", nm, l,
            codes[2 + l]);
      CHECK(codes[2 * 2 + l] == 0, "%s: x=0 gives code 0", nm);
      CHECK(codes[3 * 2 + l] == 0, "%s: x=-0 gives code 0", nm);
      CHECK(codes[4 * 2 + l] == 0, "%s: x=NaN gives code 0", nm);
    }
    // d = 0: every dot product is 0.
    std::vector<int32_t> z(3 * 4, -1);
    simhash_codes_at(lv, nullptr, 3, 0, nullptr, 4, 4, z.data());
    for (int32_t v : z) CHECK(v == 0, "%s: d=0 gives code 0, got %d", nm, v);
    // n = 0 / L = 0 write nothing.
    int32_t sentinel = 77;
    simhash_codes_at(lv, x.data(), 0, 1, proj.data(), K, 2, &sentinel);
    simhash_codes_at(lv, x.data(), 1, 1, proj.data(), K, 0, &sentinel);
    CHECK(sentinel == 77, "%s: n=0/L=0 must not write", nm);
  }
}

static void test_levels_and_env() {
  SimdLevel lv;
  const char* env = std::getenv("PIGJAX_SIMD");
  SimdLevel expect = hardware_simd_level();
  if (env != nullptr && parse_simd_level(env, &lv) && lv < expect) expect = lv;
  CHECK(simd_level() == expect, "PIGJAX_SIMD=%s: initial level %s, expected %s",
        env ? env : "(unset)", simd_level_name(simd_level()), simd_level_name(expect));
  CHECK(parse_simd_level("avx2", &lv) && lv == SimdLevel::kAvx2, "parse avx2");
  CHECK(!parse_simd_level("sse9", &lv), "parse rejects junk");
  CHECK(!parse_simd_level(nullptr, &lv), "parse rejects null");
  const SimdLevel hw = hardware_simd_level();
  CHECK(set_simd_level(SimdLevel::kScalar) == SimdLevel::kScalar, "force scalar");
  CHECK(simd_level() == SimdLevel::kScalar, "scalar sticks");
  CHECK(set_simd_level(SimdLevel::kAvx512) == hw, "clamped to hardware");
  CHECK(default_num_threads() >= 1, "threads >= 1");
  std::printf("hardware simd level: %s, threads: %d\n", simd_level_name(hw),
              default_num_threads());
}

static void test_plan() {
  SimhashPlan p;
  // Valid rank-2 proj, leading dims flattened.
  CHECK(plan_simhash({2, 3, 8}, {8, 20}, {2, 3, 4}, 5, &p).empty(), "valid plan");
  CHECK(p.rows == 6 && p.L == 4 && p.d == 8 && p.num_batches == 1 && p.batch_shape.empty(),
        "plan fields");
  struct Bad { std::vector<int64_t> x, proj, out; int64_t K; const char* needle; };
  const Bad bads[] = {
      {{4, 8}, {8}, {4, 1}, 1, "rank 2"},
      {{}, {8, 4}, {}, 1, "scalar"},
      {{4, 7}, {8, 4}, {4, 4}, 1, "last dim (7)"},
      {{4, 8}, {8, 4}, {4, 4}, 0, "K must be in [1, 16]"},
      {{4, 8}, {8, 34}, {4, 2}, 17, "K must be in [1, 16]"},
      {{4, 8}, {8, 10}, {4, 3}, 3, "not a multiple of K=3"},
      {{4, 8}, {8, 10}, {4, 3}, 5, "output shape"},
      {{4, 8}, {8, 10}, {5, 2}, 5, "output shape"},
      {{4, 8}, {8, 10}, {4, 2, 1}, 5, "output shape"},
      {{8}, {2, 8, 10}, {2}, 5, "batch dim"},
      {{3, 4, 8}, {2, 8, 10}, {3, 4, 2}, 5, "does not broadcast"},
      {{1, 4, 8}, {1, 8, 10}, {3, 4, 2}, 5, "does not broadcast"},
  };
  for (const Bad& b : bads) {
    const std::string e = plan_simhash(b.x, b.proj, b.out, b.K, &p);
    CHECK(e.find(b.needle) != std::string::npos, "expected error containing '%s', got '%s'",
          b.needle, e.c_str());
  }
}

static void test_planned_broadcast() {
  // x [B=3 (or 1), R=5, d], proj [B=3 (or 1), d, K*L]; compare with per-batch calls.
  std::mt19937 gen(7);
  const int64_t B = 3, R = 5, d = 19, L = 6;
  const int K = 4;
  for (int xb : {1, 3})
    for (int pb : {1, 3}) {
      const auto x = randn(xb * R * d, gen), proj = randn(pb * d * K * L, gen);
      const int64_t ob = std::max(xb, pb);
      SimhashPlan plan;
      const std::string e = plan_simhash({xb, R, d}, {pb, d, K * L}, {ob, R, L}, K, &plan);
      CHECK(e.empty(), "broadcast plan: %s", e.c_str());
      std::vector<int32_t> got(ob * R * L, -1), want(ob * R * L, -2);
      simhash_codes_planned(plan, x.data(), proj.data(), got.data());
      for (int64_t b = 0; b < ob; ++b)
        simhash_codes_at(SimdLevel::kScalar, x.data() + (xb == 1 ? 0 : b) * R * d, R, d,
                         proj.data() + (pb == 1 ? 0 : b) * d * K * L, K, L,
                         want.data() + b * R * L);
      int64_t diff = 0;
      for (size_t i = 0; i < got.size(); ++i) diff += got[i] != want[i];
      CHECK(diff == 0, "broadcast xb=%d pb=%d: %lld codes differ", xb, pb, (long long)diff);
    }
  (void)B;
  // Two batch dims with mixed broadcasting: x [2, 1, R, d], proj [1, 3, d, M].
  const auto x = randn(2 * 1 * R * d, gen), proj = randn(1 * 3 * d * K * L, gen);
  SimhashPlan plan;
  CHECK(plan_simhash({2, 1, R, d}, {1, 3, d, K * L}, {2, 3, R, L}, K, &plan).empty(), "2 dims");
  std::vector<int32_t> got(2 * 3 * R * L, -1), want(2 * 3 * R * L, -2);
  simhash_codes_planned(plan, x.data(), proj.data(), got.data());
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      simhash_codes_at(SimdLevel::kScalar, x.data() + i * R * d, R, d,
                       proj.data() + j * d * K * L, K, L, want.data() + (i * 3 + j) * R * L);
  CHECK(got == want, "two batch dims with broadcasting");
}

// The blocked kernel (packed and in-place proj, row and column tails, 1 and 3 threads) gives
// exactly the legacy kernel's codes at every level: same operations in the same order.
static void test_blocked_matches_legacy() {
  std::mt19937 gen(99);
  struct Case { int64_t n, d; int K; int64_t L; };
  const Case cases[] = {{15, 128, 10, 150}, {16, 128, 10, 150}, {37, 64, 10, 150},
                        {100, 33, 16, 7},   {61, 7, 3, 37},     {29, 1, 1, 1},
                        {1000, 64, 10, 150}, {257, 128, 16, 5},  {40, 17, 5, 13}};
  const int saved = get_num_threads();
  for (const Case& c : cases) {
    const auto x = randn(c.n * c.d, gen), proj = randn(c.d * c.K * c.L, gen);
    std::vector<bool> amb;
    const auto want = reference(x, c.n, c.d, proj, c.K, c.L, &amb);
    for (SimdLevel lv : levels()) {
      std::vector<int32_t> old_codes(c.n * c.L, -1);
      simhash_codes_legacy_at(lv, x.data(), c.n, c.d, proj.data(), c.K, c.L, old_codes.data());
      const std::string what = std::string("legacy ") + simd_level_name(lv);
      compare(what.c_str(), old_codes, want, amb, c.n, c.K, c.L);
      for (int threads : {1, 3}) {
        set_num_threads(threads);
        std::vector<int32_t> got(c.n * c.L, -1);
        simhash_codes_at(lv, x.data(), c.n, c.d, proj.data(), c.K, c.L, got.data());
        int64_t diff = 0;
        for (size_t i = 0; i < got.size(); ++i) diff += got[i] != old_codes[i];
        CHECK(diff == 0, "%s, %d threads, n=%lld d=%lld K=%d L=%lld: %lld codes differ from legacy",
              simd_level_name(lv), threads, (long long)c.n, (long long)c.d, c.K, (long long)c.L,
              (long long)diff);
      }
    }
  }
  // d = 0 with enough rows to be split / packed: all codes 0, proj may be null.
  set_num_threads(3);
  for (SimdLevel lv : levels()) {
    std::vector<int32_t> z(200 * 4, -1);
    simhash_codes_at(lv, nullptr, 200, 0, nullptr, 4, 4, z.data());
    for (int32_t v : z) CHECK(v == 0, "%s: d=0, 200 rows gives code 0, got %d", simd_level_name(lv), v);
  }
  set_num_threads(saved);
}

// Dense decode attention (decode_attention.h) vs a double-precision loop, f32 and bf16 rows,
// ragged lengths (0, a block boundary, a tail), a head chunk past 8, every SIMD level.
static void test_decode_attention() {
  std::mt19937 gen(11);
  const int64_t B = 3, Hq = 12, Hkv = 1, S = 600, d = 20;
  const int32_t lengths[B] = {0, 256, 599};
  const std::vector<float> q = randn(B * Hq * d, gen), k = randn(B * Hkv * S * d, gen),
                           v = randn(B * Hkv * S * d, gen);
  std::vector<uint16_t> kb(k.size()), vb(v.size());
  for (size_t i = 0; i < k.size(); ++i) { kb[i] = f32_to_bf16(k[i]); vb[i] = f32_to_bf16(v[i]); }
  DecodeAttentionShape shape;
  CHECK(plan_decode_attention({B, Hq, d}, {B, Hkv, S, d}, {B, Hkv, S, d}, {B}, {B, Hq, d}, &shape).empty(), "plan");
  DecodeAttentionShape unused;
  CHECK(!plan_decode_attention({B, Hq, d}, {B, 5, S, d}, {B, 5, S, d}, {B}, {B, Hq, d}, &unused).empty(),
        "12 query heads over 5 KV heads accepted");
  for (bool bf16 : {false, true}) {
    for (SimdLevel level : levels()) {
      set_simd_level(level);
      std::vector<float> out(q.size(), -1.0f);
      const std::string err = bf16 ? decode_attention(shape, q.data(), kb.data(), vb.data(), lengths, out.data())
                                   : decode_attention(shape, q.data(), k.data(), v.data(), lengths, out.data());
      CHECK(err.empty(), "%s", err.c_str());
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h) {
          std::vector<double> s(lengths[b]), o(d, 0.0);
          double mx = -1e300, total = 0.0;
          for (int32_t i = 0; i < lengths[b]; ++i) {
            double dot = 0.0;
            for (int64_t c = 0; c < d; ++c) {
              const size_t at = (b * S + i) * d + c;
              dot += q[(b * Hq + h) * d + c] * (bf16 ? bf16_to_f32(kb[at]) : k[at]);
            }
            s[i] = dot / std::sqrt(double(d));
            mx = std::max(mx, s[i]);
          }
          for (int32_t i = 0; i < lengths[b]; ++i) {
            const double p = std::exp(s[i] - mx);
            total += p;
            for (int64_t c = 0; c < d; ++c) {
              const size_t at = (b * S + i) * d + c;
              o[c] += p * (bf16 ? bf16_to_f32(vb[at]) : v[at]);
            }
          }
          for (int64_t c = 0; c < d; ++c) {
            const double want = total > 0 ? o[c] / total : 0.0;
            const float got = out[(b * Hq + h) * d + c];
            CHECK(std::fabs(got - want) < 1e-4, "decode_attention bf16=%d level=%d b=%ld h=%ld: %g vs %g",
                  int(bf16), int(level), long(b), long(h), double(got), want);
          }
        }
    }
  }
  const int32_t bad[B] = {0, 601, 1};
  std::vector<float> out(q.size());
  CHECK(!decode_attention(shape, q.data(), k.data(), v.data(), bad, out.data()).empty(), "length past S accepted");
  set_simd_level(hardware_simd_level());
}

// Causal prefill attention (prefill_attention.h) vs a double-precision loop: f32 and bf16 rows,
// full and partial query and key tiles (T = 150), S > T, a GQA group of 3, d filling AVX-512 (64)
// and neither width (20), every SIMD level.
static void test_prefill_attention() {
  std::mt19937 gen(12);
  for (int64_t d : {64, 20}) {
    const int64_t B = 2, T = 150, Hq = 6, Hkv = 2, S = 160, G = Hq / Hkv;
    const std::vector<float> q = randn(B * T * Hq * d, gen), k = randn(B * Hkv * S * d, gen),
                             v = randn(B * Hkv * S * d, gen);
    std::vector<uint16_t> kb(k.size()), vb(v.size());
    for (size_t i = 0; i < k.size(); ++i) { kb[i] = f32_to_bf16(k[i]); vb[i] = f32_to_bf16(v[i]); }
    PrefillAttentionShape shape, unused;
    CHECK(plan_prefill_attention({B, T, Hq, d}, {B, Hkv, S, d}, {B, Hkv, S, d}, {B, T, Hq, d}, &shape).empty(), "plan");
    CHECK(!plan_prefill_attention({B, T, Hq, d}, {B, Hkv, T - 1, d}, {B, Hkv, T - 1, d}, {B, T, Hq, d}, &unused).empty(),
          "a cache shorter than the prompt accepted");
    for (bool bf16 : {false, true})
      for (SimdLevel level : levels()) {
        set_simd_level(level);
        std::vector<float> out(q.size(), -1.0f);
        if (bf16) prefill_attention(shape, q.data(), kb.data(), vb.data(), out.data());
        else prefill_attention(shape, q.data(), k.data(), v.data(), out.data());
        for (int64_t b = 0; b < B; ++b)
          for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < Hq; ++h) {
              const int64_t kvh = h / G;
              std::vector<double> s(t + 1), o(d, 0.0);
              double mx = -1e300, total = 0.0;
              for (int64_t i = 0; i <= t; ++i) {
                double dot = 0.0;
                for (int64_t c = 0; c < d; ++c) {
                  const size_t at = ((b * Hkv + kvh) * S + i) * d + c;
                  dot += q[((b * T + t) * Hq + h) * d + c] * (bf16 ? bf16_to_f32(kb[at]) : k[at]);
                }
                s[i] = dot / std::sqrt(double(d));
                mx = std::max(mx, s[i]);
              }
              for (int64_t i = 0; i <= t; ++i) {
                const double p = std::exp(s[i] - mx);
                total += p;
                for (int64_t c = 0; c < d; ++c) {
                  const size_t at = ((b * Hkv + kvh) * S + i) * d + c;
                  o[c] += p * (bf16 ? bf16_to_f32(vb[at]) : v[at]);
                }
              }
              for (int64_t c = 0; c < d; ++c) {
                const float got = out[((b * T + t) * Hq + h) * d + c];
                CHECK(std::fabs(got - o[c] / total) < 1e-4, "prefill_attention d=%ld bf16=%d level=%d b=%ld t=%ld h=%ld: %g vs %g",
                      long(d), int(bf16), int(level), long(b), long(t), long(h), double(got), o[c] / total);
              }
            }
      }
  }
  set_simd_level(hardware_simd_level());
}

// Few-row matmul (small_matmul.h) vs a double-precision loop: both W layouts, f32 and bf16 W, row
// counts around the 4-row tile, K and N off the vector widths (tails), K = 0, 1 and 3 threads,
// every SIMD level; and the shape checks.
static void test_small_matmul() {
  std::mt19937 gen(12);
  const int saved = get_num_threads();
  for (int64_t M : {1, 3, 4, 5, 9}) {
    for (auto [K, N] : std::vector<std::pair<int64_t, int64_t>>{{37, 70}, {64, 192}, {130, 1}, {0, 20}, {5, 300}}) {
      const std::vector<float> x = randn(M * K, gen), w = randn(K * N, gen);
      std::vector<uint16_t> wb(w.size());
      for (size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16(w[i]);
      for (bool nk : {false, true}) {
        SmallMatmulShape shape;
        const std::vector<int64_t> wdims = nk ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N};
        CHECK(plan_small_matmul({M, K}, wdims, {M, N}, nk, &shape).empty(), "plan M=%ld K=%ld N=%ld", long(M), long(K), long(N));
        for (bool bf16 : {false, true})
          for (SimdLevel level : levels())
            for (int threads : {1, 3}) {
              set_simd_level(level);
              set_num_threads(threads);
              std::vector<float> out(M * N, std::nanf(""));
              if (bf16) small_matmul(shape, x.data(), wb.data(), out.data());
              else small_matmul(shape, x.data(), w.data(), out.data());
              for (int64_t m = 0; m < M; ++m)
                for (int64_t n = 0; n < N; ++n) {
                  double want = 0.0, mag = 0.0;
                  for (int64_t k = 0; k < K; ++k) {
                    const size_t at = nk ? n * K + k : k * N + n;  // w is the same matrix in both layouts' terms
                    const double wv = bf16 ? bf16_to_f32(wb[at]) : w[at];
                    want += x[m * K + k] * wv;
                    mag += std::fabs(x[m * K + k] * wv);
                  }
                  const float got = out[m * N + n];
                  CHECK(std::fabs(got - want) <= 1e-5 * (mag + 1.0),
                        "small_matmul nk=%d bf16=%d level=%d threads=%d M=%ld K=%ld N=%ld [%ld,%ld]: %g vs %g",
                        int(nk), int(bf16), int(level), threads, long(M), long(K), long(N), long(m), long(n),
                        double(got), want);
                }
            }
      }
    }
  }
  SmallMatmulShape unused;
  CHECK(!plan_small_matmul({4, 8}, {9, 3}, {4, 3}, false, &unused).empty(), "K mismatch accepted");
  CHECK(!plan_small_matmul({4, 8}, {3, 8}, {4, 8}, true, &unused).empty(), "wrong out accepted");
  CHECK(!plan_small_matmul({4, 8, 1}, {8, 3}, {4, 3}, false, &unused).empty(), "3-d x accepted");
  set_num_threads(saved);
  set_simd_level(hardware_simd_level());
}

// write_rows: in place and into another buffer, slots past either end dropped, shape errors named.
static void test_write_rows() {
  const int64_t B = 3, T = 2, H = 2, S = 5, d = 3;
  std::vector<uint16_t> buf(B * H * S * d, 7), rows(B * T * H * d);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<uint16_t>(100 + i);
  const int32_t starts[B] = {0, 4, -1};  // row 1: slot 5 dropped; row 2: slot -1 dropped
  WriteRowsShape shape;
  CHECK(plan_write_rows({B, H, S, d}, {B, T, H, d}, {B}, {B, H, S, d}, &shape).empty(), "plan");
  std::vector<uint16_t> copy(buf.size(), 0);
  write_rows(shape, sizeof(uint16_t), buf.data(), rows.data(), starts, copy.data());
  write_rows(shape, sizeof(uint16_t), buf.data(), rows.data(), starts, buf.data());
  CHECK(copy == buf, "a separate out equals the in-place write");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < d; ++c) {
          const int64_t t = s - starts[b];
          const uint16_t want = (t >= 0 && t < T) ? rows[((b * T + t) * H + h) * d + c] : 7;
          CHECK(buf[((b * H + h) * S + s) * d + c] == want, "write_rows b%lld h%lld s%lld", (long long)b,
                (long long)h, (long long)s);
        }
  CHECK(plan_write_rows({B, H, S, d}, {B, T, H + 1, d}, {B}, {B, H, S, d}, &shape).find("do not fit") !=
            std::string::npos, "mismatched rows named");
  CHECK(plan_write_rows({B, H, S, d}, {B, T, H, d}, {B + 1}, {B, H, S, d}, &shape).find("starts") !=
            std::string::npos, "bad starts named");
}

int main() {
  test_write_rows();
  test_levels_and_env();
  test_random_shapes();
  test_blocked_matches_legacy();
  test_edge_values();
  test_plan();
  test_decode_attention();
  test_prefill_attention();
  test_small_matmul();
  set_simd_level(SimdLevel::kScalar);
  test_planned_broadcast();
  set_simd_level(hardware_simd_level());
  test_planned_broadcast();
  if (g_failures) {
    std::fprintf(stderr, "test_kernels: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("test_kernels: all checks passed\n");
  return 0;
}
