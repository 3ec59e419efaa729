#!/usr/bin/env bash
# A/B of store_query as separate processes: builds ffi/tests/bench_query from an older commit's
# tree and from this tree, then runs them in turn (one query repeated, so the rows stay cached;
# bench_query_ab.sh is the in-process, 64-query-set counterpart) and prints both medians.
#   ffi/tests/bench_query_alt.sh OLD_COMMIT [B Hkv Hq d n reps threads [alternations]]
# e.g. ffi/tests/bench_query_alt.sh 8df502c 1 3 9 64 8192 400 2 10
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
old="${1:?usage: bench_query_alt.sh OLD_COMMIT [B Hkv Hq d n reps threads [alternations]]}"
shift
args=("${@:1:7}")
alternations="${8:-10}"
out="${root}/build/bench_query_alt"
rm -rf "${out}" && mkdir -p "${out}/old"
git -C "${root}" archive "${old}" ffi | tar -x -C "${out}/old"
build() {  # tree output: the engine's sources without the bindings, and bench_query.cc
  local srcs=()
  for f in simd thread_pool simhash row_kernels weight_table store_args store query query_ranked sketch; do
    [[ -f "$1/ffi/src/${f}.cc" ]] && srcs+=("$1/ffi/src/${f}.cc")
  done
  ${CXX:-g++} -O3 -std=c++17 -I"$1/ffi/src" "${srcs[@]}" "$1/ffi/tests/bench_query.cc" -lpthread -o "$2"
}
build "${out}/old" "${out}/bench_old"
build "${root}" "${out}/bench_new"
for _ in $(seq 1 "${alternations}"); do
  echo "old $("${out}/bench_old" "${args[@]}" | cut -d' ' -f2)"
  echo "new $("${out}/bench_new" "${args[@]}" | cut -d' ' -f2)"
done | python3 -c '
import collections, statistics, sys
t = collections.defaultdict(list)
for line in sys.stdin:
    k, v = line.split()
    t[k].append(float(v))
o, n, runs = statistics.median(t["old"]), statistics.median(t["new"]), len(t["old"])
print(f"old median {o:.3f} ms, new median {n:.3f} ms, old/new {o / n:.2f}x ({runs} alternations)")'
