// What a store holds in memory (private to store.cc and query.cc): per slot the middle tokens'
// K/V rows, key norms and hash tables, and the append buffer; the store's config, weight table
// and lock; and the registry lookup from a handle. The layout comments here are the reference
// for the indexing in store.cc (writes) and query.cc (reads).
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "huge_alloc.h"
#include "store.h"
#include "weight_table.h"

namespace pigjax {

// The hash tables of one block of `len` middle tokens (tokens [start, start + len) of the slot),
// the same for every KV head of the slot. Each table l lists the block's tokens grouped by
// bucket (uint16 token indices relative to the block); a directory of 2^bits + 1 int32 offsets
// per table gives each bucket's range in that list. Two layouts:
//  * direct (bits == K): the bucket is the code, so a query's range holds exactly the tokens
//    that share its code. The list is the token indices [L][len]: 4 (2^K + 1) + 2 len bytes
//    per table.
//  * compact (bits < K): the bucket is the code's top `bits` bits, with 2^bits in [len/2, len)
//    (1-2 tokens per bucket), and each list entry is a pair (token index, code): [L][len][2]
//    uint16, 4 (2^bits + 1) + 4 len bytes per table. A query scans its bucket and counts the
//    entries whose code equals its own: a second dependent load per table, slower than direct
//    (BUILD.md: +5-15% of a K = 10 query at n = 600-3000 if forced, +64% at K = 16, L = 512,
//    n = 600), so it is used only where it takes less than half the bytes of direct (blocks of
//    fewer than about 2^K / 3 tokens: 341 at K = 10, 21,845 at K = 16; never a full block).
//    One 600-token block at K = 16, L = 512 takes 2.3 MB instead of 134 MB per KV head.
// Both select exactly the tokens whose code equals the query's (same sampled sets, and the
// same union order, so bit-identical results).
struct BlockLayout {
  int64_t start = 0, len = 0;  // middle tokens of the block
  int bits = 0;                // directory bits (K: direct; fewer: compact)
  int64_t off = 0;             // start of the block's directory in a head's offsets (int32s)
  int64_t idx = 0;             // start of the block's lists in a head's entries (uint16s)
};

struct TableLayout {
  std::vector<BlockLayout> blocks;
  int64_t offsets_per_head = 0;  // int32s: sum over blocks of L * (2^bits + 1)
  int64_t entries_per_head = 0;  // uint16s: sum over blocks of L * len (x 2 if compact)
};

// Directory bits of a block of blen tokens (see BlockLayout): K (direct) unless the compact
// layout takes less than half the bytes. get_table_layout() (store.h, for tests and benchmarks)
// can force either layout: 0 always direct, 1 always compact.
inline int table_bits(int K, int64_t blen) {
  const int mode = get_table_layout();
  if (mode == 0) return K;
  int ceil_log2 = 0;
  while ((int64_t{1} << ceil_log2) < blen) ++ceil_log2;
  const int bits = std::min(K - 1, std::max(0, ceil_log2 - 1));
  if (mode > 0) return bits;
  const int64_t direct = 4 * ((int64_t{1} << K) + 1) + 2 * blen;
  const int64_t compact = 4 * ((int64_t{1} << bits) + 1) + 4 * blen;
  return 2 * compact < direct ? bits : K;
}

// The table layout of a slot with n middle tokens (blocks of kBlockTokens tokens).
inline TableLayout table_layout(int K, int64_t L, int64_t n) {
  TableLayout t;
  for (int64_t start = 0; start < n; start += kBlockTokens) {
    BlockLayout b;
    b.start = start;
    b.len = std::min(kBlockTokens, n - start);
    b.bits = table_bits(K, b.len);
    b.off = t.offsets_per_head;
    b.idx = t.entries_per_head;
    t.offsets_per_head += L * ((int64_t{1} << b.bits) + 1);
    t.entries_per_head += L * b.len * (b.bits < K ? 2 : 1);
    t.blocks.push_back(b);
  }
  return t;
}

struct SlotData {
  bool prefilled = false;
  int64_t n = 0;                   // middle tokens
  HugeVector<uint16_t> k16, v16;   // bf16 storage: [Hkv][n][d]
  HugeVector<float> k32, v32;      // f32 storage:  [Hkv][n][d]
  HugeVector<float> norms;         // [Hkv][n]
  HugeVector<uint64_t> sketch;     // [Hkv][sketch_size(n, W)]: tables [0, sketch_tables) (sketch.h)
  TableLayout layout;              // of the n middle tokens (set by prefill)
  HugeVector<int32_t> offsets;     // [Hkv][offsets_per_head]: per block [L'][2^bits + 1] (L' =
                                   // indexed_tables: table l at l - sketch_tables),
                                   // entry ranges within the block's table
  HugeVector<uint16_t> indices;    // [Hkv][entries_per_head]: per block [L'][len] token indices
                                   // (direct) or [L'][len][2] (index, code) pairs (compact)
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

  // Background prefills (store_prefill_background) queued or running: every other call on the
  // store waits until none is left (lookup_store), so it sees the tables they build.
  void begin_build() {
    std::lock_guard<std::mutex> lock(builds_mu);
    ++builds;
  }
  void end_build() {
    {
      std::lock_guard<std::mutex> lock(builds_mu);
      --builds;
    }
    builds_cv.notify_all();
  }
  void wait_builds() {
    std::unique_lock<std::mutex> lock(builds_mu);
    builds_cv.wait(lock, [&] { return builds == 0; });
  }
  int pending_builds() {
    std::lock_guard<std::mutex> lock(builds_mu);
    return builds;
  }

  // The weight table of a query that samples with `tables` of the L tables (query_ranked.h):
  // built on first use, then kept (a table is ~150 kB; a store sees one or two table counts).
  const LogWeightTable& weights_for_tables(int tables) {
    if (tables == cfg.L) return weights;
    std::lock_guard<std::mutex> lock(subset_mu);
    std::unique_ptr<LogWeightTable>& w = subset_weights[tables];
    if (!w) w = std::make_unique<LogWeightTable>(cfg.K, tables, cfg.eps);
    return *w;
  }

 private:
  std::mutex builds_mu;
  std::condition_variable builds_cv;
  int builds = 0;
  std::mutex subset_mu;
  std::map<int, std::unique_ptr<LogWeightTable>> subset_weights;
};

// The store of a handle (kept alive by the returned pointer even if freed meanwhile), or null
// with *err set for an unknown or freed handle. Unless wait_builds is false (a background prefill
// being queued), first waits for the store's background prefills. Defined in store.cc.
std::shared_ptr<Store> lookup_store(int64_t handle, std::string* err, bool wait_builds = true);

}  // namespace pigjax
