// What the LSH store's two queries share (private to query.cc and query_ranked.cc): per-thread
// scratch, the rows of one (slot, KV head), and the walk over the hash tables that finds the
// tokens colliding with a query head in a range of tables. See query.h and query_ranked.h.
#pragma once

#include <algorithm>
#include <bitset>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "sketch.h"
#include "store_layout.h"

namespace pigjax {

constexpr int kGroupChunk = 8;  // query heads of one GQA group handled together
constexpr size_t kPrefetchAhead = 12;  // rows read in scattered order are prefetched this far ahead

// Prefetches the cache lines of one stored row of d elements.
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* at = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(at + b);
}

// Per-thread query scratch. Collision counting adds to a byte per token (n bytes: 32 KiB at
// n = 32K, L1/L2-resident), which the pass that turns them into the ">= 2" bitmap clears again
// (collect_head). Each query head of a chunk (up to 8) keeps its ">= 2" bitmap (n/8 bytes per
// head); the union is listed in token order from the OR of the chunk's bitmaps, a word at a time.
struct QueryScratch {
  std::vector<uint8_t> hits;           // [words * 64]: collisions of token i; all 0 between heads
  std::vector<uint64_t> heads;         // [kGroupChunk][words]: bit i: >= 2 collisions
  struct Range { const uint16_t* ids; int32_t beg, end, base; };
  std::vector<Range> ranges;           // bucket ranges of one query head in direct blocks
  // A bucket range of a compact block ((index, code) pairs): entries with code `code` collide.
  struct CodedRange { const uint16_t* pairs; int32_t beg, end, base, code; };
  std::vector<CodedRange> coded;       // bucket ranges of one query head in compact blocks
  struct Entry { int32_t i; uint32_t mask; };
  std::vector<Entry> uni;              // union of the chunk's candidate sets
  std::vector<float> acc;              // [kGroupChunk][d]
  std::vector<std::pair<uint32_t, int32_t>> order;  // (thin_hash, token) of a thinned sample
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
    if (hits.size() < 64 * words) hits.resize(64 * words);
    if (heads.size() < kGroupChunk * words) heads.resize(kGroupChunk * words);
  }
};


inline QueryScratch& query_scratch() {
  thread_local QueryScratch s;
  return s;
}

template <typename T>
const T* stored_keys(const SlotData& s);
template <>
inline const float* stored_keys<float>(const SlotData& s) { return s.k32.data(); }
template <>
inline const uint16_t* stored_keys<uint16_t>(const SlotData& s) { return s.k16.data(); }
template <typename T>
const T* stored_values(const SlotData& s);
template <>
inline const float* stored_values<float>(const SlotData& s) { return s.v32.data(); }
template <>
inline const uint16_t* stored_values<uint16_t>(const SlotData& s) { return s.v16.data(); }

template <typename T>
const T* pick(const std::vector<uint16_t>& h, const std::vector<float>& f);
template <>
inline const float* pick<float>(const std::vector<uint16_t>&, const std::vector<float>& f) { return f.data(); }
template <>
inline const uint16_t* pick<uint16_t>(const std::vector<uint16_t>& h, const std::vector<float>&) { return h.data(); }

// The rows of one (slot, KV head): middle token i < n from the tables' arrays, appended token
// n + t from the append buffer.
template <typename T>
struct HeadRows {
  int64_t d = 0, L = 0, n = 0, na = 0;
  int64_t t0 = 0;                 // the first indexed table (StoreConfig::sketch_tables)
  int K = 0;
  const TableLayout* layout = nullptr;
  const int32_t* off = nullptr;   // per block [L - t0][2^bits + 1] at block.off
  const uint16_t* idx = nullptr;  // per block [L - t0][len] or [L - t0][len][2] at block.idx
  const T* keys = nullptr; const T* vals = nullptr; const float* norms = nullptr;
  const T* akeys = nullptr; const T* avals = nullptr; const float* anorms = nullptr;
  const int32_t* acodes = nullptr;  // [na][L]
  const uint64_t* sketch = nullptr;  // middle tokens' sketches (sketch.h), sketch_words words each
  int64_t sketch_words = 0;
  int64_t total() const { return n + na; }
  const T* key(int64_t i) const { return i < n ? keys + i * d : akeys + (i - n) * d; }
  const T* val(int64_t i) const { return i < n ? vals + i * d : avals + (i - n) * d; }
  float norm(int64_t i) const { return *norm_ptr(i); }
  const float* norm_ptr(int64_t i) const { return i < n ? norms + i : anorms + (i - n); }
};

template <typename T>
inline HeadRows<T> head_rows(const StoreConfig& c, const SlotData& s, int64_t kvh) {
  HeadRows<T> R;
  R.d = c.head_dim; R.L = c.L; R.K = c.K; R.t0 = c.sketch_tables;
  if (!s.prefilled) return R;
  R.n = s.n; R.na = s.na;
  R.layout = &s.layout;
  R.off = s.offsets.data() + kvh * s.layout.offsets_per_head;
  R.idx = s.indices.data() + kvh * s.layout.entries_per_head;
  R.keys = stored_keys<T>(s) + kvh * R.n * R.d;
  R.vals = stored_values<T>(s) + kvh * R.n * R.d;
  R.norms = s.norms.data() + kvh * R.n;
  R.sketch_words = sketch_words(c.sketch_tables, c.K);
  R.sketch = s.sketch.data() + kvh * sketch_size(R.n, R.sketch_words);
  if (R.na > 0) {
    const SlotData::Appended& a = s.app[static_cast<size_t>(kvh)];
    R.akeys = pick<T>(a.k16, a.k32);
    R.avals = pick<T>(a.v16, a.v32);
    R.anorms = a.norms.data();
    R.acodes = a.codes.data();
  }
  return R;
}

// Calls hit(i, match) for every (token i, table l) with l in [l0, l1) (indexed: l0 >= R.t0)
// whose bucket holds token i
// for the query codes qc[L]: match is 1 when the token's code equals qc[l] (always in direct
// blocks; compact blocks share a bucket between codes, so match is 0 for the others). Middle
// tokens only; the caller scans the appended tokens. Bucket ranges are found first (independent
// loads), then walked with the next ranges prefetched; hit should be branch-free in match.
template <typename T, typename Hit>
inline void visit_hits(const HeadRows<T>& R, const int32_t* qc, int64_t l0, int64_t l1,
                       QueryScratch& sc, Hit&& hit) {
  const size_t nblocks = R.layout == nullptr ? 0 : R.layout->blocks.size();
  const int64_t nt = l1 - l0;
  sc.ranges.resize(static_cast<size_t>(nt) * nblocks);
  sc.coded.resize(static_cast<size_t>(nt) * nblocks);
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
      for (int64_t l = l0; l < l1; ++l) {
        const int32_t* o = ob + (l - R.t0) * stride + qc[l];
        rg[nr++] = {ids_block + (l - R.t0) * blen, o[0], o[1], base};
      }
    } else {  // compact: the bucket is the code's top bits; entries are filtered by code
      const int shift = R.K - blk.bits;
      for (int64_t l = l0; l < l1; ++l) {
        const int32_t* o = ob + (l - R.t0) * stride + (qc[l] >> shift);
        cr[nc++] = {ids_block + (l - R.t0) * blen * 2, o[0], o[1], base, qc[l]};
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
    for (int32_t t = rg[r].beg, e = rg[r].end; t < e; ++t) hit(base + ids[t], uint32_t{1});
  }
  // Compact blocks: a bucket holds 1-2 entries; those with the query's code collide.
  for (int64_t r = 0; r < nc; ++r) {
    if (r + kAhead < nc) __builtin_prefetch(cr[r + kAhead].pairs + 2 * cr[r + kAhead].beg);
    const uint16_t* pairs = cr[r].pairs;
    const int32_t base = cr[r].base, code = cr[r].code;
    for (int32_t t = cr[r].beg, e = cr[r].end; t < e; ++t)
      hit(base + pairs[2 * t], static_cast<uint32_t>(pairs[2 * t + 1] == code));
  }
}

// Collisions of appended token t (token n + t) with the query codes qc in tables [l0, l1).
template <typename T>
inline int32_t appended_hits(const HeadRows<T>& R, const int32_t* qc, int64_t t, int64_t l0, int64_t l1) {
  const int32_t* ac = R.acodes + t * R.L;
  int32_t hits = 0;
  for (int64_t l = l0; l < l1; ++l) hits += ac[l] == qc[l];
  return hits;
}

// The bitmap of tokens with >= 2 collisions from the byte counts hits[64 words] (bit i of out[w]
// for hits[64 w + i] >= 2), zeroing the counts for the next head; returns the bits set. SSE2 is
// x86-64's baseline, so this needs no dispatch.
inline int64_t hits_to_bits(uint8_t* hits, size_t words, uint64_t* out) {
  int64_t count = 0;
#if defined(__SSE2__)
  // Counted by byte sums (psadbw), not popcount: without -mpopcnt that is a libgcc call.
  const __m128i two = _mm_set1_epi8(2), zero = _mm_setzero_si128();
  __m128i total = zero;
  for (size_t w = 0; w < words; ++w) {
    uint64_t m = 0;
    __m128i ones = zero;  // per byte: how many of the word's 4 vectors have it >= 2
    for (int k = 0; k < 4; ++k) {
      __m128i* at = reinterpret_cast<__m128i*>(hits + 64 * w + 16 * k);
      const __m128i v = _mm_loadu_si128(at);
      const __m128i ge2 = _mm_cmpeq_epi8(_mm_max_epu8(v, two), v);
      m |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(ge2))) << (16 * k);
      ones = _mm_sub_epi8(ones, ge2);
      _mm_storeu_si128(at, zero);
    }
    total = _mm_add_epi64(total, _mm_sad_epu8(ones, zero));
    out[w] = m;
  }
  count = _mm_cvtsi128_si64(total) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(total, total));
#else
  for (size_t w = 0; w < words; ++w) {
    uint64_t m = 0;
    for (int b = 0; b < 64; ++b) m |= uint64_t{hits[64 * w + b] >= 2} << b;
    std::memset(hits + 64 * w, 0, 64);
    out[w] = m;
    count += static_cast<int64_t>(std::bitset<64>(m).count());
  }
#endif
  return count;
}

// Candidates of one query head (codes qc[L]) in tables [l0, l1): sets bit i of seen2 (words =
// ceil(total / 64)) for every token i with >= 2 collisions there; returns their count. Each hit
// adds one to the token's byte in sc.hits (one add to memory: random hits make a bitmap's
// test-and-set dearer), in runs of at most 254 tables between clamps to 2, so no byte wraps.
template <typename T>
inline int64_t collect_head(const HeadRows<T>& R, const int32_t* qc, int64_t l0, int64_t l1,
                            QueryScratch& sc, uint64_t* seen2) {
  const size_t words = static_cast<size_t>((R.total() + 63) / 64);
  uint8_t* hits = sc.hits.data();
  constexpr int64_t kRun = 254;
  for (int64_t a = l0; a < l1; a += kRun) {
    const int64_t b = std::min(l1, a + kRun);
    visit_hits(R, qc, a, b, sc, [&](int32_t i, uint32_t match) { hits[i] += static_cast<uint8_t>(match); });
    if (b < l1)
      for (int64_t i = 0; i < R.n; ++i) hits[i] = std::min<uint8_t>(hits[i], 2);
  }
  // Appended tokens: a linear scan comparing the codes.
  for (int64_t t = 0; t < R.na; ++t)
    hits[R.n + t] = static_cast<uint8_t>(std::min<int32_t>(appended_hits(R, qc, t, l0, l1), 2));
  return hits_to_bits(hits, words, seen2);
}

// The sample cap (docs/algorithm.md §2.6): a head that samples more than
// max(1, ceil(sample_cap * n)) keys reads a uniform subset of that many, the first in the order
// (thin_hash, index). The hash mixes (murmur3's 32-bit finaliser) the index with a seed from n
// and the query's codes of tables [l0, L), so a call's choice is a pure function of its inputs and
// differs between queries and steps; the NumPy reference (reference.thin_hash) computes the same.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

inline uint32_t thin_seed(int64_t n, const int32_t* qc, int64_t l0, int64_t L) {
  uint32_t h = fmix32(static_cast<uint32_t>(n) ^ 0x9e3779b9u);
  for (int64_t l = l0; l < L; ++l) h = fmix32(h + static_cast<uint32_t>(qc[l]));
  return h;
}

inline uint32_t thin_hash(uint32_t seed, int32_t i) { return fmix32(seed ^ (static_cast<uint32_t>(i) * 0x9e3779b1u)); }

inline int64_t sample_cap_keys(double sample_cap, int64_t n) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(sample_cap * static_cast<double>(n))));
}

// Thins the sample bits[0, words) (*count bits set) to `cap` keys in place; returns
// log(count / cap), the extra log weight of each kept key (1 / its inclusion probability), or 0
// when nothing is dropped, and sets *count to the keys kept.
inline double thin_sample(uint64_t* bits, size_t words, int64_t* count, int64_t cap, uint32_t seed,
                          std::vector<std::pair<uint32_t, int32_t>>& order) {
  if (*count <= cap) return 0.0;
  order.clear();
  for (size_t w = 0; w < words; ++w)
    for (uint64_t b = bits[w]; b; b &= b - 1) {
      const int32_t i = static_cast<int32_t>(w * 64 + __builtin_ctzll(b));
      order.push_back({thin_hash(seed, i), i});
    }
  std::nth_element(order.begin(), order.begin() + cap, order.end());
  std::memset(bits, 0, words * sizeof(uint64_t));
  for (int64_t j = 0; j < cap; ++j) bits[order[j].second >> 6] |= uint64_t{1} << (order[j].second & 63);
  const double log_inv_a = std::log(static_cast<double>(*count) / static_cast<double>(cap));
  *count = cap;
  return log_inv_a;
}

inline void query_norms(const float* qg, int gc, int64_t d, double* qnorm) {
  for (int jj = 0; jj < gc; ++jj) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(qg[jj * d + i]) * qg[jj * d + i];
    qnorm[jj] = std::sqrt(ss);
  }
}

}  // namespace pigjax
