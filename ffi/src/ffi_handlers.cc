#include "ffi_handlers.h"

#include <exception>
#include <string>
#include <vector>

#include "lsh_store.h"
#include "simhash.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pigjax {
namespace {

template <typename Dims>
std::vector<int64_t> to_vec(const Dims& dims) {
  return std::vector<int64_t>(dims.begin(), dims.end());
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
  try {
    SimhashPlan plan;
    const std::string err = plan_simhash(to_vec(x.dimensions()), to_vec(proj.dimensions()),
                                         to_vec(out->dimensions()), K, &plan);
    if (!err.empty()) return ffi::Error::InvalidArgument("pigjax_simhash_codes: " + err);
    simhash_codes_planned(plan, x.typed_data(), proj.typed_data(), out->typed_data());
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("pigjax_simhash_codes: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("pigjax_simhash_codes: unknown C++ exception");
  }
}

// LSH store prefill: see lsh_store.h. Slots s32[B], keys/values f32[B,Hkv,n,d],
// codes s32[B,Hkv,n,L], lengths s32[B] -> middle_counts s32[B].
ffi::Error LshPrefillImpl(ffi::Buffer<ffi::S32> handle_arg, int32_t sink, int32_t local,
                          ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                          ffi::Buffer<ffi::S32> lengths,
                          ffi::ResultBuffer<ffi::S32> middle_counts) {
  try {
    int64_t handle;
    std::string herr;
    if (!read_handle(handle_arg, &handle, &herr)) return ffi::Error::InvalidArgument("pigjax_lsh_prefill: " + herr);
    PrefillIO io;
    io.slots = slots.typed_data();
    io.slots_dims = to_vec(slots.dimensions());
    io.keys = keys.typed_data();
    io.keys_dims = to_vec(keys.dimensions());
    io.values = values.typed_data();
    io.values_dims = to_vec(values.dimensions());
    io.codes = codes.typed_data();
    io.codes_dims = to_vec(codes.dimensions());
    io.lengths = lengths.typed_data();
    io.lengths_dims = to_vec(lengths.dimensions());
    io.middle_counts = middle_counts->typed_data();
    io.middle_counts_dims = to_vec(middle_counts->dimensions());
    io.sink = sink;
    io.local = local;
    const std::string err = store_prefill(handle, io);
    if (!err.empty()) return ffi::Error::InvalidArgument("pigjax_lsh_prefill: " + err);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("pigjax_lsh_prefill: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("pigjax_lsh_prefill: unknown C++ exception");
  }
}

// LSH store query: slots s32[B], q f32[B,Hq,d], q_codes s32[B,Hq,L], dep (any s32, unused:
// orders the call after a prefill by data dependence) -> out f32[B,Hq,d], lse f32[B,Hq],
// sampled s32[B,Hq].
ffi::Error LshQueryImpl(ffi::Buffer<ffi::S32> handle_arg, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                        ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                        ffi::ResultBuffer<ffi::S32> sampled) {
  try {
    int64_t handle;
    std::string herr;
    if (!read_handle(handle_arg, &handle, &herr)) return ffi::Error::InvalidArgument("pigjax_lsh_query: " + herr);
    QueryIO io;
    io.slots = slots.typed_data();
    io.slots_dims = to_vec(slots.dimensions());
    io.q = q.typed_data();
    io.q_dims = to_vec(q.dimensions());
    io.q_codes = q_codes.typed_data();
    io.q_codes_dims = to_vec(q_codes.dimensions());
    io.out = out->typed_data();
    io.out_dims = to_vec(out->dimensions());
    io.lse = lse->typed_data();
    io.lse_dims = to_vec(lse->dimensions());
    io.sampled = sampled->typed_data();
    io.sampled_dims = to_vec(sampled->dimensions());
    const std::string err = store_query(handle, io);
    if (!err.empty()) return ffi::Error::InvalidArgument("pigjax_lsh_query: " + err);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("pigjax_lsh_query: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("pigjax_lsh_query: unknown C++ exception");
  }
}

// LSH store append: slots s32[B], keys/values f32[B,Hkv,T,d], codes s32[B,Hkv,T,L],
// counts s32[B], dep (any s32, unused: orders the call after a prefill or another append)
// -> totals s32[B] (middle + appended tokens per row).
ffi::Error LshAppendImpl(ffi::Buffer<ffi::S32> handle_arg, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                         ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                         ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> /*dep*/,
                         ffi::ResultBuffer<ffi::S32> totals) {
  try {
    int64_t handle;
    std::string herr;
    if (!read_handle(handle_arg, &handle, &herr)) return ffi::Error::InvalidArgument("pigjax_lsh_append: " + herr);
    AppendIO io;
    io.slots = slots.typed_data();
    io.slots_dims = to_vec(slots.dimensions());
    io.keys = keys.typed_data();
    io.keys_dims = to_vec(keys.dimensions());
    io.values = values.typed_data();
    io.values_dims = to_vec(values.dimensions());
    io.codes = codes.typed_data();
    io.codes_dims = to_vec(codes.dimensions());
    io.counts = counts.typed_data();
    io.counts_dims = to_vec(counts.dimensions());
    io.totals = totals->typed_data();
    io.totals_dims = to_vec(totals->dimensions());
    const std::string err = store_append(handle, io);
    if (!err.empty()) return ffi::Error::InvalidArgument("pigjax_lsh_append: " + err);
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("pigjax_lsh_append: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("pigjax_lsh_append: unknown C++ exception");
  }
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
      {"pigjax_lsh_append", PigjaxLshAppend},
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

}  // namespace pigjax
