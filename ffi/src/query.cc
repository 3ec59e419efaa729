// The LSH store's query (sampled attention over a slot's middle and appended tokens, read-only):
// candidates by collision counting over the hash tables, their union per GQA group, and the
// softmax-weighted sum with MagicPIG's importance weights; at batch 1, split by query heads or
// within a KV head over threads (query_split_mode). See query.h for the semantics and BUILD.md
// ("Query inner loop", "Batch-1 parallelism") for the design and measurements.
#include "query.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <shared_mutex>
#include <vector>

#include "query_rows.h"
#include "row_kernels.h"
#include "simd.h"
#include "store_layout.h"
#include "thread_pool.h"
#include "weight_table.h"

namespace pigjax {

namespace {

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

// Partial softmax of gc <= kGroupChunk query heads (qg[gc][d], norms qnorm) over the entries
// uni[0..nu) (bit jj of an entry's mask: head jj samples it): per head the max score mx, the
// sum of exp(score - mx) and acc[jj][d] = sum of exp(score - mx) v (acc zeroed by the caller).
// Each key and value row is read once for the whole chunk; dot products and value sums are
// done only for the heads that sample the row (about one per row at K = 10, L = 150). Batches
// of kBatch entries: a key pass (scores), an online-softmax rescale of a head's acc and sum if
// the batch raised its max, then a value pass. Each pass prefetches its rows kPrefetchAhead entries
// ahead (one array per pass keeps the misses in flight; interleaving K and V rows was slower).
template <typename T>
void softmax_part(const HeadRows<T>& R, const LogWeightTable& weights, const RowKernels<T>& kern,
                  const QueryScratch::Entry* uni, size_t nu, const float* qg, const double* qnorm,
                  int gc, float* mx, double* sums, float* acc) {
  constexpr size_t kBatch = 256, kAhead = kPrefetchAhead;
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
  float score[kBatch][kGroupChunk];  // dot products, then scores
  float knorm[kBatch];
  const T* vrows[kGroupChunk][kBatch];
  float vp[kGroupChunk][kBatch];
  for (size_t e0 = 0; e0 < nu; e0 += kBatch) {
    const size_t e1 = std::min(nu, e0 + kBatch);
    float bmx[kGroupChunk];
    std::fill(bmx, bmx + gc, ninf);
    for (size_t e = e0; e < std::min(e1, e0 + kAhead); ++e) prefetch_row(R.key(uni[e].i), d);
    for (size_t e = e0; e < e1; ++e) {
      if (e + kAhead < e1) {
        prefetch_row(R.key(uni[e + kAhead].i), d);
        __builtin_prefetch(R.norm_ptr(uni[e + kAhead].i));
      }
      const int32_t i = uni[e].i;
      const T* key = R.key(i);
      knorm[e - e0] = R.norm(i);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        kern.dot(key, qdot + jj * d, d, &score[e - e0][jj]);
      }
    }
    // Scores from the dot products in a loop of their own: the row loads above do not wait
    // behind the weight table's arithmetic and lookups, so more of them are in flight.
    for (size_t e = e0; e < e1; ++e)
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        const float dot = score[e - e0][jj];
        const float sc_ = static_cast<float>(dot * inv_sqrt_d + weights(dot, qnorm[jj], knorm[e - e0]));
        score[e - e0][jj] = sc_;
        if (sc_ > bmx[jj]) bmx[jj] = sc_;
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
    // Value pass: each head's rows and scores of the batch (the rows prefetched meanwhile), the
    // head's exp(score - max) in one vectorised call, then one vsum per head, which keeps the
    // head's accumulators in registers over its rows.
    int nrow[kGroupChunk] = {};
    for (size_t e = e0; e < e1; ++e) {
      const T* val = R.val(uni[e].i);
      prefetch_row(val, d);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        vrows[jj][nrow[jj]] = val;
        vp[jj][nrow[jj]++] = score[e - e0][jj];
      }
    }
    for (int jj = 0; jj < gc; ++jj) {
      if (nrow[jj] == 0) continue;
      sums[jj] += kern.exp_sum(vp[jj], nrow[jj], mx[jj]);
      kern.vsum(vrows[jj], vp[jj], nrow[jj], d, acc + jj * d);
    }
  }
}

void write_empty(int64_t G, int64_t d, float* out, float* lse, int32_t* sampled) {
  std::fill(out, out + G * d, 0.0f);
  std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
  std::fill(sampled, sampled + G, 0);
}

// One (row, KV head), its query heads [ja, jb) of the G: q[G][d], q_codes[G][L] -> out[G][d],
// lse[G], sampled[G] at those heads. A head's result does not depend on which others share its
// call except by float rounding (the batch boundaries of softmax_part's online rescale).
template <typename T>
void query_group(const StoreConfig& c, const LogWeightTable& weights, const SlotData& s, int64_t kvh,
                 int64_t ja, int64_t jb, double sample_cap,
                 const float* q, const int32_t* qcodes, float* out, float* lse, int32_t* sampled,
                 const RowKernels<T>& kern) {
  const int64_t d = c.head_dim, L = c.L;
  const HeadRows<T> R = head_rows<T>(c, s, kvh);
  const int64_t total = R.total();
  if (total == 0) return write_empty(jb - ja, d, out + ja * d, lse + ja, sampled + ja);

  QueryScratch& sc = query_scratch();
  sc.ensure(total);
  const int64_t words = (total + 63) / 64;

  for (int64_t j0 = ja; j0 < jb; j0 += kGroupChunk) {
    const int gc = static_cast<int>(std::min<int64_t>(kGroupChunk, jb - j0));
    int64_t counts[kGroupChunk] = {};
    double log_inv_a[kGroupChunk] = {};
    const uint64_t* bm[kGroupChunk];
    // 1. Candidates per head (>= 2 collisions, thinned to the sample cap), merged into one union
    // with head masks. A head's thinning weight is common to all its keys: it moves only its lse.
    int64_t bound = 0;
    for (int jj = 0; jj < gc; ++jj) {
      uint64_t* hb = sc.heads.data() + jj * words;
      const int32_t* qc = qcodes + (j0 + jj) * L;
      counts[jj] = collect_head(R, qc, 0, L, sc, hb);
      log_inv_a[jj] = thin_sample(hb, static_cast<size_t>(words), &counts[jj], sample_cap_keys(sample_cap, total),
                                  thin_seed(total, qc, 0, L), sc.order);
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
      lse[h] = static_cast<float>(mx[jj] + std::log(sums[jj]) + log_inv_a[jj]);
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
  std::vector<double> log_inv_a(static_cast<size_t>(B * Hq), 0.0);  // the sample cap's weight (query_group)
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    if (words[b] == 0) return;
    const HeadRows<T> R = head_rows<T>(c, st.slots[io.slots.data[b]], h / G);
    QueryScratch& sc = query_scratch();
    sc.ensure(R.total());
    const int32_t* qc = io.q_codes.data + item * L;
    uint64_t* bits = bitmaps.data() + bm_off[item];
    counts[item] = collect_head(R, qc, 0, L, sc, bits);
    log_inv_a[item] = thin_sample(bits, static_cast<size_t>(words[b]), &counts[item],
                                  sample_cap_keys(io.sample_cap, R.total()), thin_seed(R.total(), qc, 0, L), sc.order);
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
      io.lse.data[h] = static_cast<float>(M + std::log(S) + log_inv_a[h]);
    }
  }
}

// Parts each (row, KV head)'s G query heads are split into: at least 2, and enough that
// tasks x parts >= 2 x threads where G allows.
int64_t heads_parts(int64_t tasks, int64_t G, int threads) {
  return std::min<int64_t>(G, std::max<int64_t>(2, (2 * int64_t{threads} + tasks - 1) / tasks));
}

// The query's parallel shape (set_query_split's modes): 0 one task per (row, KV head), 1 split
// within a KV head (query_split), 2 tasks per (row, KV head, part of its query heads). Auto (-1)
// takes the first that gives the pool >= 2 x threads tasks: 0, else 2, else 1 (batch 1 with more
// threads than query heads). Splitting by query heads reads few rows twice (about one head
// samples a row at K = 10, L = 150) and needs no merge; within a head it needs phases and one.
int query_split_mode(int mode, int64_t B, int64_t Hkv, int64_t Hq, int threads) {
  if (mode >= 0) return mode;
  if (threads <= 1 || B * Hkv >= 2 * int64_t{threads}) return 0;
  return B * Hq >= 2 * int64_t{threads} ? 2 : 1;
}

}  // namespace

void set_query_split(int mode) { g_query_split.store(mode < 0 ? -1 : std::min(mode, 2)); }
int get_query_split() { return g_query_split.load(); }

std::string store_query(int64_t handle, const QueryArgs& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  err = validate_query(c, io);
  if (!err.empty()) return err;
  if (c.sketch_tables > 0)
    return "this store keeps tables [0, " + std::to_string(c.sketch_tables) + ") as a sketch without bucket lists " +
           "(sketch_tables = " + std::to_string(c.sketch_tables) + "): it serves the ranked query (query_ranked) " +
           "only; create the store with sketch_tables=0 for this query";
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  const int64_t B = io.slots.dims[0], Hq = io.q.dims[1];

  std::shared_lock<std::shared_mutex> lock(st->mu);
  const int64_t G = Hq / Hkv;
  const SimdLevel level = simd_level();
  const bool bf16 = c.storage == StoreStorage::kBF16;
  const int threads = get_num_threads();
  const int split = query_split_mode(g_query_split.load(), B, Hkv, Hq, threads);
  if (split == 1) {
    if (bf16) query_split<uint16_t>(*st, io, B, Hq, row_kernels<uint16_t>(level), threads);
    else query_split<float>(*st, io, B, Hq, row_kernels<float>(level), threads);
    return "";
  }
  // One task per (row, KV head), or per (row, KV head, part of its query heads) when that is too
  // few tasks for the pool: each part the smallest number that makes >= 2 x threads tasks.
  const int64_t want = split == 2 ? heads_parts(B * Hkv, G, threads) : 1;
  const int64_t per = (G + want - 1) / want, parts = (G + per - 1) / per;
  parallel_for(B * Hkv * parts, [&](int64_t task) {
    const int64_t b = task / (Hkv * parts), g = task / parts % Hkv, p = task % parts;
    const SlotData& s = st->slots[io.slots.data[b]];
    const int64_t h0 = b * Hq + g * G, ja = p * per, jb = std::min(G, ja + per);
    if (bf16)
      query_group<uint16_t>(c, st->weights, s, g, ja, jb, io.sample_cap, io.q.data + h0 * d,
                            io.q_codes.data + h0 * L, io.out.data + h0 * d, io.lse.data + h0,
                            io.sampled.data + h0, row_kernels<uint16_t>(level));
    else
      query_group<float>(c, st->weights, s, g, ja, jb, io.sample_cap, io.q.data + h0 * d,
                         io.q_codes.data + h0 * L, io.out.data + h0 * d, io.lse.data + h0,
                         io.sampled.data + h0, row_kernels<float>(level));
  });
  return "";
}

}  // namespace pigjax
