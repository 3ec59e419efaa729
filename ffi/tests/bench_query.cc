// Microbenchmark of store_query (no Python): random Gaussian keys/values/queries, SimHash codes.
//   bench_query [B Hkv Hq d n reps threads K L layout]   (default: 1 8 32 128 131072 30 2 10 150 -1)
// layout: the table layout (set_table_layout: -1 auto, 0 direct, 1 compact).
// Prints the median query time, |S|/n, a checksum of the outputs and the caller's CPU time.
// RANKED=1 times the ranked query instead (query_ranked.h: a store with the sketch of 50 tables,
// top 0.018, refine 1: the RankedLSH defaults).
// Repeats one query, so rows stay cached as far as the L3 holds them. Build (no Python needed):
//   g++ -O3 -std=c++17 -Iffi/src \
//       ffi/src/{simd,thread_pool,simhash,row_kernels,weight_table,store_args,store,query,query_ranked,sketch}.cc \
//       ffi/tests/bench_query.cc -lpthread -o bench_query
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "query.h"
#include "query_ranked.h"
#include "simhash.h"
#include "store.h"
#include "store_args.h"
#include "thread_pool.h"

using namespace pigjax;

int main(int argc, char** argv) {
  int64_t B = 1, Hkv = 8, Hq = 32, d = 128, n = 131072, reps = 30, threads = 2, K = 10, L = 150,
          layout = -1;
  int64_t* args[] = {&B, &Hkv, &Hq, &d, &n, &reps, &threads, &K, &L, &layout};
  for (int i = 1; i < argc && i <= 10; ++i) *args[i - 1] = std::atoll(argv[i]);
  set_table_layout(static_cast<int>(layout));
  set_num_threads(static_cast<int>(threads));
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> keys(B * Hkv * n * d), vals(keys.size()), q(B * Hq * d), proj(d * K * L);
  for (auto& x : keys) x = nd(rng);
  for (auto& x : vals) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  for (auto& x : proj) x = nd(rng);
  std::vector<int32_t> codes(B * Hkv * n * L), qcodes(B * Hq * L);
  const int64_t rows = B * Hkv * n, chunk = 4096;
  parallel_for((rows + chunk - 1) / chunk, [&](int64_t c) {
    const int64_t r0 = c * chunk, m = std::min(chunk, rows - r0);
    simhash_codes(keys.data() + r0 * d, m, d, proj.data(), int(K), L, codes.data() + r0 * L);
  });
  simhash_codes(q.data(), B * Hq, d, proj.data(), int(K), L, qcodes.data());
  const char* ranked = std::getenv("RANKED");
  StoreConfig cfg;
  cfg.sketch_tables = ranked ? 50 : 0;
  cfg.slots = B; cfg.kv_heads = Hkv; cfg.head_dim = d; cfg.capacity = n; cfg.K = int(K); cfg.L = int(L);
  std::string err;
  const int64_t h = store_create(cfg, &err);
  if (h == 0) { std::fprintf(stderr, "%s\n", err.c_str()); return 1; }
  std::vector<int32_t> slots(B), lengths(B, static_cast<int32_t>(n)), mc(B);
  for (int64_t b = 0; b < B; ++b) slots[b] = static_cast<int32_t>(b);
  PrefillArgs pio;
  pio.slots.data = slots.data(); pio.slots.dims = {B};
  pio.keys.data = keys.data(); pio.keys.dims = {B, Hkv, n, d};
  pio.values.data = vals.data(); pio.values.dims = {B, Hkv, n, d};
  pio.codes.data = codes.data(); pio.codes.dims = {B, Hkv, n, L};
  pio.lengths.data = lengths.data(); pio.lengths.dims = {B};
  pio.middle_counts.data = mc.data(); pio.middle_counts.dims = {B};
  err = store_prefill(h, pio);
  if (!err.empty()) { std::fprintf(stderr, "%s\n", err.c_str()); return 1; }
  std::vector<float> out(B * Hq * d), lse(B * Hq);
  std::vector<int32_t> sampled(B * Hq);
  QueryArgs qio;
  qio.slots.data = slots.data(); qio.slots.dims = {B};
  qio.q.data = q.data(); qio.q.dims = {B, Hq, d};
  qio.q_codes.data = qcodes.data(); qio.q_codes.dims = {B, Hq, L};
  qio.out.data = out.data(); qio.out.dims = {B, Hq, d};
  qio.lse.data = lse.data(); qio.lse.dims = {B, Hq};
  qio.sampled.data = sampled.data(); qio.sampled.dims = {B, Hq};
  std::vector<int32_t> values_read(B * Hq);
  RankedQueryArgs rio;
  rio.base = qio;
  rio.values_read.data = values_read.data(); rio.values_read.dims = {B, Hq};
  rio.rank_tables = 50; rio.top = 0.018; rio.refine = 1.0;
  std::vector<double> t, tc;
  auto cpu_ms = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  };
  for (int64_t r = 0; r < reps + 2; ++r) {
    const double c0 = cpu_ms();
    const auto t0 = std::chrono::steady_clock::now();
    err = ranked ? store_query_ranked(h, rio) : store_query(h, qio);
    const auto t1 = std::chrono::steady_clock::now();
    const double c1 = cpu_ms();
    if (r >= 2) tc.push_back(c1 - c0);
    if (!err.empty()) { std::fprintf(stderr, "%s\n", err.c_str()); return 1; }
    if (r >= 2) t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  std::sort(tc.begin(), tc.end());
  double s = 0, cs = 0;
  for (int32_t x : sampled) s += x;
  for (float x : out) cs += x;
  for (float x : lse) cs += x;
  std::printf("median %.3f ms  min %.3f  |S|/n %.3f%%  checksum %.6f  caller-cpu median %.3f ms\n",
              t[t.size() / 2], t[0], 100.0 * s / (B * Hq) / n, cs, tc[tc.size() / 2]);
  store_free(h, &err);
  return 0;
}
