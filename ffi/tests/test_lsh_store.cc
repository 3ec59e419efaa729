// Standalone tests of the LSH KV store (store.h, query.h, store_args.h; also thread_pool.h and
// bf16.h): a naive double-precision reference versus the store on random data (f32/bf16, GQA,
// ragged lengths, several blocks, every SIMD level), empty sample sets, error handling (bad
// handles, shapes, ranges), and two stores used from two threads at once; the direct and compact
// table layouts (identical results), the memory estimate against the bytes allocated, and the
// memory limit (PIGJAX_ENGINE_MAX_BYTES, MemAvailable). Built and run by
// scripts/sanitize_ffi.sh (ASan+UBSan, or TSan).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "background.h"
#include "bf16.h"
#include "query.h"
#include "query_ranked.h"
#include "simd.h"
#include "store.h"
#include "store_args.h"
#include "thread_pool.h"

using namespace pigjax;

static int g_failures = 0;
#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++g_failures;                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                   \
    }                                                                               \
  } while (0)

static bool contains(const std::string& s, const char* needle) {
  return s.find(needle) != std::string::npos;
}

// ---- test data ---------------------------------------------------------------------------

struct Case {
  const char* name;
  StoreStorage storage;
  int K, L;
  int64_t Hkv, G, d, n, B, slots;
  int64_t sink, local;
  unsigned seed;
};

struct Data {
  std::vector<int32_t> slots, lengths, codes, q_codes;
  std::vector<float> keys, values, q;
};

static Data make_data(const Case& c) {
  std::mt19937 gen(c.seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> code(0, (1 << c.K) - 1);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  const int64_t Hq = c.Hkv * c.G;
  Data D;
  std::vector<int32_t> perm(c.slots);
  for (int64_t i = 0; i < c.slots; ++i) perm[i] = int32_t(i);
  std::shuffle(perm.begin(), perm.end(), gen);
  D.slots.assign(perm.begin(), perm.begin() + c.B);
  std::uniform_int_distribution<int64_t> len(0, c.n);
  for (int64_t b = 0; b < c.B; ++b) D.lengths.push_back(b == 0 ? int32_t(c.n) : int32_t(len(gen)));
  D.keys.resize(c.B * c.Hkv * c.n * c.d);
  D.values.resize(D.keys.size());
  for (float& x : D.keys) x = nd(gen);
  for (float& x : D.values) x = nd(gen);
  D.codes.resize(c.B * c.Hkv * c.n * c.L);
  for (int32_t& x : D.codes) x = code(gen);
  D.q.resize(c.B * Hq * c.d);
  for (float& x : D.q) x = nd(gen);
  D.q_codes.resize(c.B * Hq * c.L);
  for (int32_t& x : D.q_codes) x = code(gen);
  // Make collisions likely: each query head copies ~35% of the codes of a few random keys.
  std::uniform_int_distribution<int64_t> tok(0, std::max<int64_t>(0, c.n - 1));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      if (c.n == 0) continue;
      const int64_t kvh = h / c.G;
      for (int rep = 0; rep < 3; ++rep) {
        const int32_t* src = D.codes.data() + ((b * c.Hkv + kvh) * c.n + tok(gen)) * c.L;
        for (int64_t l = 0; l < c.L; ++l)
          if (uni(gen) < 0.35f / 3) D.q_codes[(b * Hq + h) * c.L + l] = src[l];
      }
    }
  if (!D.q.empty()) std::fill(D.q.begin(), D.q.begin() + c.d, 0.0f);  // a zero query
  if (c.n > c.sink && c.B > 0) {  // a zero key (cos = 0 branch)
    float* k0 = D.keys.data() + c.sink * c.d;
    std::fill(k0, k0 + c.d, 0.0f);
  }
  return D;
}

// ---- naive reference (double) ---------------------------------------------------------------

struct RefOut {
  std::vector<double> out, lse;
  std::vector<int32_t> sampled;
};

static double stored(float x, StoreStorage s) {
  return s == StoreStorage::kBF16 ? double(bf16_to_f32(f32_to_bf16(x))) : double(x);
}

static RefOut reference(const Case& c, const Data& D, double eps) {
  const int64_t Hq = c.Hkv * c.G;
  RefOut R;
  R.out.assign(c.B * Hq * c.d, 0.0);
  R.lse.assign(c.B * Hq, -std::numeric_limits<double>::infinity());
  R.sampled.assign(c.B * Hq, 0);
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t m = std::max<int64_t>(0, D.lengths[b] - c.local - c.sink);
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / c.G;
      const float* q = D.q.data() + (b * Hq + h) * c.d;
      const int32_t* qc = D.q_codes.data() + (b * Hq + h) * c.L;
      double qn = 0;
      for (int64_t i = 0; i < c.d; ++i) qn += double(q[i]) * q[i];
      qn = std::sqrt(qn);
      std::vector<double> scores;
      std::vector<int64_t> which;
      for (int64_t t = 0; t < m; ++t) {
        const int64_t pos = c.sink + t;
        const int32_t* kc = D.codes.data() + ((b * c.Hkv + kvh) * c.n + pos) * c.L;
        int coll = 0;
        for (int64_t l = 0; l < c.L; ++l) coll += kc[l] == qc[l];
        if (coll < 2) continue;
        const float* k = D.keys.data() + ((b * c.Hkv + kvh) * c.n + pos) * c.d;
        double dot = 0, kn = 0;
        for (int64_t i = 0; i < c.d; ++i) {
          const double kv = stored(k[i], c.storage);
          dot += kv * q[i];
          kn += kv * kv;
        }
        kn = double(float(std::sqrt(kn)));
        double cs = (qn == 0 || kn == 0) ? 0.0 : dot / (qn * kn);
        cs = std::min(1.0, std::max(-1.0, cs));
        const double p = 1.0 - std::acos(cs) / 3.14159265358979323846;
        const double P = std::pow(p, c.K);
        double u = 1.0 - std::pow(1.0 - P, c.L) - c.L * P * std::pow(1.0 - P, c.L - 1);
        u = std::min(1.0, std::max(0.0, u));
        scores.push_back(dot / std::sqrt(double(c.d)) + std::log(1.0 / (u + eps)));
        which.push_back(pos);
      }
      R.sampled[b * Hq + h] = int32_t(scores.size());
      if (scores.empty()) continue;
      double mx = *std::max_element(scores.begin(), scores.end()), sum = 0;
      for (double s : scores) sum += std::exp(s - mx);
      const double lse = mx + std::log(sum);
      R.lse[b * Hq + h] = lse;
      for (size_t j = 0; j < scores.size(); ++j) {
        const double w = std::exp(scores[j] - lse);
        const float* v = D.values.data() + ((b * c.Hkv + kvh) * c.n + which[j]) * c.d;
        for (int64_t i = 0; i < c.d; ++i)
          R.out[(b * Hq + h) * c.d + i] += w * stored(v[i], c.storage);
      }
    }
  }
  return R;
}

// ---- calls -----------------------------------------------------------------------------------

static PrefillArgs prefill_io(const Case& c, const Data& D, std::vector<int32_t>* mc) {
  PrefillArgs io;
  mc->assign(c.B, -1);
  io.slots.data = D.slots.data(); io.slots.dims = {c.B};
  io.keys.data = D.keys.data(); io.keys.dims = {c.B, c.Hkv, c.n, c.d};
  io.values.data = D.values.data(); io.values.dims = io.keys.dims;
  io.codes.data = D.codes.data(); io.codes.dims = {c.B, c.Hkv, c.n, int64_t(c.L)};
  io.lengths.data = D.lengths.data(); io.lengths.dims = {c.B};
  io.middle_counts.data = mc->data(); io.middle_counts.dims = {c.B};
  io.sink = c.sink; io.local = c.local;
  return io;
}

struct QueryOut {
  std::vector<float> out, lse;
  std::vector<int32_t> sampled;
};

static QueryArgs query_io(const Case& c, const Data& D, QueryOut* o) {
  const int64_t Hq = c.Hkv * c.G;
  o->out.assign(c.B * Hq * c.d, -7.0f);
  o->lse.assign(c.B * Hq, -7.0f);
  o->sampled.assign(c.B * Hq, -7);
  QueryArgs io;
  io.slots.data = D.slots.data(); io.slots.dims = {c.B};
  io.q.data = D.q.data(); io.q.dims = {c.B, Hq, c.d};
  io.q_codes.data = D.q_codes.data(); io.q_codes.dims = {c.B, Hq, int64_t(c.L)};
  io.out.data = o->out.data(); io.out.dims = io.q.dims;
  io.lse.data = o->lse.data(); io.lse.dims = {c.B, Hq};
  io.sampled.data = o->sampled.data(); io.sampled.dims = {c.B, Hq};
  return io;
}

static int64_t create(const Case& c, double eps = 1e-4, int64_t capacity = 0, int64_t sketch_tables = 0) {
  StoreConfig cfg;
  cfg.sketch_tables = sketch_tables;
  cfg.slots = c.slots; cfg.kv_heads = c.Hkv; cfg.head_dim = c.d;
  cfg.capacity = capacity > 0 ? capacity : std::max<int64_t>(1, c.n); cfg.K = c.K; cfg.L = c.L; cfg.eps = eps;
  cfg.storage = c.storage;
  std::string err;
  const int64_t h = store_create(cfg, &err);
  CHECK(h > 0 && err.empty(), "store_create: %s", err.c_str());
  return h;
}

static void compare(const Case& c, const RefOut& R, const QueryOut& Q, const char* level,
                    int64_t* total_sampled) {
  const int64_t Hq = c.Hkv * c.G;
  int64_t bad_count = 0, bad_lse = 0, bad_out = 0;
  double worst = 0;
  for (int64_t r = 0; r < c.B * Hq; ++r) {
    *total_sampled += R.sampled[r];
    if (Q.sampled[r] != R.sampled[r]) { ++bad_count; continue; }
    if (R.sampled[r] == 0) {
      if (!(std::isinf(Q.lse[r]) && Q.lse[r] < 0)) ++bad_lse;
      for (int64_t i = 0; i < c.d; ++i) bad_out += Q.out[r * c.d + i] != 0.0f;
      continue;
    }
    if (!(std::fabs(Q.lse[r] - R.lse[r]) <= 2e-4 * std::max(1.0, std::fabs(R.lse[r])))) ++bad_lse;
    for (int64_t i = 0; i < c.d; ++i) {
      const double e = std::fabs(Q.out[r * c.d + i] - R.out[r * c.d + i]);
      worst = std::max(worst, e);
      if (!(e <= 2e-4 + 2e-4 * std::fabs(R.out[r * c.d + i]))) ++bad_out;
    }
  }
  CHECK(bad_count == 0 && bad_lse == 0 && bad_out == 0,
        "%s [%s]: %lld sampled-count, %lld lse, %lld output mismatches (worst |err| %.3g)",
        c.name, level, (long long)bad_count, (long long)bad_lse, (long long)bad_out, worst);
}

static std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out = {SimdLevel::kScalar};
  if (hardware_simd_level() >= SimdLevel::kAvx2) out.push_back(SimdLevel::kAvx2);
  if (hardware_simd_level() >= SimdLevel::kAvx512) out.push_back(SimdLevel::kAvx512);
  return out;
}

// ---- tests -----------------------------------------------------------------------------------

static void test_against_reference() {
  const Case cases[] = {
      // name            storage              K  L   Hkv G  d    n     B  slots sink local seed
      {"f32 basic", StoreStorage::kF32, 3, 8, 2, 3, 33, 200, 3, 5, 4, 16, 1},
      {"bf16 d128 GQA4", StoreStorage::kBF16, 4, 12, 2, 4, 128, 300, 2, 4, 4, 64, 2},
      {"bf16 G9 (>8 chunk)", StoreStorage::kBF16, 2, 2, 1, 9, 17, 60, 2, 3, 0, 0, 3},
      {"f32 G1 d1", StoreStorage::kF32, 1, 5, 3, 1, 1, 40, 2, 2, 0, 3, 4},
      {"sink beyond length", StoreStorage::kF32, 2, 4, 1, 2, 8, 30, 1, 1, 40, 0, 5},
      {"K16", StoreStorage::kBF16, 16, 4, 2, 2, 16, 120, 2, 2, 4, 4, 6},
      {"K10 L150", StoreStorage::kBF16, 10, 150, 2, 2, 64, 150, 1, 1, 4, 8, 7},
      {"n0", StoreStorage::kF32, 3, 3, 1, 2, 8, 0, 1, 1, 4, 64, 8},
      {"d not multiple of 8/16", StoreStorage::kBF16, 3, 6, 2, 2, 23, 90, 2, 2, 1, 2, 9},
      {"f32 d40 G8", StoreStorage::kF32, 3, 7, 1, 8, 40, 80, 1, 3, 2, 2, 10},
  };
  for (SimdLevel lv : levels()) {
    set_simd_level(lv);
    for (const Case& c : cases) {
      const Data D = make_data(c);
      const int64_t h = create(c);
      std::vector<int32_t> mc;
      std::string err = store_prefill(h, prefill_io(c, D, &mc));
      CHECK(err.empty(), "%s: prefill: %s", c.name, err.c_str());
      for (int64_t b = 0; b < c.B; ++b)
        CHECK(mc[b] == std::max<int64_t>(0, D.lengths[b] - c.local - c.sink),
              "%s: middle count %d", c.name, mc[b]);
      QueryOut Q;
      err = store_query(h, query_io(c, D, &Q));
      CHECK(err.empty(), "%s: query: %s", c.name, err.c_str());
      int64_t total = 0;
      compare(c, reference(c, D, 1e-4), Q, simd_level_name(lv), &total);
      if (c.n > 50 && c.K <= 4)
        CHECK(total > 0, "%s: the test should sample something", c.name);
      CHECK(store_free(h, &err), "free: %s", err.c_str());
    }
  }
  set_simd_level(hardware_simd_level());
}

static void test_multi_block_and_reprefill() {
  // n > 65536: two blocks of uint16 indices. Small d, L to keep it fast under ASan.
  Case c = {"two blocks", StoreStorage::kBF16, 2, 3, 1, 2, 4, 70000, 1, 2, 3, 5, 11};
  Data D = make_data(c);
  const int64_t h = create(c, 0.5);
  std::vector<int32_t> mc;
  std::string err = store_prefill(h, prefill_io(c, D, &mc));
  CHECK(err.empty(), "two blocks prefill: %s", err.c_str());
  QueryOut Q;
  err = store_query(h, query_io(c, D, &Q));
  CHECK(err.empty(), "two blocks query: %s", err.c_str());
  int64_t total = 0;
  compare(c, reference(c, D, 0.5), Q, "default", &total);
  CHECK(total > 1000, "two blocks: expected many samples, got %lld", (long long)total);
  // Prefill the same slot again, shorter: the old tokens must be gone.
  Case c2 = c;
  c2.name = "re-prefill shorter";
  c2.n = 500;
  c2.seed = 12;
  Data D2 = make_data(c2);
  D2.slots = D.slots;
  err = store_prefill(h, prefill_io(c2, D2, &mc));
  CHECK(err.empty(), "re-prefill: %s", err.c_str());
  err = store_query(h, query_io(c2, D2, &Q));
  CHECK(err.empty(), "re-prefill query: %s", err.c_str());
  total = 0;
  compare(c2, reference(c2, D2, 0.5), Q, "default", &total);
  StoreInfo info;
  CHECK(store_info(h, &info, &err), "info: %s", err.c_str());
  CHECK(info.middle_counts[D.slots[0]] == 500 - 3 - 5, "info middle count %lld",
        (long long)info.middle_counts[D.slots[0]]);
  CHECK(info.bytes_per_token.size() >= 5 && info.bytes_per_token[3].second == 2.0 * c.L,
        "bytes per token of table indices");
  store_free(h, &err);
}

static void test_empty_and_unprefilled() {
  Case c = {"empty", StoreStorage::kF32, 8, 4, 2, 2, 8, 50, 1, 3, 0, 0, 13};
  Data D = make_data(c);
  const int64_t h = create(c);
  // Slot never prefilled: S is empty for every head.
  QueryOut Q;
  std::string err = store_query(h, query_io(c, D, &Q));
  CHECK(err.empty(), "unprefilled query: %s", err.c_str());
  for (size_t r = 0; r < Q.lse.size(); ++r) {
    CHECK(std::isinf(Q.lse[r]) && Q.lse[r] < 0 && Q.sampled[r] == 0, "unprefilled lse/sampled");
  }
  for (float x : Q.out) CHECK(x == 0.0f, "unprefilled out must be 0");
  // Prefilled, but query codes that match no key in >= 2 tables.
  for (int32_t& x : D.codes) x = 0;
  for (int32_t& x : D.q_codes) x = 1;
  std::vector<int32_t> mc;
  err = store_prefill(h, prefill_io(c, D, &mc));
  CHECK(err.empty(), "prefill: %s", err.c_str());
  err = store_query(h, query_io(c, D, &Q));
  CHECK(err.empty(), "query: %s", err.c_str());
  for (size_t r = 0; r < Q.lse.size(); ++r)
    CHECK(std::isinf(Q.lse[r]) && Q.lse[r] < 0 && Q.sampled[r] == 0, "empty S: lse -inf");
  // Exactly one colliding table is not enough; two are.
  std::fill(D.q_codes.begin(), D.q_codes.end(), 1);
  for (int64_t h2 = 0; h2 < c.Hkv * c.G; ++h2) D.q_codes[h2 * c.L + 0] = 0;
  err = store_query(h, query_io(c, D, &Q));
  for (int32_t s : Q.sampled) CHECK(s == 0, "one collision must not sample (%d)", s);
  for (int64_t h2 = 0; h2 < c.Hkv * c.G; ++h2) D.q_codes[h2 * c.L + 3] = 0;
  err = store_query(h, query_io(c, D, &Q));
  for (int32_t s : Q.sampled) CHECK(s == 50, "two collisions sample every key (%d)", s);
  store_free(h, &err);
}

// Collision counts live in one byte per token, clamped to 2 every 254 tables: a token colliding
// in all of L >= 256 tables (a count that would wrap to 0 or 1) is still sampled, and one that
// collides once before the clamp and once after is sampled too, once in total is not.
static void test_many_tables() {
  for (int L : {255, 256, 257, 300, 510, 511}) {
    Case c = {"many tables", StoreStorage::kF32, 4, L, 1, 2, 8, 40, 1, 1, 0, 0, 17};
    Data D = make_data(c);
    for (int32_t& x : D.codes) x = 5;
    const int64_t h = create(c);
    std::vector<int32_t> mc;
    std::string err = store_prefill(h, prefill_io(c, D, &mc));
    CHECK(err.empty(), "L=%d prefill: %s", L, err.c_str());
    QueryOut Q;
    std::fill(D.q_codes.begin(), D.q_codes.end(), 5);  // every table collides
    err = store_query(h, query_io(c, D, &Q));
    CHECK(err.empty(), "L=%d query: %s", L, err.c_str());
    for (int32_t s : Q.sampled) CHECK(s == 40, "L=%d: all tables collide, got %d sampled", L, s);
    std::fill(D.q_codes.begin(), D.q_codes.end(), 6);  // table 0 and table L-1 only
    for (int64_t hq = 0; hq < c.Hkv * c.G; ++hq) D.q_codes[hq * L] = D.q_codes[hq * L + L - 1] = 5;
    err = store_query(h, query_io(c, D, &Q));
    for (int32_t s : Q.sampled) CHECK(s == 40, "L=%d: first and last tables, got %d sampled", L, s);
    std::fill(D.q_codes.begin(), D.q_codes.end(), 6);  // table L-1 only
    for (int64_t hq = 0; hq < c.Hkv * c.G; ++hq) D.q_codes[hq * L + L - 1] = 5;
    err = store_query(h, query_io(c, D, &Q));
    for (int32_t s : Q.sampled) CHECK(s == 0, "L=%d: one table, got %d sampled", L, s);
    store_free(h, &err);
  }
}

static void test_errors() {
  std::string err;
  StoreConfig cfg;
  cfg.slots = 2; cfg.kv_heads = 2; cfg.head_dim = 4; cfg.capacity = 10; cfg.K = 3; cfg.L = 4;
  struct BadCfg { StoreConfig cfg; const char* needle; };
  std::vector<BadCfg> bads;
  auto with = [&](auto f, const char* needle) { StoreConfig x = cfg; f(x); bads.push_back({x, needle}); };
  with([](StoreConfig& x) { x.K = 0; }, "K must be in [1, 16]");
  with([](StoreConfig& x) { x.K = 17; }, "K must be in [1, 16]");
  with([](StoreConfig& x) { x.L = 1; }, "L must be >= 2");
  with([](StoreConfig& x) { x.slots = 0; }, "slots must be positive");
  with([](StoreConfig& x) { x.kv_heads = -1; }, "kv_heads must be positive");
  with([](StoreConfig& x) { x.head_dim = 0; }, "head_dim must be positive");
  with([](StoreConfig& x) { x.capacity = 0; }, "capacity must be positive");
  with([](StoreConfig& x) { x.capacity = int64_t{1} << 40; }, "capacity must be < 2^31");
  with([](StoreConfig& x) { x.eps = -1; }, "eps must be a finite number > 0");
  with([](StoreConfig& x) { x.eps = 0; }, "eps must be a finite number > 0");
  with([](StoreConfig& x) { x.eps = std::nan(""); }, "eps must be a finite number > 0");
  with([](StoreConfig& x) { x.L = 65537; }, "L must be <= 65536");
  with([](StoreConfig& x) { x.K = 16; x.L = 4097; }, "K·L must be <= 65536");
  with([](StoreConfig& x) { x.K = 16; x.L = 4097; }, "got K=16, L=4097 (K·L = 65552)");
  with([](StoreConfig& x) { x.slots = (int64_t{1} << 24) + 1; }, "slots must be <= 2^24");
  with([](StoreConfig& x) { x.kv_heads = 4097; }, "kv_heads must be <= 4096");
  with([](StoreConfig& x) { x.head_dim = 65537; }, "head_dim must be <= 65536");
  for (const BadCfg& b : bads) {
    const int64_t h = store_create(b.cfg, &err);
    CHECK(h == 0 && contains(err, b.needle), "bad config: want '%s', got h=%lld '%s'", b.needle,
          (long long)h, err.c_str());
  }

  // Unknown / freed handles.
  Case c = {"errors", StoreStorage::kBF16, 3, 4, 2, 2, 4, 20, 2, 2, 2, 2, 14};
  Data D = make_data(c);
  D.lengths[1] = 20;
  std::vector<int32_t> mc;
  QueryOut Q;
  CHECK(contains(store_prefill(12345678, prefill_io(c, D, &mc)), "unknown or freed store handle"),
        "unknown handle (prefill)");
  CHECK(contains(store_query(-1, query_io(c, D, &Q)), "unknown or freed store handle"),
        "unknown handle (query)");
  const int64_t h = create(c, 1e-4, /*capacity=*/16);
  const int64_t h2 = create(c);
  CHECK(h2 > h, "handles increase");
  CHECK(store_free(h2, &err), "free");
  CHECK(!store_free(h2, &err) && contains(err, "unknown or freed"), "double free: %s", err.c_str());
  CHECK(contains(store_query(h2, query_io(c, D, &Q)), "unknown or freed"), "freed handle query");
  StoreInfo info;
  CHECK(!store_info(h2, &info, &err), "info on freed handle");

  // Prefill argument errors (the store must stay unchanged).
  struct BadPrefill { std::function<void(PrefillArgs&, Data&)> f; const char* needle; };
  std::vector<int32_t> bad_codes = D.codes, neg_len = {-1, 3}, long_len = {21, 3};
  std::vector<int32_t> dup = {1, 1}, oor = {0, 2};
  const BadPrefill bp[] = {
      {[&](PrefillArgs& io, Data&) { io.slots.data = dup.data(); }, "appears more than once"},
      {[&](PrefillArgs& io, Data&) { io.slots.data = oor.data(); }, "out of range [0, 2)"},
      {[&](PrefillArgs& io, Data&) { io.lengths.data = neg_len.data(); }, "outside [0, n=20]"},
      {[&](PrefillArgs& io, Data&) { io.lengths.data = long_len.data(); }, "outside [0, n=20]"},
      {[&](PrefillArgs& io, Data&) { io.keys.dims = {2, 3, 20, 4}; }, "keys must have shape"},
      {[&](PrefillArgs& io, Data&) { io.keys.dims = {2, 2, 20, 5}; }, "keys must have shape"},
      {[&](PrefillArgs& io, Data&) { io.keys.dims = {2, 2, 80}; }, "keys must have shape"},
      {[&](PrefillArgs& io, Data&) { io.values.dims = {2, 2, 19, 4}; }, "values must have"},
      {[&](PrefillArgs& io, Data&) { io.codes.dims = {2, 2, 20, 5}; }, "codes must have shape"},
      {[&](PrefillArgs& io, Data&) { io.lengths.dims = {3}; }, "lengths must have shape"},
      {[&](PrefillArgs& io, Data&) { io.slots.dims = {2, 1}; }, "slots must have shape"},
      {[&](PrefillArgs& io, Data&) { io.middle_counts.dims = {1}; }, "middle_counts must"},
      {[&](PrefillArgs& io, Data&) { io.sink = -1; }, "sink and local must be >= 0"},
      {[&](PrefillArgs& io, Data&) { io.sink = 0; io.local = 0; }, "exceeds the store capacity"},
      {[&](PrefillArgs& io, Data&) {
         bad_codes[((1 * 2 + 1) * 20 + 5) * 4 + 2] = 8;
         io.codes.data = bad_codes.data();
       }, "codes[1, 1, 5, 2] = 8 is outside [0, 2^K=8)"},
  };
  for (const BadPrefill& b : bp) {
    PrefillArgs io = prefill_io(c, D, &mc);
    b.f(io, D);
    err = store_prefill(h, io);
    CHECK(contains(err, b.needle), "prefill error: want '%s', got '%s'", b.needle, err.c_str());
  }
  CHECK(store_info(h, &info, &err) && !info.prefilled[0] && !info.prefilled[1],
        "failed prefills leave the store unchanged");
  // A negative code outside the middle is ignored (never read); inside it is an error.
  std::vector<int32_t> codes2 = D.codes;
  codes2[0] = -5;  // row 0, head 0, position 0 (< sink = 2)
  PrefillArgs ok = prefill_io(c, D, &mc);
  ok.codes.data = codes2.data();
  err = store_prefill(h, ok);
  CHECK(err.empty(), "codes outside the middle are not read: %s", err.c_str());

  // Query argument errors.
  struct BadQuery { std::function<void(QueryArgs&)> f; const char* needle; };
  std::vector<int32_t> bad_qc = D.q_codes;
  bad_qc[5] = -1;
  const BadQuery bq[] = {
      {[&](QueryArgs& io) { io.q.dims = {2, 3, 4}; io.out.dims = io.q.dims; }, "multiple of kv_heads"},
      {[&](QueryArgs& io) { io.q.dims = {2, 4, 5}; }, "q must have shape"},
      {[&](QueryArgs& io) { io.q_codes.dims = {2, 4, 3}; }, "q_codes must have shape"},
      {[&](QueryArgs& io) { io.out.dims = {2, 4, 3}; }, "out must have shape"},
      {[&](QueryArgs& io) { io.lse.dims = {2}; }, "lse must have shape"},
      {[&](QueryArgs& io) { io.sampled.dims = {4, 2}; }, "sampled must have shape"},
      {[&](QueryArgs& io) { io.slots.data = oor.data(); }, "out of range"},
      {[&](QueryArgs& io) { io.q_codes.data = bad_qc.data(); }, "q_codes[0, 1, 1] = -1 is outside"},
  };
  for (const BadQuery& b : bq) {
    QueryArgs io = query_io(c, D, &Q);
    b.f(io);
    err = store_query(h, io);
    CHECK(contains(err, b.needle), "query error: want '%s', got '%s'", b.needle, err.c_str());
  }
  // Duplicated slots are fine for queries.
  QueryArgs qio = query_io(c, D, &Q);
  qio.slots.data = dup.data();
  CHECK(store_query(h, qio).empty(), "query with repeated slots");
  store_free(h, &err);
}

static void test_threads() {
  // Two stores, each used from its own thread (prefill + many queries), pool of 2 and 3.
  for (int nt : {1, 2, 3}) {
    set_num_threads(nt);
    CHECK(get_num_threads() == nt, "get_num_threads %d", get_num_threads());
    Case c1 = {"thread A", StoreStorage::kBF16, 3, 6, 2, 2, 16, 300, 2, 2, 1, 1, 21};
    Case c2 = {"thread B", StoreStorage::kF32, 2, 5, 1, 3, 8, 200, 1, 1, 0, 4, 22};
    const Data D1 = make_data(c1), D2 = make_data(c2);
    const RefOut R1 = reference(c1, D1, 1e-4), R2 = reference(c2, D2, 1e-4);
    const int64_t h1 = create(c1), h2 = create(c2);
    int fails[2] = {0, 0};
    auto worker = [&](int which) {
      const Case& c = which ? c2 : c1;
      const Data& D = which ? D2 : D1;
      const RefOut& R = which ? R2 : R1;
      const int64_t h = which ? h2 : h1;
      std::vector<int32_t> mc;
      if (!store_prefill(h, prefill_io(c, D, &mc)).empty()) ++fails[which];
      for (int it = 0; it < 20; ++it) {
        QueryOut Q;
        if (!store_query(h, query_io(c, D, &Q)).empty()) ++fails[which];
        for (size_t r = 0; r < Q.sampled.size(); ++r)
          if (Q.sampled[r] != R.sampled[r]) ++fails[which];
      }
    };
    std::thread t1(worker, 0), t2(worker, 1);
    t1.join();
    t2.join();
    CHECK(fails[0] == 0 && fails[1] == 0, "threads=%d: %d / %d failures", nt, fails[0], fails[1]);
    std::string err;
    store_free(h1, &err);
    store_free(h2, &err);
  }
  // parallel_for propagates exceptions and runs every index once.
  std::vector<int> hits(100, 0);
  parallel_for(100, [&](int64_t i) { hits[i]++; });
  CHECK(std::count(hits.begin(), hits.end(), 1) == 100, "parallel_for covers each index once");
  bool threw = false;
  try {
    parallel_for(10, [](int64_t i) { if (i == 7) throw std::runtime_error("boom"); });
  } catch (const std::runtime_error&) {
    threw = true;
  }
  CHECK(threw, "parallel_for rethrows");
  set_num_threads(default_num_threads());
}

static void test_bf16() {
  CHECK(f32_to_bf16(1.0f) == 0x3f80, "bf16(1)");
  CHECK(bf16_to_f32(f32_to_bf16(1.00390625f)) == 1.0f, "ties to even (down)");
  CHECK(bf16_to_f32(f32_to_bf16(1.01171875f)) == 1.015625f, "ties to even (up)");
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))), "NaN");
  CHECK(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity()))), "inf");
}

// Append mode: prefill the first half of each row's tokens, append the rest in two calls with
// ragged counts; the query must equal the reference over all of them (sink = local = 0).
static void append_rows(const Case& c, const Data& D, const std::vector<int64_t>& from,
                        const std::vector<int64_t>& cnt, int64_t h, std::vector<int32_t>* totals,
                        std::string* err) {
  int64_t T = 0;
  for (int64_t x : cnt) T = std::max(T, x);
  T += 1;  // one padding token per row beyond the largest count
  std::vector<float> k(c.B * c.Hkv * T * c.d, 1e30f), v(k.size(), -1e30f);
  std::vector<int32_t> codes(c.B * c.Hkv * T * c.L, -1), counts(c.B);  // padding is never read
  for (int64_t b = 0; b < c.B; ++b) {
    counts[b] = int32_t(cnt[b]);
    for (int64_t hh = 0; hh < c.Hkv; ++hh)
      for (int64_t t = 0; t < cnt[b]; ++t) {
        const int64_t src = (b * c.Hkv + hh) * c.n + from[b] + t, dst = (b * c.Hkv + hh) * T + t;
        std::copy(D.keys.begin() + src * c.d, D.keys.begin() + (src + 1) * c.d, k.begin() + dst * c.d);
        std::copy(D.values.begin() + src * c.d, D.values.begin() + (src + 1) * c.d, v.begin() + dst * c.d);
        std::copy(D.codes.begin() + src * c.L, D.codes.begin() + (src + 1) * c.L, codes.begin() + dst * c.L);
      }
  }
  AppendArgs io;
  totals->assign(c.B, -1);
  io.slots.data = D.slots.data(); io.slots.dims = {c.B};
  io.keys.data = k.data(); io.keys.dims = {c.B, c.Hkv, T, c.d};
  io.values.data = v.data(); io.values.dims = io.keys.dims;
  io.codes.data = codes.data(); io.codes.dims = {c.B, c.Hkv, T, int64_t(c.L)};
  io.counts.data = counts.data(); io.counts.dims = {c.B};
  io.totals.data = totals->data(); io.totals.dims = {c.B};
  *err = store_append(h, io);
}

static void test_append() {
  const Case cases[] = {
      // name              storage              K  L   Hkv G  d    n    B  slots sink local seed
      {"append f32", StoreStorage::kF32, 3, 8, 2, 3, 33, 200, 3, 5, 0, 0, 31},
      {"append bf16 G9", StoreStorage::kBF16, 2, 6, 1, 9, 40, 150, 2, 3, 0, 0, 32},
  };
  for (SimdLevel lv : levels()) {
    set_simd_level(lv);
    for (const Case& c : cases) {
      const Data D = make_data(c);
      const int64_t h = create(c);
      std::string err;
      std::vector<int32_t> mc, totals;
      // Appending before the prefill is an error.
      append_rows(c, D, std::vector<int64_t>(c.B, 0), std::vector<int64_t>(c.B, 1), h, &totals, &err);
      CHECK(contains(err, "prefill the slot first"), "%s: append before prefill: '%s'", c.name, err.c_str());
      Data P = D;  // prefill the first half of each row
      std::vector<int64_t> n0(c.B), c1(c.B), c2(c.B);
      for (int64_t b = 0; b < c.B; ++b) {
        n0[b] = D.lengths[b] / 2;
        c1[b] = b == 1 ? 0 : (D.lengths[b] - n0[b]) / 3;
        c2[b] = D.lengths[b] - n0[b] - c1[b];
        P.lengths[b] = int32_t(n0[b]);
      }
      err = store_prefill(h, prefill_io(c, P, &mc));
      CHECK(err.empty(), "%s: prefill: %s", c.name, err.c_str());
      append_rows(c, D, n0, c1, h, &totals, &err);
      CHECK(err.empty(), "%s: append 1: %s", c.name, err.c_str());
      std::vector<int64_t> from2(c.B);
      for (int64_t b = 0; b < c.B; ++b) from2[b] = n0[b] + c1[b];
      append_rows(c, D, from2, c2, h, &totals, &err);
      CHECK(err.empty(), "%s: append 2: %s", c.name, err.c_str());
      for (int64_t b = 0; b < c.B; ++b)
        CHECK(totals[b] == D.lengths[b], "%s: total %d vs %d", c.name, totals[b], D.lengths[b]);
      QueryOut Q;
      err = store_query(h, query_io(c, D, &Q));
      CHECK(err.empty(), "%s: query: %s", c.name, err.c_str());
      int64_t total = 0;
      compare(c, reference(c, D, 1e-4), Q, simd_level_name(lv), &total);
      CHECK(total > 0, "%s: the test should sample something", c.name);
      // Capacity (n here) bounds middle + appended; nothing changes on error.
      append_rows(c, D, std::vector<int64_t>(c.B, 0), std::vector<int64_t>(c.B, 1), h, &totals, &err);
      CHECK(contains(err, "exceeds the store capacity"), "%s: capacity: '%s'", c.name, err.c_str());
      StoreInfo info;
      CHECK(store_info(h, &info, &err), "info");
      for (int64_t b = 0; b < c.B; ++b)
        CHECK(info.appended_counts[D.slots[b]] == D.lengths[b] - n0[b], "%s: appended count", c.name);
      // A new prefill clears the append buffer.
      err = store_prefill(h, prefill_io(c, P, &mc));
      CHECK(store_info(h, &info, &err), "info");
      for (int64_t b = 0; b < c.B; ++b)
        CHECK(info.appended_counts[D.slots[b]] == 0, "%s: prefill clears appended", c.name);
      store_free(h, &err);
    }
  }
  set_simd_level(hardware_simd_level());
}

// ---- table layouts (direct / compact) and memory -------------------------------------------

static int ceil_log2(int64_t x) {
  int b = 0;
  while ((int64_t{1} << b) < x) ++b;
  return b;
}

// Bytes a first prefill of these rows allocates (vectors sized exactly), from the estimate's
// per-head formula.
static int64_t prefill_bytes(const Case& c, const Data& D) {
  StoreConfig cfg;
  cfg.slots = c.slots; cfg.kv_heads = c.Hkv; cfg.head_dim = c.d; cfg.capacity = std::max<int64_t>(1, c.n);
  cfg.K = c.K; cfg.L = c.L; cfg.storage = c.storage;
  int64_t total = 0;
  for (int64_t b = 0; b < c.B; ++b)
    total += c.Hkv * prefill_bytes_per_head(cfg, std::max<int64_t>(0, D.lengths[b] - c.local - c.sink));
  return total;
}

static void test_table_layouts() {
  // Compact tables (2^K > a block's tokens) and direct ones (2^K + 1 offsets per table) must give
  // identical results: the same sampled sets, bit-identical outputs. Each case runs with the
  // automatic layout, then forced direct, then forced compact.
  const Case cases[] = {
      // name                 storage              K   L    Hkv G  d   n      B  slots sink local seed
      {"K16 L64 n600", StoreStorage::kBF16, 16, 64, 2, 3, 32, 600, 2, 3, 0, 0, 41},
      {"K10 L150 n3000", StoreStorage::kBF16, 10, 150, 1, 4, 64, 3000, 1, 1, 4, 16, 42},
      {"K10 L40 n700 f32", StoreStorage::kF32, 10, 40, 2, 2, 16, 700, 2, 2, 2, 2, 43},
      {"K16 L16 two blocks", StoreStorage::kF32, 16, 16, 1, 2, 4, 66000, 1, 1, 0, 0, 44},
      {"K1 tiny", StoreStorage::kF32, 1, 3, 1, 2, 4, 3, 1, 1, 0, 0, 45},
      {"K12 G9", StoreStorage::kBF16, 12, 20, 1, 9, 24, 900, 1, 1, 0, 0, 46},
  };
  for (const Case& c : cases) {
    const Data D = make_data(c);
    const RefOut R = reference(c, D, 1e-4);
    QueryOut first;
    for (int mode : {-1, 0, 1}) {
      set_table_layout(mode);
      const int64_t h = create(c);
      std::vector<int32_t> mc;
      std::string err = store_prefill(h, prefill_io(c, D, &mc));
      CHECK(err.empty(), "%s: prefill: %s", c.name, err.c_str());
      QueryOut Q;
      err = store_query(h, query_io(c, D, &Q));
      CHECK(err.empty(), "%s: query: %s", c.name, err.c_str());
      int64_t total = 0;
      compare(c, R, Q, mode < 0 ? "auto layout" : mode == 0 ? "direct" : "compact", &total);
      if (c.n >= 600) CHECK(total > 0, "%s: the test should sample something", c.name);
      if (mode == -1) {
        first = Q;
      } else {
        CHECK(Q.sampled == first.sampled, "%s: layout %d: sampled sets differ", c.name, mode);
        CHECK(std::memcmp(Q.out.data(), first.out.data(), Q.out.size() * sizeof(float)) == 0 &&
                  std::memcmp(Q.lse.data(), first.lse.data(), Q.lse.size() * sizeof(float)) == 0,
              "%s: layout %d: outputs differ", c.name, mode);
      }
      StoreInfo info;
      CHECK(store_info(h, &info, &err), "info: %s", err.c_str());
      for (int64_t b = 0; b < c.B; ++b) {
        const int64_t m = mc[b];
        const std::vector<int>& bits = info.table_bits[D.slots[b]];
        CHECK(int64_t(bits.size()) == (m + kBlockTokens - 1) / kBlockTokens, "%s: blocks", c.name);
        for (size_t bk = 0; bk < bits.size(); ++bk) {
          const int64_t len = std::min<int64_t>(kBlockTokens, m - int64_t(bk) * kBlockTokens);
          const int compact = std::min(c.K - 1, std::max(0, ceil_log2(len) - 1));
          // auto: compact iff it takes less than half the bytes of direct
          const bool smaller = 2 * (4 * ((int64_t{1} << compact) + 1) + 4 * len) <
                               4 * ((int64_t{1} << c.K) + 1) + 2 * len;
          const int want = mode == 0 ? c.K : mode == 1 ? compact : (smaller ? compact : c.K);
          CHECK(bits[bk] == want, "%s: layout %d block %zu: bits %d, want %d", c.name, mode, bk,
                bits[bk], want);
        }
      }
      CHECK(info.bytes_allocated == prefill_bytes(c, D), "%s: layout %d: bytes_allocated %lld, "
            "estimate %lld", c.name, mode, (long long)info.bytes_allocated,
            (long long)prefill_bytes(c, D));
      store_free(h, &err);
    }
    set_table_layout(-1);
  }
  // The case of the issue: one 600-token row at K = 16, L = 512 took 512 x 65537 int32 offsets
  // (134 MB) per KV head; compact tables take 512 x 513 offsets + 600 x 512 (index, code) pairs.
  StoreConfig cfg;
  cfg.slots = 1; cfg.kv_heads = 1; cfg.head_dim = 64; cfg.capacity = 600; cfg.K = 16; cfg.L = 512;
  const int64_t bytes = prefill_bytes_per_head(cfg, 600);
  CHECK(bytes == 2 * 2 * 64 * 600 + 4 * 600 + 4 * 512 * 513 + 4 * 512 * 600,
        "K16 L512 n600: %lld bytes", (long long)bytes);
  CHECK(bytes < 2500000, "K16 L512 n600 per head: %lld bytes", (long long)bytes);
}

static void test_memory() {
  std::string err;
  // The estimate equals what a full prefill allocates, and bounds the append buffer.
  Case c = {"memory", StoreStorage::kBF16, 8, 12, 2, 2, 16, 400, 2, 3, 0, 0, 51};
  Data D = make_data(c);
  D.lengths.assign(c.B, int32_t(c.n));
  StoreConfig cfg;
  cfg.slots = c.slots; cfg.kv_heads = c.Hkv; cfg.head_dim = c.d; cfg.capacity = c.n;
  cfg.K = c.K; cfg.L = c.L; cfg.storage = c.storage;
  StoreEstimate est;
  err = estimate_store_bytes(cfg, &est);
  CHECK(err.empty(), "estimate: %s", err.c_str());
  CHECK(est.prefill_per_slot_head == prefill_bytes_per_head(cfg, c.n), "prefill per head");
  CHECK(est.append_per_slot_head == (2 * 2 * c.d + 4 + 4 * c.L) * c.n, "append per head");
  CHECK(est.bytes == c.slots * c.Hkv * std::max(est.prefill_per_slot_head, est.append_per_slot_head),
        "estimate total");
  const int64_t h = create(c);
  std::vector<int32_t> mc, totals;
  err = store_prefill(h, prefill_io(c, D, &mc));
  CHECK(err.empty(), "prefill: %s", err.c_str());
  StoreInfo info;
  store_info(h, &info, &err);
  CHECK(info.bytes_allocated == c.B * c.Hkv * est.prefill_per_slot_head,
        "full prefill: %lld bytes, estimate %lld", (long long)info.bytes_allocated,
        (long long)(c.B * c.Hkv * est.prefill_per_slot_head));
  store_free(h, &err);
  // Appends one token at a time up to the capacity: the buffer's doubling stops at the room left.
  Case a = c;
  a.B = 1;
  Data DA = make_data(a);
  Data P = DA;
  P.lengths.assign(1, 100);
  const int64_t ha = create(a);
  err = store_prefill(ha, prefill_io(a, P, &mc));
  CHECK(err.empty(), "prefill: %s", err.c_str());
  for (int64_t t = 100; t < a.n; t += 1 + t % 7) {
    const int64_t cnt = std::min<int64_t>(1 + t % 7, a.n - t);
    append_rows(a, DA, {t}, {cnt}, ha, &totals, &err);
    CHECK(err.empty(), "append: %s", err.c_str());
  }
  store_info(ha, &info, &err);
  CHECK(info.appended_counts[DA.slots[0]] == a.n - 100, "appended %lld",
        (long long)info.appended_counts[DA.slots[0]]);
  CHECK(info.bytes_allocated == a.Hkv * (prefill_bytes_per_head(cfg, 100) +
                                         (2 * 2 * a.d + 4 + 4 * a.L) * (a.n - 100)),
        "append buffer: %lld bytes", (long long)info.bytes_allocated);
  store_free(ha, &err);
  // appends = false: the estimate counts prefills only, and appending is an error.
  StoreConfig noapp = cfg;
  noapp.appends = false;
  StoreEstimate est2;
  CHECK(estimate_store_bytes(noapp, &est2).empty() &&
            est2.per_slot_head == est2.prefill_per_slot_head &&
            est2.bytes == c.slots * c.Hkv * est2.prefill_per_slot_head,
        "estimate without appends");
  const int64_t hn = store_create(noapp, &err);
  err = store_prefill(hn, prefill_io(a, P, &mc));
  CHECK(err.empty(), "prefill: %s", err.c_str());
  append_rows(a, DA, {100}, {3}, hn, &totals, &err);
  CHECK(contains(err, "created without appends"), "append without appends: '%s'", err.c_str());
  store_info(hn, &info, &err);
  CHECK(info.appended_counts[DA.slots[0]] == 0, "no tokens appended");
  store_free(hn, &err);

  // The memory limit: PIGJAX_ENGINE_MAX_BYTES, else MemAvailable.
  int64_t limit = 0;
  std::string source;
  unsetenv("PIGJAX_ENGINE_MAX_BYTES");
  CHECK(store_memory_limit(&limit, &source).empty() && limit > 0 && contains(source, "MemAvailable"),
        "MemAvailable limit %lld '%s'", (long long)limit, source.c_str());
  const std::string exact = std::to_string(est.bytes);
  setenv("PIGJAX_ENGINE_MAX_BYTES", exact.c_str(), 1);
  int64_t hh = store_create(cfg, &err);
  CHECK(hh > 0, "a store that just fits: %s", err.c_str());
  store_free(hh, &err);
  const std::string less = std::to_string(est.bytes - 1);
  setenv("PIGJAX_ENGINE_MAX_BYTES", less.c_str(), 1);
  hh = store_create(cfg, &err);
  CHECK(hh == 0 && contains(err, "K=8, L=12 for 3 slots x 2 KV heads x 400 tokens (head_dim 16, bf16, appends) needs ~") &&
            contains(err, (exact + " bytes").c_str()) &&
            contains(err, ("set by PIGJAX_ENGINE_MAX_BYTES=" + less).c_str()),
        "over the limit: '%s'", err.c_str());
  const std::pair<const char*, int64_t> good[] = {
      {"2k", 2000}, {"1.5G", 1500000000}, {"3MB", 3000000}, {"12345", 12345}, {"unlimited", -1}};
  for (const auto& g : good) {
    setenv("PIGJAX_ENGINE_MAX_BYTES", g.first, 1);
    err = store_memory_limit(&limit, &source);
    CHECK(err.empty() && limit == g.second, "PIGJAX_ENGINE_MAX_BYTES=%s: %lld '%s'", g.first,
          (long long)limit, err.c_str());
  }
  for (const char* bad : {"abc", "-5", "0", "1X", "nan", "12 GB"}) {
    setenv("PIGJAX_ENGINE_MAX_BYTES", bad, 1);
    CHECK(!store_memory_limit(&limit, &source).empty(), "PIGJAX_ENGINE_MAX_BYTES=%s accepted", bad);
    CHECK(store_create(cfg, &err) == 0 && contains(err, "PIGJAX_ENGINE_MAX_BYTES must be"),
          "store_create with PIGJAX_ENGINE_MAX_BYTES=%s: '%s'", bad, err.c_str());
  }
  // Unlimited: even an absurd store is created (nothing is allocated before a prefill).
  StoreConfig huge = cfg;
  huge.slots = int64_t{1} << 24; huge.kv_heads = 4096; huge.capacity = (int64_t{1} << 31) - 1;
  huge.K = 16; huge.L = 4096; huge.head_dim = 65536;
  CHECK(estimate_store_bytes(huge, &est).empty() && est.bytes == std::numeric_limits<int64_t>::max(),
        "the estimate saturates: %lld", (long long)est.bytes);
  setenv("PIGJAX_ENGINE_MAX_BYTES", "unlimited", 1);
  hh = store_create(huge, &err);
  CHECK(hh > 0, "unlimited: %s", err.c_str());
  store_free(hh, &err);
  unsetenv("PIGJAX_ENGINE_MAX_BYTES");
  hh = store_create(huge, &err);
  CHECK(hh == 0 && contains(err, "needs ~") && contains(err, "this machine has available"),
        "MemAvailable: '%s'", err.c_str());
  CHECK(human_bytes(13.2e9) == "13.2 GB" && human_bytes(404970528) == "405 MB" &&
            human_bytes(12) == "12 B", "human_bytes");
}

// The ranked query (query_ranked.h): top = 1 is exact softmax over the stored middle; top = 0
// reads as MagicPIG on the sampling tables (values read = keys read); a small top reads more
// values than the sample alone; every SIMD level of the sketch kernel selects the same keys;
// unprefilled slots and bad settings.
static void test_ranked_query() {
  const Case cases[] = {
      {"ranked f32", StoreStorage::kF32, 4, 12, 2, 3, 33, 200, 3, 5, 4, 16, 21},
      {"ranked bf16 G9", StoreStorage::kBF16, 3, 8, 1, 9, 17, 90, 2, 3, 0, 0, 22},
      {"ranked K16", StoreStorage::kBF16, 16, 6, 2, 2, 16, 120, 2, 2, 4, 4, 23},
  };
  for (const Case& c : cases) {
    const Data D = make_data(c);
    const int64_t h = create(c, 1e-4, 0, c.L / 2), Hq = c.Hkv * c.G;
    std::vector<int32_t> mc;
    std::string err = store_prefill(h, prefill_io(c, D, &mc));
    CHECK(err.empty(), "%s prefill: %s", c.name, err.c_str());
    for (double top : {1.0, 0.0, 0.1}) {
      std::vector<int32_t> first_keys, first_values;
      for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
        if (set_simd_level(level) != level) continue;
        QueryOut Q;
        std::vector<int32_t> values(c.B * Hq, -7);
        RankedQueryArgs a;
        a.base = query_io(c, D, &Q);
        a.values_read.data = values.data(); a.values_read.dims = {c.B, Hq};
        a.rank_tables = c.L / 2; a.top = top; a.refine = 2.0;
        err = store_query_ranked(h, a);
        CHECK(err.empty(), "%s ranked: %s", c.name, err.c_str());
        if (first_keys.empty()) { first_keys = Q.sampled; first_values = values; }
        CHECK(Q.sampled == first_keys && values == first_values, "%s top %g: level %s reads other keys",
              c.name, top, simd_level_name(level));
        for (int64_t b = 0; b < c.B; ++b) {
          const int64_t n = mc[b];
          for (int64_t j = 0; j < Hq; ++j) {
            const int64_t r = b * Hq + j;
            CHECK(values[r] <= Q.sampled[r] && Q.sampled[r] <= n, "%s: reads %d/%d of %lld", c.name,
                  values[r], Q.sampled[r], (long long)n);
            if (top == 1.0) CHECK(values[r] == n && Q.sampled[r] == n, "%s: top 1 reads all", c.name);
            if (top == 0.0) CHECK(values[r] == Q.sampled[r], "%s: top 0 reads as MagicPIG", c.name);
            if (top == 1.0 && n > 0) {  // exact softmax over the middle (stored precision)
              const int64_t g = j / c.G;
              const float* qh = D.q.data() + r * c.d;
              std::vector<double> sc(n);
              double mx = -1e300, sum = 0;
              for (int64_t i = 0; i < n; ++i) {
                const float* k = D.keys.data() + ((b * c.Hkv + g) * c.n + c.sink + i) * c.d;
                double dot = 0;
                for (int64_t e = 0; e < c.d; ++e) dot += double(qh[e]) * stored(k[e], c.storage);
                sc[i] = dot / std::sqrt(double(c.d));
                mx = std::max(mx, sc[i]);
              }
              std::vector<double> o(c.d, 0.0);
              for (int64_t i = 0; i < n; ++i) {
                const double p = std::exp(sc[i] - mx);
                sum += p;
                const float* v = D.values.data() + ((b * c.Hkv + g) * c.n + c.sink + i) * c.d;
                for (int64_t e = 0; e < c.d; ++e) o[e] += p * stored(v[e], c.storage);
              }
              const double tol = c.storage == StoreStorage::kF32 ? 1e-4 : 2e-2;
              CHECK(std::fabs(Q.lse[r] - (mx + std::log(sum))) <= tol * std::max(1.0, std::fabs(mx)),
                    "%s: top 1 lse %g vs %g", c.name, Q.lse[r], mx + std::log(sum));
              for (int64_t e = 0; e < c.d; ++e)
                CHECK(std::fabs(Q.out[r * c.d + e] - o[e] / sum) <= tol, "%s: top 1 out", c.name);
            }
            if (n == 0) CHECK(std::isinf(Q.lse[r]) && Q.sampled[r] == 0, "%s: empty slot", c.name);
          }
        }
      }
    }
    store_free(h, &err);
  }
  // Bad settings: a message naming the setting, never a crash.
  set_simd_level(hardware_simd_level());
  const Case c = cases[0];
  const Data D = make_data(c);
  const int64_t h = create(c, 1e-4, 0, 4), Hq = c.Hkv * c.G;
  QueryOut Q;
  std::vector<int32_t> values(c.B * Hq);
  auto run = [&](int64_t rank_tables, double top, double refine, std::vector<int64_t> vdims) {
    RankedQueryArgs a;
    a.base = query_io(c, D, &Q);
    a.values_read.data = values.data(); a.values_read.dims = vdims;
    a.rank_tables = rank_tables; a.top = top; a.refine = refine;
    return store_query_ranked(h, a);
  };
  const std::vector<int64_t> ok = {c.B, Hq};
  CHECK(run(4, 0.1, 1.0, ok).empty(), "unprefilled ranked query is fine");
  CHECK(contains(run(11, 0.1, 1.0, ok), "rank_tables must be in [1, L - 2] = [1, 10]"), "rank_tables");
  CHECK(contains(run(0, 0.1, 1.0, ok), "rank_tables must be in"), "rank_tables 0");
  CHECK(contains(run(5, 0.1, 1.0, ok), "rank_tables must equal the store's sketch_tables = 4"), "sketch");
  CHECK(contains(run(4, -0.5, 1.0, ok), "top must be a fraction in [0, 1]"), "top");
  CHECK(contains(run(4, std::nan(""), 1.0, ok), "top must be"), "top nan");
  CHECK(contains(run(4, 0.1, 0.5, ok), "refine must be a number in [1, 1e6]"), "refine");
  CHECK(contains(run(4, 0.1, 1.0, {c.B}), "values_read must have shape"), "values_read shape");
  std::string err;
  store_free(h, &err);
  CHECK(contains(run(4, 0.1, 1.0, ok), "unknown"), "freed handle: %s", run(4, 0.1, 1.0, ok).c_str());
  // A store's sketch must leave two tables for sampling.
  StoreConfig bad;
  bad.slots = 1; bad.kv_heads = 1; bad.head_dim = 8; bad.capacity = 8; bad.K = 4; bad.L = 12;
  bad.sketch_tables = 11;
  CHECK(store_create(bad, &err) == 0 && contains(err, "sketch_tables must be in [0, L - 2] = [0, 10]"),
        "sketch_tables: %s", err.c_str());
}

// store_prefill_background: counts at once, tables built on the background thread (held here
// until released, so the order is deterministic); a query made meanwhile waits for the build and
// equals the blocking prefill's bit for bit; an invalid call never queues a build.
static void test_background_prefill() {
  const Case c = {"background", StoreStorage::kBF16, 4, 12, 2, 4, 128, 300, 2, 4, 4, 64, 11};
  const Data D = make_data(c);
  std::string err;
  const int64_t h1 = create(c);
  std::vector<int32_t> mc1;
  err = store_prefill(h1, prefill_io(c, D, &mc1));
  CHECK(err.empty(), "background: blocking prefill: %s", err.c_str());
  QueryOut want;
  err = store_query(h1, query_io(c, D, &want));
  CHECK(err.empty(), "background: blocking query: %s", err.c_str());

  struct Done { std::atomic<int> calls{0}; std::string message; } done;
  auto on_done = [](void* ctx, const char* message) {
    Done* d = static_cast<Done*>(ctx);
    d->message = message;
    d->calls.fetch_add(1);
  };
  const int64_t h2 = create(c);
  std::vector<int32_t> mc2;
  hold_background(true);
  err = store_prefill_background(h2, prefill_io(c, D, &mc2), on_done, &done);
  CHECK(err.empty(), "background prefill: %s", err.c_str());
  CHECK(mc2 == mc1, "background prefill: counts differ from the blocking prefill's");
  CHECK(store_pending_builds(h2, &err) == 1 && done.calls.load() == 0, "background: build not pending");
  QueryOut got;
  std::atomic<bool> queried{false};
  std::thread query([&] {
    const std::string e = store_query(h2, query_io(c, D, &got));
    CHECK(e.empty(), "background: query: %s", e.c_str());
    queried = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(!queried.load(), "background: the query ran before the build");
  hold_background(false);
  query.join();
  CHECK(done.calls.load() == 1 && done.message.empty(), "background: done called %d times, '%s'",
        done.calls.load(), done.message.c_str());
  CHECK(store_pending_builds(h2, &err) == 0, "background: still pending");
  CHECK(got.out == want.out && got.lse == want.lse && got.sampled == want.sampled,
        "background: query differs from the blocking prefill's");

  std::vector<int32_t> bad_slots = {0, int32_t(c.slots)};
  PrefillArgs bad = prefill_io(c, D, &mc2);
  bad.slots.data = bad_slots.data();
  err = store_prefill_background(h2, bad, on_done, &done);
  CHECK(contains(err, "out of range") && done.calls.load() == 1 && store_pending_builds(h2, &err) == 0,
        "background: invalid slots: '%s'", err.c_str());
  err = store_prefill_background(987654321, prefill_io(c, D, &mc2), on_done, &done);
  CHECK(contains(err, "unknown or freed store handle"), "background: unknown handle: '%s'", err.c_str());

  // Freeing waits for a queued build (which reads the caller's arrays until done).
  hold_background(true);
  err = store_prefill_background(h2, prefill_io(c, D, &mc2), on_done, &done);
  CHECK(err.empty(), "background prefill 2: %s", err.c_str());
  std::atomic<bool> freed{false};
  std::thread free_it([&] {
    std::string e;
    CHECK(store_free(h2, &e), "background: free: %s", e.c_str());
    freed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(!freed.load(), "background: free returned before the build");
  hold_background(false);
  free_it.join();
  CHECK(done.calls.load() == 2, "background: second build not done");
  CHECK(store_free(h1, &err), "free: %s", err.c_str());
}

int main() {
  test_bf16();
  // The query's parallel shapes: auto (default), per KV head, split within a KV head, split by
  // query heads (same results up to rounding).
  for (int split : {-1, 0, 1, 2}) {
    set_query_split(split);
    CHECK(get_query_split() == split, "set_query_split(%d)", split);
    test_against_reference();
    test_multi_block_and_reprefill();
    test_empty_and_unprefilled();
    test_many_tables();
    test_append();
    test_threads();
  }
  set_query_split(-1);
  test_table_layouts();
  test_memory();
  test_errors();
  test_ranked_query();
  test_background_prefill();
  if (g_failures) {
    std::fprintf(stderr, "test_lsh_store: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("test_lsh_store: all checks passed\n");
  return 0;
}
