// Matrix products with few rows, for decode steps: out[M, N] = x[M, K] . W, where W is the weight
// in its stored layout, [K, N] (a Flax kernel) or [N, K] (a tied embedding used as the output
// projection). M is the batch (times the step's tokens), small, so the product is bound by reading
// W once: the kernel streams W in address order, splits its columns (or rows) over the engine's
// thread pool, and keeps x's rows and the output tile in registers/L1. W is f32 or bf16 (uint16_t,
// widened in registers, which halves the bytes read); x, out and the accumulation are f32.
// docs/algorithm.md §4, "Decode projections on the CPU". Pure C++17: no XLA, no Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

struct SmallMatmulShape {
  int64_t M = 0, K = 0, N = 0;
  bool w_nk = false;  // W is [N, K] (out = x . W^T) instead of [K, N]
};

// "" when x [M, K], W ([K, N] or, with w_nk, [N, K]) and out [M, N] fit together, else what is
// wrong. Fills *shape.
std::string plan_small_matmul(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                              const std::vector<int64_t>& out, bool w_nk, SmallMatmulShape* shape);

// Runs it. W = float or uint16_t (bf16). Every output element is written (K = 0 gives zeros).
template <typename W>
void small_matmul(const SmallMatmulShape& shape, const float* x, const W* w, float* out);

}  // namespace pigjax
