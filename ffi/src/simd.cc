// See simd.h.
#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace pigjax {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512_vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
#endif
  return f;
}

SimdLevel initial_level() {
  SimdLevel level = hardware_simd_level();
  const char* env = std::getenv("PIGJAX_SIMD");
  if (env != nullptr && env[0] != '\0') {
    SimdLevel requested;
    if (parse_simd_level(env, &requested)) {
      level = std::min(level, requested);
    } else {
      std::fprintf(stderr,
                   "pigjax: ignoring PIGJAX_SIMD=%s (expected scalar, avx2 or avx512)\n", env);
    }
  }
  return level;
}

std::atomic<int>& level_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

SimdLevel hardware_simd_level() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl) return SimdLevel::kAvx512;
  if (f.avx2 && f.fma) return SimdLevel::kAvx2;
  return SimdLevel::kScalar;
}

SimdLevel simd_level() {
  return static_cast<SimdLevel>(level_slot().load(std::memory_order_relaxed));
}

SimdLevel set_simd_level(SimdLevel requested) {
  SimdLevel level = std::min(requested, hardware_simd_level());
  level_slot().store(static_cast<int>(level), std::memory_order_relaxed);
  return level;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kScalar: break;
  }
  return "scalar";
}

bool parse_simd_level(const char* name, SimdLevel* out) {
  if (name == nullptr) return false;
  if (std::strcmp(name, "scalar") == 0) { *out = SimdLevel::kScalar; return true; }
  if (std::strcmp(name, "avx2") == 0) { *out = SimdLevel::kAvx2; return true; }
  if (std::strcmp(name, "avx512") == 0) { *out = SimdLevel::kAvx512; return true; }
  return false;
}

}  // namespace pigjax
