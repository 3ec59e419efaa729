#include "ffi_handlers.h"

#include <exception>
#include <string>
#include <vector>

#include "simhash.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pigjax {
namespace {

template <typename Dims>
std::vector<int64_t> to_vec(const Dims& dims) {
  return std::vector<int64_t>(dims.begin(), dims.end());
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PigjaxSimhashCodes, SimhashCodesImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // proj
                                  .Attr<int32_t>("K")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // codes
);

const FfiTarget* ffi_targets(int* count) {
  static const FfiTarget kTargets[] = {
      {"pigjax_simhash_codes", PigjaxSimhashCodes},
  };
  *count = static_cast<int>(sizeof(kTargets) / sizeof(kTargets[0]));
  return kTargets;
}

}  // namespace pigjax
