// SimHash bucket codes (MagicPIG, docs/algorithm.md §2.3). Pure C++: no XLA, no Python.
//
// For row r of x [n, d] and table l (0 <= l < L), with proj [d, K*L] row-major:
//   bit j   = dot(x[r, :], proj[:, l*K + j]) > 0      (j = 0..K-1, LSB first)
//   code    = sum_j bit_j << j                        (0 <= code < 2^K)
// A dot product that is exactly 0 (e.g. an all-zero row) or NaN gives a 0 bit.
//
// Dot products are float32, accumulated over d in index order starting from 0. The scalar
// path uses separate multiply and add; the AVX2/AVX-512 paths use FMA, so a dot product can
// differ in the last ulp between SIMD levels and a bit can flip only when the dot product is
// within rounding error of 0. Random inputs essentially never hit this. At a given level the
// result does not depend on the thread count or the blocking, and equals the legacy kernel's.
//
// The kernel is a blocked matrix product on the engine's thread pool (thread_pool.h): tiles of
// rows x column panels accumulate in registers and are compared with 0 into sign bits (no
// float [n, K*L] intermediate); rows are split over the pool in chunks. See BUILD.md, "SimHash".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "simd.h"

namespace pigjax {

constexpr int kMaxSimhashBits = 16;

// Preconditions (not checked here; the FFI handler validates): n >= 0, d >= 0,
// 1 <= K <= kMaxSimhashBits, L >= 0; x has n*d floats, proj d*K*L, codes n*L.
// Dispatches on simd_level(); splits rows over the thread pool when the call is large enough.
void simhash_codes(const float* x, int64_t n, int64_t d, const float* proj, int K, int64_t L,
                   int32_t* codes);

// Same, at an explicit level. The level must be <= hardware_simd_level().
void simhash_codes_at(SimdLevel level, const float* x, int64_t n, int64_t d, const float* proj,
                      int K, int64_t L, int32_t* codes);

// The single-thread kernels as of commit 4ac4b4a (4-row blocks, proj read in place, scalar
// bit packing), for benchmarks and tests. Same contract and, at a given level, the same codes.
void simhash_codes_legacy_at(SimdLevel level, const float* x, int64_t n, int64_t d,
                             const float* proj, int K, int64_t L, int32_t* codes);

// Shape plan for the batched/broadcast form used by the FFI handler:
//   x     [*B_x, *R, d]     proj [*B_p, d, K*L]     codes [*B, *R, L]
// where the leading len(B_p) dims of x and codes are "batch" dims (B_x[i] and B_p[i]
// each 1 or B[i]; this is what jax.vmap with vmap_method="expand_dims" produces)
// and R are plain row dims shared by x and codes. With proj of rank 2 there are no
// batch dims and this is simhash_codes over prod(R) rows.
struct SimhashPlan {
  int64_t d = 0;
  int64_t L = 0;
  int K = 0;
  int64_t rows = 0;                      // prod(R): rows per batch element
  std::vector<int64_t> batch_shape;      // B
  std::vector<int64_t> x_batch_stride;   // element strides of x per batch dim (0 = broadcast)
  std::vector<int64_t> proj_batch_stride;
  int64_t num_batches = 1;               // prod(B)
};

// Validates shapes and fills *plan. Returns "" on success, else a readable message.
std::string plan_simhash(const std::vector<int64_t>& x_dims, const std::vector<int64_t>& proj_dims,
                         const std::vector<int64_t>& out_dims, int64_t K, SimhashPlan* plan);

// Runs a validated plan at simd_level(), on the thread pool: tasks are (batch element, chunk
// of rows); a proj shared by all batch elements is packed once per call.
void simhash_codes_planned(const SimhashPlan& plan, const float* x, const float* proj,
                           int32_t* codes);

}  // namespace pigjax
