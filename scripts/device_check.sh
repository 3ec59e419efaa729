#!/usr/bin/env bash
# The GPU check: the same model code with JAX's default device a GPU (the engine is reached through
# io_callback there; the XLA FFI targets are CPU-only). Needs a Python with a CUDA jax, flax,
# transformers, torch, nanobind, cmake and ninja (the project's device machine has them):
#   OUT=out/device scripts/device_check.sh
#   TESTS="tests/engine/test_store.py -k callback" BENCH=0 scripts/device_check.sh   # a quick recheck
# 1. builds the engine for that Python with cmake (no pip, no venv);
# 2. runs the decode-path tests on the GPU (tests of the CPU-only FFI path and of the embedded
#    SmolLM2, which is not there, are deselected);
# 3. bench_decode on the GPU with random SmolLM2-shaped weights (8k and 32k, batch 4);
# 4. bench_attention on that machine's CPU (JAX_PLATFORMS=cpu: the dense baseline on the CPU too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep -E "Model name|^CPU\(s\)"
  grep -o -w -E "avx2|avx512f|avx512_bf16" /proc/cpuinfo | sort | uniq -c; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

build=/tmp/pigjax-build
if ! { cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
       && cmake --build "$build"; } > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; exit 1
fi
cp "$build"/_engine*.so pigjax/
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import jax, pigjax; print('jax', jax.__version__, jax.devices(), pigjax.__file__)"

status=0
echo "== tests on $("$PY" -c 'import jax; print(jax.default_backend())')"
# TESTS: pytest arguments (default: the decode-path tests that need no embedded model and no CPU FFI)
TESTS=${TESTS:-tests/attention/test_backends.py tests/engine/test_store.py tests/test_generate.py tests/test_generate_mosaics.py -k "not ffi and not smollm2"}
eval "timeout ${TEST_TIMEOUT:-210} $PY -m pytest -q -m 'not slow' -p no:cacheprovider $TESTS" > "$OUT/pytest.log" 2>&1 || status=1
tail -25 "$OUT/pytest.log"
[ "${BENCH:-1}" = 0 ] && exit $status

echo "== bench_decode on the GPU"
timeout "${BENCH_TIMEOUT:-170}" "$PY" scripts/bench_decode.py --weights random --contexts 8192,32768 --steps 32 \
  --prefill_tokens 8192 --out "$OUT/bench_decode_gpu.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -12 || status=1

echo "== bench_attention on the CPU"
JAX_PLATFORMS=cpu timeout "${ATTN_TIMEOUT:-80}" "$PY" scripts/bench_attention.py --lengths 131072 --repeats 10 \
  --out "$OUT/bench_attention_cpu.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -12 || status=1
exit $status
