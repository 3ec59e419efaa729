// SimHash kernel time without the Python / XLA around it: the legacy single-thread kernel and
// the blocked kernel on 1 and on N threads, alternating call by call on the same buffers (so
// the output is already paged in, unlike a fresh NumPy / XLA result). Medians; GFLOP/s counts
// 2 * rows * d * K * L. Build and run (no Python needed):
//   g++ -O3 -std=c++17 -Iffi/src ffi/tests/bench_simhash.cc ffi/src/simhash.cc ffi/src/simd.cc
//       ffi/src/thread_pool.cc -pthread -o /tmp/bench_simhash      (one line)
//   /tmp/bench_simhash [rows=1048576] [d=128] [repeats=5] [K=10] [L=150]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "simd.h"
#include "simhash.h"
#include "thread_pool.h"

using namespace pigjax;

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 1048576;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 128;
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 5;
  const int K = argc > 4 ? std::atoi(argv[4]) : 10;
  const int64_t L = argc > 5 ? std::atoll(argv[5]) : 150;
  const int64_t M = K * L;
  const int threads = default_num_threads();
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d), proj(d * M);
  for (float& v : x) v = normal(gen);
  for (float& v : proj) v = normal(gen);
  std::vector<int32_t> legacy_codes(n * L), codes(n * L);
  const SimdLevel level = simd_level();
  struct Method { const char* name; int threads; bool legacy; std::vector<double> t; };
  std::vector<Method> methods = {{"legacy 1t", 1, true, {}}, {"blocked 1t", 1, false, {}},
                                 {"blocked Nt", threads, false, {}}};
  for (int rep = 0; rep <= repeats; ++rep)  // round 0 warms up
    for (Method& m : methods) {
      set_num_threads(m.threads);
      const auto t0 = std::chrono::steady_clock::now();
      if (m.legacy)
        simhash_codes_legacy_at(level, x.data(), n, d, proj.data(), K, L, legacy_codes.data());
      else
        simhash_codes_at(level, x.data(), n, d, proj.data(), K, L, codes.data());
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (rep > 0) m.t.push_back(s);
      if (!m.legacy && codes != legacy_codes) {
        std::fprintf(stderr, "%s: codes differ from the legacy kernel\n", m.name);
        return 1;
      }
    }
  std::printf("rows %lld, d %lld, K %d, L %lld, simd %s, N = %d threads\n", (long long)n,
              (long long)d, K, (long long)L, simd_level_name(level), threads);
  double legacy_s = 0;
  for (Method& m : methods) {
    std::sort(m.t.begin(), m.t.end());
    const double s = m.t[m.t.size() / 2];
    if (m.legacy) legacy_s = s;
    std::printf("  %-11s %8.1f ms  %6.1f GFLOP/s  %5.2fx legacy\n", m.name, s * 1e3,
                2.0 * n * d * M / s / 1e9, legacy_s / s);
  }
  return 0;
}
