#!/usr/bin/env bash
# CPU tests of the CUDA store handlers' host logic (BUILD.md, "CUDA handlers"): builds, in
# build/cuda-test, the test-only module pigjax._engine_cuda_fake (ffi/src/cuda_handlers.cc against
# the fake runtime ffi/tests/fake_cuda) and, where a CUDA toolkit is found, the real
# pigjax._engine_cuda (compile and link only: it needs a GPU to run), copies them into pigjax/ and
# runs tests/engine/test_cuda_handlers.py. The normal build (pip / CMake defaults) builds neither.
#   PYTHON=.venv/bin/python scripts/test_cuda_handlers.sh [pytest args]
#   BUILD_ONLY=1 CUDA=OFF ...   only (re)build the fake module into pigjax/ (what the test suite does)
#   SANITIZE=1 ...   the same tests with both modules built with AddressSanitizer and
#                    UndefinedBehaviorSanitizer (build/cuda-test-asan), run from a copy of pigjax/
#                    and tests/ under /tmp with the sanitizer runtimes preloaded into Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${SANITIZE:-0}" = 1 ]; then
  build=${BUILD_DIR:-build/cuda-test-asan}
  san="-fsanitize=address,undefined -fno-omit-frame-pointer"
  extra=(-DPIGJAX_CUDA=OFF "-DCMAKE_CXX_FLAGS=$san" "-DCMAKE_MODULE_LINKER_FLAGS=$san"
         "-DCMAKE_SHARED_LINKER_FLAGS=$san")
else
  build=${BUILD_DIR:-build/cuda-test}
  extra=(-DPIGJAX_CUDA=${CUDA:-AUTO})
fi
mkdir -p "$(dirname "$build")"
# One build at a time (pytest-xdist workers may both ask for it): hold a lock on the build folder
# until the modules are built and copied.
exec 9> "$build.lock"
flock 9
[ -f "$build/build.ninja" ] || cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DPIGJAX_CUDA_FAKE=ON "${extra[@]}" > "$build.configure.log" 2>&1 || { tail -20 "$build.configure.log"; exit 1; }
grep "pigjax:" "$build.configure.log" || true
# The sanitized run needs every module (pigjax._engine too); otherwise build only the CUDA handler
# modules: the engine they reach through engine_api.h is the installed pigjax._engine.
targets=()
if [ "${SANITIZE:-0}" != 1 ]; then
  targets=(--target _engine_cuda_fake)
  grep -q "pigjax: building _engine_cuda" "$build.configure.log" && targets+=(_engine_cuda)
fi
cmake --build "$build" -j "${JOBS:-2}" "${targets[@]}"
if [ "${SANITIZE:-0}" = 1 ]; then
  flock -u 9  # the tests below build again (a no-op) from a child process
  tree=$(mktemp -d)
  trap 'rm -rf "$tree"' EXIT
  cp -r pigjax tests "$tree"/
  rm -f "$tree"/pigjax/*.so
  cp "$build"/_engine*.so "$tree"/pigjax/
  # Import pigjax from the copy, not from an editable install's import hook.
  mkdir "$tree/site"
  cat > "$tree/site/sitecustomize.py" <<PYEOF
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "skbuild" not in type(f).__module__.lower()]
sys.path.insert(0, "$tree")
PYEOF
  cd "$tree"
  export LD_PRELOAD="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libubsan.so)"
  export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
  export PYTHONPATH="$tree/site" PIGJAX_FAKE_CUDA_PREBUILT=1  # the tests load the copy's modules
  "$PY" -c "import pigjax._engine_cuda_fake as m; print('sanitized modules from', m.__file__)"
  [ "${BUILD_ONLY:-0}" = 1 ] && exit 0
  "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda_handlers.py "$@"
  exit
fi
cp "$build"/_engine_cuda_fake*.so pigjax/
if ls "$build"/_engine_cuda.*.so > /dev/null 2>&1; then
  cp "$build"/_engine_cuda.*.so pigjax/
  echo "built and linked: $(ls "$build"/_engine_cuda.*.so) ($(ldd "$build"/_engine_cuda.*.so | grep -o 'libcudart[^ ]*' | head -1))"
fi
flock -u 9
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0
"$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda_handlers.py "$@"
