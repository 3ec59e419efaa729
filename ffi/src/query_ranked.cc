// The ranked query (query_ranked.h). One task per (row, query head): soft collision counts over
// the ranking tables (a uint16 count per token, added without branches), the r best tokens by a
// histogram of the counts (one pass, no sort), a partial selection of the m best scores among them, the
// sampling tables' >= 2-collision bitmap (collect_head, as MagicPIG's query), then one softmax
// over T and S \ T. Unlike query.cc it does not share key rows between the heads of a GQA group.
#include "query_ranked.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "query_rows.h"
#include "row_kernels.h"
#include "simd.h"
#include "store_layout.h"
#include "thread_pool.h"
#include "weight_table.h"

namespace pigjax {

namespace {

struct RankScratch {
  std::vector<uint16_t> count;     // [n] soft counts in the ranking tables (0 between heads)
  std::vector<int64_t> hist;       // tokens per count value
  std::vector<std::pair<float, int32_t>> scored;  // (q.k, token) of R
  std::vector<uint64_t> in_r, in_t, in_s;  // bitmaps over the tokens
  std::vector<std::pair<float, int32_t>> entries;  // (score, token) of T u S
  std::vector<uint16_t> qprep;
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
    if (count.size() < static_cast<size_t>(n)) count.resize(static_cast<size_t>(n), 0);
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

// Bucket offsets to probe around a query code: every mask of K bits with at most `radius` set
// bits, with the weight radius + 1 - popcount(mask) (a table whose code is h <= radius bits from
// the query's adds radius + 1 - h to a token's count).
std::vector<std::pair<int32_t, uint16_t>> probe_masks(int K, int radius) {
  std::vector<std::pair<int32_t, uint16_t>> masks;
  for (int32_t m = 0; m < (int32_t{1} << K); ++m) {
    const int h = __builtin_popcount(static_cast<uint32_t>(m));
    if (h <= radius) masks.push_back({m, static_cast<uint16_t>(radius + 1 - h)});
  }
  std::stable_sort(masks.begin(), masks.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return masks;
}

// Soft collision counts of the query codes qc in tables [0, Lr) (probe_masks), into rs.count
// (zero on entry). The walk is the ranked query's main cost (per table, one probe for each code
// within `radius` bits, 176 at K 10 / radius 3, each a bucket of about n / 2^K tokens), so a hit is
// one unconditional add. Direct blocks: the probed code's bucket; compact
// blocks: the entries of its bucket whose code is the probed one; appended tokens: their codes.
template <typename T>
void soft_counts(const HeadRows<T>& R, const int32_t* qc, int64_t Lr, int radius,
                 const std::vector<std::pair<int32_t, uint16_t>>& masks, RankScratch& rs) {
  uint16_t* cnt = rs.count.data();
  auto add = [cnt](int32_t i, uint16_t w) { cnt[i] = static_cast<uint16_t>(cnt[i] + w); };
  const size_t nblocks = R.layout == nullptr ? 0 : R.layout->blocks.size();
  for (size_t bk = 0; bk < nblocks; ++bk) {
    const BlockLayout& blk = R.layout->blocks[bk];
    const int64_t blen = blk.len, stride = (int64_t{1} << blk.bits) + 1;
    const int32_t* ob = R.off + blk.off;
    const int32_t base = static_cast<int32_t>(blk.start);
    for (int64_t l = 0; l < Lr; ++l) {
      for (const auto& [mask, w] : masks) {
        const int32_t code = qc[l] ^ mask;
        if (blk.bits == R.K) {
          const int32_t* o = ob + l * stride + code;
          const uint16_t* ids = R.idx + blk.idx + l * blen;
          for (int32_t t = o[0]; t < o[1]; ++t) add(base + ids[t], w);
        } else {
          const int32_t* o = ob + l * stride + (code >> (R.K - blk.bits));
          const uint16_t* pairs = R.idx + blk.idx + l * blen * 2;
          for (int32_t t = o[0]; t < o[1]; ++t)
            if (pairs[2 * t + 1] == code) add(base + pairs[2 * t], w);
        }
      }
    }
  }
  for (int64_t t = 0; t < R.na; ++t) {
    const int32_t* ac = R.acodes + t * R.L;
    uint32_t sum = 0;
    for (int64_t l = 0; l < Lr; ++l) {
      const int h = __builtin_popcount(static_cast<uint32_t>(ac[l] ^ qc[l]));
      sum += h <= radius ? static_cast<uint32_t>(radius + 1 - h) : 0u;
    }
    if (sum > 0) add(static_cast<int32_t>(R.n + t), static_cast<uint16_t>(sum));
  }
}

// R: the r first tokens in the order (soft count descending, index ascending), into rs.scored's
// second fields, in index order (tokens never counted are the count-0 class, so they follow in
// index order when fewer were counted). Counts are at most rank_tables x (radius + 1) <= 65535
// (validated), so a histogram finds the count c of the r-th token: every token above c is taken,
// then the first ones at c.
template <typename T>
void rank_by_collisions(const HeadRows<T>& R, const int32_t* qc, const RankedQueryArgs& a, int64_t r,
                        const std::vector<std::pair<int32_t, uint16_t>>& masks, RankScratch& rs) {
  soft_counts(R, qc, a.rank_tables, static_cast<int>(a.radius), masks, rs);
  const int64_t n = R.total();
  uint16_t* cnt = rs.count.data();
  const int64_t top_count = a.rank_tables * (a.radius + 1);
  rs.hist.assign(static_cast<size_t>(top_count + 1), 0);
  for (int64_t i = 0; i < n; ++i) ++rs.hist[cnt[i]];
  int64_t above = 0, c = top_count;
  for (; c > 0 && above + rs.hist[c] < r; --c) above += rs.hist[c];
  int64_t at_c = r - above;  // tokens to take with count exactly c
  for (int64_t i = 0; i < n; ++i) {
    const bool take = cnt[i] > c || (cnt[i] == c && at_c > 0);
    if (take) {
      at_c -= cnt[i] == c;
      rs.scored.push_back({0.0f, static_cast<int32_t>(i)});
    }
  }
  std::fill(cnt, cnt + n, uint16_t{0});
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
                 const RankedQueryArgs& a, const std::vector<std::pair<int32_t, uint16_t>>& masks,
                 const float* q, const int32_t* qc, const RowKernels<T>& kern,
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
  if (r > 0) rank_by_collisions(R, qc, a, r, masks, rs);
  for (auto& e : rs.scored) {
    kern.dot(R.key(e.second), qdot, d, &e.first);
    set_bit(rs.in_r, e.second);
  }
  auto higher = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
    return x.first != y.first ? x.first > y.first : x.second < y.second;
  };
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
  for (const auto& e : rs.entries) {
    const float p = std::exp(e.first - mx);
    sum += p;
    const T* val = R.val(e.second);
    kern.vsum(&val, &p, 1, d, acc.data());
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
  const std::vector<std::pair<int32_t, uint16_t>> masks = probe_masks(c.K, static_cast<int>(a.radius));
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    ranked_head<T>(c, wS, st.slots[io.slots.data[b]], h / G, a, masks, io.q.data + item * d,
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
