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
//   table indices 2*L bytes: uint16 index within a block of kBlockTokens = 65536 middle tokens
//                 (300 B at L = 150; MagicPIG's int32 indices take 600 B)
//   table offsets per block: L * (2^K + 1) int32 = 4*L*(2^K+1) bytes, i.e. amortised
//                 4*L*(2^K+1)/min(n, 65536) bytes per token (9.4 B at K=10, L=150 and a full
//                 block; 37.5 B at n = 16384).
// Storage is allocated lazily, sized to the middle count of each prefill (capacity is only
// a limit); vectors keep their allocation when a slot is prefilled again with fewer tokens.
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
//   codes) bytes, e.g. 860 B at d = 64, L = 150, bf16.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "store_args.h"

namespace pigjax {

constexpr int kLshMaxK = 16;
constexpr int64_t kBlockTokens = 65536;  // uint16 table indices are relative to a block

enum class StoreStorage : int { kF32 = 0, kBF16 = 1 };

struct StoreConfig {
  int64_t slots = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;  // max middle tokens per slot
  int K = 10;            // bits per table, 1..16
  int L = 150;           // tables, >= 2
  double eps = 1e-4;
  StoreStorage storage = StoreStorage::kBF16;
};

// Parses "f32" / "bf16".
bool parse_store_storage(const std::string& name, StoreStorage* out);
const char* store_storage_name(StoreStorage s);

// Validates the config; returns "" if fine, else a message.
std::string validate_store_config(const StoreConfig& cfg);

// Registry. store_create returns a handle >= 1, or 0 with *err set.
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
  int64_t bytes_allocated = 0;  // current heap bytes of all slots (capacity of the vectors)
};
bool store_info(int64_t handle, StoreInfo* info, std::string* err);

// Both return "" on success, else a message for an invalid argument (the store is then
// unchanged): validate_prefill / validate_append (store_args.h), then, for append, whether the
// slots were prefilled and have room. They may throw (std::bad_alloc, ...) on internal failures;
// callers catch. Thread-safe: both take the store's lock exclusively (a query shares it).
std::string store_prefill(int64_t handle, const PrefillArgs& args);
std::string store_append(int64_t handle, const AppendArgs& args);

}  // namespace pigjax
