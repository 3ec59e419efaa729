#!/usr/bin/env bash
# Builds the C++ kernel layer and its standalone tests (ffi/tests/) with
# AddressSanitizer + UndefinedBehaviorSanitizer in build/sanitize, then runs ctest.
# SANITIZERS=thread scripts/sanitize_ffi.sh uses ThreadSanitizer instead (build/sanitize-thread).
# Needs only a C++17 compiler and CMake (no Python, no jax).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sanitizers="${SANITIZERS:-address,undefined}"
build="${root}/build/sanitize"
[[ "${sanitizers}" == "address,undefined" ]] || build="${root}/build/sanitize-${sanitizers//,/-}"
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S "${root}" -B "${build}" "${generator[@]}" \
  -DPIGJAX_SANITIZE=ON -DPIGJAX_SANITIZERS="${sanitizers}" -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "${build}" --parallel
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1}"
# Run every SIMD level the CPU has (PIGJAX_SIMD only lowers the dispatch level;
# the tests also call each level explicitly).
for level in scalar avx2 avx512; do
  echo "== PIGJAX_SIMD=${level}"
  PIGJAX_SIMD="${level}" ctest --test-dir "${build}" --output-on-failure
done
