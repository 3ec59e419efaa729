// See cuda_handlers.h. One call of a store target on the GPU (docs/gpu_engine.md):
//   1. cudaMemcpyAsync device -> pinned host of every operand (the handle, slots, q and its codes;
//      at prefill / append also keys, values, codes and lengths / counts) on XLA's stream;
//   2. one cudaStreamSynchronize: the host now holds what the program computed before the call;
//   3. the engine's call (ffi_store_calls.h: the same views, validation and store code as the
//      CPU handlers) writes its results into the same pinned buffer;
//   4. cudaMemcpyAsync host -> device of the results on XLA's stream, then an event: the handler
//      returns without waiting, and the GPU runs the rest of the step after the copies.
// So one host round trip (one synchronization) per call; nothing runs Python.
//
// Staging: one pinned buffer per host thread that runs handlers (XLA's GPU executor runs a
// program's thunks from one thread, so in practice one or two), grown geometrically to the
// largest call seen and freed when the thread exits. Before the buffer is written again, the
// event of its previous call's result copies is waited for (those copies read the buffer). A
// failed CUDA call throws and becomes INTERNAL naming the target and the CUDA error; an invalid
// argument is INVALID_ARGUMENT with the engine's message, and no result is copied back.
//
// The asynchronous targets (pigjax_cuda_async_lsh_*: query, ranked query, append) replace steps
// 2-3 by a host function on the stream (cudaLaunchHostFunc) that runs the engine when the stream
// reaches it, and return after enqueueing step 4: the launching thread never waits. Their staging
// is a per-thread pool (StagingPool), and an engine error, found after the handler returned, is
// recorded for take_deferred_error() while the results become NaN / -1 (AsyncMem, run_job).
// The asynchronous prefill's host function only validates and writes the middle counts: the
// engine's background thread builds the tables while the stream goes on (BuildMem), and later
// calls on the store wait for the build inside the engine.
#include "cuda_handlers.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "ffi_store_calls.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifdef PIGJAX_CUDA_FAKE
// Test build (platform "cpu"): XLA's CPU backend has no stream to give; the fake runtime's
// stream is a null pointer, as the real runtime's default stream.
namespace pigjax {
namespace cuda {
struct NoStream {};
}  // namespace cuda
}  // namespace pigjax
template <>
struct xla::ffi::CtxDecoding<pigjax::cuda::NoStream> {
  using Type = cudaStream_t;
  static std::optional<Type> Decode(const XLA_FFI_Api*, XLA_FFI_ExecutionContext*,
                                    DiagnosticEngine&) {
    return static_cast<cudaStream_t>(nullptr);
  }
};
#define PIGJAX_CUDA_STREAM_CTX pigjax::cuda::NoStream
#define PIGJAX_CUDA_TARGET(name) "pigjax_test_cuda_" name
#else
#define PIGJAX_CUDA_STREAM_CTX ffi::PlatformStream<cudaStream_t>
#define PIGJAX_CUDA_TARGET(name) "pigjax_cuda_" name
#endif

namespace pigjax {
namespace cuda {
namespace {

std::atomic<const EngineApi*> g_api{nullptr};
std::atomic<int64_t> g_staging_bytes{0};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(e) + " (" +
                             std::to_string(static_cast<int>(e)) + ")");
}

// A pinned host buffer and the event after the last copies that read it.
class Staging {
 public:
  Staging() = default;
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {  // thread exit: errors are ignored (the CUDA context may already be gone)
    if (pending_) cudaEventSynchronize(done_);
    wait_build();
    if (data_ != nullptr) {
      cudaFreeHost(data_);
      g_staging_bytes -= static_cast<int64_t>(capacity_);
    }
    if (done_ != nullptr) cudaEventDestroy(done_);
  }

  // Waits until the previous call's result copies have read the buffer and a background build
  // from it is done, then makes room for `bytes` (the old contents are not kept).
  char* reserve(size_t bytes) {
    if (pending_) {  // first: the build is queued by a host function before this event
      check(cudaEventSynchronize(done_), "cudaEventSynchronize");
      pending_ = false;
    }
    wait_build();
    if (bytes > capacity_) {
      const size_t want = std::max(bytes, capacity_ + capacity_ / 2);
      if (data_ != nullptr) {
        check(cudaFreeHost(data_), "cudaFreeHost");
        g_staging_bytes -= static_cast<int64_t>(capacity_);
        data_ = nullptr;
        capacity_ = 0;
      }
      void* p = nullptr;
      check(cudaMallocHost(&p, want), "cudaMallocHost");
      data_ = static_cast<char*>(p);
      capacity_ = want;
      g_staging_bytes += static_cast<int64_t>(capacity_);
    }
    return data_;
  }

  // Whether the last copies that read the buffer have completed and no background build reads
  // it (so reserve() would not wait).
  bool idle() {
    if (pending_) {
      const cudaError_t e = cudaEventQuery(done_);
      if (e == cudaErrorNotReady) return false;
      check(e, "cudaEventQuery");
      pending_ = false;
    }
    std::lock_guard<std::mutex> lock(build_mu_);
    return !building_;
  }

  // A background build (store_prefill_background) reads the buffer from begin_build() until
  // end_build(), which the engine's background thread calls.
  void begin_build() {
    std::lock_guard<std::mutex> lock(build_mu_);
    building_ = true;
  }
  void end_build() {
    {
      std::lock_guard<std::mutex> lock(build_mu_);
      building_ = false;
    }
    build_cv_.notify_all();
  }

  size_t capacity() const { return capacity_; }

  // Records that work enqueued on `stream` so far uses the buffer.
  void mark_in_use(cudaStream_t stream) {
    if (done_ == nullptr) check(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming),
                                "cudaEventCreateWithFlags");
    check(cudaEventRecord(done_, stream), "cudaEventRecord");
    pending_ = true;
  }

 private:
  void wait_build() {
    std::unique_lock<std::mutex> lock(build_mu_);
    build_cv_.wait(lock, [&] { return !building_; });
  }

  char* data_ = nullptr;
  size_t capacity_ = 0;
  cudaEvent_t done_ = nullptr;
  bool pending_ = false;
  std::mutex build_mu_;
  std::condition_variable build_cv_;
  bool building_ = false;
};

// The blocking handlers' buffer: one per host thread; a call waits for the previous one's copies.
Staging& thread_staging() {
  thread_local Staging staging;
  return staging;
}

// The asynchronous handlers' buffers, per host thread: a call must not wait for the previous
// calls (their engine work is still queued on the stream), so it takes an idle buffer, else a new
// one while there are fewer than max_buffers, else the oldest in turn (reserve() then waits).
class StagingPool {
 public:
  explicit StagingPool(size_t max_buffers) : max_buffers_(max_buffers) {}

  Staging& acquire(size_t bytes) {
    Staging* idle = nullptr;
    for (auto& b : buffers_)
      if (b->idle()) {
        if (b->capacity() >= bytes) return *b;
        if (idle == nullptr) idle = b.get();
      }
    if (idle != nullptr) return *idle;
    if (buffers_.size() < max_buffers_) {
      buffers_.push_back(std::make_unique<Staging>());
      return *buffers_.back();
    }
    Staging& oldest = *buffers_[next_];
    next_ = (next_ + 1) % buffers_.size();
    return oldest;
  }

 private:
  const size_t max_buffers_;
  std::vector<std::unique_ptr<Staging>> buffers_;
  size_t next_ = 0;
};

// Queries and appends: up to a whole step of calls may be queued on the stream at once.
StagingPool& thread_pool() {
  thread_local StagingPool pool(64);  // > the sparse layers of one decode step
  return pool;
}

// Background prefills: each buffer holds a whole layer's keys, values and codes until its tables
// are built, so few are kept: PIGJAX_CUDA_PREFILL_BUFFERS (default 2: one layer's build overlaps
// the next layer's prefill on the GPU; a third prefill waits for the first build). Another value
// than an integer in [1, 64] fails the prefill (INTERNAL, naming the variable).
size_t prefill_buffers() {
  const char* env = std::getenv("PIGJAX_CUDA_PREFILL_BUFFERS");
  if (env == nullptr || *env == '\0') return 2;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (end == env || *end != '\0' || v < 1 || v > 64)
    throw std::runtime_error(std::string("PIGJAX_CUDA_PREFILL_BUFFERS must be an integer in [1, 64], got '") +
                             env + "'");
  return static_cast<size_t>(v);
}

StagingPool& thread_build_pool() {
  thread_local StagingPool pool(prefill_buffers());
  return pool;
}

// Errors of asynchronous calls, found on the stream after the handler returned: by store handle,
// the first one kept until take_deferred_error().
std::mutex g_errors_mu;
std::unordered_map<int64_t, std::string> g_errors;

void defer_error(int64_t handle, std::string message) {
  std::lock_guard<std::mutex> lock(g_errors_mu);
  g_errors.emplace(handle, std::move(message));
}

// A result of a call: its device buffer and its place in the staging buffer.
struct StagedResult {
  void* device;
  char* host;
  size_t bytes;
  bool is_float;  // f32 (else s32): what a failed asynchronous call fills it with
};

// What the Mem policies below share: the call's operands staged into a pinned buffer by
// device-to-host copies on the stream, its results written there by the engine.
class StagedMem {
 public:
  // A call that failed with copies on the stream that no event covers (into or out of the
  // staging buffer): wait for them (ignoring errors) before the buffer can be reused or freed.
  ~StagedMem() {
    if (unsynced_) cudaStreamSynchronize(stream_);
  }

  template <ffi::DataType T>
  ArrayView<const ffi::NativeType<T>> in(const ffi::Buffer<T>& b) {
    char* host = take(b.size_bytes());
    unsynced_ = true;
    if (b.size_bytes() > 0)
      check(cudaMemcpyAsync(host, b.untyped_data(), b.size_bytes(), cudaMemcpyDeviceToHost,
                            stream_),
            "cudaMemcpyAsync (device to host)");
    return {reinterpret_cast<const ffi::NativeType<T>*>(host),
            ffi_calls::to_vec(b.dimensions())};
  }

  template <ffi::DataType T>
  ArrayView<ffi::NativeType<T>> out(ffi::ResultBuffer<T>& b) {
    char* host = take(b->size_bytes());
    results_.push_back({b->untyped_data(), host, b->size_bytes(),
                        std::is_floating_point<ffi::NativeType<T>>::value});
    return {reinterpret_cast<ffi::NativeType<T>*>(host), ffi_calls::to_vec(b->dimensions())};
  }

 protected:
  explicit StagedMem(cudaStream_t stream) : stream_(stream) {}

  void start(Staging& staging, size_t bytes) {
    staging_ = &staging;
    base_ = staging.reserve(bytes);
    size_ = bytes;
    used_ = 0;
  }

  // Enqueues the results' copies back to the device and the event that covers them.
  void send() {
    unsynced_ = true;
    for (const StagedResult& r : results_)
      if (r.bytes > 0)
        check(cudaMemcpyAsync(r.device, r.host, r.bytes, cudaMemcpyHostToDevice, stream_),
              "cudaMemcpyAsync (host to device)");
    staging_->mark_in_use(stream_);
    unsynced_ = false;  // the event covers the copies
  }

  cudaStream_t stream_;
  std::vector<StagedResult> results_;
  bool unsynced_ = false;
  Staging* staging_ = nullptr;

 private:
  char* take(size_t bytes) {
    const size_t n = ffi_calls::staged_bytes(bytes);
    if (used_ + n > size_) throw std::logic_error("staging buffer overrun (a size was not counted)");
    char* p = base_ + used_;
    used_ += n;
    return p;
  }

  char* base_ = nullptr;
  size_t size_ = 0;
  size_t used_ = 0;
};

// The Mem policy of ffi_store_calls.h for the blocking handlers: see the top of this file.
class DeviceMem : public StagedMem {
 public:
  static constexpr bool kBackgroundPrefill = false;
  explicit DeviceMem(cudaStream_t stream) : StagedMem(stream) {}

  void begin(size_t bytes) { start(thread_staging(), bytes); }

  // Synchronizes once (the operands are then on the host), runs op, and on success copies the
  // results back.
  template <typename Op>
  std::string run(const char* /*name*/, const ArrayView<const int32_t>& h, Op op) {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    unsynced_ = false;
    std::string err = ffi_calls::call_with_handle(h, op);
    if (err.empty()) send();
    return err;
  }
};

// One asynchronous call's engine work, run by the stream (cudaLaunchHostFunc) once its operands
// are staged. It owns itself: run_job deletes it.
struct AsyncJob {
  std::string name;  // the target, for the deferred error's message
  ArrayView<const int32_t> handle;
  std::function<std::string(int64_t)> op;
  std::vector<StagedResult> results;  // filled with NaN / -1 if the call fails
};

// Host functions may not call CUDA, and nothing can return an error to XLA any more: an engine
// error (or exception) is recorded for take_deferred_error() and the results become NaN (f32) and
// -1 (s32), as the io_callback path does (docs/gpu_engine.md).
void CUDART_CB run_job(void* p) {
  std::unique_ptr<AsyncJob> job(static_cast<AsyncJob*>(p));
  const int64_t handle = *job->handle.data;
  std::string err;
  try {
    err = job->op(handle);
  } catch (const std::exception& e) {
    err = std::string("internal error: ") + e.what();
  } catch (...) {
    err = "internal error: unknown C++ exception";
  }
  if (err.empty()) return;
  defer_error(handle, job->name + ": " + err);
  for (const StagedResult& r : job->results) {
    if (r.is_float)
      std::fill_n(reinterpret_cast<float*>(r.host), r.bytes / sizeof(float),
                  std::numeric_limits<float>::quiet_NaN());
    else
      std::fill_n(reinterpret_cast<int32_t*>(r.host), r.bytes / sizeof(int32_t), int32_t{-1});
  }
}

// The Mem policy of ffi_store_calls.h for the asynchronous handlers: the handler enqueues the
// operands' copies, the engine's work (a host function) and the results' copies on XLA's stream
// and returns without waiting; the stream runs the engine when it gets there.
class AsyncMem : public StagedMem {
 public:
  static constexpr bool kBackgroundPrefill = false;
  explicit AsyncMem(cudaStream_t stream) : StagedMem(stream) {}

  void begin(size_t bytes) { start(thread_pool().acquire(bytes), bytes); }

  template <typename Op>
  std::string run(const char* name, const ArrayView<const int32_t>& h, Op op) {
    std::string err = ffi_calls::handle_rank_error(h);  // known now: the rest waits for the data
    if (!err.empty()) return err;
    auto job = std::make_unique<AsyncJob>();
    job->name = name;
    job->handle = h;
    job->op = std::move(op);
    job->results = results_;
    check(cudaLaunchHostFunc(stream_, run_job, job.get()), "cudaLaunchHostFunc");
    job.release();  // run_job owns it now
    send();
    return "";
  }
};

// The end of a background build (store_prefill_background's done, on the engine's background
// thread): an error is recorded for take_deferred_error(), and the staging buffer is free again.
struct BuildDoneCtx {
  Staging* staging;
  int64_t handle;
  std::string name;
};

void build_done(void* p, const char* message) {
  std::unique_ptr<BuildDoneCtx> ctx(static_cast<BuildDoneCtx*>(p));
  if (message != nullptr && *message != '\0') defer_error(ctx->handle, ctx->name + ": " + message);
  ctx->staging->end_build();
}

// The Mem policy of the asynchronous prefill: as AsyncMem, but its host function only validates,
// writes the middle counts and hands the table build to the engine's background thread, so the
// stream goes on with the next layers while the tables are built (docs/gpu_engine.md). The
// staging buffer, which the build reads, stays taken until the build is done; a later call on
// the store waits for the build in the engine.
class BuildMem : public AsyncMem {
 public:
  static constexpr bool kBackgroundPrefill = true;
  explicit BuildMem(cudaStream_t stream) : AsyncMem(stream) {}

  void begin(size_t bytes) { start(thread_build_pool().acquire(bytes), bytes); }

  std::string run_background_prefill(const char* name, const ArrayView<const int32_t>& h,
                                     const StoreOps& ops, const PrefillArgs& args) {
    Staging* staging = staging_;
    return run(name, h, [&ops, args, staging, target = std::string(name)](int64_t handle) {
      auto ctx = std::make_unique<BuildDoneCtx>(BuildDoneCtx{staging, handle, target});
      // Marked on the stream, before the event that would free the buffer (idle(), reserve()).
      staging->begin_build();
      std::string e;
      try {
        e = ops.prefill_background(handle, args, build_done, ctx.get());
      } catch (...) {
        staging->end_build();
        throw;
      }
      if (e.empty()) ctx.release();  // build_done owns it
      else staging->end_build();     // invalid: no build was queued
      return e;
    });
  }
};

const EngineApi& api() {
  const EngineApi* a = g_api.load();
  if (a == nullptr)
    throw std::runtime_error("the engine is not connected (pigjax._engine_cuda.connect() was not run)");
  return *a;
}

// The engine's calls through its table (engine_api.h), looked up at each call: a handler that
// runs before connect() fails with INTERNAL instead of crashing.
std::string prefill_op(int64_t h, const PrefillArgs& a) { return api().ops.prefill(h, a); }
std::string append_op(int64_t h, const AppendArgs& a) { return api().ops.append(h, a); }
std::string query_op(int64_t h, const QueryArgs& a) { return api().ops.query(h, a); }
std::string query_ranked_op(int64_t h, const RankedQueryArgs& a) { return api().ops.query_ranked(h, a); }
std::string prefill_background_op(int64_t h, const PrefillArgs& a, void (*done)(void*, const char*),
                                  void* ctx) {
  return api().ops.prefill_background(h, a, done, ctx);
}
const StoreOps kOps = {prefill_op, append_op, query_op, query_ranked_op, prefill_background_op};

// The handlers, blocking (Mem = DeviceMem) or asynchronous (AsyncMem); Name is the target's.
constexpr char kPrefillName[] = PIGJAX_CUDA_TARGET("lsh_prefill");
constexpr char kQueryName[] = PIGJAX_CUDA_TARGET("lsh_query");
constexpr char kAppendName[] = PIGJAX_CUDA_TARGET("lsh_append");
constexpr char kRankedName[] = PIGJAX_CUDA_TARGET("lsh_query_ranked");
constexpr char kAsyncPrefillName[] = PIGJAX_CUDA_TARGET("async_lsh_prefill");
constexpr char kAsyncQueryName[] = PIGJAX_CUDA_TARGET("async_lsh_query");
constexpr char kAsyncAppendName[] = PIGJAX_CUDA_TARGET("async_lsh_append");
constexpr char kAsyncRankedName[] = PIGJAX_CUDA_TARGET("async_lsh_query_ranked");

template <class Mem, const char* Name>
ffi::Error LshPrefill(cudaStream_t stream, ffi::Buffer<ffi::S32> handle, int32_t sink,
                      int32_t local, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                      ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                      ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::S32> middle_counts) {
  Mem mem(stream);
  return ffi_calls::lsh_prefill(Name, kOps, mem, handle, sink, local, slots, keys, values, codes,
                                lengths, middle_counts);
}

template <class Mem, const char* Name>
ffi::Error LshQuery(cudaStream_t stream, ffi::Buffer<ffi::S32> handle, double sample_cap,
                    ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                    ffi::ResultBuffer<ffi::S32> sampled) {
  Mem mem(stream);
  return ffi_calls::lsh_query(Name, kOps, mem, handle, sample_cap, slots, q, q_codes, out, lse,
                              sampled);
}

template <class Mem, const char* Name>
ffi::Error LshQueryRanked(cudaStream_t stream, ffi::Buffer<ffi::S32> handle, int32_t rank_tables,
                          double top, double refine, double sample_cap,
                          ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                          ffi::ResultBuffer<ffi::S32> keys_read,
                          ffi::ResultBuffer<ffi::S32> values_read) {
  Mem mem(stream);
  return ffi_calls::lsh_query_ranked(Name, kOps, mem, handle, rank_tables, top, refine, sample_cap,
                                     slots, q, q_codes, out, lse, keys_read, values_read);
}

template <class Mem, const char* Name>
ffi::Error LshAppend(cudaStream_t stream, ffi::Buffer<ffi::S32> handle,
                     ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                     ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                     ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> /*dep*/,
                     ffi::ResultBuffer<ffi::S32> totals) {
  Mem mem(stream);
  return ffi_calls::lsh_append(Name, kOps, mem, handle, slots, keys, values, codes, counts, totals);
}

// Operands, attributes and results as the CPU targets (ffi_store_calls.h), after the stream.
auto with_stream() { return ffi::Ffi::Bind().Ctx<PIGJAX_CUDA_STREAM_CTX>(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshPrefill, (LshPrefill<DeviceMem, kPrefillName>),
                              ffi_calls::bind_prefill(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshQuery, (LshQuery<DeviceMem, kQueryName>),
                              ffi_calls::bind_query(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshAppend, (LshAppend<DeviceMem, kAppendName>),
                              ffi_calls::bind_append(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshQueryRanked, (LshQueryRanked<DeviceMem, kRankedName>),
                              ffi_calls::bind_query_ranked(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaAsyncLshQueryRanked,
                              (LshQueryRanked<AsyncMem, kAsyncRankedName>),
                              ffi_calls::bind_query_ranked(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaAsyncLshPrefill, (LshPrefill<BuildMem, kAsyncPrefillName>),
                              ffi_calls::bind_prefill(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaAsyncLshQuery, (LshQuery<AsyncMem, kAsyncQueryName>),
                              ffi_calls::bind_query(with_stream()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaAsyncLshAppend, (LshAppend<AsyncMem, kAsyncAppendName>),
                              ffi_calls::bind_append(with_stream()));

const char* set_engine_api(const EngineApi* a) {
  if (a == nullptr) return "the engine_api capsule holds a null pointer";
  if (a->struct_size != sizeof(EngineApi) || a->version != kEngineApiVersion)
    return "pigjax._engine and pigjax._engine_cuda come from different builds (EngineApi size or "
           "version differ); rebuild both";
  g_api.store(a);
  return "";
}

const FfiTarget* cuda_ffi_targets(int* count) {
  static const FfiTarget kTargets[] = {
      {PIGJAX_CUDA_TARGET("lsh_prefill"), PigjaxCudaLshPrefill},
      {PIGJAX_CUDA_TARGET("lsh_query"), PigjaxCudaLshQuery},
      {PIGJAX_CUDA_TARGET("lsh_append"), PigjaxCudaLshAppend},
      {PIGJAX_CUDA_TARGET("async_lsh_prefill"), PigjaxCudaAsyncLshPrefill},
      {PIGJAX_CUDA_TARGET("async_lsh_query"), PigjaxCudaAsyncLshQuery},
      {PIGJAX_CUDA_TARGET("async_lsh_append"), PigjaxCudaAsyncLshAppend},
      {PIGJAX_CUDA_TARGET("lsh_query_ranked"), PigjaxCudaLshQueryRanked},
      {PIGJAX_CUDA_TARGET("async_lsh_query_ranked"), PigjaxCudaAsyncLshQueryRanked},
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

int64_t staging_bytes() { return g_staging_bytes.load(); }

bool take_deferred_error(int64_t handle, std::string* message) {
  std::lock_guard<std::mutex> lock(g_errors_mu);
  auto it = g_errors.find(handle);
  if (it == g_errors.end()) return false;
  *message = std::move(it->second);
  g_errors.erase(it);
  return true;
}

}  // namespace cuda
}  // namespace pigjax
