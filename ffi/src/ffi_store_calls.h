// The LSH store's FFI handler logic (prefill, append, query), written once for every kind of
// memory the operands may live in (docs/algorithm.md §6):
//   - ffi_handlers.cc (platform "cpu"): operands and results are host memory, viewed in place;
//   - cuda_handlers.cc (platform "CUDA"): they are device memory; operands are copied to pinned
//     host buffers on XLA's stream, results copied back after the engine ran.
// Both build the same store_args.h views and call the same store_prefill / store_append /
// store_query / store_query_ranked (whose validate_* hold every argument check), so a call and its error messages are
// the same on both platforms; only the target name in the message differs.
//
// A Mem policy supplies:
//   void begin(size_t bytes)   room for this call's staged arrays (sum of staged_bytes())
//   ArrayView<const T> in(const ffi::Buffer<T>&)    host view of an operand, readable by op
//   ArrayView<T> out(ffi::ResultBuffer<T>&)         host view of a result, delivered after op
//   std::string run(name, handle_view, op)          runs op(handle) (-> "" or a message) once the
//                                                   operands are on the host, then delivers the
//                                                   results; returns op's message, or "" where
//                                                   op runs later (the asynchronous CUDA handlers:
//                                                   their errors are deferred, cuda_handlers.cc)
//   static constexpr bool kBackgroundPrefill        whether a prefill only validates and hands the
//                                                   table build to the engine's background thread
//                                                   (then run_background_prefill(name, h, ops, args)
//                                                   replaces run; cuda_handlers.cc, BuildMem)
// and StoreOps (engine_api.h) the engine's calls: store_prefill / ... / store_query_ranked
// themselves in pigjax._engine, the table pigjax._engine exports in the CUDA module.
// A failure of the memory layer (e.g. a CUDA call) is thrown as an exception and becomes INTERNAL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "engine_api.h"
#include "store_args.h"
#include "xla/ffi/api/ffi.h"

namespace pigjax {
namespace ffi_calls {

namespace ffi = xla::ffi;

template <typename Dims>
std::vector<int64_t> to_vec(const Dims& dims) {
  return std::vector<int64_t>(dims.begin(), dims.end());
}

// Bytes an array takes in a staging buffer: its size rounded up to 64 (each array starts on a
// cache line).
inline size_t staged_bytes(size_t bytes) { return (bytes + 63) / 64 * 64; }
template <ffi::DataType T>
size_t staged_bytes(const ffi::Buffer<T>& b) { return staged_bytes(b.size_bytes()); }
template <ffi::DataType T>
size_t staged_bytes(ffi::ResultBuffer<T>& b) { return staged_bytes(b->size_bytes()); }

// Runs call() (which returns "" or a validation message) for the target `name`: a message becomes
// INVALID_ARGUMENT and a C++ exception INTERNAL, both prefixed with the target's name.
template <typename Call>
ffi::Error run(const char* name, Call&& call) {
  try {
    const std::string err = call();
    if (!err.empty()) return ffi::Error::InvalidArgument(std::string(name) + ": " + err);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal(std::string(name) + ": unknown C++ exception");
  }
}

// The store handle travels as a rank-0 s32 operand (not an attribute) so that one compiled
// program serves every store: generate creates a store per call.
inline std::string handle_rank_error(const ArrayView<const int32_t>& h) {
  if (h.dims.size() == 0) return "";
  return "handle must be a rank-0 int32 array, got rank " + std::to_string(h.dims.size());
}

// op(handle) once h (staged or in place) holds the handle: what a Mem policy's run() calls.
template <typename Op>
std::string call_with_handle(const ArrayView<const int32_t>& h, Op& op) {
  std::string err = handle_rank_error(h);
  if (!err.empty()) return err;
  return op(static_cast<int64_t>(*h.data));
}

// LSH store prefill: see store.h. Slots s32[B], keys/values f32[B,Hkv,n,d],
// codes s32[B,Hkv,n,L], lengths s32[B] -> middle_counts s32[B].
template <class Mem>
ffi::Error lsh_prefill(const char* name, const StoreOps& ops, Mem& mem,
                       ffi::Buffer<ffi::S32> handle_arg, int32_t sink, int32_t local,
                       ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                       ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                       ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::S32> middle_counts) {
  return run(name, [&] {
    mem.begin(staged_bytes(handle_arg) + staged_bytes(slots) + staged_bytes(keys) +
              staged_bytes(values) + staged_bytes(codes) + staged_bytes(lengths) +
              staged_bytes(middle_counts));
    const ArrayView<const int32_t> h = mem.in(handle_arg);
    PrefillArgs a;
    a.slots = mem.in(slots);
    a.keys = mem.in(keys);
    a.values = mem.in(values);
    a.codes = mem.in(codes);
    a.lengths = mem.in(lengths);
    a.middle_counts = mem.out(middle_counts);
    a.sink = sink;
    a.local = local;
    if constexpr (Mem::kBackgroundPrefill) return mem.run_background_prefill(name, h, ops, a);
    else return mem.run(name, h, [&ops, a](int64_t handle) { return ops.prefill(handle, a); });
  });
}

// LSH store query: slots s32[B], q f32[B,Hq,d], q_codes s32[B,Hq,L], dep (any s32, unused:
// orders the call after a prefill by data dependence; never copied) -> out f32[B,Hq,d],
// lse f32[B,Hq], sampled s32[B,Hq].
template <class Mem>
ffi::Error lsh_query(const char* name, const StoreOps& ops, Mem& mem,
                     ffi::Buffer<ffi::S32> handle_arg, double sample_cap, ffi::Buffer<ffi::S32> slots,
                     ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_codes,
                     ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                     ffi::ResultBuffer<ffi::S32> sampled) {
  return run(name, [&] {
    mem.begin(staged_bytes(handle_arg) + staged_bytes(slots) + staged_bytes(q) +
              staged_bytes(q_codes) + staged_bytes(out) + staged_bytes(lse) +
              staged_bytes(sampled));
    const ArrayView<const int32_t> h = mem.in(handle_arg);
    QueryArgs a;
    a.slots = mem.in(slots);
    a.q = mem.in(q);
    a.q_codes = mem.in(q_codes);
    a.out = mem.out(out);
    a.lse = mem.out(lse);
    a.sampled = mem.out(sampled);
    a.sample_cap = sample_cap;
    return mem.run(name, h, [&ops, a](int64_t handle) { return ops.query(handle, a); });
  });
}

// LSH store ranked query (query_ranked.h): the query's operands, attrs rank_tables, top, refine,
// sample_cap -> out f32[B,Hq,d], lse f32[B,Hq], keys_read s32[B,Hq], values_read s32[B,Hq].
template <class Mem>
ffi::Error lsh_query_ranked(const char* name, const StoreOps& ops, Mem& mem,
                            ffi::Buffer<ffi::S32> handle_arg, int32_t rank_tables, double top,
                            double refine, double sample_cap, ffi::Buffer<ffi::S32> slots,
                            ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_codes,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                            ffi::ResultBuffer<ffi::S32> keys_read,
                            ffi::ResultBuffer<ffi::S32> values_read) {
  return run(name, [&] {
    mem.begin(staged_bytes(handle_arg) + staged_bytes(slots) + staged_bytes(q) +
              staged_bytes(q_codes) + staged_bytes(out) + staged_bytes(lse) +
              staged_bytes(keys_read) + staged_bytes(values_read));
    const ArrayView<const int32_t> h = mem.in(handle_arg);
    RankedQueryArgs a;
    a.base.slots = mem.in(slots);
    a.base.q = mem.in(q);
    a.base.q_codes = mem.in(q_codes);
    a.base.out = mem.out(out);
    a.base.lse = mem.out(lse);
    a.base.sampled = mem.out(keys_read);
    a.values_read = mem.out(values_read);
    a.base.sample_cap = sample_cap;
    a.rank_tables = rank_tables;
    a.top = top;
    a.refine = refine;
    return mem.run(name, h, [&ops, a](int64_t handle) { return ops.query_ranked(handle, a); });
  });
}

// LSH store append: slots s32[B], keys/values f32[B,Hkv,T,d], codes s32[B,Hkv,T,L],
// counts s32[B], dep (any s32, unused) -> totals s32[B] (middle + appended tokens per row).
template <class Mem>
ffi::Error lsh_append(const char* name, const StoreOps& ops, Mem& mem,
                      ffi::Buffer<ffi::S32> handle_arg, ffi::Buffer<ffi::S32> slots,
                      ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                      ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::S32> counts,
                      ffi::ResultBuffer<ffi::S32> totals) {
  return run(name, [&] {
    mem.begin(staged_bytes(handle_arg) + staged_bytes(slots) + staged_bytes(keys) +
              staged_bytes(values) + staged_bytes(codes) + staged_bytes(counts) +
              staged_bytes(totals));
    const ArrayView<const int32_t> h = mem.in(handle_arg);
    AppendArgs a;
    a.slots = mem.in(slots);
    a.keys = mem.in(keys);
    a.values = mem.in(values);
    a.codes = mem.in(codes);
    a.counts = mem.in(counts);
    a.totals = mem.out(totals);
    return mem.run(name, h, [&ops, a](int64_t handle) { return ops.append(handle, a); });
  });
}

// The store targets' operands, attributes and results, bound after what `b` binds already (the
// CUDA targets bind their stream first): one list each for the CPU and the CUDA targets.
template <typename B>
auto bind_prefill(B b) {
  return std::move(b)
      .template Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
      .template Attr<int32_t>("sink")
      .template Attr<int32_t>("local")
      .template Arg<ffi::Buffer<ffi::S32>>()  // slots
      .template Arg<ffi::Buffer<ffi::F32>>()  // keys
      .template Arg<ffi::Buffer<ffi::F32>>()  // values
      .template Arg<ffi::Buffer<ffi::S32>>()  // codes
      .template Arg<ffi::Buffer<ffi::S32>>()  // lengths
      .template Ret<ffi::Buffer<ffi::S32>>();  // middle_counts
}

// What both queries take after their attributes, and their first three results.
template <typename B>
auto bind_query_operands(B b) {
  return std::move(b)
      .template Arg<ffi::Buffer<ffi::S32>>()  // slots
      .template Arg<ffi::Buffer<ffi::F32>>()  // q
      .template Arg<ffi::Buffer<ffi::S32>>()  // q_codes
      .template Arg<ffi::Buffer<ffi::S32>>()  // dep
      .template Ret<ffi::Buffer<ffi::F32>>()  // out
      .template Ret<ffi::Buffer<ffi::F32>>()  // lse
      .template Ret<ffi::Buffer<ffi::S32>>();  // sampled (the ranked query: keys_read)
}

template <typename B>
auto bind_query(B b) {
  return bind_query_operands(std::move(b)
                                 .template Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                 .template Attr<double>("sample_cap"));
}

template <typename B>
auto bind_query_ranked(B b) {
  return bind_query_operands(std::move(b)
                                 .template Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                 .template Attr<int32_t>("rank_tables")
                                 .template Attr<double>("top")
                                 .template Attr<double>("refine")
                                 .template Attr<double>("sample_cap"))
      .template Ret<ffi::Buffer<ffi::S32>>();  // values_read
}

template <typename B>
auto bind_append(B b) {
  return std::move(b)
      .template Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
      .template Arg<ffi::Buffer<ffi::S32>>()  // slots
      .template Arg<ffi::Buffer<ffi::F32>>()  // keys
      .template Arg<ffi::Buffer<ffi::F32>>()  // values
      .template Arg<ffi::Buffer<ffi::S32>>()  // codes
      .template Arg<ffi::Buffer<ffi::S32>>()  // counts
      .template Arg<ffi::Buffer<ffi::S32>>()  // dep
      .template Ret<ffi::Buffer<ffi::S32>>();  // totals
}

}  // namespace ffi_calls
}  // namespace pigjax
