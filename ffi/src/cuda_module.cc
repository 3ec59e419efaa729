// nanobind module pigjax._engine_cuda (or, built with PIGJAX_CUDA_FAKE, the test-only
// pigjax._engine_cuda_fake): the CUDA store handlers of cuda_handlers.cc as FFI capsules.
// pigjax/engine/native.py imports it, calls connect() with pigjax._engine's engine_api capsule
// (engine_api.h) and registers registrations() for platform "CUDA" (the fake: "cpu").
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cuda_runtime_api.h>

#include <optional>
#include <string>

#include "cuda_handlers.h"
#include "engine_api.h"

namespace nb = nanobind;

namespace {

void define(nb::module_& m) {
  m.def("registrations", [] {
    nb::dict d;
    int n = 0;
    const pigjax::FfiTarget* t = pigjax::cuda::cuda_ffi_targets(&n);
    for (int i = 0; i < n; ++i)
      d[t[i].name] = nb::capsule(reinterpret_cast<void*>(t[i].handler));
    return d;
  }, "Dict: FFI target name -> PyCapsule of its XLA_FFI_Handler.");

  m.def("connect", [](nb::capsule api) {
    if (api.name() == nullptr || std::string(api.name()) != pigjax::kEngineApiName)
      throw nb::value_error("connect: expected pigjax._engine.engine_api()'s capsule");
    const std::string err =
        pigjax::cuda::set_engine_api(static_cast<const pigjax::EngineApi*>(api.data()));
    if (!err.empty()) throw nb::value_error(("connect: " + err).c_str());
  }, nb::arg("engine_api"),
     "Connect the handlers to pigjax._engine's store registry (engine_api.h); once per process.");

  m.def("take_deferred_error", [](int64_t handle) -> std::optional<std::string> {
    std::string message;
    if (!pigjax::cuda::take_deferred_error(handle, &message)) return std::nullopt;
    return message;
  }, nb::arg("handle"),
     "The first engine error of an asynchronous call (pigjax_cuda_async_lsh_*) on the store "
     "`handle` since the last take, or None; the call's results were NaN / -1.");

  m.def("staging_bytes", [] { return pigjax::cuda::staging_bytes(); },
        "Pinned host bytes the handlers' staging buffers hold now (per calling thread: one for the "
        "blocking targets, a pool for the asynchronous ones).");
}

}  // namespace

#ifdef PIGJAX_CUDA_FAKE
NB_MODULE(_engine_cuda_fake, m) {
  m.doc() = "TEST ONLY: pigjax's CUDA store handlers built against a fake CUDA runtime "
            "(ffi/tests/fake_cuda), registered for the CPU platform";
  define(m);
  m.def("counters", [] {
    const fake_cuda::Counters c = fake_cuda::counters();
    nb::dict d;
    d["d2h_copies"] = c.d2h_copies; d["h2d_copies"] = c.h2d_copies;
    d["d2h_bytes"] = c.d2h_bytes; d["h2d_bytes"] = c.h2d_bytes;
    d["stream_syncs"] = c.stream_syncs; d["event_syncs"] = c.event_syncs;
    d["event_records"] = c.event_records; d["host_allocs"] = c.host_allocs;
    d["host_frees"] = c.host_frees; d["host_funcs"] = c.host_funcs;
    return d;
  }, "Dict of the fake runtime's call counters since reset_counters().");
  m.def("reset_counters", [] { fake_cuda::reset_counters(); });
  m.def("fail_after", [](long long n, int error) { fake_cuda::fail_after(n, error); },
        nb::arg("n"), nb::arg("error") = 2,
        "The (n+1)-th fake runtime call from now returns `error` (2: out of memory, 719: launch "
        "failure); n < 0 disarms.");
}
#else
NB_MODULE(_engine_cuda, m) {
  m.doc() = "pigjax's LSH store handlers for XLA's CUDA platform (ffi/src/cuda_handlers.cc)";
  define(m);
  m.def("runtime_version", [] {
    int v = 0;
    const cudaError_t e = cudaRuntimeGetVersion(&v);
    if (e != cudaSuccess) throw nb::value_error(cudaGetErrorString(e));
    return v;
  }, "The CUDA runtime version this module runs with (e.g. 12080 for 12.8).");
}
#endif
