// The arguments of the store's prefill, append and query calls, as one view (pointer + shape)
// per array, and one validation function per call. The XLA FFI handlers (ffi_handlers.cc), the
// nanobind NumPy entry points (module.cc) and the C++ tests fill the same structs, and
// store_prefill / store_append / store_query run the matching validate_* first, so every check
// and its message (shapes against the store's config, slot indices, lengths and counts, code
// ranges) is written once. Pure C++17: no XLA, no Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pigjax {

struct StoreConfig;

// A C-contiguous array the caller owns: its data and its shape (checked by validate_*).
template <typename T>
struct ArrayView {
  T* data = nullptr;
  std::vector<int64_t> dims;
};

struct PrefillArgs {
  ArrayView<const int32_t> slots;    // s32 [B]
  ArrayView<const float> keys;       // f32 [B,Hkv,n,d]
  ArrayView<const float> values;     // f32 [B,Hkv,n,d]
  ArrayView<const int32_t> codes;    // s32 [B,Hkv,n,L]
  ArrayView<const int32_t> lengths;  // s32 [B]
  ArrayView<int32_t> middle_counts;  // s32 [B] (output)
  int64_t sink = 0;
  int64_t local = 0;
};

struct AppendArgs {
  ArrayView<const int32_t> slots;    // s32 [B]
  ArrayView<const float> keys;       // f32 [B,Hkv,T,d]
  ArrayView<const float> values;     // f32 [B,Hkv,T,d]
  ArrayView<const int32_t> codes;    // s32 [B,Hkv,T,L]
  ArrayView<const int32_t> counts;   // s32 [B], in [0, T]
  ArrayView<int32_t> totals;         // s32 [B] (output): middle + appended
};

struct QueryArgs {
  ArrayView<const int32_t> slots;    // s32 [B]
  ArrayView<const float> q;          // f32 [B,Hq,d]
  ArrayView<const int32_t> q_codes;  // s32 [B,Hq,L]
  ArrayView<float> out;              // f32 [B,Hq,d] (output)
  ArrayView<float> lse;              // f32 [B,Hq] (output)
  ArrayView<int32_t> sampled;        // s32 [B,Hq] (output)
  double sample_cap = 1;             // most sampled keys read, as a fraction of n (uniform thinning past it)
};

// The ranked query (query_ranked.h): the query's arrays, with `base.sampled` holding the keys
// read per head, plus the values read per head and the ranking settings.
struct RankedQueryArgs {
  QueryArgs base;                    // slots, q, q_codes, out, lse; sampled = keys read [B,Hq]
  ArrayView<int32_t> values_read;    // s32 [B,Hq] (output)
  int64_t rank_tables = 0;           // tables [0, rank_tables) rank (the store's sketch), the rest sample
  double top = 0;                    // fraction of a head's tokens read exactly
  double refine = 1;                 // keys ranked by the sketch and scored: refine x the top
};

// Each returns "" if the arguments fit a store with config c, else the message for an invalid
// argument (callers prefix the target or function name). They read the input arrays but not
// the store, so they run before the store's lock is taken; whether an append's slots were
// prefilled and have room is checked by store_append under the lock. Order: shapes (in field
// order), then values row by row, then the codes; the first failing check wins.
// validate_prefill also returns the middle count of each row in *middle.
std::string validate_prefill(const StoreConfig& c, const PrefillArgs& a,
                             std::vector<int64_t>* middle);
std::string validate_append(const StoreConfig& c, const AppendArgs& a);
std::string validate_query(const StoreConfig& c, const QueryArgs& a);
// validate_query on `base`, then values_read's shape, then the settings (ranges in query_ranked.h).
// validate_query checks sample_cap (in (0, 1]) after the shapes.
std::string validate_ranked_query(const StoreConfig& c, const RankedQueryArgs& a);

}  // namespace pigjax
