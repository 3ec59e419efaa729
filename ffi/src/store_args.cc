// See store_args.h. The messages are part of the interface: Python tests match parts of them.
#include "store_args.h"

#include <algorithm>

#include "shape_text.h"
#include "store.h"
#include "thread_pool.h"

namespace pigjax {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

// slots [B], and keys, values [B, Hkv, tokens, d] and codes [B, Hkv, tokens, L]: the arrays
// prefill (tokens = "n") and append (tokens = "T") share. Sets *B and *tokens.
std::string check_token_arrays(const StoreConfig& c, const ArrayView<const int32_t>& slots,
                               const ArrayView<const float>& keys,
                               const ArrayView<const float>& values,
                               const ArrayView<const int32_t>& codes, const char* tokens_name,
                               int64_t* B, int64_t* tokens) {
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  if (slots.dims.size() != 1) return "slots must have shape [B], got " + shape_text(slots.dims);
  const int64_t b = slots.dims[0];
  if (keys.dims.size() != 4 || keys.dims[0] != b || keys.dims[1] != Hkv || keys.dims[3] != d)
    return "keys must have shape [B=" + str(b) + ", Hkv=" + str(Hkv) + ", " + tokens_name +
           ", d=" + str(d) + "], got " + shape_text(keys.dims);
  const int64_t n = keys.dims[2];
  if (values.dims != keys.dims)
    return "values must have the shape of keys " + shape_text(keys.dims) + ", got " +
           shape_text(values.dims);
  const std::vector<int64_t> want_codes = {b, Hkv, n, L};
  if (codes.dims != want_codes)
    return std::string("codes must have shape [B, Hkv, ") + tokens_name + ", L] = " +
           shape_text(want_codes) + ", got " + shape_text(codes.dims);
  *B = b;
  *tokens = n;
  return "";
}

// A per-row array [B] (lengths, counts, and the outputs middle_counts and totals).
std::string check_rows(const char* name, const std::vector<int64_t>& dims, int64_t B) {
  if (dims != std::vector<int64_t>{B})
    return std::string(name) + " must have shape [B] = [" + str(B) + "], got " + shape_text(dims);
  return "";
}

// slots[b] must name a slot of the store; with `seen` (prefill, append: the call writes the
// slot) it must also not repeat within the call.
std::string check_slot(const StoreConfig& c, const int32_t* slots, int64_t b,
                       std::vector<char>* seen, const char* call) {
  const int64_t slot = slots[b];
  if (slot < 0 || slot >= c.slots)
    return "slots[" + str(b) + "] = " + str(slot) + " is out of range [0, " + str(c.slots) + ")";
  if (seen == nullptr) return "";
  if ((*seen)[slot])
    return "slot " + str(slot) + " appears more than once in one " + call + " call";
  (*seen)[slot] = 1;
  return "";
}

// Index of the first of cd[0..count) outside [0, NB), or -1.
int64_t first_bad_code(const int32_t* cd, int64_t count, int64_t NB) {
  uint32_t any = 0;
  for (int64_t i = 0; i < count; ++i) any |= static_cast<uint32_t>(cd[i]) >= uint32_t(NB);
  if (!any) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (cd[i] < 0 || cd[i] >= NB) return i;
  return -1;
}

std::string bad_code(int64_t b, int64_t h, int64_t pos, int64_t table, int32_t value, int64_t NB) {
  return "codes[" + str(b) + ", " + str(h) + ", " + str(pos) + ", " + str(table) + "] = " +
         str(value) + " is outside [0, 2^K=" + str(NB) + ")";
}

}  // namespace

std::string validate_prefill(const StoreConfig& c, const PrefillArgs& a,
                             std::vector<int64_t>* middle) {
  const int64_t Hkv = c.kv_heads, L = c.L;
  int64_t B = 0, n = 0;
  std::string err = check_token_arrays(c, a.slots, a.keys, a.values, a.codes, "n", &B, &n);
  if (err.empty()) err = check_rows("lengths", a.lengths.dims, B);
  if (err.empty()) err = check_rows("middle_counts", a.middle_counts.dims, B);
  if (!err.empty()) return err;
  if (a.sink < 0 || a.local < 0)
    return "sink and local must be >= 0, got sink=" + str(a.sink) + " local=" + str(a.local);
  middle->assign(static_cast<size_t>(B), 0);
  std::vector<char> seen(static_cast<size_t>(c.slots), 0);
  for (int64_t b = 0; b < B; ++b) {
    err = check_slot(c, a.slots.data, b, &seen, "prefill");
    if (!err.empty()) return err;
    const int64_t len = a.lengths.data[b];
    if (len < 0 || len > n)
      return "lengths[" + str(b) + "] = " + str(len) + " is outside [0, n=" + str(n) + "]";
    const int64_t m = std::max<int64_t>(0, len - a.local - a.sink);
    if (m > c.capacity)
      return "row " + str(b) + ": middle count " + str(m) + " (length " + str(len) + ", sink " +
             str(a.sink) + ", local " + str(a.local) + ") exceeds the store capacity " +
             str(c.capacity);
    (*middle)[b] = m;
  }
  // Codes of the middle tokens must be in [0, 2^K) (other positions are never read).
  const int64_t NB = int64_t{1} << c.K;
  std::vector<int64_t> bad(static_cast<size_t>(B * Hkv), -1);  // per (row, head): first bad index
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv;
    bad[task] = first_bad_code(a.codes.data + (task * n + a.sink) * L, (*middle)[b] * L, NB);
  });
  for (int64_t t = 0; t < B * Hkv; ++t)
    if (bad[t] >= 0) {
      const int64_t i = bad[t];
      return bad_code(t / Hkv, t % Hkv, a.sink + i / L, i % L,
                      a.codes.data[(t * n + a.sink) * L + i], NB);
    }
  return "";
}

std::string validate_append(const StoreConfig& c, const AppendArgs& a) {
  const int64_t Hkv = c.kv_heads, L = c.L;
  int64_t B = 0, T = 0;
  std::string err = check_token_arrays(c, a.slots, a.keys, a.values, a.codes, "T", &B, &T);
  if (err.empty()) err = check_rows("counts", a.counts.dims, B);
  if (err.empty()) err = check_rows("totals", a.totals.dims, B);
  if (!err.empty()) return err;
  std::vector<char> seen(static_cast<size_t>(c.slots), 0);
  for (int64_t b = 0; b < B; ++b) {
    err = check_slot(c, a.slots.data, b, &seen, "append");
    if (!err.empty()) return err;
    const int64_t cnt = a.counts.data[b];
    if (cnt < 0 || cnt > T)
      return "counts[" + str(b) + "] = " + str(cnt) + " is outside [0, T=" + str(T) + "]";
  }
  const int64_t NB = int64_t{1} << c.K;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int32_t* cd = a.codes.data + (b * Hkv + h) * T * L;
      const int64_t i = first_bad_code(cd, a.counts.data[b] * L, NB);
      if (i >= 0) return bad_code(b, h, i / L, i % L, cd[i], NB);
    }
  return "";
}

std::string validate_query(const StoreConfig& c, const QueryArgs& a) {
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  if (a.slots.dims.size() != 1) return "slots must have shape [B], got " + shape_text(a.slots.dims);
  const int64_t B = a.slots.dims[0];
  if (a.q.dims.size() != 3 || a.q.dims[0] != B || a.q.dims[2] != d)
    return "q must have shape [B=" + str(B) + ", Hq, d=" + str(d) + "], got " +
           shape_text(a.q.dims);
  const int64_t Hq = a.q.dims[1];
  if (Hq <= 0 || Hq % Hkv != 0)
    return "the number of query heads (" + str(Hq) + ") must be a positive multiple of kv_heads (" +
           str(Hkv) + ")";
  if (a.q_codes.dims != std::vector<int64_t>{B, Hq, L})
    return "q_codes must have shape [B, Hq, L] = " + shape_text({B, Hq, L}) + ", got " +
           shape_text(a.q_codes.dims);
  if (a.out.dims != a.q.dims)
    return "out must have shape " + shape_text(a.q.dims) + ", got " + shape_text(a.out.dims);
  if (a.lse.dims != std::vector<int64_t>{B, Hq})
    return "lse must have shape " + shape_text({B, Hq}) + ", got " + shape_text(a.lse.dims);
  if (a.sampled.dims != std::vector<int64_t>{B, Hq})
    return "sampled must have shape " + shape_text({B, Hq}) + ", got " + shape_text(a.sampled.dims);
  if (!(a.sample_cap > 0.0 && a.sample_cap <= 1.0))
    return "sample_cap must be a fraction in (0, 1], got " + std::to_string(a.sample_cap);
  for (int64_t b = 0; b < B; ++b) {
    const std::string err = check_slot(c, a.slots.data, b, nullptr, "query");
    if (!err.empty()) return err;
  }
  const int64_t NB = int64_t{1} << c.K;
  for (int64_t i = 0; i < B * Hq * L; ++i)
    if (a.q_codes.data[i] < 0 || a.q_codes.data[i] >= NB)
      return "q_codes[" + str(i / (Hq * L)) + ", " + str(i / L % Hq) + ", " + str(i % L) + "] = " +
             str(a.q_codes.data[i]) + " is outside [0, 2^K=" + str(NB) + ")";
  return "";
}

std::string validate_ranked_query(const StoreConfig& c, const RankedQueryArgs& a) {
  std::string err = validate_query(c, a.base);
  if (!err.empty()) return err;
  const std::vector<int64_t>& want = a.base.sampled.dims;
  if (a.values_read.dims != want)
    return "values_read must have shape " + shape_text(want) + ", got " + shape_text(a.values_read.dims);
  if (a.rank_tables < 1 || a.rank_tables > c.L - 2)
    return "rank_tables must be in [1, L - 2] = [1, " + str(c.L - 2) + "] (at least 2 of the L=" +
           str(c.L) + " tables must remain for sampling), got " + str(a.rank_tables);
  if (a.rank_tables != c.sketch_tables)
    return "rank_tables must equal the store's sketch_tables = " + str(c.sketch_tables) +
           " (the ranking scans the per-token sketch of tables [0, rank_tables), which a store keeps " +
           "only for its sketch_tables: create it with sketch_tables=" + str(a.rank_tables) + "), got " +
           str(a.rank_tables);
  if (!(a.top >= 0.0 && a.top <= 1.0))
    return "top must be a fraction in [0, 1], got " + std::to_string(a.top);
  if (!(a.refine >= 1.0 && a.refine <= 1e6))
    return "refine must be a number in [1, 1e6], got " + std::to_string(a.refine);
  return "";
}

}  // namespace pigjax
