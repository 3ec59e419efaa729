#!/usr/bin/env bash
# The GPU check: the same model code with JAX's default device a GPU; the engine is reached through
# the CUDA-platform FFI handlers (pigjax._engine_cuda, paths "cuda-ffi" and "cuda-async") when they build, else
# through io_callback. Needs a Python with a CUDA jax, flax, transformers, torch, nanobind, cmake and
# ninja (the project's device machine has them):
#   OUT=out/device scripts/device_check.sh
#   TESTS="tests/engine/test_cuda_gpu.py" BENCH=0 scripts/device_check.sh   # a quick recheck
#   TESTS=none: no tests; HANDLER=0 / DECODE=0: no bench_cuda_handler / bench_decode; HANDLER_BATCHES / HANDLER_CONTEXTS / HANDLER_CALLS
#   size bench_cuda_handler; DEADLINE=s: the optional runs (5.) end by s seconds after the start, so one
#   device call returns with what they measured (bench_capped_memory writes its JSON after each run).
# 1. builds the engine and pigjax._engine_cuda for that Python with cmake (no pip, no venv), against
#    the CUDA runtime pip package JAX's CUDA plugin installed (nvidia/.../include, lib), else the
#    toolkit (PIGJAX_CUDA_ROOT=dir overrides);
# 2. runs the CUDA handler tests and the decode-path tests on the GPU (tests of the CPU-only FFI
#    path and of the embedded SmolLM2, which is not there, are deselected);
# 3. bench_cuda_handler: per-call latency of the store calls by size, cuda-ffi vs cuda-async vs
#    io_callback;
# 4. bench_decode on the GPU with random SmolLM2-shaped weights (8k, batch 4): dense vs MagicPIG
#    through cuda-ffi, cuda-async and io_callback, same run;
# 5. optional: ATTN=1 bench_attention on that machine's CPU; CAPPED=1 the capped-memory comparison
#    (scripts/bench_capped_memory.py, Llama-3.1-8B shapes; long: run it alone).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o -w -E "avx2|avx512f|avx512_bf16" /proc/cpuinfo | sort | uniq -c; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The CUDA runtime JAX itself loads: the nvidia pip package with include/cuda_runtime_api.h and
# lib/libcudart.so* (the last in sorted order), so _engine_cuda links the same libcudart as the plugin.
find_cuda_root='
import glob, os, site
roots = []
for sp in site.getsitepackages():
    for h in glob.glob(os.path.join(sp, "nvidia", "**", "include", "cuda_runtime_api.h"), recursive=True):
        root = os.path.dirname(os.path.dirname(h))
        if glob.glob(os.path.join(root, "lib", "libcudart.so*")) and os.path.exists(
                os.path.join(root, "include", "crt", "host_defines.h")):  # the cu13 package lacks crt/
            roots.append(root)
print(sorted(roots)[-1] if roots else "")
'
CUDA_ROOT=${PIGJAX_CUDA_ROOT:-}
[ -n "$CUDA_ROOT" ] || CUDA_ROOT=$("$PY" -c "$find_cuda_root")
echo "CUDA runtime root: ${CUDA_ROOT:-none found: find_package(CUDAToolkit)}" | tee -a "$OUT/machine.txt"

build=/tmp/pigjax-build
configure() {  # $@: extra CMake arguments
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" "$@" \
    && cmake --build "$build"
}
# The CUDA module against JAX's runtime package; if that fails (e.g. headers missing from the
# package), against a toolkit if one is found; else the CPU engine alone (io_callback on the GPU).
if ! { configure -DPIGJAX_CUDA=${PIGJAX_CUDA:-AUTO} ${CUDA_ROOT:+-DPIGJAX_CUDA_ROOT="$CUDA_ROOT"}; } > "$OUT/build.log" 2>&1; then
  tail -15 "$OUT/build.log"; echo "== CUDA module build failed with root '${CUDA_ROOT}'; retrying without it"
  rm -rf "$build"
  if ! { configure -DPIGJAX_CUDA=AUTO -DPIGJAX_CUDA_ROOT= || { rm -rf "$build"; configure -DPIGJAX_CUDA=OFF; }; } \
       >> "$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log"; exit 1
  fi
fi
grep "pigjax:" "$OUT/build.log" || true
cp "$build"/_engine*.so pigjax/
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import jax, pigjax; print('jax', jax.__version__, jax.devices(), pigjax.__file__)"
"$PY" -c "
from pigjax.engine import native, store
print('cuda handlers:', native.cuda_handlers(), native.cuda_unavailable_reason(), '| default path:', store.default_path())
if native.cuda_handlers(): print('CUDA runtime of _engine_cuda:', native._cuda['module'].runtime_version())
" 2>&1 | tee -a "$OUT/machine.txt"

status=0
echo "== tests on $("$PY" -c 'import jax; print(jax.default_backend())')"
# TESTS: pytest arguments (default: the decode-path tests that need no embedded model and no CPU FFI)
TESTS=${TESTS:-tests/engine/test_cuda_gpu.py tests/attention/test_backends.py tests/engine/test_store.py tests/test_generate.py tests/test_generate_mosaics.py -k "not ffi and not smollm2"}
if [ "$TESTS" != none ]; then
  eval "timeout ${TEST_TIMEOUT:-210} $PY -m pytest -v -m 'not slow' -p no:cacheprovider $TESTS" > "$OUT/pytest.log" 2>&1 || status=1
  tail -25 "$OUT/pytest.log"
fi
[ "${BENCH:-1}" = 0 ] && exit $status

paths=callback
"$PY" -c "from pigjax.engine import native; raise SystemExit(0 if native.cuda_handlers() else 1)" && paths=cuda-ffi,cuda-async,callback

if [ "${HANDLER:-1}" = 1 ]; then
echo "== bench_cuda_handler on the GPU (paths $paths)"
timeout "${HANDLER_TIMEOUT:-150}" "$PY" scripts/bench_cuda_handler.py --paths "$paths" \
  --batches "${HANDLER_BATCHES:-1,4,16}" --contexts "${HANDLER_CONTEXTS:-1024,8192,32768}" \
  --calls "${HANDLER_CALLS:-200}" --out "$OUT/bench_cuda_handler.json" 2>&1 \
  | tee -a "$OUT/bench.log" | tail -14 || status=1
fi

if [ "${DECODE:-1}" = 1 ]; then
  echo "== bench_decode on the GPU (MagicPIG via $paths)"
  timeout "${BENCH_TIMEOUT:-240}" "$PY" scripts/bench_decode.py --weights random --contexts "${CONTEXTS:-8192}" --steps 32 \
    --prefill_tokens "${PREFILL_TOKENS:-0}" --engine_paths "$paths" --out "$OUT/bench_decode_gpu.json" 2>&1 \
    | tee -a "$OUT/bench.log" | tail -14 || status=1
fi
left() {  # seconds until DEADLINE (the given default when none is set), at least 1
  local want=$1
  [ -n "${DEADLINE:-}" ] && want=$(( DEADLINE - SECONDS < want ? DEADLINE - SECONDS : want ))
  echo $(( want > 1 ? want : 1 ))
}

if [ "${ATTN:-0}" = 1 ]; then
  echo "== bench_attention on the CPU"
  JAX_PLATFORMS=cpu timeout "$(left "${ATTN_TIMEOUT:-80}")" "$PY" scripts/bench_attention.py --lengths 131072 --repeats 10 \
    --out "$OUT/bench_attention_cpu.json" 2>&1 | tee -a "$OUT/bench.log" | tail -12 || status=1
fi
if [ "${CAPPED:-0}" = 1 ]; then
  echo "== capped-memory comparison (Llama-3.1-8B shapes, random bf16)"
  timeout "$(left "${CAPPED_TIMEOUT:-540}")" "$PY" scripts/bench_capped_memory.py --caps_gb "${CAPS_GB:-24,48}" \
    --contexts "${CAPPED_CONTEXTS:-32768,65536}" ${CAPPED_ARGS:-} --out "$OUT/bench_capped_memory.json" 2>&1 \
    | tee -a "$OUT/bench.log" | tail -20 || status=1
fi
exit $status
