// The LSH store's ranked query (docs/algorithm.md §2.9): the top of each query head's keys read
// exactly, ranked by collision counts in some of the store's tables, and MagicPIG's importance
// sample (query.h) over the other tables for the rest. Pure C++17: no XLA, no Python.
//
// query_ranked(slot, q[Hq,d], q_codes[Hq,L], rank_tables Lr, radius rho, top f, refine r); query
// head h uses KV head h / (Hq/Hkv); n = the slot's tokens (middle + appended, store.h):
//   m = min(n, ceil(f n)),  r_n = min(n, max(m, ceil(r m)))
//   h_il = popcount(codes_i[l] xor q_codes[h,l])  (bits by which table l's codes differ)
//   c_i = sum over l < Lr of max(0, rho + 1 - h_il)    soft collision count (ranking tables;
//         rho = 0: the number of collisions). The engine finds it by probing, in each ranking
//         table, the buckets of every code within rho bits of the query's, not by a scan.
//   R = the r_n tokens first in the order (c_i descending, i ascending)  keys scored
//   T = the m tokens of R first in the order (q.k_i descending, i ascending)  read exactly
//   S = { i : #{l >= Lr : codes_i[l] == q_codes[h,l]} >= 2 }           (sampling tables)
//   u_i = query.h's u with L - Lr tables;  score_i = q.k_i / sqrt(d) for i in T,
//   q.k_i / sqrt(d) + log(1 / (u_i + eps)) for i in S \ T
//   lse = logsumexp over T u S;  o = sum exp(score_i - lse) v_i
//   keys_read = |R u S|,  values_read = |T u S|;  T u S empty: o = 0, lse = -inf.
// T depends on the ranking tables and the scores only, S on the sampling tables only: given T,
// i not in T is in S with probability u_i, so the S \ T sum stays an unbiased estimate of the
// sum over all tokens outside T. f = 0 gives MagicPIG's estimate over the sampling tables;
// f = 1 reads every token exactly (dense attention over the slot).
// Settings: 1 <= Lr <= L - 2, 0 <= rho <= min(3, K), Lr (rho + 1) <= 65535, 0 <= f <= 1,
// 1 <= r <= 1e6 (validate_ranked_query).
#pragma once

#include <cstdint>
#include <string>

#include "store_args.h"

namespace pigjax {

// Returns "" on success, else a message for an invalid argument. May throw on internal failures;
// callers catch. Thread-safe like store_query (takes the store's lock shared).
std::string store_query_ranked(int64_t handle, const RankedQueryArgs& args);

}  // namespace pigjax
