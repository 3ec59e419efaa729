// What a store holds in memory (private to store.cc and query.cc): per slot the middle tokens'
// K/V rows, key norms and hash tables, and the append buffer; the store's config, weight table
// and lock; and the registry lookup from a handle. The layout comments here are the reference
// for the indexing in store.cc (writes) and query.cc (reads).
#pragma once

#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "huge_alloc.h"
#include "store.h"
#include "weight_table.h"

namespace pigjax {

struct SlotData {
  bool prefilled = false;
  int64_t n = 0;                   // middle tokens
  HugeVector<uint16_t> k16, v16;   // bf16 storage: [Hkv][n][d]
  HugeVector<float> k32, v32;      // f32 storage:  [Hkv][n][d]
  HugeVector<float> norms;         // [Hkv][n]
  HugeVector<int32_t> offsets;     // [Hkv][nblocks][L][2^K + 1], relative to the block
  HugeVector<uint16_t> indices;    // [Hkv][nblocks][L][block_len], index within the block
  // Append buffer: token t of a head is token n + t of the slot (same count for every head).
  struct Appended {
    std::vector<uint16_t> k16, v16;  // [na][d]
    std::vector<float> k32, v32;     // [na][d]
    std::vector<float> norms;        // [na]
    std::vector<int32_t> codes;      // [na][L]
  };
  int64_t na = 0;
  std::vector<Appended> app;       // [Hkv], allocated on the first append
};

struct Store {
  explicit Store(const StoreConfig& c)
      : cfg(c), weights(c.K, c.L, c.eps), slots(static_cast<size_t>(c.slots)) {}
  const StoreConfig cfg;
  const LogWeightTable weights;
  std::shared_mutex mu;            // prefill / append: exclusive; query: shared
  std::vector<SlotData> slots;
};

// The store of a handle (kept alive by the returned pointer even if freed meanwhile), or null
// with *err set for an unknown or freed handle. Defined in store.cc.
std::shared_ptr<Store> lookup_store(int64_t handle, std::string* err);

// Blocks of kBlockTokens middle tokens (each has its own table offsets; indices are uint16).
inline int64_t num_blocks(int64_t n) { return (n + kBlockTokens - 1) / kBlockTokens; }

}  // namespace pigjax
