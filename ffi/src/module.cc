// nanobind module pigjax._engine (layer 3): FFI capsules plus a few CPU queries.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "cpu.h"
#include "ffi_handlers.h"

namespace nb = nanobind;

NB_MODULE(_engine, m) {
  m.doc() = "pigjax native engine: XLA FFI handlers (CPU) and CPU feature queries";

  m.def("registrations", [] {
    nb::dict d;
    int n = 0;
    const pigjax::FfiTarget* t = pigjax::ffi_targets(&n);
    for (int i = 0; i < n; ++i)
      d[t[i].name] = nb::capsule(reinterpret_cast<void*>(t[i].handler));
    return d;
  }, "Dict: FFI target name -> PyCapsule of its XLA_FFI_Handler.");

  m.def("simd_level", [] { return std::string(pigjax::simd_level_name(pigjax::simd_level())); },
        "SIMD level the kernels use now: 'avx512', 'avx2' or 'scalar'.");

  m.def("hardware_simd_level",
        [] { return std::string(pigjax::simd_level_name(pigjax::hardware_simd_level())); },
        "Best SIMD level this CPU supports.");

  m.def("set_simd_level", [](const std::string& name) {
    pigjax::SimdLevel level;
    if (!pigjax::parse_simd_level(name.c_str(), &level))
      throw nb::value_error("simd level must be 'scalar', 'avx2' or 'avx512'");
    return std::string(pigjax::simd_level_name(pigjax::set_simd_level(level)));
  }, nb::arg("level"),
     "Force a SIMD level (clamped to the hardware's) for tests/benchmarks; returns the "
     "effective level. Process-wide.");

  m.def("cpu_features", [] {
    const pigjax::CpuFeatures& f = pigjax::cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_bf16"] = f.avx512_bf16;
    return d;
  }, "Dict of CPU feature flags (as usable by this process).");

  m.def("num_threads", [] { return pigjax::default_num_threads(); },
        "Default worker count: PIGJAX_NUM_THREADS, else hardware_concurrency().");
}
