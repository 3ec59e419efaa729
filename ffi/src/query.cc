// The LSH store's query (sampled attention over a slot's middle and appended tokens, read-only):
// candidates by collision counting over the hash tables, their union per GQA group, and the
// softmax-weighted sum with MagicPIG's importance weights; optionally split within a KV head over
// threads (query_split). See query.h for the semantics and BUILD.md ("Query inner loop",
// "Batch-1 parallelism") for the design and measurements.
#include "query.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <shared_mutex>
#include <vector>

#include "row_kernels.h"
#include "simd.h"
#include "store_layout.h"
#include "thread_pool.h"
#include "weight_table.h"

namespace pigjax {

namespace {

constexpr int kGroupChunk = 8;  // query heads of one GQA group handled together

// Per-thread query scratch. Collision counting uses two bitmaps (>= 1 and >= 2 collisions,
// n/4 bytes together: 32 KiB at n = 128K, i.e. L1/L2-resident), cleared per query head by
// memset; this saturating count is exact for any K and L since only ">= 2" matters. Each query
// head of a chunk (up to 8) keeps its ">= 2" bitmap (n/8 bytes per head); the union is listed
// in token order from the OR of the chunk's bitmaps, a word at a time.
struct QueryScratch {
  std::vector<uint64_t> seen1;         // bit i: token i collided >= 1 times
  std::vector<uint64_t> heads;         // [kGroupChunk][words]: bit i: >= 2 collisions
  struct Range { const uint16_t* ids; int32_t beg, end, base; };
  std::vector<Range> ranges;           // bucket ranges of one query head in direct blocks
  // A bucket range of a compact block ((index, code) pairs): entries with code `code` collide.
  struct CodedRange { const uint16_t* pairs; int32_t beg, end, base, code; };
  std::vector<CodedRange> coded;       // bucket ranges of one query head in compact blocks
  struct Entry { int32_t i; uint32_t mask; };
  std::vector<Entry> uni;              // union of the chunk's candidate sets
  std::vector<float> acc;              // [kGroupChunk][d]
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
    if (seen1.size() < words) seen1.resize(words);
    if (heads.size() < kGroupChunk * words) heads.resize(kGroupChunk * words);
  }
};

// Appends to out the union of the gc candidate bitmaps bm[jj] over words [w0, w1), in token
// order, with bit jj of an entry's mask set iff head jj samples it. out needs room for the
// sum of the bitmaps' counts; returns the number of entries written.
size_t bitmap_union(const uint64_t* const* bm, int gc, int64_t w0, int64_t w1,
                    QueryScratch::Entry* out) {
  size_t nu = 0;
  for (int64_t w = w0; w < w1; ++w) {
    uint64_t b[kGroupChunk], any = 0;
    for (int jj = 0; jj < gc; ++jj) { b[jj] = bm[jj][w]; any |= b[jj]; }
    for (; any; any &= any - 1) {
      const int bit = __builtin_ctzll(any);
      uint32_t m = 0;
      for (int jj = 0; jj < gc; ++jj) m |= static_cast<uint32_t>(b[jj] >> bit & 1u) << jj;
      out[nu++] = {static_cast<int32_t>(w * 64 + bit), m};
    }
  }
  return nu;
}

QueryScratch& query_scratch() {
  thread_local QueryScratch s;
  return s;
}

template <typename T>
const T* stored_keys(const SlotData& s);
template <>
const float* stored_keys<float>(const SlotData& s) { return s.k32.data(); }
template <>
const uint16_t* stored_keys<uint16_t>(const SlotData& s) { return s.k16.data(); }
template <typename T>
const T* stored_values(const SlotData& s);
template <>
const float* stored_values<float>(const SlotData& s) { return s.v32.data(); }
template <>
const uint16_t* stored_values<uint16_t>(const SlotData& s) { return s.v16.data(); }

template <typename T>
const T* pick(const std::vector<uint16_t>& h, const std::vector<float>& f);
template <>
const float* pick<float>(const std::vector<uint16_t>&, const std::vector<float>& f) { return f.data(); }
template <>
const uint16_t* pick<uint16_t>(const std::vector<uint16_t>& h, const std::vector<float>&) { return h.data(); }

// The rows of one (slot, KV head): middle token i < n from the tables' arrays, appended token
// n + t from the append buffer.
template <typename T>
struct HeadRows {
  int64_t d = 0, L = 0, n = 0, na = 0;
  int K = 0;
  const TableLayout* layout = nullptr;
  const int32_t* off = nullptr;   // per block [L][2^bits + 1] at block.off
  const uint16_t* idx = nullptr;  // per block [L][len] or [L][len][2] at block.idx
  const T* keys = nullptr; const T* vals = nullptr; const float* norms = nullptr;
  const T* akeys = nullptr; const T* avals = nullptr; const float* anorms = nullptr;
  const int32_t* acodes = nullptr;  // [na][L]
  int64_t total() const { return n + na; }
  const T* key(int64_t i) const { return i < n ? keys + i * d : akeys + (i - n) * d; }
  const T* val(int64_t i) const { return i < n ? vals + i * d : avals + (i - n) * d; }
  float norm(int64_t i) const { return *norm_ptr(i); }
  const float* norm_ptr(int64_t i) const { return i < n ? norms + i : anorms + (i - n); }
};

template <typename T>
HeadRows<T> head_rows(const StoreConfig& c, const SlotData& s, int64_t kvh) {
  HeadRows<T> R;
  R.d = c.head_dim; R.L = c.L; R.K = c.K;
  if (!s.prefilled) return R;
  R.n = s.n; R.na = s.na;
  R.layout = &s.layout;
  R.off = s.offsets.data() + kvh * s.layout.offsets_per_head;
  R.idx = s.indices.data() + kvh * s.layout.entries_per_head;
  R.keys = stored_keys<T>(s) + kvh * R.n * R.d;
  R.vals = stored_values<T>(s) + kvh * R.n * R.d;
  R.norms = s.norms.data() + kvh * R.n;
  if (R.na > 0) {
    const SlotData::Appended& a = s.app[static_cast<size_t>(kvh)];
    R.akeys = pick<T>(a.k16, a.k32);
    R.avals = pick<T>(a.v16, a.v32);
    R.anorms = a.norms.data();
    R.acodes = a.codes.data();
  }
  return R;
}

// Candidates of one query head (codes qc[L]): sets bit i of seen2 (words = ceil(total / 64),
// cleared here) for every token i with >= 2 collisions; returns their count.
template <typename T>
int64_t collect_head(const HeadRows<T>& R, const int32_t* qc, QueryScratch& sc, uint64_t* seen2) {
  const int64_t L = R.L;
  const size_t words = static_cast<size_t>((R.total() + 63) / 64);
  uint64_t* seen1 = sc.seen1.data();
  std::memset(seen1, 0, words * sizeof(uint64_t));
  std::memset(seen2, 0, words * sizeof(uint64_t));
  // Bucket ranges first (independent loads), then count with the next ranges prefetched.
  const size_t nblocks = R.layout == nullptr ? 0 : R.layout->blocks.size();
  sc.ranges.resize(L * nblocks);
  sc.coded.resize(L * nblocks);
  QueryScratch::Range* rg = sc.ranges.data();
  QueryScratch::CodedRange* cr = sc.coded.data();
  int64_t nr = 0, nc = 0;
  for (size_t bk = 0; bk < nblocks; ++bk) {
    const BlockLayout& blk = R.layout->blocks[bk];
    const int64_t blen = blk.len, stride = (int64_t{1} << blk.bits) + 1;
    const uint16_t* ids_block = R.idx + blk.idx;
    const int32_t* ob = R.off + blk.off;
    const int32_t base = static_cast<int32_t>(blk.start);
    if (blk.bits == R.K) {  // direct: the bucket is the code
      for (int64_t l = 0; l < L; ++l) {
        const int32_t* o = ob + l * stride + qc[l];
        rg[nr++] = {ids_block + l * blen, o[0], o[1], base};
      }
    } else {  // compact: the bucket is the code's top bits; entries are filtered by code
      const int shift = R.K - blk.bits;
      for (int64_t l = 0; l < L; ++l) {
        const int32_t* o = ob + l * stride + (qc[l] >> shift);
        cr[nc++] = {ids_block + l * blen * 2, o[0], o[1], base, qc[l]};
      }
    }
  }
  constexpr int64_t kAhead = 8;
  for (int64_t r = 0; r < std::min(nr, kAhead); ++r) __builtin_prefetch(rg[r].ids + rg[r].beg);
  for (int64_t r = 0; r < nr; ++r) {
    if (r + kAhead < nr) {
      const QueryScratch::Range& a = rg[r + kAhead];
      __builtin_prefetch(a.ids + a.beg);
      if (a.end - a.beg > 32) __builtin_prefetch(a.ids + a.beg + 32);
    }
    const uint16_t* ids = rg[r].ids;
    const int32_t base = rg[r].base;
    // Branch-free: a token's second hit sets its seen2 bit (random hits mispredict branches).
    for (int32_t t = rg[r].beg, e = rg[r].end; t < e; ++t) {
      const int32_t i = base + ids[t];
      const uint64_t b = uint64_t{1} << (i & 63);
      seen2[i >> 6] |= seen1[i >> 6] & b;
      seen1[i >> 6] |= b;
    }
  }
  // Compact blocks: a bucket holds 1-2 entries; those with the query's code collide.
  for (int64_t r = 0; r < nc; ++r) {
    if (r + kAhead < nc) __builtin_prefetch(cr[r + kAhead].pairs + 2 * cr[r + kAhead].beg);
    const uint16_t* pairs = cr[r].pairs;
    const int32_t base = cr[r].base, code = cr[r].code;
    for (int32_t t = cr[r].beg, e = cr[r].end; t < e; ++t) {
      const int32_t i = base + pairs[2 * t];
      const uint64_t b = uint64_t{pairs[2 * t + 1] == code} << (i & 63);
      seen2[i >> 6] |= seen1[i >> 6] & b;
      seen1[i >> 6] |= b;
    }
  }
  // Appended tokens: a linear scan comparing all L codes.
  for (int64_t t = 0; t < R.na; ++t) {
    const int32_t* ac = R.acodes + t * L;
    int32_t hits = 0;
    for (int64_t l = 0; l < L; ++l) hits += ac[l] == qc[l];
    const int64_t i = R.n + t;
    seen2[i >> 6] |= uint64_t{hits >= 2} << (i & 63);
  }
  int64_t count = 0;
  for (size_t w = 0; w < words; ++w) count += __builtin_popcountll(seen2[w]);
  return count;
}

// Partial softmax of gc <= kGroupChunk query heads (qg[gc][d], norms qnorm) over the entries
// uni[0..nu) (bit jj of an entry's mask: head jj samples it): per head the max score mx, the
// sum of exp(score - mx) and acc[jj][d] = sum of exp(score - mx) v (acc zeroed by the caller).
// Each key and value row is read once for the whole chunk; dot products and value sums are
// done only for the heads that sample the row (about one per row at K = 10, L = 150). Batches
// of kBatch entries: a key pass (scores), an online-softmax rescale of a head's acc and sum if
// the batch raised its max, then a value pass. Each pass prefetches its rows kAhead entries
// ahead (one array per pass keeps the misses in flight; interleaving K and V rows was slower).
template <typename T>
void softmax_part(const HeadRows<T>& R, const LogWeightTable& weights, const RowKernels<T>& kern,
                  const QueryScratch::Entry* uni, size_t nu, const float* qg, const double* qnorm,
                  int gc, float* mx, double* sums, float* acc) {
  constexpr size_t kBatch = 256, kAhead = 12;
  const int64_t d = R.d;
  const float* qdot = qg;  // what the dot kernel reads: the f32 rows or the prepared buffer
  if (kern.prep != nullptr) {
    thread_local std::vector<uint16_t> qprep;
    qprep.resize(static_cast<size_t>(2 * gc * d) + 2);  // never empty, so data() is non-null
    kern.prep(qg, gc, d, qprep.data());
    qdot = reinterpret_cast<const float*>(qprep.data());
  }
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  const float ninf = -std::numeric_limits<float>::infinity();
  std::fill(mx, mx + gc, ninf);
  std::fill(sums, sums + gc, 0.0);
  const int64_t row_bytes = d * int64_t(sizeof(T));
  auto prefetch_row = [&](const T* row) {
    const char* r = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(r + b);
  };
  float score[kBatch][kGroupChunk];
  for (size_t e0 = 0; e0 < nu; e0 += kBatch) {
    const size_t e1 = std::min(nu, e0 + kBatch);
    float bmx[kGroupChunk];
    std::fill(bmx, bmx + gc, ninf);
    for (size_t e = e0; e < std::min(e1, e0 + kAhead); ++e) prefetch_row(R.key(uni[e].i));
    for (size_t e = e0; e < e1; ++e) {
      if (e + kAhead < e1) {
        prefetch_row(R.key(uni[e + kAhead].i));
        __builtin_prefetch(R.norm_ptr(uni[e + kAhead].i));
      }
      const int32_t i = uni[e].i;
      const T* key = R.key(i);
      const float kn = R.norm(i);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        float dot;
        kern.dot(key, qdot + jj * d, d, &dot);
        const float sc_ = static_cast<float>(dot * inv_sqrt_d + weights(dot, qnorm[jj], kn));
        score[e - e0][jj] = sc_;
        if (sc_ > bmx[jj]) bmx[jj] = sc_;
      }
    }
    for (int jj = 0; jj < gc; ++jj) {
      if (!(bmx[jj] > mx[jj])) continue;
      if (mx[jj] != ninf) {  // else acc and sums are still 0
        const float f = std::exp(mx[jj] - bmx[jj]);
        sums[jj] *= f;
        for (int64_t c = 0; c < d; ++c) acc[jj * d + c] *= f;
      }
      mx[jj] = bmx[jj];
    }
    for (size_t e = e0; e < std::min(e1, e0 + kAhead); ++e) prefetch_row(R.val(uni[e].i));
    for (size_t e = e0; e < e1; ++e) {
      if (e + kAhead < e1) prefetch_row(R.val(uni[e + kAhead].i));
      const T* val = R.val(uni[e].i);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        const float pj = std::exp(score[e - e0][jj] - mx[jj]);
        sums[jj] += pj;
        kern.vsum(&val, &pj, 1, d, acc + jj * d);
      }
    }
  }
}

void query_norms(const float* qg, int gc, int64_t d, double* qnorm) {
  for (int jj = 0; jj < gc; ++jj) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(qg[jj * d + i]) * qg[jj * d + i];
    qnorm[jj] = std::sqrt(ss);
  }
}

void write_empty(int64_t G, int64_t d, float* out, float* lse, int32_t* sampled) {
  std::fill(out, out + G * d, 0.0f);
  std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
  std::fill(sampled, sampled + G, 0);
}

// One (row, KV head): the G query heads q[G][d], q_codes[G][L] -> out[G][d], lse[G], sampled[G].
template <typename T>
void query_group(const StoreConfig& c, const LogWeightTable& weights, const SlotData& s, int64_t kvh,
                 int64_t G,
                 const float* q, const int32_t* qcodes, float* out, float* lse, int32_t* sampled,
                 const RowKernels<T>& kern) {
  const int64_t d = c.head_dim, L = c.L;
  const HeadRows<T> R = head_rows<T>(c, s, kvh);
  const int64_t total = R.total();
  if (total == 0) return write_empty(G, d, out, lse, sampled);

  QueryScratch& sc = query_scratch();
  sc.ensure(total);
  const int64_t words = (total + 63) / 64;

  for (int64_t j0 = 0; j0 < G; j0 += kGroupChunk) {
    const int gc = static_cast<int>(std::min<int64_t>(kGroupChunk, G - j0));
    int64_t counts[kGroupChunk] = {};
    const uint64_t* bm[kGroupChunk];
    // 1. Candidates per head (>= 2 collisions), merged into one union with head masks.
    int64_t bound = 0;
    for (int jj = 0; jj < gc; ++jj) {
      uint64_t* hb = sc.heads.data() + jj * words;
      counts[jj] = collect_head(R, qcodes + (j0 + jj) * L, sc, hb);
      bm[jj] = hb;
      bound += counts[jj];
    }
    sc.uni.resize(static_cast<size_t>(bound));
    const size_t nu = bitmap_union(bm, gc, 0, words, sc.uni.data());
    // 2.-3. Scores and softmax-weighted values.
    const float* qg = q + j0 * d;
    double qnorm[kGroupChunk];
    query_norms(qg, gc, d, qnorm);
    sc.acc.assign(static_cast<size_t>(gc * d), 0.0f);
    float mx[kGroupChunk];
    double sums[kGroupChunk];
    softmax_part(R, weights, kern, sc.uni.data(), nu, qg, qnorm, gc, mx,
                 sums, sc.acc.data());
    const float* acc = sc.acc.data();
    for (int jj = 0; jj < gc; ++jj) {
      const int64_t h = j0 + jj;
      sampled[h] = static_cast<int32_t>(counts[jj]);
      float* oh = out + h * d;
      if (counts[jj] == 0) {
        std::fill(oh, oh + d, 0.0f);
        lse[h] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const double inv = 1.0 / sums[jj];
      for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<float>(acc[jj * d + i] * inv);
      lse[h] = static_cast<float>(mx[jj] + std::log(sums[jj]));
    }
  }
}

std::atomic<int> g_query_split{-1};  // see set_query_split

// Batch-1 parallelism: with few (row, KV head) tasks for the pool, the query runs in phases:
// 1. one item per (row, query head): its candidate bitmap (over middle + appended tokens);
// 2. one item per (row, KV head, chunk of <= 8 query heads, part): the union of the chunk's
//    candidates within the part's range of bitmap words, in token order, and its partial
//    softmax (max, sum, accumulator) per query head -- each row still read once per chunk;
// 3. the parts merged exactly by log-sum-exp (only float rounding differs from one part).
template <typename T>
void query_split(const Store& st, const QueryArgs& io, int64_t B, int64_t Hq, const RowKernels<T>& kern,
                 int threads) {
  const StoreConfig& c = st.cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L, G = Hq / Hkv;
  const int64_t chunks = (G + kGroupChunk - 1) / kGroupChunk;
  // Phase 1: candidate bitmaps, one per (row, query head).
  std::vector<int64_t> words(static_cast<size_t>(B)), bm_off(static_cast<size_t>(B * Hq + 1), 0);
  for (int64_t b = 0; b < B; ++b) {
    const SlotData& s = st.slots[io.slots.data[b]];
    words[b] = s.prefilled ? (s.n + s.na + 63) / 64 : 0;
    for (int64_t h = 0; h < Hq; ++h) bm_off[b * Hq + h + 1] = bm_off[b * Hq + h] + words[b];
  }
  std::vector<uint64_t> bitmaps(static_cast<size_t>(bm_off[B * Hq]));
  std::vector<int64_t> counts(static_cast<size_t>(B * Hq), 0);
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    if (words[b] == 0) return;
    const HeadRows<T> R = head_rows<T>(c, st.slots[io.slots.data[b]], h / G);
    QueryScratch& sc = query_scratch();
    sc.ensure(R.total());
    counts[item] = collect_head(R, io.q_codes.data + item * L, sc, bitmaps.data() + bm_off[item]);
  });
  // Phase 2: parts of each (row, KV head, chunk).
  const int64_t groups = B * Hkv * chunks;
  const int64_t want = (4 * int64_t{threads} + groups - 1) / groups;
  struct Partial { float mx[kGroupChunk]; double sums[kGroupChunk]; };
  std::vector<int64_t> parts(static_cast<size_t>(B));
  std::vector<int64_t> part_off(static_cast<size_t>(groups + 1), 0);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t b = gi / (Hkv * chunks);
    const int64_t p = std::max<int64_t>(1, std::min<int64_t>(want, words[b] / 16));
    parts[b] = p;
    part_off[gi + 1] = part_off[gi] + p;
  }
  const int64_t nparts = part_off[groups];
  std::vector<Partial> partial(static_cast<size_t>(nparts));
  std::vector<float> acc(static_cast<size_t>(nparts * kGroupChunk * d), 0.0f);
  parallel_for(nparts, [&](int64_t pi) {
    const int64_t gi = std::upper_bound(part_off.begin(), part_off.end(), pi) - part_off.begin() - 1;
    const int64_t b = gi / (Hkv * chunks), g = gi / chunks % Hkv, ch = gi % chunks;
    const int64_t p = pi - part_off[gi], P = parts[b];
    const int64_t j0 = ch * kGroupChunk, h0 = b * Hq + g * G + j0;
    const int gc = static_cast<int>(std::min<int64_t>(kGroupChunk, G - j0));
    Partial& out = partial[pi];
    std::fill(out.mx, out.mx + kGroupChunk, -std::numeric_limits<float>::infinity());
    std::fill(out.sums, out.sums + kGroupChunk, 0.0);
    if (words[b] == 0) return;
    const HeadRows<T> R = head_rows<T>(c, st.slots[io.slots.data[b]], g);
    const int64_t w0 = words[b] * p / P, w1 = words[b] * (p + 1) / P;
    const uint64_t* bm[kGroupChunk];
    for (int jj = 0; jj < gc; ++jj) bm[jj] = bitmaps.data() + bm_off[h0 + jj];
    QueryScratch& sc = query_scratch();
    int64_t bound = 0;
    for (int jj = 0; jj < gc; ++jj) bound += counts[h0 + jj];
    sc.uni.resize(static_cast<size_t>(bound));
    const size_t nu = bitmap_union(bm, gc, w0, w1, sc.uni.data());
    if (nu == 0) return;
    const float* qg = io.q.data + h0 * d;
    double qnorm[kGroupChunk];
    query_norms(qg, gc, d, qnorm);
    softmax_part(R, st.weights, kern, sc.uni.data(), nu, qg, qnorm, gc, out.mx,
                 out.sums, acc.data() + pi * kGroupChunk * d);
  });
  // Phase 3: merge.
  std::vector<double> o(static_cast<size_t>(d));
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t b = gi / (Hkv * chunks), g = gi / chunks % Hkv, ch = gi % chunks;
    const int64_t j0 = ch * kGroupChunk, h0 = b * Hq + g * G + j0;
    const int gc = static_cast<int>(std::min<int64_t>(kGroupChunk, G - j0));
    for (int jj = 0; jj < gc; ++jj) {
      const int64_t h = h0 + jj;
      io.sampled.data[h] = static_cast<int32_t>(counts[h]);
      float* oh = io.out.data + h * d;
      double M = -std::numeric_limits<double>::infinity();
      for (int64_t pi = part_off[gi]; pi < part_off[gi + 1]; ++pi)
        if (partial[pi].sums[jj] > 0) M = std::max<double>(M, partial[pi].mx[jj]);
      if (counts[h] == 0 || !std::isfinite(M)) {
        std::fill(oh, oh + d, 0.0f);
        io.lse.data[h] = -std::numeric_limits<float>::infinity();
        continue;
      }
      double S = 0;
      std::fill(o.begin(), o.end(), 0.0);
      for (int64_t pi = part_off[gi]; pi < part_off[gi + 1]; ++pi) {
        if (!(partial[pi].sums[jj] > 0)) continue;
        const double f = std::exp(double(partial[pi].mx[jj]) - M);
        S += partial[pi].sums[jj] * f;
        const float* a = acc.data() + (pi * kGroupChunk + jj) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += f * a[i];
      }
      for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<float>(o[i] / S);
      io.lse.data[h] = static_cast<float>(M + std::log(S));
    }
  }
}

}  // namespace

void set_query_split(int mode) { g_query_split.store(mode < 0 ? -1 : (mode > 0 ? 1 : 0)); }
int get_query_split() { return g_query_split.load(); }

std::string store_query(int64_t handle, const QueryArgs& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  err = validate_query(c, io);
  if (!err.empty()) return err;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  const int64_t B = io.slots.dims[0], Hq = io.q.dims[1];

  std::shared_lock<std::shared_mutex> lock(st->mu);
  const int64_t G = Hq / Hkv;
  const SimdLevel level = simd_level();
  const bool bf16 = c.storage == StoreStorage::kBF16;
  const int threads = get_num_threads();
  const int split = g_query_split.load();
  if (split == 1 || (split == -1 && threads > 1 && B * Hkv < 2 * int64_t{threads})) {
    if (bf16) query_split<uint16_t>(*st, io, B, Hq, row_kernels<uint16_t>(level), threads);
    else query_split<float>(*st, io, B, Hq, row_kernels<float>(level), threads);
    return "";
  }
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, g = task % Hkv;
    const SlotData& s = st->slots[io.slots.data[b]];
    const int64_t h0 = b * Hq + g * G;
    if (bf16)
      query_group<uint16_t>(c, st->weights, s, g, G, io.q.data + h0 * d, io.q_codes.data + h0 * L,
                            io.out.data + h0 * d, io.lse.data + h0, io.sampled.data + h0,
                            row_kernels<uint16_t>(level));
    else
      query_group<float>(c, st->weights, s, g, G, io.q.data + h0 * d, io.q_codes.data + h0 * L,
                         io.out.data + h0 * d, io.lse.data + h0, io.sampled.data + h0,
                         row_kernels<float>(level));
  });
  return "";
}

}  // namespace pigjax
