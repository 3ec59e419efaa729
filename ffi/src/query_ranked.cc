// The ranked query (query_ranked.h). One task per (row, query head): score estimates from the
// sketch of the ranking tables (one linear pass of popcounts, sketch.h), the r best of them by a
// partial selection above a sampled bound, a partial selection of the m best exact scores among
// them, the sampling tables' >= 2-collision bitmap (collect_head, as MagicPIG's query), then one
// softmax over T and S \ T. Unlike query.cc it does not share key rows between the heads of a
// GQA group.
#include "query_ranked.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "query_rows.h"
#include "row_kernels.h"
#include "simd.h"
#include "sketch.h"
#include "store_layout.h"
#include "thread_pool.h"
#include "weight_table.h"

namespace pigjax {

namespace {

struct RankScratch {
  std::vector<float> est;          // [n] score estimates from the sketch
  std::vector<float> sample;       // strided sample of est (the selection's threshold)
  std::vector<std::pair<float, int32_t>> scored;  // (estimate, then q.k; token) of R
  std::vector<uint64_t> in_r, in_t, in_s;  // bitmaps over the tokens
  std::vector<std::pair<float, int32_t>> entries;  // (score, token) of T u S
  std::vector<uint16_t> qprep;
  std::vector<uint64_t> qsketch;
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
    if (est.size() < static_cast<size_t>(n)) est.resize(static_cast<size_t>(n));
    for (auto* b : {&in_r, &in_t, &in_s})
      if (b->size() < words) b->resize(words);
  }
};

RankScratch& rank_scratch() {
  thread_local RankScratch s;
  return s;
}

bool bit(const std::vector<uint64_t>& b, int64_t i) { return b[i >> 6] >> (i & 63) & 1u; }
void set_bit(std::vector<uint64_t>& b, int64_t i) { b[i >> 6] |= uint64_t{1} << (i & 63); }

// (value descending, token ascending): the order of R and of T.
bool higher(const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
  return x.first != y.first ? x.first > y.first : x.second < y.second;
}

// cos(pi D / B) for D in [0, B], B = the sketch's bits: a token whose sketch differs from the
// query's in D of B bits is at an estimated angle of pi D / B (each bit is a random hyperplane).
std::vector<float> cos_table(int64_t bits) {
  std::vector<float> t(static_cast<size_t>(bits + 1));
  for (int64_t D = 0; D <= bits; ++D) t[static_cast<size_t>(D)] = static_cast<float>(std::cos(M_PI * D / bits));
  return t;
}

// R: the r first tokens in the order (estimate descending, index ascending), into rs.scored.
// Estimates: est_i = |k_i| cos(pi D_i / B) (middle tokens: the sketch kernel; appended tokens:
// their stored codes). The r-th estimate is bracketed from a strided sample of 1024, so only
// tokens above that bound are sorted (all of them if too few are).
template <typename T>
void rank_by_sketch(const HeadRows<T>& R, const int32_t* qc, int64_t Lr, int64_t r, const float* cos_tab,
                    SketchScoreFn score, RankScratch& rs) {
  const int64_t n = R.total();
  float* est = rs.est.data();
  rs.qsketch.resize(static_cast<size_t>(R.sketch_words));
  pack_sketch(qc, Lr, R.K, rs.qsketch.data(), 1);
  score(R.sketch, R.n, R.sketch_words, rs.qsketch.data(), R.norms, cos_tab, est);
  for (int64_t t = 0; t < R.na; ++t) {
    const int32_t* ac = R.acodes + t * R.L;
    uint32_t dist = 0;
    for (int64_t l = 0; l < Lr; ++l) dist += static_cast<uint32_t>(__builtin_popcount(static_cast<uint32_t>(ac[l] ^ qc[l])));
    est[R.n + t] = R.anorms[t] * cos_tab[dist];
  }
  float bound = -std::numeric_limits<float>::infinity();
  constexpr int64_t kSample = 1024;
  if (n > 4 * kSample && r < n / 4) {  // else sorting everything is as cheap
    rs.sample.resize(kSample);
    for (int64_t j = 0; j < kSample; ++j) rs.sample[static_cast<size_t>(j)] = est[j * n / kSample];
    // A rank in the sample well past r's expected one (r kSample / n, plus 4 standard deviations).
    const double expect = static_cast<double>(r) * kSample / static_cast<double>(n);
    const int64_t at = std::min<int64_t>(kSample - 1, static_cast<int64_t>(expect + 4 * std::sqrt(expect) + 8));
    std::nth_element(rs.sample.begin(), rs.sample.begin() + at, rs.sample.end(), std::greater<float>());
    bound = rs.sample[static_cast<size_t>(at)];
  }
  for (int pass = 0; pass < 2; ++pass) {
    rs.scored.clear();
    for (int64_t i = 0; i < n; ++i)
      if (est[i] >= bound) rs.scored.push_back({est[i], static_cast<int32_t>(i)});
    if (static_cast<int64_t>(rs.scored.size()) >= r) break;
    bound = -std::numeric_limits<float>::infinity();  // the sample misjudged: take every token
  }
  if (static_cast<int64_t>(rs.scored.size()) > r) {
    std::nth_element(rs.scored.begin(), rs.scored.begin() + r, rs.scored.end(), higher);
    rs.scored.resize(static_cast<size_t>(r));
  }
}

void write_empty_head(int64_t d, float* out, float* lse, int32_t* keys, int32_t* values) {
  std::fill(out, out + d, 0.0f);
  *lse = -std::numeric_limits<float>::infinity();
  *keys = 0;
  *values = 0;
}

// One (row, query head): q[d], codes qc[L] -> out[d], lse, keys and values read (query_ranked.h).
template <typename T>
void ranked_head(const StoreConfig& c, const LogWeightTable& wS, const SlotData& s, int64_t kvh,
                 const RankedQueryArgs& a, const float* cos_tab, SketchScoreFn score, const float* q, const int32_t* qc, const RowKernels<T>& kern,
                 float* out, float* lse, int32_t* keys_read, int32_t* values_read) {
  const HeadRows<T> R = head_rows<T>(c, s, kvh);
  const int64_t n = R.total(), d = R.d;
  if (n == 0) return write_empty_head(d, out, lse, keys_read, values_read);
  const int64_t m = std::min<int64_t>(n, static_cast<int64_t>(std::ceil(a.top * static_cast<double>(n))));
  const int64_t r = std::min<int64_t>(n, std::max<int64_t>(m, static_cast<int64_t>(std::ceil(a.refine * m))));
  QueryScratch& qs = query_scratch();
  RankScratch& rs = rank_scratch();
  qs.ensure(n);
  rs.ensure(n);
  const size_t words = static_cast<size_t>((n + 63) / 64);
  std::fill(rs.in_r.begin(), rs.in_r.begin() + words, 0);
  std::fill(rs.in_t.begin(), rs.in_t.begin() + words, 0);
  const float* qdot = q;
  if (kern.prep != nullptr) {
    rs.qprep.resize(static_cast<size_t>(2 * d) + 2);
    kern.prep(q, 1, d, rs.qprep.data());
    qdot = reinterpret_cast<const float*>(rs.qprep.data());
  }
  // R, then T: the m best scores of R.
  rs.scored.clear();
  if (r > 0) rank_by_sketch(R, qc, a.rank_tables, r, cos_tab, score, rs);
  for (auto& e : rs.scored) {
    kern.dot(R.key(e.second), qdot, d, &e.first);
    set_bit(rs.in_r, e.second);
  }
  if (static_cast<int64_t>(rs.scored.size()) > m)
    std::nth_element(rs.scored.begin(), rs.scored.begin() + m, rs.scored.end(), higher);
  // S from the sampling tables.
  collect_head(R, qc, a.rank_tables, c.L, qs, rs.in_s.data());
  // Entries: T with weight 1, S \ T with MagicPIG's weight for L - Lr tables.
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  double qnorm;
  query_norms(q, 1, d, &qnorm);
  rs.entries.clear();
  for (int64_t j = 0; j < m; ++j) {
    set_bit(rs.in_t, rs.scored[j].second);
    rs.entries.push_back({static_cast<float>(rs.scored[j].first * inv_sqrt_d), rs.scored[j].second});
  }
  int64_t keys = static_cast<int64_t>(rs.scored.size());
  for (size_t w = 0; w < words; ++w) {
    for (uint64_t b = rs.in_s[w]; b; b &= b - 1) {
      const int32_t i = static_cast<int32_t>(w * 64 + __builtin_ctzll(b));
      keys += !bit(rs.in_r, i);
      if (bit(rs.in_t, i)) continue;
      float dot;
      kern.dot(R.key(i), qdot, d, &dot);
      rs.entries.push_back({static_cast<float>(dot * inv_sqrt_d + wS(dot, qnorm, R.norm(i))), i});
    }
  }
  *keys_read = static_cast<int32_t>(keys);
  *values_read = static_cast<int32_t>(rs.entries.size());
  if (rs.entries.empty()) return write_empty_head(d, out, lse, keys_read, values_read);
  float mx = -std::numeric_limits<float>::infinity();
  for (const auto& e : rs.entries) mx = std::max(mx, e.first);
  std::vector<float>& acc = qs.acc;
  acc.assign(static_cast<size_t>(d), 0.0f);
  double sum = 0;
  // Values in batches of 256 rows per vsum call (its accumulators stay in registers).
  constexpr size_t kBatch = 256;
  const T* rows[kBatch];
  float probs[kBatch];
  for (size_t j0 = 0; j0 < rs.entries.size(); j0 += kBatch) {
    const size_t cnt = std::min(kBatch, rs.entries.size() - j0);
    for (size_t j = 0; j < cnt; ++j) {
      probs[j] = std::exp(rs.entries[j0 + j].first - mx);
      sum += probs[j];
      rows[j] = R.val(rs.entries[j0 + j].second);
    }
    kern.vsum(rows, probs, static_cast<int64_t>(cnt), d, acc.data());
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / sum);
  *lse = static_cast<float>(mx + std::log(sum));
}

template <typename T>
void run_ranked(Store& st, const RankedQueryArgs& a) {
  const StoreConfig& c = st.cfg;
  const QueryArgs& io = a.base;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  const int64_t B = io.slots.dims[0], Hq = io.q.dims[1], G = Hq / Hkv;
  const LogWeightTable& wS = st.weights_for_tables(static_cast<int>(L - a.rank_tables));
  const RowKernels<T>& kern = row_kernels<T>(simd_level());
  const std::vector<float> cos_tab = cos_table(a.rank_tables * c.K);
  const SketchScoreFn score = sketch_score_kernel(simd_level());
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    ranked_head<T>(c, wS, st.slots[io.slots.data[b]], h / G, a, cos_tab.data(), score, io.q.data + item * d,
                   io.q_codes.data + item * L, kern, io.out.data + item * d, io.lse.data + item,
                   io.sampled.data + item, a.values_read.data + item);
  });
}

}  // namespace

std::string store_query_ranked(int64_t handle, const RankedQueryArgs& a) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err);
  if (!st) return err;
  err = validate_ranked_query(st->cfg, a);
  if (!err.empty()) return err;
  std::shared_lock<std::shared_mutex> lock(st->mu);
  if (st->cfg.storage == StoreStorage::kBF16) run_ranked<uint16_t>(*st, a);
  else run_ranked<float>(*st, a);
  return "";
}

}  // namespace pigjax
