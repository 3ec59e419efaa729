// See ffi_handlers.h. Each handler turns its buffers into the views of store_args.h (or the
// simhash plan's shapes), runs the kernel layer's call, and maps a validation message to
// INVALID_ARGUMENT and a C++ exception to INTERNAL, both prefixed with the target's name.
#include "ffi_handlers.h"

#include <exception>
#include <string>
#include <vector>

#include "query.h"
#include "query_ranked.h"
#include "simhash.h"
#include "store.h"
#include "store_args.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pigjax {
namespace {

template <typename Dims>
std::vector<int64_t> to_vec(const Dims& dims) {
  return std::vector<int64_t>(dims.begin(), dims.end());
}

// Views of an operand and of a result buffer.
template <ffi::DataType T>
ArrayView<const ffi::NativeType<T>> view(const ffi::Buffer<T>& b) {
  return {b.typed_data(), to_vec(b.dimensions())};
}
template <ffi::DataType T>
ArrayView<ffi::NativeType<T>> view(ffi::ResultBuffer<T>& b) {
  return {b->typed_data(), to_vec(b->dimensions())};
}

// Runs call() (which returns "" or a validation message) for the target `name`.
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
bool read_handle(const ffi::Buffer<ffi::S32>& h, int64_t* handle, std::string* err) {
  if (h.dimensions().size() != 0) {
    *err = "handle must be a rank-0 int32 array, got rank " + std::to_string(h.dimensions().size());
    return false;
  }
  *handle = *h.typed_data();
  return true;
}

// x: f32 [..., d]; proj: f32 [d, K*L] (or [*batch, d, K*L] under jax.vmap with
// vmap_method="expand_dims"); attr K; out: s32 [..., L].
ffi::Error SimhashCodesImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> proj, int32_t K,
                            ffi::ResultBuffer<ffi::S32> out) {
  return run("pigjax_simhash_codes", [&] {
    SimhashPlan plan;
    const std::string err = plan_simhash(to_vec(x.dimensions()), to_vec(proj.dimensions()),
                                         to_vec(out->dimensions()), K, &plan);
    if (err.empty())
      simhash_codes_planned(plan, x.typed_data(), proj.typed_data(), out->typed_data());
    return err;
  });
}

// LSH store prefill: see store.h. Slots s32[B], keys/values f32[B,Hkv,n,d],
// codes s32[B,Hkv,n,L], lengths s32[B] -> middle_counts s32[B].
ffi::Error LshPrefillImpl(ffi::Buffer<ffi::S32> handle_arg, int32_t sink, int32_t local,
                          ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                          ffi::Buffer<ffi::S32> lengths,
                          ffi::ResultBuffer<ffi::S32> middle_counts) {
  return run("pigjax_lsh_prefill", [&] {
    int64_t handle;
    std::string err;
    if (!read_handle(handle_arg, &handle, &err)) return err;
    PrefillArgs a;
    a.slots = view(slots);
    a.keys = view(keys);
    a.values = view(values);
    a.codes = view(codes);
    a.lengths = view(lengths);
    a.middle_counts = view(middle_counts);
    a.sink = sink;
    a.local = local;
    return store_prefill(handle, a);
  });
}

// LSH store query: slots s32[B], q f32[B,Hq,d], q_codes s32[B,Hq,L], dep (any s32, unused:
// orders the call after a prefill by data dependence) -> out f32[B,Hq,d], lse f32[B,Hq],
// sampled s32[B,Hq].
ffi::Error LshQueryImpl(ffi::Buffer<ffi::S32> handle_arg, ffi::Buffer<ffi::S32> slots,
                        ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_codes,
                        ffi::Buffer<ffi::S32> /*dep*/, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::S32> sampled) {
  return run("pigjax_lsh_query", [&] {
    int64_t handle;
    std::string err;
    if (!read_handle(handle_arg, &handle, &err)) return err;
    QueryArgs a;
    a.slots = view(slots);
    a.q = view(q);
    a.q_codes = view(q_codes);
    a.out = view(out);
    a.lse = view(lse);
    a.sampled = view(sampled);
    return store_query(handle, a);
  });
}

// LSH store ranked query (query_ranked.h): the query's operands, attrs rank_tables, radius, top, refine
// -> out f32[B,Hq,d], lse f32[B,Hq], keys_read s32[B,Hq], values_read s32[B,Hq].
ffi::Error LshQueryRankedImpl(ffi::Buffer<ffi::S32> handle_arg, int32_t rank_tables,
                              int32_t radius, double top, double refine, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                              ffi::ResultBuffer<ffi::S32> keys_read,
                              ffi::ResultBuffer<ffi::S32> values_read) {
  return run("pigjax_lsh_query_ranked", [&] {
    int64_t handle;
    std::string err;
    if (!read_handle(handle_arg, &handle, &err)) return err;
    RankedQueryArgs a;
    a.base.slots = view(slots);
    a.base.q = view(q);
    a.base.q_codes = view(q_codes);
    a.base.out = view(out);
    a.base.lse = view(lse);
    a.base.sampled = view(keys_read);
    a.values_read = view(values_read);
    a.rank_tables = rank_tables;
    a.radius = radius;
    a.top = top;
    a.refine = refine;
    return store_query_ranked(handle, a);
  });
}

// LSH store append: slots s32[B], keys/values f32[B,Hkv,T,d], codes s32[B,Hkv,T,L],
// counts s32[B], dep (any s32, unused: orders the call after a prefill or another append)
// -> totals s32[B] (middle + appended tokens per row).
ffi::Error LshAppendImpl(ffi::Buffer<ffi::S32> handle_arg, ffi::Buffer<ffi::S32> slots,
                         ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                         ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::S32> counts,
                         ffi::Buffer<ffi::S32> /*dep*/, ffi::ResultBuffer<ffi::S32> totals) {
  return run("pigjax_lsh_append", [&] {
    int64_t handle;
    std::string err;
    if (!read_handle(handle_arg, &handle, &err)) return err;
    AppendArgs a;
    a.slots = view(slots);
    a.keys = view(keys);
    a.values = view(values);
    a.codes = view(codes);
    a.counts = view(counts);
    a.totals = view(totals);
    return store_append(handle, a);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxSimhashCodes, SimhashCodesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // proj
                                  .Attr<int32_t>("K")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // codes
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshPrefill, LshPrefillImpl,
                              ffi::Ffi::Bind()
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshQuery, LshQueryImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dep
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sampled
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshQueryRanked, LshQueryRankedImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Attr<int32_t>("rank_tables")
                                  .Attr<int32_t>("radius")
                                  .Attr<double>("top")
                                  .Attr<double>("refine")
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dep
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::S32>>()  // keys_read
                                  .Ret<ffi::Buffer<ffi::S32>>()  // values_read
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshAppend, LshAppendImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // handle (rank 0)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // codes
                                  .Arg<ffi::Buffer<ffi::S32>>()  // counts
                                  .Arg<ffi::Buffer<ffi::S32>>()  // dep
                                  .Ret<ffi::Buffer<ffi::S32>>()  // totals
);

const FfiTarget* ffi_targets(int* count) {
  static const FfiTarget kTargets[] = {
      {"pigjax_simhash_codes", PigjaxSimhashCodes},
      {"pigjax_lsh_prefill", PigjaxLshPrefill},
      {"pigjax_lsh_query", PigjaxLshQuery},
      {"pigjax_lsh_query_ranked", PigjaxLshQueryRanked},
      {"pigjax_lsh_append", PigjaxLshAppend},
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

}  // namespace pigjax
