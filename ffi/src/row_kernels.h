// Per-ISA kernels over stored K/V rows (T = float, or uint16_t for bf16 storage): the dot
// product of one key row with one query head (score pass) and one head's probability-weighted
// sum of value rows (value pass), in scalar, AVX2+FMA and AVX-512 versions (plus an AVX512_BF16
// score pass for bf16 keys). The query (query.cc) picks one set per call with row_kernels() and
// calls them through function pointers. Pure C++17: no XLA, no Python.
#pragma once

#include <cstdint>

#include "simd.h"

namespace pigjax {

// Per level: the dot product of one key row with one query head, and vsum.
template <typename T>
struct RowKernels {
  using DotFn = void (*)(const T*, const float*, int64_t, float*);
  using VsumFn = void (*)(const T* const*, const float*, int, int64_t, float*);
  // Optional: rewrites a chunk's query rows q[gc][d] into buf (2 * gc * d uint16, head j at
  // float offset j * d like the f32 rows); dot then receives that buffer.
  using PrepFn = void (*)(const float*, int, int64_t, uint16_t*);
  // out[j * n + i] = row i . query head j for n contiguous rows (stride d) and gc <= 8 heads (q as
  // dot receives it): each row is loaded once for all heads.
  using ScoresFn = void (*)(const T*, int64_t, const float*, int, int64_t, float*);
  // x[i] <- exp(x[i] - m) for i < n; returns their sum. Vectorised at the avx2 / avx512 levels
  // (a Cephes-style polynomial, within 2 ulp of std::exp; arguments below -87.3 give ~1e-38, not 0).
  using ExpSumFn = float (*)(float*, int64_t, float);
  DotFn dot = nullptr;
  VsumFn vsum = nullptr;
  PrepFn prep = nullptr;
  ScoresFn scores = nullptr;
  ExpSumFn exp_sum = nullptr;
};

// The kernels for `level` (<= hardware_simd_level()). For uint16_t (bf16) rows at the avx512
// level, the score pass uses AVX512_BF16 when cpu_features() has it. T = float or uint16_t.
template <typename T>
const RowKernels<T>& row_kernels(SimdLevel level);

}  // namespace pigjax
