"""SimHash codes on the CPU: the legacy single-thread kernel, the blocked multi-threaded kernel,
and XLA's dot, in one run.

  python scripts/bench_simhash.py                                  # 16k and 128k tokens x 8 KV heads, d 128 and 64
  python scripts/bench_simhash.py --tokens 4096 --dims 128 --repeats 5

For each (tokens, d): rows = tokens x kv_heads random float32 rows, proj [d, K*L] (Llama-8B
shapes by default: 8 KV heads, K = 10, L = 150, i.e. 1500 projection columns). Columns:

  legacy      the single-thread kernel of commit 4ac4b4a (`simhash_codes_np(kernel="legacy")`)
  blocked 1t  the new kernel on one thread (`_engine.set_num_threads(1)`)
  blocked Nt  the new kernel on num_threads() threads (what the FFI handler runs)
  ffi         the new kernel through `jax.jit(native.simhash_codes)` (FFI call overhead included)
  xla         `jnp.matmul(x, proj) > 0` and the bit packing, jitted, over chunks of --xla_chunk
              rows (`lax.map`: a [rows, K*L] float intermediate for 1M rows would be 6 GB)

The methods run round-robin, --repeats rounds (median), so load from other jobs hits them alike.
GFLOP/s counts 2 * rows * d * K * L per call; the peak is cores x GHz x SIMD lanes x 2 (FMA) x
--fma_units. The blocked kernel's codes must equal the legacy kernel's bit for bit; XLA's may
differ where a dot product is within float rounding of 0 (its summation order differs): the
number of differing bits is reported. Prints a table and writes JSON (and a Markdown table).
"""

import json
import os
import time

from absl import app, flags

from pigjax import cli

_TOKENS = flags.DEFINE_list("tokens", ["16384", "131072"], "tokens per KV head")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads (rows = tokens x kv_heads)")
_DIMS = flags.DEFINE_list("dims", ["128", "64"], "head dims d")
_K = flags.DEFINE_integer("K", 10, "bits per table")
_L = flags.DEFINE_integer("L", 150, "tables")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds (median)")
_XLA_CHUNK = flags.DEFINE_integer("xla_chunk", 4096, "rows per chunk of the XLA variant")
_GHZ = flags.DEFINE_float(
    "ghz", 3.65,
    "clock for the peak estimate. Default: this dev machine's effective AVX-512 clock, from a "
    "register-only FMA loop (7.3 G zmm FMAs/s per core at 2 per cycle); under KVM /proc/cpuinfo "
    "shows only the 2.6 GHz TSC")
_FMA_UNITS = flags.DEFINE_integer("fma_units", 2, "vector FMA pipes per core (Zen 4/5: 2)")
_OUT = flags.DEFINE_string("out", "docs/results/bench_simhash.json", "JSON output")
_MD = flags.DEFINE_string("md", "docs/results/bench_simhash.md", "Markdown output ('' = none)")
cli.ints(_TOKENS)
cli.ints(_DIMS)

LANES = {"avx512": 16, "avx2": 8, "scalar": 1}


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pigjax import _engine
    from pigjax.engine import native
    from pigjax.machine import describe

    K, L = _K.value, _L.value
    threads = native.num_threads()
    level = native.simd_level()
    cores = os.cpu_count()
    peak_core = _GHZ.value * LANES[level] * 2 * _FMA_UNITS.value
    machine = {**describe(), "simd_level": level, "num_threads": threads,
               "peak_gflops_estimate": peak_core * cores,
               "peak_formula": f"{cores} cores x {_GHZ.value} GHz x {LANES[level]} lanes x 2 (FMA) "
                               f"x {_FMA_UNITS.value} FMA units"}
    print(f"machine: {machine}")
    weights = jnp.left_shift(jnp.int32(1), jnp.arange(K, dtype=jnp.int32))

    def xla_codes_fn(rows, d):
        chunk = min(_XLA_CHUNK.value, rows)
        assert rows % chunk == 0, (rows, chunk)

        def codes(xc, proj):
            bits = (jnp.matmul(xc, proj) > 0).reshape(xc.shape[0], L, K).astype(jnp.int32)
            return jnp.sum(bits * weights, axis=-1, dtype=jnp.int32)

        @jax.jit
        def run(x, proj):
            return jax.lax.map(lambda xc: codes(xc, proj), x.reshape(-1, chunk, d)).reshape(rows, L)
        return run

    ffi_codes = jax.jit(native.simhash_codes, static_argnums=2)
    results = []
    for tokens in map(int, _TOKENS.value):
        for d in map(int, _DIMS.value):
            rows = tokens * _KV_HEADS.value
            rng = np.random.default_rng(tokens + d)
            x = rng.standard_normal((rows, d), dtype=np.float32)
            proj = rng.standard_normal((d, K * L), dtype=np.float32)
            xj, pj = jnp.asarray(x), jnp.asarray(proj)
            xla_run = xla_codes_fn(rows, d)

            def blocked(n):
                def f():
                    _engine.set_num_threads(n)
                    return native.simhash_codes_np(x, proj, K)
                return f

            def ffi():
                _engine.set_num_threads(threads)
                return np.asarray(jax.block_until_ready(ffi_codes(xj, pj, K)))

            def xla():
                _engine.set_num_threads(threads)
                return np.asarray(jax.block_until_ready(xla_run(xj, pj)))

            methods = {"legacy": lambda: native.simhash_codes_np(x, proj, K, kernel="legacy"),
                       "blocked_1t": blocked(1), "blocked": blocked(threads), "ffi": ffi, "xla": xla}
            out = {name: fn() for name, fn in methods.items()}  # warm-up / compile, and results
            times = {name: [] for name in methods}
            for _ in range(_REPEATS.value):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            _engine.set_num_threads(threads)
            med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            flops = 2 * rows * d * K * L
            ref = out["legacy"]
            diff_bits = {name: int(np.unpackbits((o ^ ref).view(np.uint8)).sum())
                         for name, o in out.items() if name != "legacy"}
            r = {"tokens": tokens, "kv_heads": _KV_HEADS.value, "rows": rows, "d": d, "K": K, "L": L,
                 "gflop_per_call": flops / 1e9,
                 "seconds": med, "all_seconds": times,
                 "gflops": {name: flops / t / 1e9 for name, t in med.items()},
                 "pct_of_peak": {name: 100 * flops / t / 1e9 / machine["peak_gflops_estimate"]
                                 for name, t in med.items()},
                 "speedup_vs_legacy": {name: med["legacy"] / t for name, t in med.items()},
                 "bits_differing_from_legacy": diff_bits, "codes_total": rows * L}
            results.append(r)
            print(f"tokens={tokens:7d} d={d:3d} rows={rows:8d}: " + " | ".join(
                f"{name} {t:7.3f}s {r['gflops'][name]:6.1f} GF/s" for name, t in med.items())
                + f" | differing bits {diff_bits}", flush=True)
            del x, xj, out

    header = ("| tokens x heads | d | legacy 1t s | blocked 1t s | blocked {n}t s | ffi {n}t s | "
              "xla s | blocked / legacy | xla / legacy | GFLOP/s legacy / blocked / xla | "
              "% of peak (blocked) | bits != legacy (blocked / xla) |").format(n=threads)
    lines = [header, "|" + "---|" * 12]
    for r in results:
        s, g = r["seconds"], r["gflops"]
        lines.append(
            f"| {r['tokens']} x {r['kv_heads']} | {r['d']} | {s['legacy']:.3f} | {s['blocked_1t']:.3f} | "
            f"{s['blocked']:.3f} | {s['ffi']:.3f} | {s['xla']:.3f} | "
            f"{r['speedup_vs_legacy']['blocked']:.2f}x | {r['speedup_vs_legacy']['xla']:.2f}x | "
            f"{g['legacy']:.0f} / {g['blocked']:.0f} / {g['xla']:.0f} | {r['pct_of_peak']['blocked']:.0f}% | "
            f"{r['bits_differing_from_legacy']['blocked']} / {r['bits_differing_from_legacy']['xla']} |")
    table = "\n".join(lines)
    print()
    print(table)
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"benchmark": "simhash", "machine": machine, "repeats": _REPEATS.value,
                   "xla_chunk": _XLA_CHUNK.value, "rows": results}, f, indent=2)
    print(f"\nwrote {_OUT.value}")
    if _MD.value:
        with open(_MD.value, "w") as f:
            f.write("# SimHash codes: legacy vs blocked kernel vs XLA's dot\n\n"
                    "`python scripts/bench_simhash.py` (median of "
                    f"{_REPEATS.value} round-robin rounds; K = {K}, L = {L}; "
                    f"rows = tokens x {_KV_HEADS.value} KV heads).\n\n"
                    f"Machine: {machine['cpu']}, {cores} cores, SIMD level {level}, "
                    f"{threads} engine threads, jax {machine['jax']}. Peak estimate "
                    f"{machine['peak_gflops_estimate']:.0f} GFLOP/s = {machine['peak_formula']}.\n\n"
                    + table + "\n")
        print(f"wrote {_MD.value}")


if __name__ == "__main__":
    app.run(main)
