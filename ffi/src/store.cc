// The LSH store: the registry of handles, create / free / info, and the two calls that write a
// store: prefill (copies the middle's rows, builds the tables by counting sort) and append
// (fills the append buffer). The query, which only reads, is in query.cc; the memory layout is
// in store_layout.h. See store.h for the semantics.
#include "store.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <unordered_map>

#include "background.h"
#include "bf16.h"
#include "sketch.h"
#include "store_layout.h"
#include "thread_pool.h"

namespace pigjax {

// ----------------------------------------------------------------------------------------
// Registry, config, create / free / info
// ----------------------------------------------------------------------------------------

namespace {

std::mutex g_registry_mu;
std::unordered_map<int64_t, std::shared_ptr<Store>>& registry() {
  static auto* r = new std::unordered_map<int64_t, std::shared_ptr<Store>>();
  return *r;
}
int64_t g_next_handle = 1;

}  // namespace

std::shared_ptr<Store> lookup_store(int64_t handle, std::string* err, bool wait_builds) {
  std::shared_ptr<Store> st;
  {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    auto& r = registry();
    auto it = r.find(handle);
    if (it == r.end()) {
      *err = "unknown or freed store handle " + std::to_string(handle);
      return nullptr;
    }
    st = it->second;
  }
  if (wait_builds) st->wait_builds();
  return st;
}

namespace {
std::atomic<int> g_table_layout{-1};
}  // namespace

void set_table_layout(int mode) { g_table_layout.store(mode < 0 ? -1 : (mode > 0 ? 1 : 0)); }
int get_table_layout() { return g_table_layout.load(std::memory_order_relaxed); }

bool parse_store_storage(const std::string& name, StoreStorage* out) {
  if (name == "f32" || name == "float32") { *out = StoreStorage::kF32; return true; }
  if (name == "bf16" || name == "bfloat16") { *out = StoreStorage::kBF16; return true; }
  return false;
}

const char* store_storage_name(StoreStorage s) {
  return s == StoreStorage::kF32 ? "f32" : "bf16";
}

std::string validate_store_config(const StoreConfig& c) {
  const auto str = [](int64_t v) { return std::to_string(v); };
  if (c.slots <= 0) return "slots must be positive, got " + str(c.slots);
  if (c.kv_heads <= 0) return "kv_heads must be positive, got " + str(c.kv_heads);
  if (c.head_dim <= 0) return "head_dim must be positive, got " + str(c.head_dim);
  if (c.capacity <= 0) return "capacity must be positive, got " + str(c.capacity);
  if (c.K < 1 || c.K > kLshMaxK)
    return "K must be in [1, " + str(kLshMaxK) + "], got " + str(c.K);
  if (c.L < 2) return "L must be >= 2, got " + str(c.L);
  if (c.L > kLshMaxL) return "L must be <= " + str(kLshMaxL) + ", got " + str(c.L);
  if (int64_t{c.K} * c.L > kLshMaxKL)
    return "K·L must be <= " + str(kLshMaxKL) + " (the SimHash projection has K·L columns and " +
           "every stored token L table entries), got K=" + str(c.K) + ", L=" + str(c.L) +
           " (K·L = " + str(int64_t{c.K} * c.L) + ")";
  if (c.sketch_tables < 0 || c.sketch_tables > c.L - 2)
    return "sketch_tables must be in [0, L - 2] = [0, " + str(c.L - 2) + "] (a ranked query samples " +
           "with the other tables, at least 2), got " + str(c.sketch_tables);
  if (!(c.eps > 0) || !std::isfinite(c.eps))
    return "eps must be a finite number > 0, got " + std::to_string(c.eps);
  if (c.storage != StoreStorage::kF32 && c.storage != StoreStorage::kBF16)
    return "storage must be 'f32' or 'bf16'";
  // Per-slot, per-head element counts must stay well inside int64 and our int32 indices.
  if (c.capacity > std::numeric_limits<int32_t>::max())
    return "capacity must be < 2^31, got " + str(c.capacity);
  if (c.slots > (int64_t{1} << 24)) return "slots must be <= 2^24, got " + str(c.slots);
  if (c.kv_heads > 4096) return "kv_heads must be <= 4096, got " + str(c.kv_heads);
  if (c.head_dim > 65536) return "head_dim must be <= 65536, got " + str(c.head_dim);
  return "";
}

// ----------------------------------------------------------------------------------------
// Memory: estimate and limit
// ----------------------------------------------------------------------------------------

int64_t prefill_bytes_per_head(const StoreConfig& c, int64_t m) {
  const int64_t elem = c.storage == StoreStorage::kBF16 ? 2 : 4;
  const TableLayout t = table_layout(c.K, indexed_tables(c), m);
  return 2 * elem * c.head_dim * m + 4 * m + 4 * t.offsets_per_head + 2 * t.entries_per_head +
         8 * sketch_size(m, sketch_words(c.sketch_tables, c.K));
}

std::string estimate_store_bytes(const StoreConfig& c, StoreEstimate* out) {
  std::string err = validate_store_config(c);
  if (!err.empty()) return err;
  const int64_t elem = c.storage == StoreStorage::kBF16 ? 2 : 4;
  out->prefill_per_slot_head = prefill_bytes_per_head(c, c.capacity);
  out->append_per_slot_head = (2 * elem * c.head_dim + 4 + 4 * int64_t{c.L}) * c.capacity;
  out->per_slot_head = c.appends ? std::max(out->prefill_per_slot_head, out->append_per_slot_head)
                                 : out->prefill_per_slot_head;
  const long double total =
      static_cast<long double>(out->per_slot_head) * c.slots * c.kv_heads;
  const int64_t max = std::numeric_limits<int64_t>::max();
  out->bytes = total >= static_cast<long double>(max) ? max
                                                       : out->per_slot_head * c.slots * c.kv_heads;
  return "";
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  int u = 0;
  while (bytes >= 1000 && u < 6) { bytes /= 1000; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g %s", bytes, units[u]);
  return buf;
}

namespace {

// MemAvailable from /proc/meminfo in bytes, or -1.
int64_t mem_available() {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return -1;
  char line[256];
  int64_t kb = -1;
  while (std::fgets(line, sizeof line, f) != nullptr) {
    long long v = 0;
    if (std::sscanf(line, "MemAvailable: %lld kB", &v) == 1) { kb = v; break; }
  }
  std::fclose(f);
  return kb < 0 ? -1 : kb * 1024;
}

}  // namespace

std::string store_memory_limit(int64_t* bytes, std::string* source) {
  const char* env = std::getenv("PIGJAX_ENGINE_MAX_BYTES");
  if (env != nullptr && *env != '\0') {
    const std::string v = env;
    if (v == "unlimited") {
      *bytes = -1;
      *source = "PIGJAX_ENGINE_MAX_BYTES=unlimited";
      return "";
    }
    const std::string bad = "PIGJAX_ENGINE_MAX_BYTES must be a positive number of bytes, "
                            "optionally with a suffix k, M, G or T (e.g. 8G), or 'unlimited'; got '" +
                            v + "'";
    char* end = nullptr;
    errno = 0;
    double x = std::strtod(env, &end);
    if (end == env || errno != 0) return bad;
    std::string rest = end;
    const std::string suffixes = "kMGT";
    double scale = 1;
    if (!rest.empty() && suffixes.find(rest[0]) != std::string::npos) {
      for (size_t i = 0; i <= suffixes.find(rest[0]); ++i) scale *= 1000;
      rest = rest.substr(1);
    }
    if (rest == "B" || rest == "b") rest.clear();
    x *= scale;
    if (!rest.empty() || !(x >= 1) || !std::isfinite(x)) return bad;
    *bytes = x >= 9.2e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(x);
    *source = "set by PIGJAX_ENGINE_MAX_BYTES=" + v;
    return "";
  }
  *bytes = mem_available();
  *source = *bytes < 0 ? "" : "this machine has available (MemAvailable in /proc/meminfo; "
                              "PIGJAX_ENGINE_MAX_BYTES overrides it)";
  return "";
}

int64_t store_create(const StoreConfig& cfg, std::string* err) {
  StoreEstimate est;
  *err = estimate_store_bytes(cfg, &est);
  if (!err->empty()) return 0;
  int64_t limit = -1;
  std::string source;
  *err = store_memory_limit(&limit, &source);
  if (!err->empty()) return 0;
  if (limit >= 0 && est.bytes > limit) {
    const auto str = [](int64_t v) { return std::to_string(v); };
    *err = "K=" + str(cfg.K) + ", L=" + str(cfg.L) + " for " + str(cfg.slots) + " slots x " +
           str(cfg.kv_heads) + " KV heads x " + str(cfg.capacity) + " tokens (head_dim " +
           str(cfg.head_dim) + ", " + store_storage_name(cfg.storage) +
           (cfg.appends ? ", appends" : "") + ") needs ~" +
           human_bytes(double(est.bytes)) + " (" + str(est.bytes) + " bytes, " +
           human_bytes(double(est.per_slot_head)) + " per slot and KV head), more than the " +
           human_bytes(double(limit)) + " " + source;
    return 0;
  }
  auto store = std::make_shared<Store>(cfg);
  std::lock_guard<std::mutex> lock(g_registry_mu);
  const int64_t h = g_next_handle++;
  registry().emplace(h, std::move(store));
  return h;
}

bool store_free(int64_t handle, std::string* err) {
  std::shared_ptr<Store> victim;  // destroyed outside the registry lock
  {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    auto& r = registry();
    auto it = r.find(handle);
    if (it == r.end()) {
      *err = "unknown or freed store handle " + std::to_string(handle);
      return false;
    }
    victim = std::move(it->second);
    r.erase(it);
  }
  victim->wait_builds();  // a build in flight would outlive the call that frees its store
  return true;
}

bool store_info(int64_t handle, StoreInfo* info, std::string* err) {
  std::shared_ptr<Store> st = lookup_store(handle, err);
  if (!st) return false;
  const StoreConfig& c = st->cfg;
  info->config = c;
  std::shared_lock<std::shared_mutex> lock(st->mu);
  info->middle_counts.clear();
  info->appended_counts.clear();
  info->prefilled.clear();
  info->table_bits.clear();
  int64_t bytes = 0;
  for (const SlotData& s : st->slots) {
    info->middle_counts.push_back(s.n);
    info->appended_counts.push_back(s.na);
    info->prefilled.push_back(s.prefilled);
    std::vector<int> bits;
    if (s.prefilled)
      for (const BlockLayout& b : s.layout.blocks) bits.push_back(b.bits);
    info->table_bits.push_back(bits);
    bytes += s.k16.capacity() * 2 + s.v16.capacity() * 2 + s.k32.capacity() * 4 +
             s.v32.capacity() * 4 + s.norms.capacity() * 4 + s.offsets.capacity() * 4 +
             s.indices.capacity() * 2 + s.sketch.capacity() * 8;
    for (const SlotData::Appended& a : s.app)
      bytes += a.k16.capacity() * 2 + a.v16.capacity() * 2 + a.k32.capacity() * 4 +
               a.v32.capacity() * 4 + a.norms.capacity() * 4 + a.codes.capacity() * 4;
  }
  info->bytes_allocated = bytes;
  const double elem = c.storage == StoreStorage::kBF16 ? 2.0 : 4.0;
  info->bytes_per_appended_token = 2.0 * elem * c.head_dim + 4.0 + 4.0 * c.L;
  const double per_block = 4.0 * indexed_tables(c) * ((int64_t{1} << c.K) + 1);
  info->bytes_per_token = {
      {"keys", elem * c.head_dim},
      {"values", elem * c.head_dim},
      {"key_norms", 4.0},
      {"table_indices", 2.0 * indexed_tables(c)},
      {"table_offsets", per_block / kBlockTokens},
      {"table_offsets_per_block", per_block},
      {"sketch", 8.0 * sketch_words(c.sketch_tables, c.K)},
  };
  return true;
}

// ----------------------------------------------------------------------------------------
// Writing rows and tables
// ----------------------------------------------------------------------------------------

namespace {

struct BuildScratch {
  std::vector<uint16_t> codes;   // [16 tables][block tokens]
  std::vector<int32_t> cursor;   // [2^K]
};
BuildScratch& build_scratch() {
  thread_local BuildScratch s;
  return s;
}

// Copies/rounds one (row, KV head)'s middle keys and values and computes the key norms.
template <typename T>
void store_rows(const float* src, int64_t m, int64_t d, T* dst);
template <>
void store_rows<float>(const float* src, int64_t m, int64_t d, float* dst) {
  if (m > 0) std::memcpy(dst, src, sizeof(float) * m * d);
}
template <>
void store_rows<uint16_t>(const float* src, int64_t m, int64_t d, uint16_t* dst) {
  for (int64_t i = 0; i < m * d; ++i) dst[i] = f32_to_bf16(src[i]);
}

template <typename T>
void key_norms(const T* k, int64_t m, int64_t d, float* norms) {
  for (int64_t r = 0; r < m; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double x = ld(k + r * d, i);
      ss += x * x;
    }
    norms[r] = static_cast<float>(std::sqrt(ss));
  }
}

// Resizes an append-buffer array to `tokens` rows of `row` elements, growing its allocation by
// doubling (amortised O(1) per appended token) but never beyond `room` rows, the most the
// buffer can hold: so the buffer never allocates more than estimate_store_bytes counts.
template <typename T>
void grow(std::vector<T>& v, int64_t tokens, int64_t room, int64_t row) {
  const size_t need = static_cast<size_t>(tokens * row);
  if (need > v.capacity())
    v.reserve(std::max(need, std::min(2 * v.capacity(), static_cast<size_t>(room * row))));
  v.resize(need);
}

}  // namespace

// ----------------------------------------------------------------------------------------
// prefill
// ----------------------------------------------------------------------------------------

namespace {

// The writes of a validated prefill (middle[b]: row b's middle count), under the exclusive lock;
// the caller reports the counts. May throw (std::bad_alloc).
void build_prefill(Store* st, const PrefillArgs& io, const std::vector<int64_t>& middle) {
  const StoreConfig& c = st->cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  const int64_t B = io.slots.dims[0], n = io.keys.dims[2];

  std::unique_lock<std::shared_mutex> lock(st->mu);
  const bool bf16 = c.storage == StoreStorage::kBF16;
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots.data[b]];
    s.prefilled = false;
    s.n = 0;
    s.na = 0;  // a prefill clears the append buffer (keeping its allocation)
    for (SlotData::Appended& ap : s.app) {
      ap.k16.clear(); ap.v16.clear(); ap.k32.clear(); ap.v32.clear();
      ap.norms.clear(); ap.codes.clear();
    }
    const int64_t m = middle[b];
    const size_t kv = static_cast<size_t>(Hkv * m * d);
    if (bf16) { s.k16.resize(kv); s.v16.resize(kv); } else { s.k32.resize(kv); s.v32.resize(kv); }
    s.norms.resize(static_cast<size_t>(Hkv * m));
    s.layout = table_layout(c.K, indexed_tables(c), m);
    s.offsets.resize(static_cast<size_t>(Hkv * s.layout.offsets_per_head));
    s.indices.resize(static_cast<size_t>(Hkv * s.layout.entries_per_head));
    s.sketch.resize(static_cast<size_t>(Hkv * sketch_size(m, sketch_words(c.sketch_tables, c.K))));
  }

  // Keys (rounded), norms of the stored keys, values, sketches.
  const int64_t W = sketch_words(c.sketch_tables, c.K);
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, h = task % Hkv, m = middle[b];
    SlotData& s = st->slots[io.slots.data[b]];
    if (W > 0) {
      uint64_t* sk = s.sketch.data() + h * sketch_size(m, W);
      const int32_t* cd = io.codes.data + (task * n + io.sink) * L;
      std::fill(sk, sk + sketch_size(m, W), uint64_t{0});
      for (int64_t i = 0; i < m; ++i)
        pack_sketch(cd + i * L, c.sketch_tables, c.K, sk + (i / kSketchBlock) * W * kSketchBlock + i % kSketchBlock,
                    kSketchBlock);
    }
    const float* ks = io.keys.data + (task * n + io.sink) * d;
    const float* vs = io.values.data + (task * n + io.sink) * d;
    if (bf16) {
      store_rows(ks, m, d, s.k16.data() + h * m * d);
      store_rows(vs, m, d, s.v16.data() + h * m * d);
      key_norms(s.k16.data() + h * m * d, m, d, s.norms.data() + h * m);
    } else {
      store_rows(ks, m, d, s.k32.data() + h * m * d);
      store_rows(vs, m, d, s.v32.data() + h * m * d);
      key_norms(s.k32.data() + h * m * d, m, d, s.norms.data() + h * m);
    }
  });

  // Tables: one task per (row, head, block, group of 16 tables); counting sort by bucket (the
  // code, or its top bits in a compact block: see BlockLayout in store_layout.h). Only the
  // indexed tables [t0, L) get bucket lists (table l at position l - t0).
  constexpr int64_t kTablesPerTask = 16;
  const int64_t t0 = c.sketch_tables;
  const int64_t groups = (L - t0 + kTablesPerTask - 1) / kTablesPerTask;
  struct Task { int64_t b, h, bk, g; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nblocks = static_cast<int64_t>(st->slots[io.slots.data[b]].layout.blocks.size());
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t bk = 0; bk < nblocks; ++bk)
        for (int64_t g = 0; g < groups; ++g) tasks.push_back({b, h, bk, g});
  }
  parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t ti) {
    const Task t = tasks[ti];
    SlotData& s = st->slots[io.slots.data[t.b]];
    const BlockLayout& blk = s.layout.blocks[t.bk];
    const int64_t blen = blk.len, NB = int64_t{1} << blk.bits;
    const int shift = c.K - blk.bits;
    const int32_t* cd = io.codes.data + ((t.b * Hkv + t.h) * n + io.sink + blk.start) * L;
    int32_t* off = s.offsets.data() + t.h * s.layout.offsets_per_head + blk.off;
    uint16_t* idx = s.indices.data() + t.h * s.layout.entries_per_head + blk.idx;
    const int64_t l0 = t0 + t.g * kTablesPerTask, l1 = std::min(L, l0 + kTablesPerTask);
    const int64_t nl = l1 - l0;
    // Transpose this group's codes to [table][token] (uint16: K <= 16), then one counting
    // sort per table: 2^bits counters and 2^bits write cursors stay cache-resident.
    BuildScratch& bs = build_scratch();
    bs.codes.resize(static_cast<size_t>(nl * blen));
    bs.cursor.resize(static_cast<size_t>(NB));
    uint16_t* tc = bs.codes.data();
    for (int64_t r = 0; r < blen; ++r) {
      const int32_t* cr = cd + r * L + l0;
      for (int64_t j = 0; j < nl; ++j) tc[j * blen + r] = static_cast<uint16_t>(cr[j]);
    }
    int32_t* cur = bs.cursor.data();
    for (int64_t l = l0; l < l1; ++l) {
      const uint16_t* col = tc + (l - l0) * blen;
      int32_t* o = off + (l - t0) * (NB + 1);
      std::fill(o, o + NB + 1, 0);
      for (int64_t r = 0; r < blen; ++r) ++o[(col[r] >> shift) + 1];
      for (int64_t c2 = 1; c2 <= NB; ++c2) o[c2] += o[c2 - 1];
      std::copy(o, o + NB, cur);
      if (shift == 0) {  // direct: token indices
        uint16_t* dst = idx + (l - t0) * blen;
        for (int64_t r = 0; r < blen; ++r) dst[cur[col[r]]++] = static_cast<uint16_t>(r);
      } else {  // compact: (token index, code) pairs
        uint16_t* dst = idx + (l - t0) * blen * 2;
        for (int64_t r = 0; r < blen; ++r) {
          const int32_t at = cur[col[r] >> shift]++;
          dst[2 * at] = static_cast<uint16_t>(r);
          dst[2 * at + 1] = col[r];
        }
      }
    }
  });

  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots.data[b]];
    s.n = middle[b];
    s.prefilled = true;
  }
}

void write_counts(const PrefillArgs& io, const std::vector<int64_t>& middle) {
  for (size_t b = 0; b < middle.size(); ++b) io.middle_counts.data[b] = static_cast<int32_t>(middle[b]);
}

}  // namespace

std::string store_prefill(int64_t handle, const PrefillArgs& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err);
  if (!st) return err;
  std::vector<int64_t> middle;  // per row
  err = validate_prefill(st->cfg, io, &middle);
  if (!err.empty()) return err;
  build_prefill(st.get(), io, middle);
  write_counts(io, middle);
  return "";
}

std::string store_prefill_background(int64_t handle, const PrefillArgs& io, BuildDone done, void* ctx) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err, /*wait_builds=*/false);
  if (!st) return err;
  std::vector<int64_t> middle;
  err = validate_prefill(st->cfg, io, &middle);
  if (!err.empty()) return err;
  write_counts(io, middle);
  st->begin_build();
  PrefillArgs args = io;
  args.middle_counts = {};  // reported above; the build must not write it again
  run_in_background([st, args, middle = std::move(middle), done, ctx] {
    std::string build_err;
    try {
      build_prefill(st.get(), args, middle);
    } catch (const std::exception& e) {
      build_err = std::string("internal error while building the tables: ") + e.what();
    } catch (...) {
      build_err = "internal error while building the tables";
    }
    done(ctx, build_err.c_str());  // first: a caller that waited for the build sees its error
    st->end_build();
  });
  return "";
}

bool store_wait_builds(int64_t handle, std::string* err) { return lookup_store(handle, err) != nullptr; }

int store_pending_builds(int64_t handle, std::string* err) {
  std::shared_ptr<Store> st = lookup_store(handle, err, /*wait_builds=*/false);
  return st ? st->pending_builds() : -1;
}

// ----------------------------------------------------------------------------------------
// append
// ----------------------------------------------------------------------------------------

std::string store_append(int64_t handle, const AppendArgs& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup_store(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  err = validate_append(c, io);
  if (!err.empty()) return err;
  const int64_t B = io.slots.dims[0], T = io.keys.dims[2];

  // Checks that depend on the slots' state, then the writes, under the exclusive lock.
  std::unique_lock<std::shared_mutex> lock(st->mu);
  if (!c.appends)
    return "this store was created without appends (appends=false): create it with appends=true "
           "to append";
  for (int64_t b = 0; b < B; ++b) {
    const SlotData& s = st->slots[io.slots.data[b]];
    if (!s.prefilled)
      return "slot " + std::to_string(io.slots.data[b]) +
             " was never prefilled: prefill the slot first, then append";
    const int64_t after = s.n + s.na + io.counts.data[b];
    if (after > c.capacity)
      return "row " + std::to_string(b) + ": appending " + std::to_string(io.counts.data[b]) +
             " tokens to slot " + std::to_string(io.slots.data[b]) + " (" + std::to_string(s.n) +
             " middle + " + std::to_string(s.na) + " appended) exceeds the store capacity " +
             std::to_string(c.capacity);
  }
  const bool bf16 = c.storage == StoreStorage::kBF16;
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots.data[b]];
    if (s.app.size() != static_cast<size_t>(Hkv)) s.app.resize(static_cast<size_t>(Hkv));
  }
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, h = task % Hkv, cnt = io.counts.data[b];
    SlotData& s = st->slots[io.slots.data[b]];
    SlotData::Appended& a = s.app[static_cast<size_t>(h)];
    const int64_t old = s.na, now = old + cnt;
    const float* ks = io.keys.data + task * T * d;
    const float* vs = io.values.data + task * T * d;
    const int64_t room = c.capacity - s.n;  // the buffer never needs more tokens than this
    if (bf16) {
      grow(a.k16, now, room, d);
      grow(a.v16, now, room, d);
      store_rows(ks, cnt, d, a.k16.data() + old * d);
      store_rows(vs, cnt, d, a.v16.data() + old * d);
    } else {
      grow(a.k32, now, room, d);
      grow(a.v32, now, room, d);
      store_rows(ks, cnt, d, a.k32.data() + old * d);
      store_rows(vs, cnt, d, a.v32.data() + old * d);
    }
    grow(a.norms, now, room, 1);
    if (bf16) key_norms(a.k16.data() + old * d, cnt, d, a.norms.data() + old);
    else key_norms(a.k32.data() + old * d, cnt, d, a.norms.data() + old);
    grow(a.codes, now, room, L);
    if (cnt > 0)
      std::memcpy(a.codes.data() + old * L, io.codes.data + task * T * L, sizeof(int32_t) * cnt * L);
  });
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots.data[b]];
    s.na += io.counts.data[b];
    io.totals.data[b] = static_cast<int32_t>(s.n + s.na);
  }
  return "";
}

}  // namespace pigjax
