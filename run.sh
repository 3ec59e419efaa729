#!/usr/bin/env bash
# The two set-up-free entry points (see README):
#   ./run.sh generate [flags of scripts/generate.py]   greedy continuation with the embedded model
#   ./run.sh test [pytest args]                         the full test suite
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
# XLA's compiled programs persist in build/jax-cache (JAX's own compilation cache; capped, so it
# evicts the oldest and locks between processes): a second run, and the suite's workers and
# subprocesses compiling the same programs, skip most compile time. Set JAX_COMPILATION_CACHE_DIR
# to use another folder.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/build/jax-cache}"
export JAX_COMPILATION_CACHE_MAX_SIZE="${JAX_COMPILATION_CACHE_MAX_SIZE:-2000000000}"
cmd="${1:-}"
shift || true
case "$cmd" in
  generate) exec python scripts/generate.py "$@" ;;
  test)
    # Two pytest workers (pytest-xdist), one test file per worker at a time so module fixtures are
    # built once: most tests are bound by XLA's single-threaded compiles, so this halves the time
    # on 2 cores. Files go out in collection order (tests/conftest.py puts the longest first), not
    # xdist's default of most tests first. PIGJAX_TEST_WORKERS=0 runs everything in one process.
    workers="${PIGJAX_TEST_WORKERS:-2}"
    par=()
    [ "$workers" != "0" ] && par=(-n "$workers" --dist loadfile --no-loadscope-reorder)
    status=0
    python -m pytest "${par[@]}" "$@" || status=$?
    # pytest exits 5 when it collected no test: that is a failure here, not a pass.
    [ "$status" -eq 5 ] && echo "run.sh: pytest ran no test" >&2 && exit 1
    exit "$status" ;;
  *) echo "usage: ./run.sh generate [flags] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
