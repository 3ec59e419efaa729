#!/usr/bin/env bash
# Builds ffi/tests/bench_query_ab (an in-process A/B of store_query) from this tree's ffi/src and
# the ffi/src of an older commit, then runs it with the given arguments.
#   ffi/tests/bench_query_ab.sh OLD_COMMIT [B Hkv Hq d n reps threads layout K L]
# e.g. ffi/tests/bench_query_ab.sh 979da08 4 3 9 64 32768 60 2
# Builds in build/bench_query_ab (objects of both engines; -O3, no -march flags, like the module).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
old="${1:?usage: bench_query_ab.sh OLD_COMMIT [bench_query_ab arguments]}"
shift
out="${root}/build/bench_query_ab"
rm -rf "${out}" && mkdir -p "${out}/old"
git -C "${root}" archive "${old}" ffi/src | tar -x -C "${out}/old"
cxx="${CXX:-g++} -O3 -std=c++17"
# The engine's sources without the bindings (each tree's own list: files come and go).
srcs="simd thread_pool simhash row_kernels weight_table store_args store query query_ranked sketch background"
for f in ${srcs}; do
  [[ -f "${out}/old/ffi/src/${f}.cc" ]] &&
    ${cxx} -c -Dpigjax=pigjax_old -I"${out}/old/ffi/src" "${out}/old/ffi/src/${f}.cc" -o "${out}/old_${f}.o"
  [[ -f "${root}/ffi/src/${f}.cc" ]] && ${cxx} -c -I"${root}/ffi/src" "${root}/ffi/src/${f}.cc" -o "${out}/new_${f}.o"
done
${cxx} -c -Dpigjax=pigjax_old -DPFX=old_ -I"${out}/old/ffi/src" "${root}/ffi/tests/bench_query_ab_api.cc" -o "${out}/api_old.o"
${cxx} -c -DPFX=new_ -DNEW_ENGINE -I"${root}/ffi/src" "${root}/ffi/tests/bench_query_ab_api.cc" -o "${out}/api_new.o"
${cxx} -c -I"${root}/ffi/src" "${root}/ffi/tests/bench_query_ab.cc" -o "${out}/main.o"
${CXX:-g++} "${out}"/main.o "${out}"/api_old.o "${out}"/api_new.o "${out}"/old_*.o "${out}"/new_*.o -lpthread \
  -o "${out}/bench_query_ab"
"${out}/bench_query_ab" "$@"
