// LSH KV store (MagicPIG, docs/algorithm.md §2.4-2.6, CPU side): configuration, the registry of
// stores, and the calls that write a store (prefill, append). Pure C++17: no XLA, no Python.
//
// A store holds, per (slot, KV head), the *middle* tokens of a prefilled sequence:
// centered keys, values, fp32 key norms (of the stored, possibly bf16-rounded, keys) and
// L hash tables (bucket code -> token indices). Stores live in a process-wide registry
// keyed by an int64 handle (never reused; a freed or unknown handle is an error).
//
// prefill(slot, keys[Hkv,n,d], values[Hkv,n,d], codes[Hkv,n,L], length, sink, local):
//   middle = positions [sink, max(sink, length - local)); middle index i <-> position sink+i.
//   Replaces whatever the slot held. The middle count must be <= capacity.
//
// query: see query.h.
//
// Memory per middle token per KV head (see BUILD.md, "LSH store memory"):
//   keys          2*d bytes (bf16) or 4*d (f32)
//   values        2*d bytes (bf16) or 4*d (f32)
//   key norms     4 bytes (fp32)
//   sketch        8 * ceil(sketch_tables * K / 64) bytes (0 unless sketch_tables > 0; 64 B at
//                 50 tables of K = 10), for whole blocks of 8 tokens (sketch.h)
//   table indices 2*L' bytes, L' = L - sketch_tables (the indexed tables): uint16 index within
//                 a block of kBlockTokens = 65536 middle tokens (300 B at L' = 150; MagicPIG's
//                 int32 indices take 600 B)
//   table offsets per block of len tokens (store_layout.h, BlockLayout), two layouts:
//     direct: L' * (2^K + 1) int32, i.e. amortised 4*L'*(2^K+1)/len bytes per token (9.4 B at
//       K=10, L=150 and a full block; 37.5 B at n = 16384);
//     compact, used when it takes less than half the bytes (blocks of fewer than ~2^K / 3
//       tokens): L * (2^b + 1) int32 with 2^b in [len/2, len), and each index stored with its
//       uint16 code: under (6 + 4/len)*L bytes per token on top of the indices (e.g. 2.4 MB
//       instead of 135 MB per KV head for one 600-token row at K = 16, L = 512, d = 64).
// Storage is allocated lazily, sized to the middle count of each prefill (capacity is only
// a limit); vectors keep their allocation when a slot is prefilled again with fewer tokens.
//
// store_create rejects a config whose estimated bytes (estimate_store_bytes: every slot full)
// exceed the memory limit (store_memory_limit: PIGJAX_ENGINE_MAX_BYTES, else MemAvailable).
//
// append(slot, keys[Hkv,T,d], values[Hkv,T,d], codes[Hkv,T,L], count)  (beyond the paper):
//   adds the first `count` of T tokens (e.g. generated ones, centered by the caller) to a
//   prefilled slot's append buffer; a later prefill of the slot clears it. Appended token t
//   is token n + t of the slot: it is sampled iff its codes equal the query's in >= 2 tables
//   and weighted by the same 1/(u + eps) as a middle token, so the estimator stays unbiased.
//   The buffer is scanned linearly at query time (L code comparisons per appended token and
//   query head; its candidates join the table candidates in the same union, each row read
//   once per GQA group): fine for up to a few thousand tokens; rebuilding it into the tables
//   is future work. middle + appended <= capacity.
//   Memory per appended token per KV head: keys + values (as above) + 4 (norm) + 4*L (int32
//   codes) bytes, e.g. 860 B at d = 64, L = 150, bf16. The buffer grows by doubling, capped at
//   the slot's room (capacity - middle tokens), so it never holds more than that.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "store_args.h"

namespace pigjax {

constexpr int kLshMaxK = 16;
constexpr int64_t kLshMaxL = 65536;
constexpr int64_t kLshMaxKL = 65536;     // K * L: SimHash projection columns
constexpr int64_t kBlockTokens = 65536;  // uint16 table indices are relative to a block

enum class StoreStorage : int { kF32 = 0, kBF16 = 1 };

struct StoreConfig {
  int64_t slots = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;  // max middle tokens per slot
  int K = 10;            // bits per table, 1..16
  int L = 150;           // tables, 2..65536, K * L <= 65536
  double eps = 1e-4;     // finite, > 0
  StoreStorage storage = StoreStorage::kBF16;
  bool appends = true;   // false: store_append is an error, and the estimate counts prefills only
  // Tables [0, sketch_tables) are kept per middle token as a packed sketch of their codes
  // (sketch.h), which the ranked query scans (query_ranked.h), instead of as bucket lists: only
  // tables [sketch_tables, L) are indexed, so such a store serves ranked queries only (the
  // plain query, which walks every table, refuses it). 0 (MagicPIG) indexes all L.
  // 0 <= sketch_tables <= L - 2.
  int64_t sketch_tables = 0;
};

// The tables a store keeps bucket lists for: [sketch_tables, L).
inline int64_t indexed_tables(const StoreConfig& c) { return c.L - c.sketch_tables; }

// Parses "f32" / "bf16".
bool parse_store_storage(const std::string& name, StoreStorage* out);
const char* store_storage_name(StoreStorage s);

// Validates the config's values (not its memory); returns "" if fine, else a message naming
// the setting.
std::string validate_store_config(const StoreConfig& cfg);

// What a store allocates (the heap bytes StoreInfo::bytes_allocated counts; arrays of >= 2 MiB
// are also rounded up to 2 MiB pages) with every slot full.
struct StoreEstimate {
  int64_t prefill_per_slot_head = 0;  // a (slot, KV head) prefilled with `capacity` middle tokens
  int64_t append_per_slot_head = 0;   // its append buffer holding `capacity` tokens (at most)
  int64_t per_slot_head = 0;          // the larger of the two (appends), else the prefill's
  int64_t bytes = 0;                  // slots * kv_heads * per_slot_head, saturated at INT64_MAX
};
// Bytes of one (slot, KV head) prefilled with m middle tokens: exactly what prefill allocates.
int64_t prefill_bytes_per_head(const StoreConfig& cfg, int64_t m);
// Returns validate_store_config(cfg) and, if that is "", fills *out. With cfg.appends, a slot
// may be filled by appends instead (4*L code bytes per token: more than a prefill's tables at
// large n), so per_slot_head is the larger of the two. A slot re-prefilled with fewer tokens
// keeps its arrays, and an append buffer keeps its allocation over a later prefill, so a store
// used both ways can exceed the estimate (at most by the smaller term).
std::string estimate_store_bytes(const StoreConfig& cfg, StoreEstimate* out);

// The limit store_create checks estimates against, read at each call: PIGJAX_ENGINE_MAX_BYTES
// (a positive number of bytes, optionally with a decimal suffix k, M, G or T and a trailing B,
// e.g. "8G"; or "unlimited"), else MemAvailable from /proc/meminfo, else none. Sets *bytes
// (-1: no limit) and *source (for messages); returns "" or the message for a bad variable.
std::string store_memory_limit(int64_t* bytes, std::string* source);

// "13.2 GB", "404 MB", "1.75 kB", "12 B" (decimal units, 3 significant digits).
std::string human_bytes(double bytes);

// The table layout of later prefills (store_layout.h, BlockLayout): -1 = auto (compact iff 2^K
// exceeds the block's token count; the default), 0 = always direct, 1 = always compact.
// Process-wide; for tests and benchmarks (results are identical; memory and speed differ).
// A slot keeps the layout it was prefilled with.
void set_table_layout(int mode);
int get_table_layout();

// Registry. store_create returns a handle >= 1, or 0 with *err set: an invalid config
// (validate_store_config), or an estimate above the memory limit (message naming K, L, the
// sizes, the bytes and the limit).
int64_t store_create(const StoreConfig& cfg, std::string* err);
// Returns false with *err set for an unknown or already freed handle. A store freed while a
// call uses it stays alive until that call returns.
bool store_free(int64_t handle, std::string* err);

struct StoreInfo {
  StoreConfig config;
  std::vector<int64_t> middle_counts;  // per slot (0 if never prefilled)
  std::vector<int64_t> appended_counts;  // per slot: tokens in the append buffer
  std::vector<bool> prefilled;         // per slot
  // Bytes per middle token per KV head of each structure. "table_offsets" is amortised over
  // a full block of 65536 tokens; "table_offsets_per_block" is bytes per block per KV head.
  std::vector<std::pair<std::string, double>> bytes_per_token;
  double bytes_per_appended_token = 0;  // per KV head: keys + values + norm + 4*L code bytes
  // Per slot: the directory bits of each block's tables (K: direct; fewer: compact, see
  // store_layout.h); empty if the slot holds no middle tokens.
  std::vector<std::vector<int>> table_bits;
  int64_t bytes_allocated = 0;  // current heap bytes of all slots (capacity of the vectors)
};
bool store_info(int64_t handle, StoreInfo* info, std::string* err);

// Both return "" on success, else a message for an invalid argument (the store is then
// unchanged): validate_prefill / validate_append (store_args.h), then, for append, whether the
// slots were prefilled and have room. They may throw (std::bad_alloc, ...) on internal failures;
// callers catch. Thread-safe: both take the store's lock exclusively (a query shares it).
std::string store_prefill(int64_t handle, const PrefillArgs& args);
std::string store_append(int64_t handle, const AppendArgs& args);

// The non-blocking prefill (docs/gpu_engine.md, "Table building overlapped with the prefill"):
// validates as store_prefill and writes middle_counts, then returns while the background thread
// (background.h) builds the tables from the operands, which must stay valid until it calls
// done(ctx, message) (message "" on success, else an internal error). Every other call on the
// store, free included, first waits for its builds; background prefills run in the order they
// were made. Returns a validation message (done is then never called), or "".
using BuildDone = void (*)(void* ctx, const char* message);
std::string store_prefill_background(int64_t handle, const PrefillArgs& args, BuildDone done, void* ctx);
// Background prefills of the store not yet built, or -1 with *err set for an unknown handle.
int store_pending_builds(int64_t handle, std::string* err);
// Waits until the store's background prefills are built; false with *err set for an unknown handle.
bool store_wait_builds(int64_t handle, std::string* err);

}  // namespace pigjax
