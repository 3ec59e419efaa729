// The LSH store's query: MagicPIG's sampled attention over one slot per row (docs/algorithm.md
// §2.4-2.6, CPU side). Pure C++17: no XLA, no Python.
//
// query(slot, q[Hq,d], q_codes[Hq,L], sample_cap c); query head h uses KV head h / (Hq/Hkv):
//   S = { i : #{l : codes_i[l] == q_codes[h,l]} >= 2 }; n = the slot's tokens
//   if |S| > c_n = max(1, ceil(c n)): S = its c_n tokens first in the order (thin_hash(i), i)
//   (query_rows.h: a uniform subset, each kept with probability a = c_n / |S|), else a = 1
//   cos_i = clamp(q.k_i / (|q||k_i|), -1, 1)  (0 if |q| == 0 or |k_i| == 0)
//   p = 1 - acos(cos_i)/pi;  P = p^K;  u = 1 - (1-P)^L - L P (1-P)^(L-1)  (double, clamp [0,1])
//   score_i = q.k_i / sqrt(d) + log(1 / (u + eps))
//   lse = logsumexp_i score_i + log(1 / a);  o = sum_i exp(score_i - lse) v_i;  sampled = |S|
//   Empty S: o = 0, lse = -inf, sampled = 0 (also for a slot that was never prefilled).
// i ranges over the slot's middle tokens and its appended ones (store.h). log(1 / (u + eps))
// comes from the store's LogWeightTable (weight_table.h).
#pragma once

#include <cstdint>
#include <string>

#include "store_args.h"

namespace pigjax {

// Returns "" on success, else a message for an invalid argument (validate_query, store_args.h).
// May throw (std::bad_alloc, ...) on internal failures; callers catch. Thread-safe: takes the
// store's lock shared, so queries run concurrently with each other, not with prefill / append.
std::string store_query(int64_t handle, const QueryArgs& args);

// The query's parallel shape (see store_query): -1 = auto, 0 = one task per (row, KV head),
// 1 = split within a KV head (phases merged by log-sum-exp), 2 = tasks per (row, KV head, part of
// its query heads). Auto takes 0 when it gives >= 2 x threads tasks, else 2 when that does, else 1.
// Process-wide; for tests and benchmarks. Results differ between modes by float rounding only.
void set_query_split(int mode);
int get_query_split();

}  // namespace pigjax
