// SIMD support shared by every kernel file: CPU feature detection, the runtime dispatch level
// (PIGJAX_SIMD / set_simd_level) and the function-level ISA target macros. Kept in one place so
// simhash.cc and row_kernels.cc dispatch the same way and compile their AVX2 / AVX-512 paths
// with the same target attributes (no file is compiled with ISA flags; see BUILD.md, "SIMD
// policy"). Pure C++: no XLA, no Python.
#pragma once

#include <cstdint>

// PIGJAX_X86: 1 where the AVX2 / AVX-512 paths are built (x86), else 0 (scalar only).
// PIGJAX_TARGET_*: put on a function to compile it for that ISA; call it only when
// simd_level() (or cpu_features(), for AVX512_BF16 / VPOPCNTDQ) says the CPU has it. A file that uses
// intrinsics includes <immintrin.h> itself under `#if PIGJAX_X86`.
#if defined(__x86_64__) || defined(__i386__)
#define PIGJAX_X86 1
#define PIGJAX_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PIGJAX_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#define PIGJAX_TARGET_AVX512BF16 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define PIGJAX_TARGET_AVX512VPOPCNT \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))
#else
#define PIGJAX_X86 0
#endif

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
  bool avx512_vpopcntdq = false;
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

}  // namespace pigjax
