// CPU feature detection, SIMD level selection and thread-count defaults.
// Pure C++: no XLA, no Python.
#pragma once

#include <cstdint>

namespace pigjax {

// Ordered: a higher level implies the lower ones are usable.
enum class SimdLevel : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
};

// What the CPU (and OS, via XGETBV as checked by libgcc) supports. Cached.
const CpuFeatures& cpu_features();

// Best level the hardware supports: avx512 needs avx512f+bw+vl, avx2 needs avx2+fma.
SimdLevel hardware_simd_level();

// Level the kernels dispatch to: hardware_simd_level(), lowered by the env var
// PIGJAX_SIMD=scalar|avx2|avx512 (read once; it can never raise the level above
// what the hardware has), or by set_simd_level().
SimdLevel simd_level();

// Forces a level (clamped to the hardware level); returns the effective level.
// Meant for tests and benchmarks. Thread-safe (atomic).
SimdLevel set_simd_level(SimdLevel requested);

const char* simd_level_name(SimdLevel level);
// Parses "scalar" / "avx2" / "avx512"; returns false on anything else.
bool parse_simd_level(const char* name, SimdLevel* out);

// Default worker count: PIGJAX_NUM_THREADS if it is a positive integer, else
// std::thread::hardware_concurrency() (at least 1).
int default_num_threads();

}  // namespace pigjax
