// A fake of the few CUDA runtime calls ffi/src/cuda_handlers.cc makes, for the test-only module
// pigjax._engine_cuda_fake: "device" memory is host memory, so the CUDA handlers' host logic
// (staging sizes, copies, synchronization, error paths) runs under JAX's CPU backend.
// Not a simulator, but strict where the handler's correctness depends on it:
//   - cudaMemcpyAsync and cudaLaunchHostFunc only queue a copy / a host function; queued work
//     runs in order at cudaStreamSynchronize and at cudaEventRecord (this fake has one stream and
//     no concurrency, so "the stream reached the event" means "everything queued ran"). A handler
//     that read staged operands before synchronizing would read the poison below, not the
//     operands.
//   - cudaMallocHost fills new memory with 0xFF bytes (NaN floats, -1 ints).
//   - fake_cuda::fail_after(n, error): the call n+1 calls from now returns `error`.
// Counters (fake_cuda::counters()) let tests check one synchronization per handler call.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorMemoryAllocation = 2;
constexpr cudaError_t cudaErrorNotReady = 600;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
#define CUDART_CB
typedef void (*cudaHostFn_t)(void* userData);
typedef struct FakeCudaStream* cudaStream_t;
typedef struct FakeCudaEvent* cudaEvent_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3
};
constexpr unsigned cudaEventDisableTiming = 2;

namespace fake_cuda {

struct Counters {
  long long d2h_copies = 0, h2d_copies = 0, d2h_bytes = 0, h2d_bytes = 0;
  long long stream_syncs = 0, event_syncs = 0, event_records = 0, host_allocs = 0, host_frees = 0;
  long long host_funcs = 0;
};

struct State {
  std::mutex mu;
  struct Work { void* dst; const void* src; size_t bytes; cudaHostFn_t fn; void* arg; };  // fn: a host function
  std::vector<Work> queue;
  Counters counters;
  long long fail_countdown = -1;  // >= 0: calls left before the injected failure
  cudaError_t fail_error = cudaSuccess;
};

inline State& state() {
  static State s;
  return s;
}

inline Counters counters() {
  std::lock_guard<std::mutex> l(state().mu);
  return state().counters;
}

inline void reset_counters() {
  std::lock_guard<std::mutex> l(state().mu);
  state().counters = Counters();
}

// The (n+1)-th runtime call from now returns `error` (n = 0: the next one); n < 0 disarms.
inline void fail_after(long long n, cudaError_t error) {
  std::lock_guard<std::mutex> l(state().mu);
  state().fail_countdown = n;
  state().fail_error = error;
}

// Under the lock: whether this call is the injected failure.
inline bool injected(State& s) {
  if (s.fail_countdown < 0) return false;
  if (s.fail_countdown-- == 0) return true;
  return false;
}

// Runs the queued work in order (host functions with the lock held: they may not call CUDA).
inline void drain(State& s) {
  for (const State::Work& w : s.queue) {
    if (w.fn != nullptr) w.fn(w.arg);
    else std::memcpy(w.dst, w.src, w.bytes);
  }
  s.queue.clear();
}

}  // namespace fake_cuda

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorMemoryAllocation: return "out of memory (fake)";
    case cudaErrorNotReady: return "device not ready (fake)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (fake)";
    default: return "unknown error (fake)";
  }
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  s.queue.push_back({dst, src, bytes, nullptr, nullptr});
  if (kind == cudaMemcpyDeviceToHost) { ++s.counters.d2h_copies; s.counters.d2h_bytes += bytes; }
  if (kind == cudaMemcpyHostToDevice) { ++s.counters.h2d_copies; s.counters.h2d_bytes += bytes; }
  return cudaSuccess;
}

inline cudaError_t cudaLaunchHostFunc(cudaStream_t, cudaHostFn_t fn, void* arg) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  s.queue.push_back({nullptr, nullptr, 0, fn, arg});
  ++s.counters.host_funcs;
  return cudaSuccess;
}

inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  fake_cuda::drain(s);
  ++s.counters.stream_syncs;
  return cudaSuccess;
}

inline cudaError_t cudaMallocHost(void** p, size_t bytes) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  *p = std::malloc(bytes > 0 ? bytes : 1);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, bytes);
  ++s.counters.host_allocs;
  return cudaSuccess;
}

inline cudaError_t cudaFreeHost(void* p) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  std::free(p);
  ++s.counters.host_frees;
  return cudaSuccess;
}

inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  static char token;
  *e = reinterpret_cast<cudaEvent_t>(&token);
  return cudaSuccess;
}

inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  fake_cuda::drain(s);
  ++s.counters.event_records;
  return cudaSuccess;
}

inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  fake_cuda::drain(s);
  ++s.counters.event_syncs;
  return cudaSuccess;
}

// Every event was reached when it was recorded (see the top): never cudaErrorNotReady.
inline cudaError_t cudaEventQuery(cudaEvent_t) {
  fake_cuda::State& s = fake_cuda::state();
  std::lock_guard<std::mutex> l(s.mu);
  if (fake_cuda::injected(s)) return s.fail_error;
  return cudaSuccess;
}

inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
