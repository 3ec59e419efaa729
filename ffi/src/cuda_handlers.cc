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
#include "cuda_handlers.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>
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
  ~Staging() {  // thread exit: errors are ignored (the CUDA context may already be gone)
    if (pending_) cudaEventSynchronize(done_);
    if (data_ != nullptr) {
      cudaFreeHost(data_);
      g_staging_bytes -= static_cast<int64_t>(capacity_);
    }
    if (done_ != nullptr) cudaEventDestroy(done_);
  }

  // Waits until the previous call's result copies have read the buffer, then makes room for
  // `bytes` (the old contents are not kept).
  char* reserve(size_t bytes) {
    if (pending_) {
      check(cudaEventSynchronize(done_), "cudaEventSynchronize");
      pending_ = false;
    }
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

  // Records that copies enqueued on `stream` so far read the buffer.
  void mark_in_use(cudaStream_t stream) {
    if (done_ == nullptr) check(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming),
                                "cudaEventCreateWithFlags");
    check(cudaEventRecord(done_, stream), "cudaEventRecord");
    pending_ = true;
  }

 private:
  char* data_ = nullptr;
  size_t capacity_ = 0;
  cudaEvent_t done_ = nullptr;
  bool pending_ = false;
};

Staging& thread_staging() {
  thread_local Staging staging;
  return staging;
}

// The Mem policy of ffi_store_calls.h for device buffers: see the top of this file.
class DeviceMem {
 public:
  explicit DeviceMem(cudaStream_t stream) : stream_(stream), staging_(thread_staging()) {}
  // A call that failed with copies on the stream that neither fetch() nor the event of send()
  // covers (into or out of the staging buffer): wait for them (ignoring errors) before the
  // buffer can be reused or freed.
  ~DeviceMem() {
    if (unsynced_) cudaStreamSynchronize(stream_);
  }

  void begin(size_t bytes) {
    base_ = staging_.reserve(bytes);
    size_ = bytes;
    used_ = 0;
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
    results_.push_back({b->untyped_data(), host, b->size_bytes()});
    return {reinterpret_cast<ffi::NativeType<T>*>(host), ffi_calls::to_vec(b->dimensions())};
  }

  void fetch() {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    unsynced_ = false;
  }

  void send() {
    unsynced_ = true;
    for (const Result& r : results_)
      if (r.bytes > 0)
        check(cudaMemcpyAsync(r.device, r.host, r.bytes, cudaMemcpyHostToDevice, stream_),
              "cudaMemcpyAsync (host to device)");
    staging_.mark_in_use(stream_);
    unsynced_ = false;  // the event covers the copies
  }

 private:
  struct Result {
    void* device;
    const char* host;
    size_t bytes;
  };

  char* take(size_t bytes) {
    const size_t n = ffi_calls::staged_bytes(bytes);
    if (used_ + n > size_) throw std::logic_error("staging buffer overrun (a size was not counted)");
    char* p = base_ + used_;
    used_ += n;
    return p;
  }

  cudaStream_t stream_;
  Staging& staging_;
  char* base_ = nullptr;
  size_t size_ = 0;
  size_t used_ = 0;
  bool unsynced_ = false;
  std::vector<Result> results_;
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
const StoreOps kOps = {prefill_op, append_op, query_op};

ffi::Error LshPrefillImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> handle, int32_t sink,
                          int32_t local, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                          ffi::Buffer<ffi::S32> lengths,
                          ffi::ResultBuffer<ffi::S32> middle_counts) {
  DeviceMem mem(stream);
  return ffi_calls::lsh_prefill(PIGJAX_CUDA_TARGET("lsh_prefill"), kOps, mem, handle, sink, local,
                                slots, keys, values, codes, lengths, middle_counts);
}

ffi::Error LshQueryImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> handle, double sample_cap,
                        ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                        ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                        ffi::ResultBuffer<ffi::S32> sampled) {
  DeviceMem mem(stream);
  return ffi_calls::lsh_query(PIGJAX_CUDA_TARGET("lsh_query"), kOps, mem, handle, sample_cap, slots, q,
                              q_codes, out, lse, sampled);
}

ffi::Error LshAppendImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> handle,
                         ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                         ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                         ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> /*dep*/,
                         ffi::ResultBuffer<ffi::S32> totals) {
  DeviceMem mem(stream);
  return ffi_calls::lsh_append(PIGJAX_CUDA_TARGET("lsh_append"), kOps, mem, handle, slots, keys,
                               values, codes, counts, totals);
}

}  // namespace

// Same operands, attributes and results as the CPU targets (ffi_handlers.cc), plus the stream.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshPrefill, LshPrefillImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<PIGJAX_CUDA_STREAM_CTX>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Attr<int32_t>("sink")
                                  .Attr<int32_t>("local")
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::S32>>()  // middle_counts
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshQuery, LshQueryImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<PIGJAX_CUDA_STREAM_CTX>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Attr<double>("sample_cap")
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dep
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sampled
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxCudaLshAppend, LshAppendImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<PIGJAX_CUDA_STREAM_CTX>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // counts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dep
                                  .Ret<ffi::Buffer<ffi::S32>>()  // totals
);

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
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

int64_t staging_bytes() { return g_staging_bytes.load(); }

}  // namespace cuda
}  // namespace pigjax
