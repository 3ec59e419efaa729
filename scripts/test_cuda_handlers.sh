#!/usr/bin/env bash
# CPU tests of the CUDA store handlers' host logic (BUILD.md, "CUDA handlers"): builds, in
# build/cuda-test, the test-only module pigjax._engine_cuda_fake (ffi/src/cuda_handlers.cc against
# the fake runtime ffi/tests/fake_cuda) and, where a CUDA toolkit is found, the real
# pigjax._engine_cuda (compile and link only: it needs a GPU to run), copies them into pigjax/ and
# runs tests/engine/test_cuda_handlers.py. The normal build (pip / CMake defaults) builds neither.
#   PYTHON=.venv/bin/python scripts/test_cuda_handlers.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
build=${BUILD_DIR:-build/cuda-test}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DPIGJAX_CUDA=AUTO -DPIGJAX_CUDA_FAKE=ON > "$build.configure.log" 2>&1 || { tail -20 "$build.configure.log"; exit 1; }
grep "pigjax:" "$build.configure.log" || true
cmake --build "$build" -j "${JOBS:-2}"
cp "$build"/_engine_cuda_fake*.so pigjax/
if ls "$build"/_engine_cuda.*.so > /dev/null 2>&1; then
  cp "$build"/_engine_cuda.*.so pigjax/
  echo "built and linked: $(ls "$build"/_engine_cuda.*.so) ($(ldd "$build"/_engine_cuda.*.so | grep -o 'libcudart[^ ]*' | head -1))"
fi
"$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda_handlers.py "$@"
