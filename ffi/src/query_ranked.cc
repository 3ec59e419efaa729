// The ranked query (query_ranked.h) in three parallel passes:
//  1. per (row, query head): m, r, the query's sketch and a bound below the r-th best estimate,
//     from the estimates of 1024 tokens in evenly spaced blocks (rows of > 4096 tokens with
//     r < n / 4; else no bound);
//  2. per (row, KV head, chunk of 8192 tokens): one scan of the sketches (sketch.h) for all the
//     group's query heads, keeping the tokens whose estimate reaches their head's bound; the
//     sketches are read once per group, not once per head;
//  3. per (row, query head): R = the r best candidates (rows without a bound, or whose bound let
//     too few or too many through, scan alone here with room for every token), their exact
//     scores, T = the m best of them, the sampling tables' >= 2-collision bitmap (collect_head,
//     as MagicPIG's query), S \ T thinned to the sample cap, then one softmax over T and the
//     kept sample. Unlike query.cc, key rows are not shared between the heads of a GQA group.
// The candidates of 2 hold every token at or above the bound, and when there are at least r of
// them they hold the r best: the selection is exactly query_ranked.h's whatever the sample.
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

constexpr int64_t kSample = 1024;       // tokens whose estimates place the bound
constexpr int64_t kScanChunk = 8192;    // tokens per scan task (a multiple of kSketchBlock)

// What pass 1 decides for one (row, query head).
struct HeadPlan {
  int64_t n = 0, m = 0, r = 0;
  bool bounded = false;                 // pass 2 scans for this head
  float bound = -std::numeric_limits<float>::infinity();
  int64_t chunk_cap = 0;                // candidates kept per chunk of pass 2
};

struct CallScratch {
  std::vector<uint64_t> qsk;                        // [B][Hq][W] query sketches
  std::vector<HeadPlan> plan;                       // [B][Hq]
  std::vector<Candidates> cand;                     // [B][Hq][chunk]
  std::vector<std::pair<float, int32_t>> items;     // the candidates' storage
  std::vector<float> bounds;                        // [B][Hq]
};

struct RankScratch {
  std::vector<float> sample;
  std::vector<std::pair<float, int32_t>> scored;  // (estimate, then q.k; token) of R
  std::vector<uint64_t> in_r, in_t, in_s;  // bitmaps over the tokens
  std::vector<std::pair<float, int32_t>> entries;  // (score, token) of T u S'
  std::vector<uint16_t> qprep;
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
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

// cos(pi D / B) for D in [0, B], B = the sketch's bits (sketch.h).
std::vector<float> cos_table(int64_t bits) {
  std::vector<float> t(static_cast<size_t>(bits + 1));
  for (int64_t D = 0; D <= bits; ++D) t[static_cast<size_t>(D)] = static_cast<float>(std::cos(M_PI * D / bits));
  return t;
}

// Pass 1 for one (row, query head): sizes, and for a long row a bound at a rank of the sample
// (kSample tokens: evenly spaced blocks of 8) well past r's expected one (r kSample / n plus 4
// standard deviations plus 8).
template <typename T>
HeadPlan plan_head(const HeadRows<T>& R, const RankedQueryArgs& a, const uint64_t* qsk, const float* cos_tab,
                   SketchScanFn scan, RankScratch& rs) {
  HeadPlan p;
  p.n = R.total();
  p.m = std::min<int64_t>(p.n, static_cast<int64_t>(std::ceil(a.top * static_cast<double>(p.n))));
  p.r = std::min<int64_t>(p.n, std::max<int64_t>(p.m, static_cast<int64_t>(std::ceil(a.refine * p.m))));
  if (R.n <= 4 * kSample || p.r == 0 || p.r >= p.n / 4) return p;
  rs.scored.resize(kSample);
  Candidates sample{rs.scored.data(), kSample, 0, false};
  const float none = -std::numeric_limits<float>::infinity();
  const int64_t blocks = R.n / kSketchBlock, picks = kSample / kSketchBlock;
  for (int64_t j = 0; j < picks; ++j) {
    const int64_t b = j * blocks / picks * kSketchBlock;
    scan(R.sketch, b, b + kSketchBlock, R.sketch_words, qsk, 1, R.norms, cos_tab, &none, &sample);
  }
  rs.sample.resize(kSample);
  for (int64_t j = 0; j < kSample; ++j) rs.sample[static_cast<size_t>(j)] = rs.scored[static_cast<size_t>(j)].first;
  const double expect = static_cast<double>(p.r) * kSample / static_cast<double>(p.n);
  const int64_t at = std::min<int64_t>(kSample - 1, static_cast<int64_t>(expect + 4 * std::sqrt(expect) + 8));
  std::nth_element(rs.sample.begin(), rs.sample.begin() + at, rs.sample.end(), std::greater<float>());
  p.bounded = true;
  p.bound = rs.sample[static_cast<size_t>(at)];
  p.chunk_cap = 2 * (at + 1) * kScanChunk / kSample + 64;  // twice the sample's share, plus slack
  return p;
}

// R: the r first tokens in the order (estimate descending, index ascending), into rs.scored.
// From the chunks' candidates of pass 2 when they suffice, else from a scan of every token.
template <typename T>
void select_r(const HeadRows<T>& R, const HeadPlan& p, const Candidates* chunks, int64_t nchunks,
              const int32_t* qc, int64_t Lr, const uint64_t* qsk, const float* cos_tab, SketchScanFn scan,
              RankScratch& rs) {
  rs.scored.clear();
  bool complete = p.bounded;
  for (int64_t c = 0; complete && c < nchunks; ++c) {
    complete = !chunks[c].overflow;
    rs.scored.insert(rs.scored.end(), chunks[c].items, chunks[c].items + chunks[c].count);
  }
  float bound = p.bound;
  if (!complete) {  // no bound, or a chunk overflowed: every middle token
    bound = -std::numeric_limits<float>::infinity();
    rs.scored.resize(static_cast<size_t>(R.n));
    Candidates all{rs.scored.data(), R.n, 0, false};
    scan(R.sketch, 0, R.n, R.sketch_words, qsk, 1, R.norms, cos_tab, &bound, &all);
    rs.scored.resize(static_cast<size_t>(all.count));
  }
  for (int64_t t = 0; t < R.na; ++t) {  // appended tokens: their stored codes
    const int32_t* ac = R.acodes + t * R.L;
    uint32_t dist = 0;
    for (int64_t l = 0; l < Lr; ++l) dist += static_cast<uint32_t>(__builtin_popcount(static_cast<uint32_t>(ac[l] ^ qc[l])));
    const float e = R.anorms[t] * cos_tab[dist];
    if (e >= bound) rs.scored.push_back({e, static_cast<int32_t>(R.n + t)});
  }
  if (static_cast<int64_t>(rs.scored.size()) < p.r && bound > -std::numeric_limits<float>::infinity()) {
    HeadPlan all = p;  // the sample misjudged: too few reached the bound
    all.bounded = false;
    return select_r(R, all, nullptr, 0, qc, Lr, qsk, cos_tab, scan, rs);
  }
  if (static_cast<int64_t>(rs.scored.size()) > p.r) {
    std::nth_element(rs.scored.begin(), rs.scored.begin() + p.r, rs.scored.end(), higher);
    rs.scored.resize(static_cast<size_t>(p.r));
  }
}

void write_empty_head(int64_t d, float* out, float* lse, int32_t* keys, int32_t* values) {
  std::fill(out, out + d, 0.0f);
  *lse = -std::numeric_limits<float>::infinity();
  *keys = 0;
  *values = 0;
}

// Pass 3 for one (row, query head): q[d], codes qc[L] -> out[d], lse, keys and values read.
template <typename T>
void ranked_head(const HeadRows<T>& R, const LogWeightTable& wS, const RankedQueryArgs& a, const HeadPlan& p,
                 const Candidates* chunks, int64_t nchunks, const uint64_t* qsk, const float* cos_tab,
                 SketchScanFn scan, const float* q, const int32_t* qc, int64_t L, const RowKernels<T>& kern,
                 float* out, float* lse, int32_t* keys_read, int32_t* values_read) {
  const int64_t n = p.n, m = p.m, d = R.d;
  if (n == 0) return write_empty_head(d, out, lse, keys_read, values_read);
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
  // Rows are read in scattered order: each loop prefetches kAhead rows ahead (as query.cc).
  constexpr size_t kAhead = kPrefetchAhead;
  // R, then T: the m best scores of R.
  rs.scored.clear();
  if (p.r > 0) select_r(R, p, chunks, nchunks, qc, a.rank_tables, qsk, cos_tab, scan, rs);
  for (size_t j = 0; j < std::min(kAhead, rs.scored.size()); ++j) prefetch_row(R.key(rs.scored[j].second), d);
  for (size_t j = 0; j < rs.scored.size(); ++j) {
    if (j + kAhead < rs.scored.size()) prefetch_row(R.key(rs.scored[j + kAhead].second), d);
    auto& e = rs.scored[j];
    kern.dot(R.key(e.second), qdot, d, &e.first);
    set_bit(rs.in_r, e.second);
  }
  if (static_cast<int64_t>(rs.scored.size()) > m)
    std::nth_element(rs.scored.begin(), rs.scored.begin() + m, rs.scored.end(), higher);
  // Entries: T with weight 1, then S' (S \ T from the sampling tables, thinned to the sample
  // cap) with MagicPIG's weight for L - Lr tables times 1/a.
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  double qnorm;
  query_norms(q, 1, d, &qnorm);
  rs.entries.clear();
  for (int64_t j = 0; j < m; ++j) {
    set_bit(rs.in_t, rs.scored[j].second);
    rs.entries.push_back({static_cast<float>(rs.scored[j].first * inv_sqrt_d), rs.scored[j].second});
  }
  collect_head(R, qc, a.rank_tables, L, qs, rs.in_s.data());
  int64_t rest = 0;
  for (size_t w = 0; w < words; ++w) rest += __builtin_popcountll(rs.in_s[w] &= ~rs.in_t[w]);
  const double log_inv_a = thin_sample(rs.in_s.data(), words, &rest, sample_cap_keys(a.base.sample_cap, n),
                                       thin_seed(n, qc, a.rank_tables, L), qs.order);
  int64_t keys = static_cast<int64_t>(rs.scored.size());
  const size_t first_s = rs.entries.size();
  for (size_t w = 0; w < words; ++w) {
    for (uint64_t b = rs.in_s[w]; b; b &= b - 1) {
      const int32_t i = static_cast<int32_t>(w * 64 + __builtin_ctzll(b));
      keys += !bit(rs.in_r, i);
      rs.entries.push_back({0.0f, i});
    }
  }
  for (size_t j = first_s; j < std::min(first_s + kAhead, rs.entries.size()); ++j) prefetch_row(R.key(rs.entries[j].second), d);
  for (size_t j = first_s; j < rs.entries.size(); ++j) {
    if (j + kAhead < rs.entries.size()) prefetch_row(R.key(rs.entries[j + kAhead].second), d);
    const int32_t i = rs.entries[j].second;
    float dot;
    kern.dot(R.key(i), qdot, d, &dot);
    rs.entries[j].first = static_cast<float>(dot * inv_sqrt_d + wS(dot, qnorm, R.norm(i)) + log_inv_a);
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
      rows[j] = R.val(rs.entries[j0 + j].second);
      prefetch_row(rows[j], d);
      probs[j] = std::exp(rs.entries[j0 + j].first - mx);
      sum += probs[j];
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
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L, W = sketch_words(a.rank_tables, c.K);
  const int64_t B = io.slots.dims[0], Hq = io.q.dims[1], G = Hq / Hkv;
  const LogWeightTable& wS = st.weights_for_tables(static_cast<int>(L - a.rank_tables));
  const RowKernels<T>& kern = row_kernels<T>(simd_level());
  const std::vector<float> cos_tab = cos_table(a.rank_tables * c.K);
  const SketchScanFn scan = sketch_scan_kernel(simd_level());
  auto rows = [&](int64_t b, int64_t kvh) { return head_rows<T>(c, st.slots[io.slots.data[b]], kvh); };
  // Per-call arrays, kept by the calling thread between calls (the pool's threads fill them
  // while it waits in parallel_for).
  thread_local CallScratch call;
  std::vector<uint64_t>& qsk = call.qsk;
  std::vector<HeadPlan>& plan = call.plan;
  std::vector<float>& bounds = call.bounds;  // plan's bounds side by side, as the scan reads them
  qsk.resize(static_cast<size_t>(B * Hq * W));
  plan.assign(static_cast<size_t>(B * Hq), HeadPlan{});
  bounds.resize(static_cast<size_t>(B * Hq));
  // Pass 1: sizes, query sketches, bounds.
  parallel_for(B * Hq, [&](int64_t item) {
    uint64_t* qs = qsk.data() + item * W;
    pack_sketch(io.q_codes.data + item * L, a.rank_tables, c.K, qs, 1);
    plan[static_cast<size_t>(item)] = plan_head(rows(item / Hq, item % Hq / G), a, qs, cos_tab.data(), scan,
                                                  rank_scratch());
    bounds[static_cast<size_t>(item)] = plan[static_cast<size_t>(item)].bound;
  });
  // Pass 2: chunks of the bounded rows' middle tokens, each scanned once for its group's heads.
  int64_t nchunks = 0;
  for (int64_t b = 0; b < B; ++b) nchunks = std::max(nchunks, (rows(b, 0).n + kScanChunk - 1) / kScanChunk);
  std::vector<Candidates>& cand = call.cand;  // [b][h][chunk]
  cand.assign(static_cast<size_t>(B * Hq * nchunks), Candidates{});
  int64_t room = 0;
  for (int64_t item = 0; item < B * Hq; ++item) {
    if (!plan[static_cast<size_t>(item)].bounded) continue;
    for (int64_t k = 0; k < nchunks; ++k) cand[static_cast<size_t>(item * nchunks + k)].cap = plan[static_cast<size_t>(item)].chunk_cap;
    room += plan[static_cast<size_t>(item)].chunk_cap * nchunks;
  }
  std::vector<std::pair<float, int32_t>>& items = call.items;
  items.resize(static_cast<size_t>(room));
  room = 0;
  for (Candidates& x : cand) { x.items = items.data() + room; room += x.cap; }
  parallel_for(B * Hkv * nchunks, [&](int64_t task) {
    const int64_t b = task / (Hkv * nchunks), kvh = task / nchunks % Hkv, k = task % nchunks;
    const int64_t h0 = b * Hq + kvh * G;
    if (!plan[static_cast<size_t>(h0)].bounded) return;  // the same for every head of a row
    const HeadRows<T> R = rows(b, kvh);
    const int64_t begin = k * kScanChunk, end = std::min(R.n, begin + kScanChunk);
    if (begin >= end) return;
    // The group's candidate lists of this chunk sit nchunks apart: gather them.
    Candidates local[kGroupChunk];
    for (int64_t g0 = 0; g0 < G; g0 += kGroupChunk) {
      const int64_t gc = std::min<int64_t>(kGroupChunk, G - g0);
      for (int64_t g = 0; g < gc; ++g) local[g] = cand[static_cast<size_t>((h0 + g0 + g) * nchunks + k)];
      scan(R.sketch, begin, end, R.sketch_words, qsk.data() + (h0 + g0) * W, gc, R.norms, cos_tab.data(),
           bounds.data() + h0 + g0, local);
      for (int64_t g = 0; g < gc; ++g) cand[static_cast<size_t>((h0 + g0 + g) * nchunks + k)] = local[g];
    }
  });
  // Pass 3: per query head.
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    ranked_head<T>(rows(b, h / G), wS, a, plan[static_cast<size_t>(item)], cand.data() + item * nchunks, nchunks,
                   qsk.data() + item * W, cos_tab.data(), scan, io.q.data + item * d, io.q_codes.data + item * L, L,
                   kern, io.out.data + item * d, io.lse.data + item, io.sampled.data + item,
                   a.values_read.data + item);
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
