// LSH KV store (MagicPIG, SPEC §2 steps 4-6, CPU side). Pure C++17: no XLA, no Python.
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
// query(slot, q[Hq,d], q_codes[Hq,L]); query head h uses KV head h / (Hq/Hkv):
//   S = { i : #{l : codes_i[l] == q_codes[h,l]} >= 2 }
//   cos_i = clamp(q.k_i / (|q||k_i|), -1, 1)  (0 if |q| == 0 or |k_i| == 0)
//   p = 1 - acos(cos_i)/pi;  P = p^K;  u = 1 - (1-P)^L - L P (1-P)^(L-1)  (double, clamp [0,1])
//   score_i = q.k_i / sqrt(d) + log(1 / (u + eps))
//   lse = logsumexp_i score_i;  o = sum_i exp(score_i - lse) v_i;  sampled = |S|
//   Empty S: o = 0, lse = -inf, sampled = 0 (also for a slot that was never prefilled).
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
#include <functional>
#include <memory>
#include <string>
#include <vector>

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

// -log(u + eps) as a function of the angle between query and key (SPEC §2 step 5-6), tabulated.
class LogWeightTable {
 public:
  static constexpr int kIntervals = 16384;
  static constexpr double kMaxTableError = 1e-7;
  LogWeightTable(int K, int L, double eps);
  double operator()(double dot, double qnorm, double knorm) const;

 private:
  int K_, L_;
  double eps_;
  std::vector<double> f_;        // values at cos(theta) = -1 + 2 i / kIntervals
  std::vector<uint8_t> exact_;   // interval i evaluates the formula instead of interpolating
};

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

// Buffers of one prefill call (shapes as given by the caller; validated by store_prefill).
struct PrefillIO {
  const int32_t* slots = nullptr;   std::vector<int64_t> slots_dims;    // s32 [B]
  const float* keys = nullptr;      std::vector<int64_t> keys_dims;     // f32 [B,Hkv,n,d]
  const float* values = nullptr;    std::vector<int64_t> values_dims;   // f32 [B,Hkv,n,d]
  const int32_t* codes = nullptr;   std::vector<int64_t> codes_dims;    // s32 [B,Hkv,n,L]
  const int32_t* lengths = nullptr; std::vector<int64_t> lengths_dims;  // s32 [B]
  int32_t* middle_counts = nullptr; std::vector<int64_t> middle_counts_dims;  // s32 [B]
  int64_t sink = 0;
  int64_t local = 0;
};

struct QueryIO {
  const int32_t* slots = nullptr;   std::vector<int64_t> slots_dims;    // s32 [B]
  const float* q = nullptr;         std::vector<int64_t> q_dims;        // f32 [B,Hq,d]
  const int32_t* q_codes = nullptr; std::vector<int64_t> q_codes_dims;  // s32 [B,Hq,L]
  float* out = nullptr;             std::vector<int64_t> out_dims;      // f32 [B,Hq,d]
  float* lse = nullptr;             std::vector<int64_t> lse_dims;      // f32 [B,Hq]
  int32_t* sampled = nullptr;       std::vector<int64_t> sampled_dims;  // s32 [B,Hq]
};

// Buffers of one append call.
struct AppendIO {
  const int32_t* slots = nullptr;   std::vector<int64_t> slots_dims;    // s32 [B]
  const float* keys = nullptr;      std::vector<int64_t> keys_dims;     // f32 [B,Hkv,T,d]
  const float* values = nullptr;    std::vector<int64_t> values_dims;   // f32 [B,Hkv,T,d]
  const int32_t* codes = nullptr;   std::vector<int64_t> codes_dims;    // s32 [B,Hkv,T,L]
  const int32_t* counts = nullptr;  std::vector<int64_t> counts_dims;   // s32 [B], in [0, T]
  int32_t* totals = nullptr;        std::vector<int64_t> totals_dims;   // s32 [B]: middle+appended
};

// All return "" on success, else a message for an invalid argument (the store is then
// unchanged). They may throw (std::bad_alloc, ...) on internal failures; callers catch.
// Thread-safe: prefill and append take the store's lock exclusively, query shares it.
std::string store_prefill(int64_t handle, const PrefillIO& io);
std::string store_append(int64_t handle, const AppendIO& io);
std::string store_query(int64_t handle, const QueryIO& io);

// Persistent worker pool shared by all stores. n >= 1 is the total parallelism (the calling
// thread works too, so n - 1 workers are spawned). Default: default_num_threads().
void set_num_threads(int n);
int get_num_threads();
// Runs fn(0..n-1) on the pool; the caller participates. Exceptions are rethrown (first one).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

// Query parallelism within a KV head (see store_query): -1 = auto (when there are fewer than
// 2 x threads (row, KV head) tasks and more than one thread), 0 = never, 1 = always. Process-wide;
// for tests and benchmarks. Results differ from the unsplit ones by float rounding only.
void set_query_split(int mode);
int get_query_split();

// bf16 helpers (round to nearest even; NaN stays NaN).
uint16_t f32_to_bf16(float x);
float bf16_to_f32(uint16_t h);

}  // namespace pigjax
