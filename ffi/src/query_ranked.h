// The LSH store's ranked query (docs/algorithm.md §2.9): the top of each query head's keys read
// exactly, ranked by an estimate of their scores from the codes of some of the store's tables,
// and MagicPIG's importance sample (query.h) over the other tables for the rest. Pure C++17: no
// XLA, no Python.
//
// query_ranked(slot, q[Hq,d], q_codes[Hq,L], rank_tables Lr, top f, refine r, sample_cap c);
// query head h uses
// KV head h / (Hq/Hkv); n = the slot's tokens (middle + appended, store.h); the store must keep
// the sketch of the ranking tables (StoreConfig::sketch_tables == Lr):
//   m = min(n, ceil(f n)),  r_n = min(n, max(m, ceil(r m)))
//   D_i = sum over l < Lr of popcount(codes_i[l] xor q_codes[h,l])   (of B = Lr K bits)
//   e_i = f32(|k_i|) * f32(cos(pi D_i / B))    estimated q.k_i / |q| (|k_i|: the stored norm);
//         the engine scans the packed sketch of each token (sketch.h), not the tables' buckets
//   R = the r_n tokens first in the order (e_i descending, i ascending)  keys scored
//   T = the m tokens of R first in the order (q.k_i descending, i ascending)  read exactly
//   S = { i : #{l >= Lr : codes_i[l] == q_codes[h,l]} >= 2 }           (sampling tables)
//   N = |S \ T|, c_n = max(1, ceil(c n)); if N > c_n, S' = the c_n tokens of S \ T first in the
//   order (thin_hash(i), i) ascending (a uniform c_n-subset: each kept with probability
//   a = c_n / N), else S' = S \ T and a = 1; thin_hash: query_rows.h, seeded by n and the
//   query's codes of the sampling tables
//   u_i = query.h's u with L - Lr tables;  score_i = q.k_i / sqrt(d) for i in T,
//   q.k_i / sqrt(d) + log(1 / (u_i + eps)) + log(1 / a) for i in S'
//   lse = logsumexp over T u S';  o = sum exp(score_i - lse) v_i
//   keys_read = |R u S'|,  values_read = |T u S'|;  T u S' empty: o = 0, lse = -inf.
// T depends on the ranking tables and the scores only, S on the sampling tables only: given T,
// i not in T is in S with probability u_i, so the S \ T sum stays an unbiased estimate of the
// sum over all tokens outside T; given S \ T, each of its tokens is in S' with probability a, so
// the 1/a weight keeps it so. f = 0 (and c = 1) gives MagicPIG's estimate over the sampling tables;
// f = 1 reads every token exactly (dense attention over the slot).
// Settings: 1 <= Lr <= L - 2, Lr == the store's sketch_tables, 0 <= f <= 1, 1 <= r <= 1e6, 0 < c <= 1
// (validate_ranked_query).
#pragma once

#include <cstdint>
#include <string>

#include "store_args.h"

namespace pigjax {

// Returns "" on success, else a message for an invalid argument. May throw on internal failures;
// callers catch. Thread-safe like store_query (takes the store's lock shared).
std::string store_query_ranked(int64_t handle, const RankedQueryArgs& args);

}  // namespace pigjax
