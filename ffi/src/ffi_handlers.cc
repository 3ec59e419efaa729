// See ffi_handlers.h. Each handler turns its buffers into the views of store_args.h (or the
// simhash plan's shapes), runs the kernel layer's call, and maps a validation message to
// INVALID_ARGUMENT and a C++ exception to INTERNAL, both prefixed with the target's name. The
// store handlers' logic is ffi_store_calls.h, shared with the CUDA handlers (cuda_handlers.cc).
#include "ffi_handlers.h"

#include <string>
#include <vector>

#include "decode_attention.h"
#include "ffi_store_calls.h"
#include "prefill_attention.h"
#include "query.h"
#include "query_ranked.h"
#include "simhash.h"
#include "small_matmul.h"
#include "store.h"
#include "store_args.h"
#include "write_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pigjax {
namespace {

using ffi_calls::run;
using ffi_calls::to_vec;

// Host memory (the CPU platform): operands and results are viewed in place, nothing is staged.
struct HostMem {
  static constexpr bool kBackgroundPrefill = false;
  void begin(size_t /*bytes*/) {}
  template <ffi::DataType T>
  ArrayView<const ffi::NativeType<T>> in(const ffi::Buffer<T>& b) {
    return {b.typed_data(), to_vec(b.dimensions())};
  }
  template <ffi::DataType T>
  ArrayView<ffi::NativeType<T>> out(ffi::ResultBuffer<T>& b) {
    return {b->typed_data(), to_vec(b->dimensions())};
  }
  template <typename Op>
  std::string run(const char* /*name*/, const ArrayView<const int32_t>& h, Op op) {
    return ffi_calls::call_with_handle(h, op);
  }
};

const StoreOps kStoreOps = {store_prefill, store_append, store_query, store_query_ranked,
                            store_prefill_background};

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

// Dense decode attention (decode_attention.h): q f32 [B,Hq,d], k and v f32 or bf16 [B,Hkv,S,d]
// (the same dtype), lengths s32 [B] -> out f32 [B,Hq,d], lse f32 [B,Hq].
ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<ffi::F32> lse) {
  return run("pigjax_decode_attention", [&]() -> std::string {
    DecodeAttentionShape shape;
    std::string err = plan_decode_attention(to_vec(q.dimensions()), to_vec(k.dimensions()),
                                            to_vec(v.dimensions()), to_vec(lengths.dimensions()),
                                            to_vec(out->dimensions()), &shape);
    if (!err.empty()) return err;
    if (to_vec(lse->dimensions()) != std::vector<int64_t>{shape.B, shape.Hq})
      return "lse must be [B, Hq] = [" + std::to_string(shape.B) + ", " + std::to_string(shape.Hq) + "]";
    if (k.element_type() != v.element_type())
      return "k and v must have one dtype (both f32 or both bf16)";
    if (k.element_type() == ffi::DataType::F32)
      return decode_attention(shape, q.typed_data(), static_cast<const float*>(k.untyped_data()),
                              static_cast<const float*>(v.untyped_data()), lengths.typed_data(),
                              out->typed_data(), lse->typed_data());
    if (k.element_type() == ffi::DataType::BF16)
      return decode_attention(shape, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
                              static_cast<const uint16_t*>(v.untyped_data()), lengths.typed_data(),
                              out->typed_data(), lse->typed_data());
    return "k and v must be f32 or bf16";
  });
}

// Causal prefill attention (prefill_attention.h): q f32 [B,T,Hq,d] at positions 0..T-1, k and v
// f32 or bf16 [B,Hkv,S,d] (the same dtype, S >= T) -> out f32 [B,T,Hq,d].
ffi::Error PrefillAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::ResultBuffer<ffi::F32> out) {
  return run("pigjax_prefill_attention", [&]() -> std::string {
    PrefillAttentionShape shape;
    const std::string err = plan_prefill_attention(to_vec(q.dimensions()), to_vec(k.dimensions()),
                                                   to_vec(v.dimensions()), to_vec(out->dimensions()), &shape);
    if (!err.empty()) return err;
    if (k.element_type() != v.element_type()) return "k and v must have one dtype (both f32 or both bf16)";
    if (k.element_type() == ffi::DataType::F32) {
      prefill_attention(shape, q.typed_data(), static_cast<const float*>(k.untyped_data()),
                        static_cast<const float*>(v.untyped_data()), out->typed_data());
      return "";
    }
    if (k.element_type() == ffi::DataType::BF16) {
      prefill_attention(shape, q.typed_data(), static_cast<const uint16_t*>(k.untyped_data()),
                        static_cast<const uint16_t*>(v.untyped_data()), out->typed_data());
      return "";
    }
    return "k and v must be f32 or bf16";
  });
}

// Few-row matrix product (small_matmul.h): x f32 [M,K], w f32 or bf16 ([K,N], or [N,K] with
// attr w_nk) -> out f32 [M,N].
ffi::Error SmallMatmulImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, bool w_nk, ffi::ResultBuffer<ffi::F32> out) {
  return run("pigjax_small_matmul", [&]() -> std::string {
    SmallMatmulShape shape;
    const std::string err = plan_small_matmul(to_vec(x.dimensions()), to_vec(w.dimensions()),
                                              to_vec(out->dimensions()), w_nk, &shape);
    if (!err.empty()) return err;
    if (w.element_type() == ffi::DataType::F32)
      small_matmul(shape, x.typed_data(), static_cast<const float*>(w.untyped_data()), out->typed_data());
    else if (w.element_type() == ffi::DataType::BF16)
      small_matmul(shape, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), out->typed_data());
    else
      return "w must be f32 or bf16";
    return "";
  });
}

// The store calls: ffi_store_calls.h (shared with the CUDA handlers, cuda_handlers.cc).
ffi::Error LshPrefillImpl(ffi::Buffer<ffi::S32> handle, int32_t sink, int32_t local,
                          ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> codes,
                          ffi::Buffer<ffi::S32> lengths,
                          ffi::ResultBuffer<ffi::S32> middle_counts) {
  HostMem mem;
  return ffi_calls::lsh_prefill("pigjax_lsh_prefill", kStoreOps, mem, handle, sink, local, slots,
                                keys, values, codes, lengths, middle_counts);
}

ffi::Error LshQueryImpl(ffi::Buffer<ffi::S32> handle, double sample_cap, ffi::Buffer<ffi::S32> slots,
                        ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> q_codes,
                        ffi::Buffer<ffi::S32> /*dep*/, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::S32> sampled) {
  HostMem mem;
  return ffi_calls::lsh_query("pigjax_lsh_query", kStoreOps, mem, handle, sample_cap, slots, q, q_codes,
                              out, lse, sampled);
}

// LSH store ranked query (query_ranked.h): the query's operands, attrs rank_tables, top, refine,
// sample_cap -> out f32[B,Hq,d], lse f32[B,Hq], keys_read s32[B,Hq], values_read s32[B,Hq].
ffi::Error LshQueryRankedImpl(ffi::Buffer<ffi::S32> handle, int32_t rank_tables, double top, double refine,
                              double sample_cap, ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::S32> q_codes, ffi::Buffer<ffi::S32> /*dep*/,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                              ffi::ResultBuffer<ffi::S32> keys_read,
                              ffi::ResultBuffer<ffi::S32> values_read) {
  HostMem mem;
  return ffi_calls::lsh_query_ranked("pigjax_lsh_query_ranked", kStoreOps, mem, handle, rank_tables, top,
                                     refine, sample_cap, slots, q, q_codes, out, lse, keys_read,
                                     values_read);
}

ffi::Error LshAppendImpl(ffi::Buffer<ffi::S32> handle, ffi::Buffer<ffi::S32> slots,
                         ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                         ffi::Buffer<ffi::S32> codes, ffi::Buffer<ffi::S32> counts,
                         ffi::Buffer<ffi::S32> /*dep*/, ffi::ResultBuffer<ffi::S32> totals) {
  HostMem mem;
  return ffi_calls::lsh_append("pigjax_lsh_append", kStoreOps, mem, handle, slots, keys, values,
                               codes, counts, totals);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxSimhashCodes, SimhashCodesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // proj
                                  .Attr<int32_t>("K")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // codes
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxPrefillAttention, PrefillAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k
                                  .Arg<ffi::AnyBuffer>()         // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // w
                                  .Attr<bool>("w_nk")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
);

// A step's rows into a cache buffer (write_rows.h): buf [B,H,S,d] and rows [B,T,H,d] of one dtype,
// starts s32 [B] -> out, buf's shape (aliased to buf by the caller, so written in place).
ffi::Error WriteRowsImpl(ffi::AnyBuffer buf, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> starts,
                         ffi::Result<ffi::AnyBuffer> out) {
  return run("pigjax_write_rows", [&]() -> std::string {
    WriteRowsShape shape;
    const std::string err = plan_write_rows(to_vec(buf.dimensions()), to_vec(rows.dimensions()),
                                            to_vec(starts.dimensions()), to_vec(out->dimensions()), &shape);
    if (!err.empty()) return err;
    if (rows.element_type() != buf.element_type() || out->element_type() != buf.element_type())
      return "buf, rows and out must have one dtype";
    const size_t elsize = ffi::ByteWidth(buf.element_type());
    if (elsize == 0) return "buf has a dtype without a byte width";
    write_rows(shape, elsize, buf.untyped_data(), rows.untyped_data(), starts.typed_data(), out->untyped_data());
    return "";
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxWriteRows, WriteRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // buf
                                  .Arg<ffi::AnyBuffer>()         // rows
                                  .Arg<ffi::Buffer<ffi::S32>>()  // starts
                                  .Ret<ffi::AnyBuffer>()         // out (aliases buf)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshPrefill, LshPrefillImpl, ffi_calls::bind_prefill(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshQuery, LshQueryImpl, ffi_calls::bind_query(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshQueryRanked, LshQueryRankedImpl, ffi_calls::bind_query_ranked(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxLshAppend, LshAppendImpl, ffi_calls::bind_append(ffi::Ffi::Bind()));

const FfiTarget* ffi_targets(int* count) {
  static const FfiTarget kTargets[] = {
      {"pigjax_simhash_codes", PigjaxSimhashCodes},
      {"pigjax_decode_attention", PigjaxDecodeAttention},
      {"pigjax_prefill_attention", PigjaxPrefillAttention},
      {"pigjax_small_matmul", PigjaxSmallMatmul},
      {"pigjax_write_rows", PigjaxWriteRows},
      {"pigjax_lsh_prefill", PigjaxLshPrefill},
      {"pigjax_lsh_query", PigjaxLshQuery},
      {"pigjax_lsh_query_ranked", PigjaxLshQueryRanked},
      {"pigjax_lsh_append", PigjaxLshAppend},
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

}  // namespace pigjax
