// In-process A/B of store_query: an older engine against this tree's, both linked into one binary
// (bench_query_ab.sh builds it), alternating query by query (which goes first alternates too) over
// a cycle of 64 different query sets, so both see the same machine load and cache state. Random
// Gaussian keys/values/queries, SimHash codes, K = 10, L = 150 unless given.
//   bench_query_ab [B Hkv Hq d n reps threads layout K L]  (default: 1 8 32 128 131072 30 2 -1 10 150)
// layout: the new engine's table layout (-1 auto, 0 direct, 1 compact; store.h set_table_layout).
// Prints both medians, the median of the per-pair time ratios new/old, and how many pairs' outputs
// (out, lse, sampled) were not bit-identical.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "simhash.h"
#include "thread_pool.h"
extern "C" {
void old_threads(int); void new_threads(int);
void old_table_layout(int); void new_table_layout(int);
long long old_create_prefill(long long, long long, long long, long long, int, int, const float*, const float*, const int*);
long long new_create_prefill(long long, long long, long long, long long, int, int, const float*, const float*, const int*);
int old_query(long long, long long, long long, long long, int, const float*, const int*, float*, float*, int*);
int new_query(long long, long long, long long, long long, int, const float*, const int*, float*, float*, int*);
}
int main(int argc, char** argv) {
  long long B = 1, Hkv = 8, Hq = 32, d = 128, n = 131072, reps = 30, threads = 2, layout = -1;
  long long K_ = 10, L_ = 150;
  long long* args[] = {&B, &Hkv, &Hq, &d, &n, &reps, &threads, &layout, &K_, &L_};
  for (int i = 1; i < argc && i <= 10; ++i) *args[i - 1] = std::atoll(argv[i]);
  const int K = int(K_), L = int(L_), NQ = 64;
  new_table_layout(int(layout));
  pigjax::set_num_threads(int(threads));
  old_threads(int(threads)); new_threads(int(threads));
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> keys(B * Hkv * n * d), vals(keys.size()), q(NQ * B * Hq * d), proj(d * K * L);
  for (auto& x : keys) x = nd(rng);
  for (auto& x : vals) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  for (auto& x : proj) x = nd(rng);
  std::vector<int> codes(B * Hkv * n * L), qcodes(NQ * B * Hq * L);
  const long long rows = B * Hkv * n, chunk = 4096;
  pigjax::parallel_for((rows + chunk - 1) / chunk, [&](int64_t c) {
    const long long r0 = c * chunk, m = std::min(chunk, rows - r0);
    pigjax::simhash_codes(keys.data() + r0 * d, m, d, proj.data(), K, L, codes.data() + r0 * L);
  });
  pigjax::simhash_codes(q.data(), NQ * B * Hq, d, proj.data(), K, L, qcodes.data());
  const long long ho = old_create_prefill(B, Hkv, d, n, K, L, keys.data(), vals.data(), codes.data());
  const long long hn = new_create_prefill(B, Hkv, d, n, K, L, keys.data(), vals.data(), codes.data());
  if (!ho || !hn) { std::fprintf(stderr, "create/prefill failed\n"); return 1; }
  std::vector<float> oo(B * Hq * d), on(oo.size()), lo(B * Hq), ln(B * Hq);
  std::vector<int> so(B * Hq), sn(B * Hq);
  std::vector<double> to, tn, ratio;
  long long mismatches = 0;
  for (long long r = 0; r < reps + 4; ++r) {
    const int iq = int(r % NQ);
    const float* qq = q.data() + iq * B * Hq * d;
    const int* qc = qcodes.data() + iq * B * Hq * L;
    const bool old_first = r % 2 == 0;
    double t_old = 0, t_new = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const bool run_old = (pass == 0) == old_first;
      const auto t0 = std::chrono::steady_clock::now();
      if (run_old) old_query(ho, B, Hq, d, L, qq, qc, oo.data(), lo.data(), so.data());
      else new_query(hn, B, Hq, d, L, qq, qc, on.data(), ln.data(), sn.data());
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      (run_old ? t_old : t_new) = ms;
    }
    mismatches += std::memcmp(oo.data(), on.data(), oo.size() * 4) != 0 || so != sn ||
                  std::memcmp(lo.data(), ln.data(), lo.size() * 4) != 0;
    if (r >= 4) { to.push_back(t_old); tn.push_back(t_new); ratio.push_back(t_new / t_old); }
  }
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  std::printf("B%lld Hkv%lld Hq%lld d%lld n%lld K%d L%d threads%lld layout%lld: old median %.4f ms, new median %.4f ms, "
              "median new/old %.3f (%lld pairs), output mismatches %lld\n", B, Hkv, Hq, d, n, K, L, threads, layout,
              med(to), med(tn), med(ratio), (long long)to.size(), mismatches);
  return 0;
}
