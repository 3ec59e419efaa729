#include "lsh_store.h"
#include "shape_text.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#define PIGJAX_X86 1
#include <immintrin.h>
// GCC 12's intrinsic headers use `__m512i __Y = __Y;` placeholders that trigger false
// (-W(maybe-)uninitialized) warnings once inlined into our target("avx512f") functions.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define PIGJAX_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PIGJAX_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#define PIGJAX_TARGET_AVX512BF16 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define PIGJAX_X86 0
#endif

namespace pigjax {

// ----------------------------------------------------------------------------------------
// bf16
// ----------------------------------------------------------------------------------------

uint16_t f32_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN, keep sign
  const uint32_t bias = 0x7fffu + ((bits >> 16) & 1u);      // round to nearest even
  return static_cast<uint16_t>((bits + bias) >> 16);
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// ----------------------------------------------------------------------------------------
// Thread pool: persistent workers + participating caller. Several callers (XLA threads) may
// run parallel_for at once; each caller drains its own job, so a job always finishes even if
// no worker is free (or while the pool is being resized).
// ----------------------------------------------------------------------------------------

namespace {

class ThreadPool {
 public:
  ThreadPool() { resize(default_num_threads()); }
  ~ThreadPool() { stop_workers(); }

  int size() const { return size_.load(); }

  void resize(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> resize_lock(resize_mu_);
    stop_workers();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = false;
    }
    workers_.reserve(n - 1);
    for (int i = 0; i + 1 < n; ++i) workers_.emplace_back([this] { worker_loop(); });
    size_.store(n);
  }

  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    if (n == 1 || size_.load() <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    Job job;
    job.fn = &fn;
    job.n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(&job);
    }
    cv_work_.notify_all();
    for (;;) {
      const int64_t i = job.next.fetch_add(1);
      if (i >= n) break;
      execute(&job, i);
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return job.done == job.n; });
    auto it = std::find(jobs_.begin(), jobs_.end(), &job);
    if (it != jobs_.end()) jobs_.erase(it);
    lock.unlock();
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // guarded by mu_
    std::exception_ptr error;  // guarded by mu_
  };

  void execute(Job* job, int64_t i) {
    std::exception_ptr err;
    try {
      (*job->fn)(i);
    } catch (...) {
      err = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (err && !job->error) job->error = err;
    if (++job->done == job->n) cv_done_.notify_all();
  }

  void worker_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_work_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      Job* job = jobs_.front();
      const int64_t i = job->next.fetch_add(1);
      if (i >= job->n) {
        jobs_.pop_front();  // exhausted; its caller waits for the running indices
        continue;
      }
      lock.unlock();
      execute(job, i);
      lock.lock();
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex resize_mu_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<Job*> jobs_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
  std::atomic<int> size_{1};
};

ThreadPool& pool() {
  static ThreadPool* p = new ThreadPool();  // leaked on purpose: no join at static destruction
  return *p;
}

}  // namespace

void set_num_threads(int n) { pool().resize(n); }
int get_num_threads() { return pool().size(); }
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) { pool().run(n, fn); }

// ----------------------------------------------------------------------------------------
// Store + registry
// ----------------------------------------------------------------------------------------

namespace {

// Allocator of the per-slot arrays a query reads at random (K/V rows, norms, table indices and
// offsets): allocations of >= 2 MiB are 2 MiB-aligned and marked MADV_HUGEPAGE, so with
// transparent huge pages in "madvise" mode (a common default) they get 2 MiB pages. With 4 KiB
// pages nearly every sampled row costs a TLB miss and a page walk. Only a hint: without THP
// the memory is ordinary.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t{1} << 21;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  static size_t rounded(size_t n) { return (n * sizeof(T) + kHuge - 1) / kHuge * kHuge; }
  T* allocate(size_t n) {
    if (n > std::numeric_limits<size_t>::max() / sizeof(T) - kHuge) throw std::bad_alloc();
    if (n * sizeof(T) < kHuge) return static_cast<T*>(::operator new(n * sizeof(T)));
    void* p = std::aligned_alloc(kHuge, rounded(n));
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded(n), MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) < kHuge) ::operator delete(p);
    else std::free(p);
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
template <typename T>
using HugeVector = std::vector<T, HugePageAllocator<T>>;

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
  std::shared_mutex mu;
  std::vector<SlotData> slots;
};

std::mutex g_registry_mu;
std::unordered_map<int64_t, std::shared_ptr<Store>>& registry() {
  static auto* r = new std::unordered_map<int64_t, std::shared_ptr<Store>>();
  return *r;
}
int64_t g_next_handle = 1;

std::shared_ptr<Store> lookup(int64_t handle, std::string* err) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& r = registry();
  auto it = r.find(handle);
  if (it == r.end()) {
    *err = "unknown or freed store handle " + std::to_string(handle);
    return nullptr;
  }
  return it->second;
}

int64_t num_blocks(int64_t n) { return (n + kBlockTokens - 1) / kBlockTokens; }

}  // namespace

bool parse_store_storage(const std::string& name, StoreStorage* out) {
  if (name == "f32" || name == "float32") { *out = StoreStorage::kF32; return true; }
  if (name == "bf16" || name == "bfloat16") { *out = StoreStorage::kBF16; return true; }
  return false;
}

const char* store_storage_name(StoreStorage s) {
  return s == StoreStorage::kF32 ? "f32" : "bf16";
}

std::string validate_store_config(const StoreConfig& c) {
  if (c.slots <= 0) return "slots must be positive, got " + std::to_string(c.slots);
  if (c.kv_heads <= 0) return "kv_heads must be positive, got " + std::to_string(c.kv_heads);
  if (c.head_dim <= 0) return "head_dim must be positive, got " + std::to_string(c.head_dim);
  if (c.capacity <= 0) return "capacity must be positive, got " + std::to_string(c.capacity);
  if (c.K < 1 || c.K > kLshMaxK)
    return "K must be in [1, " + std::to_string(kLshMaxK) + "], got " + std::to_string(c.K);
  if (c.L < 2) return "L must be >= 2, got " + std::to_string(c.L);
  if (!(c.eps >= 0) || !std::isfinite(c.eps))
    return "eps must be a finite number >= 0, got " + std::to_string(c.eps);
  if (c.storage != StoreStorage::kF32 && c.storage != StoreStorage::kBF16)
    return "storage must be 'f32' or 'bf16'";
  // Per-slot, per-head element counts must stay well inside int64 and our int32 indices.
  if (c.capacity > std::numeric_limits<int32_t>::max())
    return "capacity must be < 2^31, got " + std::to_string(c.capacity);
  if (c.slots > (int64_t{1} << 24) || c.kv_heads > 4096 || c.head_dim > 65536 || c.L > 65536)
    return "slots (<= 2^24), kv_heads (<= 4096), head_dim (<= 65536) or L (<= 65536) too large";
  return "";
}

int64_t store_create(const StoreConfig& cfg, std::string* err) {
  *err = validate_store_config(cfg);
  if (!err->empty()) return 0;
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
  return true;
}

bool store_info(int64_t handle, StoreInfo* info, std::string* err) {
  std::shared_ptr<Store> st = lookup(handle, err);
  if (!st) return false;
  const StoreConfig& c = st->cfg;
  info->config = c;
  std::shared_lock<std::shared_mutex> lock(st->mu);
  info->middle_counts.clear();
  info->appended_counts.clear();
  info->prefilled.clear();
  int64_t bytes = 0;
  for (const SlotData& s : st->slots) {
    info->middle_counts.push_back(s.n);
    info->appended_counts.push_back(s.na);
    info->prefilled.push_back(s.prefilled);
    bytes += s.k16.capacity() * 2 + s.v16.capacity() * 2 + s.k32.capacity() * 4 +
             s.v32.capacity() * 4 + s.norms.capacity() * 4 + s.offsets.capacity() * 4 +
             s.indices.capacity() * 2;
    for (const SlotData::Appended& a : s.app)
      bytes += a.k16.capacity() * 2 + a.v16.capacity() * 2 + a.k32.capacity() * 4 +
               a.v32.capacity() * 4 + a.norms.capacity() * 4 + a.codes.capacity() * 4;
  }
  info->bytes_allocated = bytes;
  const double elem = c.storage == StoreStorage::kBF16 ? 2.0 : 4.0;
  info->bytes_per_appended_token = 2.0 * elem * c.head_dim + 4.0 + 4.0 * c.L;
  const double per_block = 4.0 * c.L * ((int64_t{1} << c.K) + 1);
  info->bytes_per_token = {
      {"keys", elem * c.head_dim},
      {"values", elem * c.head_dim},
      {"key_norms", 4.0},
      {"table_indices", 2.0 * c.L},
      {"table_offsets", per_block / kBlockTokens},
      {"table_offsets_per_block", per_block},
  };
  return true;
}

// ----------------------------------------------------------------------------------------
// Kernels over stored rows (T = float or uint16_t bf16): dot products of one row with G query
// heads (q rows contiguous, stride d; the query uses G = 1, one call per sampling head), and
// one head's probability-weighted sum of value rows.
// ----------------------------------------------------------------------------------------

namespace {

constexpr int kGroupChunk = 8;

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }

template <typename T, int G>
void dots_scalar(const T* k, const float* q, int64_t d, float* out) {
  float acc[G] = {};
  for (int64_t i = 0; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) acc[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = acc[j];
}

// acc[:] += sum_k p[k] * rows[k][:] for one query head over nb rows.
template <typename T>
void vsum_scalar(const T* const* rows, const float* p, int nb, int64_t d, float* acc) {
  for (int k = 0; k < nb; ++k)
    for (int64_t i = 0; i < d; ++i) acc[i] += p[k] * ld(rows[k], i);
}

#if PIGJAX_X86

PIGJAX_TARGET_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PIGJAX_TARGET_AVX2 static inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PIGJAX_TARGET_AVX2 static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

template <typename T, int G>
PIGJAX_TARGET_AVX2 void dots_avx2(const T* k, const float* q, int64_t d, float* out) {
  __m256 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 kv = load8(k + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q + j * d + i), acc[j]);
  }
  float tail[G] = {};
  for (; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) tail[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = hsum8(acc[j]) + tail[j];
}

// Up to 8 column vectors of acc stay in registers over the rows (independent FMA chains).
template <typename T>
PIGJAX_TARGET_AVX2 void vsum_avx2(const T* const* rows, const float* p, int nb, int64_t d, float* acc) {
  int64_t i = 0;
  for (; i + 8 <= d; i += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(8, (d - i) / 8));
    __m256 a[8];
    for (int c = 0; c < 8; ++c) a[c] = c < nv ? _mm256_loadu_ps(acc + i + 8 * c) : _mm256_setzero_ps();
    for (int k = 0; k < nb; ++k) {
      const __m256 pk = _mm256_broadcast_ss(p + k);
      const T* v = rows[k] + i;
      if (nv == 8) {
        for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(pk, load8(v + 8 * c), a[c]);
      } else {
        for (int c = 0; c < nv; ++c) a[c] = _mm256_fmadd_ps(pk, load8(v + 8 * c), a[c]);
      }
    }
    for (int c = 0; c < nv; ++c) _mm256_storeu_ps(acc + i + 8 * c, a[c]);
    if (nv < 8) { i += 8 * nv; break; }
  }
  for (; i < d; ++i)
    for (int k = 0; k < nb; ++k) acc[i] += p[k] * ld(rows[k], i);
}

PIGJAX_TARGET_AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PIGJAX_TARGET_AVX512 static inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T, int G>
PIGJAX_TARGET_AVX512 void dots_avx512(const T* k, const float* q, int64_t d, float* out) {
  __m512 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512 kv = load16(k + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q + j * d + i), acc[j]);
  }
  float tail[G] = {};
  for (; i < d; ++i) {
    const float kv = ld(k, i);
    for (int j = 0; j < G; ++j) tail[j] += kv * q[j * d + i];
  }
  for (int j = 0; j < G; ++j) out[j] = _mm512_reduce_add_ps(acc[j]) + tail[j];
}

template <typename T>
PIGJAX_TARGET_AVX512 void vsum_avx512(const T* const* rows, const float* p, int nb, int64_t d,
                                      float* acc) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 128) {
    const int nv = static_cast<int>(std::min<int64_t>(8, (d - i) / 16));
    __m512 a[8];
    for (int c = 0; c < 8; ++c) a[c] = c < nv ? _mm512_loadu_ps(acc + i + 16 * c) : _mm512_setzero_ps();
    for (int k = 0; k < nb; ++k) {
      const __m512 pk = _mm512_set1_ps(p[k]);
      const T* v = rows[k] + i;
      if (nv == 8) {
        for (int c = 0; c < 8; ++c) a[c] = _mm512_fmadd_ps(pk, load16(v + 16 * c), a[c]);
      } else {
        for (int c = 0; c < nv; ++c) a[c] = _mm512_fmadd_ps(pk, load16(v + 16 * c), a[c]);
      }
    }
    for (int c = 0; c < nv; ++c) _mm512_storeu_ps(acc + i + 16 * c, a[c]);
    if (nv < 8) { i += 16 * nv; break; }
  }
  for (; i < d; ++i)
    for (int k = 0; k < nb; ++k) acc[i] += p[k] * ld(rows[k], i);
}

// AVX512_BF16 score pass for bf16 keys: vdpbf16ps needs bf16 on both sides, so each query
// row is split once per chunk into hi = bf16(q) and lo = bf16(q - hi) (about 16 mantissa bits
// of q) and dot = dpbf16(k, hi) + dpbf16(k, lo) with fp32 accumulation.
// Prepared layout, per head j: hi[d] then lo[d] (uint16 bf16), i.e. 2 * gc * d uint16.
void prep_q_bf16x2(const float* q, int gc, int64_t d, uint16_t* buf) {
  for (int j = 0; j < gc; ++j) {
    const float* qj = q + j * d;
    uint16_t* hi = buf + 2 * j * d;
    uint16_t* lo = hi + d;
    for (int64_t i = 0; i < d; ++i) {
      const uint16_t h = f32_to_bf16(qj[i]);
      const float r = qj[i] - bf16_to_f32(h);
      hi[i] = h;
      lo[i] = std::isfinite(r) ? f32_to_bf16(r) : uint16_t{0};
    }
  }
}

template <int G>
PIGJAX_TARGET_AVX512BF16 void dots_avx512bf16(const uint16_t* k, const float* qprep, int64_t d,
                                              float* out) {
  const uint16_t* q = reinterpret_cast<const uint16_t*>(qprep);
  __m512 acc_hi[G], acc_lo[G];
  for (int j = 0; j < G; ++j) { acc_hi[j] = _mm512_setzero_ps(); acc_lo[j] = _mm512_setzero_ps(); }
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + i);
    for (int j = 0; j < G; ++j) {
      const uint16_t* qj = q + 2 * j * d + i;
      acc_hi[j] = _mm512_dpbf16_ps(acc_hi[j], kv, (__m512bh)_mm512_loadu_si512(qj));
      acc_lo[j] = _mm512_dpbf16_ps(acc_lo[j], kv, (__m512bh)_mm512_loadu_si512(qj + d));
    }
  }
  if (i < d) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (d - i)) - 1);
    const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(m, k + i);
    for (int j = 0; j < G; ++j) {
      const uint16_t* qj = q + 2 * j * d + i;
      acc_hi[j] = _mm512_dpbf16_ps(acc_hi[j], kv, (__m512bh)_mm512_maskz_loadu_epi16(m, qj));
      acc_lo[j] = _mm512_dpbf16_ps(acc_lo[j], kv, (__m512bh)_mm512_maskz_loadu_epi16(m, qj + d));
    }
  }
  for (int j = 0; j < G; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc_hi[j], acc_lo[j]));
}

#endif  // PIGJAX_X86

// Per level: the dot product of one key row with one query head, and vsum.
template <typename T>
struct RowKernels {
  using DotFn = void (*)(const T*, const float*, int64_t, float*);
  using VsumFn = void (*)(const T* const*, const float*, int, int64_t, float*);
  // Optional: rewrites a chunk's query rows q[gc][d] into buf (2 * gc * d uint16, head j at
  // float offset j * d like the f32 rows); dot then receives that buffer.
  using PrepFn = void (*)(const float*, int, int64_t, uint16_t*);
  DotFn dot = nullptr;
  VsumFn vsum = nullptr;
  PrepFn prep = nullptr;
};

template <typename T>
RowKernels<T> kernels_scalar() { return {dots_scalar<T, 1>, vsum_scalar<T>, nullptr}; }
#if PIGJAX_X86
template <typename T>
RowKernels<T> kernels_avx2() { return {dots_avx2<T, 1>, vsum_avx2<T>, nullptr}; }
template <typename T>
RowKernels<T> kernels_avx512() { return {dots_avx512<T, 1>, vsum_avx512<T>, nullptr}; }
// avx512 kernels with the AVX512_BF16 score pass (bf16 storage only).
RowKernels<uint16_t> kernels_avx512bf16() {
  return {dots_avx512bf16<1>, vsum_avx512<uint16_t>, prep_q_bf16x2};
}
#endif

template <typename T>
const RowKernels<T>& row_kernels(SimdLevel level) {
  static const RowKernels<T> scalar = kernels_scalar<T>();
#if PIGJAX_X86
  static const RowKernels<T> avx2 = kernels_avx2<T>();
  static const RowKernels<T> avx512 = kernels_avx512<T>();
  if constexpr (std::is_same_v<T, uint16_t>) {
    // bf16 keys: the dpbf16 score pass whenever the avx512 level is in use and the CPU has it.
    static const bool has_bf16 = cpu_features().avx512_bf16;
    static const RowKernels<uint16_t> avx512bf16 = kernels_avx512bf16();
    if (level >= SimdLevel::kAvx512 && has_bf16) return avx512bf16;
  }
  if (level >= SimdLevel::kAvx512) return avx512;
  if (level >= SimdLevel::kAvx2) return avx2;
#else
  (void)level;
#endif
  return scalar;
}

// log(1 / (u + eps)) at angle theta; see the header for the formula.
double log_weight_at(double theta, int K, int L, double eps) {
  const double p = 1.0 - theta / 3.14159265358979323846;
  const double P = std::pow(p, K);
  const double lg = std::log1p(-P);  // -inf at P == 1
  const double a = std::exp(L * lg);
  const double b = L * P * std::exp((L - 1) * lg);
  double u = 1.0 - a - b;
  if (!(u > 0.0)) u = 0.0;
  if (u > 1.0) u = 1.0;
  return -std::log(u + eps);
}

}  // namespace

// The formula costs six transcendental calls per (sampled key, query head), a third of a query;
// it depends on the angle alone, so tabulate it and interpolate linearly. The table is over
// cos(theta) in [-1, 1] rather than theta, which saves the acos per (key, head). Intervals where
// interpolation misses the formula by more than kMaxTableError at the midpoint or quarter points
// (steep spots, e.g. near cos = +-1 where d theta / d cos is unbounded, for small K or L) evaluate
// the formula instead, so the table never costs accuracy.
LogWeightTable::LogWeightTable(int K, int L, double eps)
    : K_(K), L_(L), eps_(eps), f_(kIntervals + 1), exact_(kIntervals) {
  const double h = 2.0 / kIntervals;
  auto at = [&](double c) { return log_weight_at(std::acos(std::min(1.0, std::max(-1.0, c))), K, L, eps); };
  for (int i = 0; i <= kIntervals; ++i) f_[i] = at(-1.0 + i * h);
  for (int i = 0; i < kIntervals; ++i) {
    bool ok = true;
    for (double t : {0.25, 0.5, 0.75}) {
      const double interp = f_[i] + t * (f_[i + 1] - f_[i]);
      ok = ok && std::abs(interp - at(-1.0 + (i + t) * h)) <= kMaxTableError;
    }
    exact_[i] = !ok;
  }
}

double LogWeightTable::operator()(double dot, double qnorm, double knorm) const {
  double c = 0.0;
  if (qnorm > 0.0 && knorm > 0.0) c = dot / (qnorm * knorm);
  if (c > 1.0) c = 1.0;
  if (c < -1.0) c = -1.0;
  if (std::isnan(c)) c = 0.0;
  const double x = (c + 1.0) * (kIntervals / 2.0);
  int i = static_cast<int>(x);
  if (i >= kIntervals) i = kIntervals - 1;
  if (exact_[i]) return log_weight_at(std::acos(c), K_, L_, eps_);
  const double t = x - i;
  return f_[i] + t * (f_[i + 1] - f_[i]);
}

namespace {

// Per-thread query scratch. Collision counting uses two bitmaps (>= 1 and >= 2 collisions,
// n/4 bytes together: 32 KiB at n = 128K, i.e. L1/L2-resident), cleared per query head by
// memset; this saturating count is exact for any K and L since only ">= 2" matters. Each query
// head of a chunk (up to 8) keeps its ">= 2" bitmap (n/8 bytes per head); the union is listed
// in token order from the OR of the chunk's bitmaps, a word at a time.
struct QueryScratch {
  std::vector<uint64_t> seen1;         // bit i: token i collided >= 1 times
  std::vector<uint64_t> heads;         // [kGroupChunk][words]: bit i: >= 2 collisions
  struct Range { const uint16_t* ids; int32_t beg, end, base; };
  std::vector<Range> ranges;           // bucket ranges of one query head (L * nblocks)
  struct Entry { int32_t i; uint32_t mask; };
  std::vector<Entry> uni;              // union of the chunk's candidate sets
  std::vector<float> acc;              // [kGroupChunk][d]
  void ensure(int64_t n) {
    const size_t words = static_cast<size_t>((n + 63) / 64);
    if (seen1.size() < words) seen1.resize(words);
    if (heads.size() < kGroupChunk * words) heads.resize(kGroupChunk * words);
  }
};

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

QueryScratch& query_scratch() {
  thread_local QueryScratch s;
  return s;
}

struct BuildScratch {
  std::vector<uint16_t> codes;   // [16 tables][block tokens]
  std::vector<int32_t> cursor;   // [2^K]
};
BuildScratch& build_scratch() {
  thread_local BuildScratch s;
  return s;
}

template <typename T>
const T* stored_keys(const SlotData& s);
template <>
const float* stored_keys<float>(const SlotData& s) { return s.k32.data(); }
template <>
const uint16_t* stored_keys<uint16_t>(const SlotData& s) { return s.k16.data(); }
template <typename T>
const T* stored_values(const SlotData& s);
template <>
const float* stored_values<float>(const SlotData& s) { return s.v32.data(); }
template <>
const uint16_t* stored_values<uint16_t>(const SlotData& s) { return s.v16.data(); }

template <typename T>
const T* pick(const std::vector<uint16_t>& h, const std::vector<float>& f);
template <>
const float* pick<float>(const std::vector<uint16_t>&, const std::vector<float>& f) { return f.data(); }
template <>
const uint16_t* pick<uint16_t>(const std::vector<uint16_t>& h, const std::vector<float>&) { return h.data(); }

// The rows of one (slot, KV head): middle token i < n from the tables' arrays, appended token
// n + t from the append buffer.
template <typename T>
struct HeadRows {
  int64_t d = 0, L = 0, NB = 0, n = 0, na = 0, nblocks = 0;
  const int32_t* off = nullptr;   // [nblocks][L][NB + 1]
  const uint16_t* idx = nullptr;  // [nblocks][L][block_len]
  const T* keys = nullptr; const T* vals = nullptr; const float* norms = nullptr;
  const T* akeys = nullptr; const T* avals = nullptr; const float* anorms = nullptr;
  const int32_t* acodes = nullptr;  // [na][L]
  int64_t total() const { return n + na; }
  const T* key(int64_t i) const { return i < n ? keys + i * d : akeys + (i - n) * d; }
  const T* val(int64_t i) const { return i < n ? vals + i * d : avals + (i - n) * d; }
  float norm(int64_t i) const { return *norm_ptr(i); }
  const float* norm_ptr(int64_t i) const { return i < n ? norms + i : anorms + (i - n); }
};

template <typename T>
HeadRows<T> head_rows(const StoreConfig& c, const SlotData& s, int64_t kvh) {
  HeadRows<T> R;
  R.d = c.head_dim; R.L = c.L; R.NB = int64_t{1} << c.K;
  if (!s.prefilled) return R;
  R.n = s.n; R.na = s.na; R.nblocks = num_blocks(s.n);
  R.off = s.offsets.data() + kvh * R.nblocks * R.L * (R.NB + 1);
  R.idx = s.indices.data() + kvh * R.n * R.L;
  R.keys = stored_keys<T>(s) + kvh * R.n * R.d;
  R.vals = stored_values<T>(s) + kvh * R.n * R.d;
  R.norms = s.norms.data() + kvh * R.n;
  if (R.na > 0) {
    const SlotData::Appended& a = s.app[static_cast<size_t>(kvh)];
    R.akeys = pick<T>(a.k16, a.k32);
    R.avals = pick<T>(a.v16, a.v32);
    R.anorms = a.norms.data();
    R.acodes = a.codes.data();
  }
  return R;
}

// Candidates of one query head (codes qc[L]): sets bit i of seen2 (words = ceil(total / 64),
// cleared here) for every token i with >= 2 collisions; returns their count.
template <typename T>
int64_t collect_head(const HeadRows<T>& R, const int32_t* qc, QueryScratch& sc, uint64_t* seen2) {
  const int64_t L = R.L, NB = R.NB, n = R.n;
  const size_t words = static_cast<size_t>((R.total() + 63) / 64);
  uint64_t* seen1 = sc.seen1.data();
  std::memset(seen1, 0, words * sizeof(uint64_t));
  std::memset(seen2, 0, words * sizeof(uint64_t));
  // Bucket ranges first (independent loads), then count with the next ranges prefetched.
  sc.ranges.resize(static_cast<size_t>(L * R.nblocks));
  QueryScratch::Range* rg = sc.ranges.data();
  int64_t nr = 0;
  for (int64_t bk = 0; bk < R.nblocks; ++bk) {
    const int64_t blen = std::min(kBlockTokens, n - bk * kBlockTokens);
    const uint16_t* ids_block = R.idx + bk * kBlockTokens * L;
    const int32_t* ob = R.off + bk * L * (NB + 1);
    for (int64_t l = 0; l < L; ++l) {
      const int32_t* o = ob + l * (NB + 1) + qc[l];
      rg[nr++] = {ids_block + l * blen, o[0], o[1], static_cast<int32_t>(bk * kBlockTokens)};
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
    // Branch-free: a token's second hit sets its seen2 bit (random hits mispredict branches).
    for (int32_t t = rg[r].beg, e = rg[r].end; t < e; ++t) {
      const int32_t i = base + ids[t];
      const uint64_t b = uint64_t{1} << (i & 63);
      seen2[i >> 6] |= seen1[i >> 6] & b;
      seen1[i >> 6] |= b;
    }
  }
  // Appended tokens: a linear scan comparing all L codes.
  for (int64_t t = 0; t < R.na; ++t) {
    const int32_t* ac = R.acodes + t * L;
    int32_t hits = 0;
    for (int64_t l = 0; l < L; ++l) hits += ac[l] == qc[l];
    const int64_t i = n + t;
    seen2[i >> 6] |= uint64_t{hits >= 2} << (i & 63);
  }
  int64_t count = 0;
  for (size_t w = 0; w < words; ++w) count += __builtin_popcountll(seen2[w]);
  return count;
}

// Partial softmax of gc <= kGroupChunk query heads (qg[gc][d], norms qnorm) over the entries
// uni[0..nu) (bit jj of an entry's mask: head jj samples it): per head the max score mx, the
// sum of exp(score - mx) and acc[jj][d] = sum of exp(score - mx) v (acc zeroed by the caller).
// Each key and value row is read once for the whole chunk; dot products and value sums are
// done only for the heads that sample the row (about one per row at K = 10, L = 150). Batches
// of kBatch entries: a key pass (scores), an online-softmax rescale of a head's acc and sum if
// the batch raised its max, then a value pass. Each pass prefetches its rows kAhead entries
// ahead (one array per pass keeps the misses in flight; interleaving K and V rows was slower).
template <typename T>
void softmax_part(const HeadRows<T>& R, const LogWeightTable& weights, const RowKernels<T>& kern,
                  const QueryScratch::Entry* uni, size_t nu, const float* qg, const double* qnorm,
                  int gc, float* mx, double* sums, float* acc) {
  constexpr size_t kBatch = 256, kAhead = 12;
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
  const int64_t row_bytes = d * int64_t(sizeof(T));
  auto prefetch_row = [&](const T* row) {
    const char* r = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(r + b);
  };
  float score[kBatch][kGroupChunk];
  for (size_t e0 = 0; e0 < nu; e0 += kBatch) {
    const size_t e1 = std::min(nu, e0 + kBatch);
    float bmx[kGroupChunk];
    std::fill(bmx, bmx + gc, ninf);
    for (size_t e = e0; e < std::min(e1, e0 + kAhead); ++e) prefetch_row(R.key(uni[e].i));
    for (size_t e = e0; e < e1; ++e) {
      if (e + kAhead < e1) {
        prefetch_row(R.key(uni[e + kAhead].i));
        __builtin_prefetch(R.norm_ptr(uni[e + kAhead].i));
      }
      const int32_t i = uni[e].i;
      const T* key = R.key(i);
      const float kn = R.norm(i);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        float dot;
        kern.dot(key, qdot + jj * d, d, &dot);
        const float sc_ = static_cast<float>(dot * inv_sqrt_d + weights(dot, qnorm[jj], kn));
        score[e - e0][jj] = sc_;
        if (sc_ > bmx[jj]) bmx[jj] = sc_;
      }
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
    for (size_t e = e0; e < std::min(e1, e0 + kAhead); ++e) prefetch_row(R.val(uni[e].i));
    for (size_t e = e0; e < e1; ++e) {
      if (e + kAhead < e1) prefetch_row(R.val(uni[e + kAhead].i));
      const T* val = R.val(uni[e].i);
      for (uint32_t m = uni[e].mask; m; m &= m - 1) {
        const int jj = __builtin_ctz(m);
        const float pj = std::exp(score[e - e0][jj] - mx[jj]);
        sums[jj] += pj;
        kern.vsum(&val, &pj, 1, d, acc + jj * d);
      }
    }
  }
}

void query_norms(const float* qg, int gc, int64_t d, double* qnorm) {
  for (int jj = 0; jj < gc; ++jj) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(qg[jj * d + i]) * qg[jj * d + i];
    qnorm[jj] = std::sqrt(ss);
  }
}

void write_empty(int64_t G, int64_t d, float* out, float* lse, int32_t* sampled) {
  std::fill(out, out + G * d, 0.0f);
  std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
  std::fill(sampled, sampled + G, 0);
}

// One (row, KV head): the G query heads q[G][d], q_codes[G][L] -> out[G][d], lse[G], sampled[G].
template <typename T>
void query_group(const StoreConfig& c, const LogWeightTable& weights, const SlotData& s, int64_t kvh,
                 int64_t G,
                 const float* q, const int32_t* qcodes, float* out, float* lse, int32_t* sampled,
                 const RowKernels<T>& kern) {
  const int64_t d = c.head_dim, L = c.L;
  const HeadRows<T> R = head_rows<T>(c, s, kvh);
  const int64_t total = R.total();
  if (total == 0) return write_empty(G, d, out, lse, sampled);

  QueryScratch& sc = query_scratch();
  sc.ensure(total);
  const int64_t words = (total + 63) / 64;

  for (int64_t j0 = 0; j0 < G; j0 += kGroupChunk) {
    const int gc = static_cast<int>(std::min<int64_t>(kGroupChunk, G - j0));
    int64_t counts[kGroupChunk] = {};
    const uint64_t* bm[kGroupChunk];
    // 1. Candidates per head (>= 2 collisions), merged into one union with head masks.
    int64_t bound = 0;
    for (int jj = 0; jj < gc; ++jj) {
      uint64_t* hb = sc.heads.data() + jj * words;
      counts[jj] = collect_head(R, qcodes + (j0 + jj) * L, sc, hb);
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
      lse[h] = static_cast<float>(mx[jj] + std::log(sums[jj]));
    }
  }
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

}  // namespace

// ----------------------------------------------------------------------------------------
// prefill
// ----------------------------------------------------------------------------------------

std::string store_prefill(int64_t handle, const PrefillIO& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  if (io.slots_dims.size() != 1) return "slots must have shape [B], got " + shape_text(io.slots_dims);
  const int64_t B = io.slots_dims[0];
  if (io.keys_dims.size() != 4 || io.keys_dims[0] != B || io.keys_dims[1] != Hkv ||
      io.keys_dims[3] != d)
    return "keys must have shape [B=" + std::to_string(B) + ", Hkv=" + std::to_string(Hkv) +
           ", n, d=" + std::to_string(d) + "], got " + shape_text(io.keys_dims);
  const int64_t n = io.keys_dims[2];
  if (io.values_dims != io.keys_dims)
    return "values must have the shape of keys " + shape_text(io.keys_dims) + ", got " +
           shape_text(io.values_dims);
  const std::vector<int64_t> want_codes = {B, Hkv, n, L};
  if (io.codes_dims != want_codes)
    return "codes must have shape [B, Hkv, n, L] = " + shape_text(want_codes) + ", got " +
           shape_text(io.codes_dims);
  if (io.lengths_dims != std::vector<int64_t>{B})
    return "lengths must have shape [B] = [" + std::to_string(B) + "], got " +
           shape_text(io.lengths_dims);
  if (io.middle_counts_dims != std::vector<int64_t>{B})
    return "middle_counts must have shape [B] = [" + std::to_string(B) + "], got " +
           shape_text(io.middle_counts_dims);
  if (io.sink < 0 || io.local < 0)
    return "sink and local must be >= 0, got sink=" + std::to_string(io.sink) +
           " local=" + std::to_string(io.local);
  std::vector<int64_t> middle(static_cast<size_t>(B));
  std::vector<char> seen(static_cast<size_t>(c.slots), 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = io.slots[b];
    if (slot < 0 || slot >= c.slots)
      return "slots[" + std::to_string(b) + "] = " + std::to_string(slot) +
             " is out of range [0, " + std::to_string(c.slots) + ")";
    if (seen[slot])
      return "slot " + std::to_string(slot) + " appears more than once in one prefill call";
    seen[slot] = 1;
    const int64_t len = io.lengths[b];
    if (len < 0 || len > n)
      return "lengths[" + std::to_string(b) + "] = " + std::to_string(len) +
             " is outside [0, n=" + std::to_string(n) + "]";
    const int64_t m = std::max<int64_t>(0, len - io.local - io.sink);
    if (m > c.capacity)
      return "row " + std::to_string(b) + ": middle count " + std::to_string(m) +
             " (length " + std::to_string(len) + ", sink " + std::to_string(io.sink) +
             ", local " + std::to_string(io.local) + ") exceeds the store capacity " +
             std::to_string(c.capacity);
    middle[b] = m;
  }
  const int64_t NB = int64_t{1} << c.K;

  // Codes of the middle tokens must be in [0, 2^K) (other positions are never read).
  struct BadCode { bool bad = false; int64_t pos = 0, table = 0; int32_t value = 0; };
  std::vector<BadCode> bad(static_cast<size_t>(B * Hkv));
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv;
    const int32_t* cd = io.codes + (task * n + io.sink) * L;
    const int64_t cnt = middle[b] * L;
    uint32_t any = 0;
    for (int64_t i = 0; i < cnt; ++i) any |= static_cast<uint32_t>(cd[i]) >= uint32_t(NB);
    if (!any) return;
    for (int64_t i = 0; i < cnt; ++i)
      if (cd[i] < 0 || cd[i] >= NB) {
        bad[task] = {true, io.sink + i / L, i % L, cd[i]};
        return;
      }
  });
  for (int64_t t = 0; t < B * Hkv; ++t)
    if (bad[t].bad)
      return "codes[" + std::to_string(t / Hkv) + ", " + std::to_string(t % Hkv) + ", " +
             std::to_string(bad[t].pos) + ", " + std::to_string(bad[t].table) + "] = " +
             std::to_string(bad[t].value) + " is outside [0, 2^K=" + std::to_string(NB) + ")";

  std::unique_lock<std::shared_mutex> lock(st->mu);
  const bool bf16 = c.storage == StoreStorage::kBF16;
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots[b]];
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
    s.offsets.resize(static_cast<size_t>(Hkv * num_blocks(m) * L * (NB + 1)));
    s.indices.resize(static_cast<size_t>(Hkv * m * L));
  }

  // Keys (rounded), norms of the stored keys, values.
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, h = task % Hkv, m = middle[b];
    SlotData& s = st->slots[io.slots[b]];
    const float* ks = io.keys + (task * n + io.sink) * d;
    const float* vs = io.values + (task * n + io.sink) * d;
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

  // Tables: one task per (row, head, block, group of 16 tables); counting sort by bucket.
  constexpr int64_t kTablesPerTask = 16;
  const int64_t groups = (L + kTablesPerTask - 1) / kTablesPerTask;
  struct Task { int64_t b, h, bk, g; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t bk = 0; bk < num_blocks(middle[b]); ++bk)
        for (int64_t g = 0; g < groups; ++g) tasks.push_back({b, h, bk, g});
  parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t ti) {
    const Task t = tasks[ti];
    const int64_t m = middle[t.b], nblocks = num_blocks(m);
    SlotData& s = st->slots[io.slots[t.b]];
    const int64_t blen = std::min(kBlockTokens, m - t.bk * kBlockTokens);
    const int32_t* cd =
        io.codes + ((t.b * Hkv + t.h) * n + io.sink + t.bk * kBlockTokens) * L;
    int32_t* off = s.offsets.data() + (t.h * nblocks + t.bk) * L * (NB + 1);
    uint16_t* idx = s.indices.data() + t.h * m * L + t.bk * kBlockTokens * L;
    const int64_t l0 = t.g * kTablesPerTask, l1 = std::min(L, l0 + kTablesPerTask);
    const int64_t nl = l1 - l0;
    // Transpose this group's codes to [table][token] (uint16: K <= 16), then one counting
    // sort per table: 2^K counters and 2^K write cursors stay cache-resident.
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
      int32_t* o = off + l * (NB + 1);
      std::fill(o, o + NB + 1, 0);
      for (int64_t r = 0; r < blen; ++r) ++o[col[r] + 1];
      for (int64_t c2 = 1; c2 <= NB; ++c2) o[c2] += o[c2 - 1];
      std::copy(o, o + NB, cur);
      uint16_t* dst = idx + l * blen;
      for (int64_t r = 0; r < blen; ++r) dst[cur[col[r]]++] = static_cast<uint16_t>(r);
    }
  });

  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots[b]];
    s.n = middle[b];
    s.prefilled = true;
    io.middle_counts[b] = static_cast<int32_t>(middle[b]);
  }
  return "";
}

// ----------------------------------------------------------------------------------------
// append
// ----------------------------------------------------------------------------------------

std::string store_append(int64_t handle, const AppendIO& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  if (io.slots_dims.size() != 1) return "slots must have shape [B], got " + shape_text(io.slots_dims);
  const int64_t B = io.slots_dims[0];
  if (io.keys_dims.size() != 4 || io.keys_dims[0] != B || io.keys_dims[1] != Hkv ||
      io.keys_dims[3] != d)
    return "keys must have shape [B=" + std::to_string(B) + ", Hkv=" + std::to_string(Hkv) +
           ", T, d=" + std::to_string(d) + "], got " + shape_text(io.keys_dims);
  const int64_t T = io.keys_dims[2];
  if (io.values_dims != io.keys_dims)
    return "values must have the shape of keys " + shape_text(io.keys_dims) + ", got " +
           shape_text(io.values_dims);
  const std::vector<int64_t> want_codes = {B, Hkv, T, L};
  if (io.codes_dims != want_codes)
    return "codes must have shape [B, Hkv, T, L] = " + shape_text(want_codes) + ", got " +
           shape_text(io.codes_dims);
  if (io.counts_dims != std::vector<int64_t>{B})
    return "counts must have shape [B] = [" + std::to_string(B) + "], got " +
           shape_text(io.counts_dims);
  if (io.totals_dims != std::vector<int64_t>{B})
    return "totals must have shape [B] = [" + std::to_string(B) + "], got " +
           shape_text(io.totals_dims);
  std::vector<char> seen(static_cast<size_t>(c.slots), 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = io.slots[b];
    if (slot < 0 || slot >= c.slots)
      return "slots[" + std::to_string(b) + "] = " + std::to_string(slot) +
             " is out of range [0, " + std::to_string(c.slots) + ")";
    if (seen[slot])
      return "slot " + std::to_string(slot) + " appears more than once in one append call";
    seen[slot] = 1;
    const int64_t cnt = io.counts[b];
    if (cnt < 0 || cnt > T)
      return "counts[" + std::to_string(b) + "] = " + std::to_string(cnt) +
             " is outside [0, T=" + std::to_string(T) + "]";
  }
  const int64_t NB = int64_t{1} << c.K;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int32_t* cd = io.codes + (b * Hkv + h) * T * L;
      for (int64_t i = 0; i < io.counts[b] * L; ++i)
        if (cd[i] < 0 || cd[i] >= NB)
          return "codes[" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                 std::to_string(i / L) + ", " + std::to_string(i % L) + "] = " +
                 std::to_string(cd[i]) + " is outside [0, 2^K=" + std::to_string(NB) + ")";
    }

  // Checks that depend on the slots' state, then the writes, under the exclusive lock.
  std::unique_lock<std::shared_mutex> lock(st->mu);
  for (int64_t b = 0; b < B; ++b) {
    const SlotData& s = st->slots[io.slots[b]];
    if (!s.prefilled)
      return "slot " + std::to_string(io.slots[b]) +
             " was never prefilled: prefill the slot first, then append";
    const int64_t after = s.n + s.na + io.counts[b];
    if (after > c.capacity)
      return "row " + std::to_string(b) + ": appending " + std::to_string(io.counts[b]) +
             " tokens to slot " + std::to_string(io.slots[b]) + " (" + std::to_string(s.n) +
             " middle + " + std::to_string(s.na) + " appended) exceeds the store capacity " +
             std::to_string(c.capacity);
  }
  const bool bf16 = c.storage == StoreStorage::kBF16;
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots[b]];
    if (s.app.size() != static_cast<size_t>(Hkv)) s.app.resize(static_cast<size_t>(Hkv));
  }
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, h = task % Hkv, cnt = io.counts[b];
    SlotData& s = st->slots[io.slots[b]];
    SlotData::Appended& a = s.app[static_cast<size_t>(h)];
    const int64_t old = s.na, now = old + cnt;
    const float* ks = io.keys + task * T * d;
    const float* vs = io.values + task * T * d;
    if (bf16) {
      a.k16.resize(static_cast<size_t>(now * d));
      a.v16.resize(static_cast<size_t>(now * d));
      store_rows(ks, cnt, d, a.k16.data() + old * d);
      store_rows(vs, cnt, d, a.v16.data() + old * d);
    } else {
      a.k32.resize(static_cast<size_t>(now * d));
      a.v32.resize(static_cast<size_t>(now * d));
      store_rows(ks, cnt, d, a.k32.data() + old * d);
      store_rows(vs, cnt, d, a.v32.data() + old * d);
    }
    a.norms.resize(static_cast<size_t>(now));
    if (bf16) key_norms(a.k16.data() + old * d, cnt, d, a.norms.data() + old);
    else key_norms(a.k32.data() + old * d, cnt, d, a.norms.data() + old);
    a.codes.resize(static_cast<size_t>(now * L));
    if (cnt > 0)
      std::memcpy(a.codes.data() + old * L, io.codes + task * T * L, sizeof(int32_t) * cnt * L);
  });
  for (int64_t b = 0; b < B; ++b) {
    SlotData& s = st->slots[io.slots[b]];
    s.na += io.counts[b];
    io.totals[b] = static_cast<int32_t>(s.n + s.na);
  }
  return "";
}

// ----------------------------------------------------------------------------------------
// query
// ----------------------------------------------------------------------------------------

namespace {

std::atomic<int> g_query_split{-1};

// Batch-1 parallelism: with few (row, KV head) tasks for the pool, the query runs in phases:
// 1. one item per (row, query head): its candidate bitmap (over middle + appended tokens);
// 2. one item per (row, KV head, chunk of <= 8 query heads, part): the union of the chunk's
//    candidates within the part's range of bitmap words, in token order, and its partial
//    softmax (max, sum, accumulator) per query head -- each row still read once per chunk;
// 3. the parts merged exactly by log-sum-exp (only float rounding differs from one part).
template <typename T>
void query_split(const Store& st, const QueryIO& io, int64_t B, int64_t Hq, const RowKernels<T>& kern,
                 int threads) {
  const StoreConfig& c = st.cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L, G = Hq / Hkv;
  const int64_t chunks = (G + kGroupChunk - 1) / kGroupChunk;
  // Phase 1: candidate bitmaps, one per (row, query head).
  std::vector<int64_t> words(static_cast<size_t>(B)), bm_off(static_cast<size_t>(B * Hq + 1), 0);
  for (int64_t b = 0; b < B; ++b) {
    const SlotData& s = st.slots[io.slots[b]];
    words[b] = s.prefilled ? (s.n + s.na + 63) / 64 : 0;
    for (int64_t h = 0; h < Hq; ++h) bm_off[b * Hq + h + 1] = bm_off[b * Hq + h] + words[b];
  }
  std::vector<uint64_t> bitmaps(static_cast<size_t>(bm_off[B * Hq]));
  std::vector<int64_t> counts(static_cast<size_t>(B * Hq), 0);
  parallel_for(B * Hq, [&](int64_t item) {
    const int64_t b = item / Hq, h = item % Hq;
    if (words[b] == 0) return;
    const HeadRows<T> R = head_rows<T>(c, st.slots[io.slots[b]], h / G);
    QueryScratch& sc = query_scratch();
    sc.ensure(R.total());
    counts[item] = collect_head(R, io.q_codes + item * L, sc, bitmaps.data() + bm_off[item]);
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
    const HeadRows<T> R = head_rows<T>(c, st.slots[io.slots[b]], g);
    const int64_t w0 = words[b] * p / P, w1 = words[b] * (p + 1) / P;
    const uint64_t* bm[kGroupChunk];
    for (int jj = 0; jj < gc; ++jj) bm[jj] = bitmaps.data() + bm_off[h0 + jj];
    QueryScratch& sc = query_scratch();
    int64_t bound = 0;
    for (int jj = 0; jj < gc; ++jj) bound += counts[h0 + jj];
    sc.uni.resize(static_cast<size_t>(bound));
    const size_t nu = bitmap_union(bm, gc, w0, w1, sc.uni.data());
    if (nu == 0) return;
    const float* qg = io.q + h0 * d;
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
      io.sampled[h] = static_cast<int32_t>(counts[h]);
      float* oh = io.out + h * d;
      double M = -std::numeric_limits<double>::infinity();
      for (int64_t pi = part_off[gi]; pi < part_off[gi + 1]; ++pi)
        if (partial[pi].sums[jj] > 0) M = std::max<double>(M, partial[pi].mx[jj]);
      if (counts[h] == 0 || !std::isfinite(M)) {
        std::fill(oh, oh + d, 0.0f);
        io.lse[h] = -std::numeric_limits<float>::infinity();
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
      io.lse[h] = static_cast<float>(M + std::log(S));
    }
  }
}

}  // namespace

void set_query_split(int mode) { g_query_split.store(mode < 0 ? -1 : (mode > 0 ? 1 : 0)); }
int get_query_split() { return g_query_split.load(); }


std::string store_query(int64_t handle, const QueryIO& io) {
  std::string err;
  std::shared_ptr<Store> st = lookup(handle, &err);
  if (!st) return err;
  const StoreConfig& c = st->cfg;
  const int64_t Hkv = c.kv_heads, d = c.head_dim, L = c.L;
  if (io.slots_dims.size() != 1) return "slots must have shape [B], got " + shape_text(io.slots_dims);
  const int64_t B = io.slots_dims[0];
  if (io.q_dims.size() != 3 || io.q_dims[0] != B || io.q_dims[2] != d)
    return "q must have shape [B=" + std::to_string(B) + ", Hq, d=" + std::to_string(d) +
           "], got " + shape_text(io.q_dims);
  const int64_t Hq = io.q_dims[1];
  if (Hq <= 0 || Hq % Hkv != 0)
    return "the number of query heads (" + std::to_string(Hq) +
           ") must be a positive multiple of kv_heads (" + std::to_string(Hkv) + ")";
  if (io.q_codes_dims != std::vector<int64_t>{B, Hq, L})
    return "q_codes must have shape [B, Hq, L] = " + shape_text({B, Hq, L}) + ", got " +
           shape_text(io.q_codes_dims);
  if (io.out_dims != io.q_dims)
    return "out must have shape " + shape_text(io.q_dims) + ", got " + shape_text(io.out_dims);
  if (io.lse_dims != std::vector<int64_t>{B, Hq})
    return "lse must have shape " + shape_text({B, Hq}) + ", got " + shape_text(io.lse_dims);
  if (io.sampled_dims != std::vector<int64_t>{B, Hq})
    return "sampled must have shape " + shape_text({B, Hq}) + ", got " + shape_text(io.sampled_dims);
  for (int64_t b = 0; b < B; ++b)
    if (io.slots[b] < 0 || io.slots[b] >= c.slots)
      return "slots[" + std::to_string(b) + "] = " + std::to_string(io.slots[b]) +
             " is out of range [0, " + std::to_string(c.slots) + ")";
  const int64_t NB = int64_t{1} << c.K;
  for (int64_t i = 0; i < B * Hq * L; ++i)
    if (io.q_codes[i] < 0 || io.q_codes[i] >= NB)
      return "q_codes[" + std::to_string(i / (Hq * L)) + ", " + std::to_string(i / L % Hq) +
             ", " + std::to_string(i % L) + "] = " + std::to_string(io.q_codes[i]) +
             " is outside [0, 2^K=" + std::to_string(NB) + ")";

  std::shared_lock<std::shared_mutex> lock(st->mu);
  const int64_t G = Hq / Hkv;
  const SimdLevel level = simd_level();
  const bool bf16 = c.storage == StoreStorage::kBF16;
  const int threads = get_num_threads();
  const int split = g_query_split.load();
  if (split == 1 || (split == -1 && threads > 1 && B * Hkv < 2 * int64_t{threads})) {
    if (bf16) query_split<uint16_t>(*st, io, B, Hq, row_kernels<uint16_t>(level), threads);
    else query_split<float>(*st, io, B, Hq, row_kernels<float>(level), threads);
    return "";
  }
  parallel_for(B * Hkv, [&](int64_t task) {
    const int64_t b = task / Hkv, g = task % Hkv;
    const SlotData& s = st->slots[io.slots[b]];
    const int64_t h0 = b * Hq + g * G;
    if (bf16)
      query_group<uint16_t>(c, st->weights, s, g, G, io.q + h0 * d, io.q_codes + h0 * L, io.out + h0 * d,
                            io.lse + h0, io.sampled + h0, row_kernels<uint16_t>(level));
    else
      query_group<float>(c, st->weights, s, g, G, io.q + h0 * d, io.q_codes + h0 * L, io.out + h0 * d,
                         io.lse + h0, io.sampled + h0, row_kernels<float>(level));
  });
  return "";
}

}  // namespace pigjax
