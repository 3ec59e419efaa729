"""Per-call latency of the LSH store's calls by size and path, same run (issue 18's "per-layer host
call"): the CUDA-platform FFI handlers (blocking "cuda-ffi" and asynchronous "cuda-async",
ffi/src/cuda_handlers.cc) against the io_callback path they replace ("callback"), and on a CPU the CPU
FFI target ("ffi").

  python scripts/bench_cuda_handler.py                      # paths: the backend's (see --paths)
  python scripts/bench_cuda_handler.py --paths ffi,fake-cuda,fake-cuda-async,callback --contexts 1024 --calls 50

Shapes: SmolLM2's (3 KV / 9 q heads, d 64; K 10, L 150, bf16 storage) by default. For each
(batch, stored tokens n, path): one store, prefilled with random keys, values and their SimHash
codes (jnp on the default device, as on a GPU); then a jitted `lax.fori_loop` of `--calls` queries,
each query's q depending on the previous output (so they cannot overlap or be merged), timed after
a warm-up; per-call µs = loop seconds / calls. "engine" is the same query through the NumPy entry
point (`store_query_np`, no JAX, no copies): per-call minus engine = the path's overhead (copies,
synchronization, dispatch). The prefill call (keys, values, codes of n tokens) is timed once per
path (median of `--prefills`). "fake-cuda" / "fake-cuda-async" (CPU only, test build) are the CUDA
handlers compiled against the fake runtime of ffi/tests/fake_cuda (scripts/test_cuda_handlers.sh
builds it): their host logic without a GPU. The loop's calls depend on each other, so "cuda-async"
can only gain here what the launch thread no longer waits for; its gain from XLA launching the step's
other GPU work meanwhile shows in bench_decode. Prints a table and writes JSON.
"""

import time

from absl import app, flags

from pigjax import cli

_PATHS = flags.DEFINE_list("paths", None,
                           "paths to time (default: cuda-ffi,cuda-async,callback on a GPU; ffi,callback on a CPU)")
_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16"], "batch sizes")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "8192", "32768"], "stored (middle) tokens per row")
_CALLS = flags.DEFINE_integer("calls", 200, "queries per timed loop")
_PREFILLS = flags.DEFINE_integer("prefills", 3, "timed prefill calls per (batch, n, path)")
_HQ = flags.DEFINE_integer("hq", 9, "query heads")
_HKV = flags.DEFINE_integer("hkv", 3, "KV heads")
_D = flags.DEFINE_integer("d", 64, "head dim")
_K = flags.DEFINE_integer("K", 10, "bits per table")
_L = flags.DEFINE_integer("L", 150, "tables")
_OUT = flags.DEFINE_string("out", "out/bench_cuda_handler.json", "JSON output")
_FAKE = {"fake-cuda": "cuda-ffi", "fake-cuda-async": "cuda-async"}  # test build's path -> the path it stands for
cli.among(_PATHS, ("cuda-ffi", "cuda-async", "ffi", "callback", *_FAKE))
cli.ints(_BATCHES)
cli.ints(_CONTEXTS)


def use_fake_cuda():
    """Route "cuda-ffi" and "cuda-async" to the fake-runtime build registered for the CPU (test module)."""
    from pigjax.engine import native
    from pigjax.engine import store

    native.load_fake_cuda_handlers()
    store._FFI_TARGETS["cuda-ffi"] = "pigjax_test_cuda_lsh"
    store._FFI_TARGETS["cuda-async"] = "pigjax_test_cuda_async_lsh"
    native.cuda_handlers = lambda: True


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pigjax.engine import Store, native
    from pigjax.engine import store as engine_store
    from pigjax.machine import describe

    backend = jax.default_backend()
    paths = _PATHS.value or (["cuda-ffi", "cuda-async", "callback"] if backend == "gpu" else ["ffi", "callback"])
    if set(paths) & set(_FAKE):
        use_fake_cuda()
    hq, hkv, d, K, L = _HQ.value, _HKV.value, _D.value, _K.value, _L.value
    key = jax.random.key(0)
    proj = jax.random.normal(key, (d, K * L), jnp.float32)
    codes_of = jax.jit(lambda x: native.simhash_codes_reference(x, proj, K))
    rows = []
    for b in map(int, _BATCHES.value):
        for n in map(int, _CONTEXTS.value):
            kk, kv, kq = jax.random.split(jax.random.fold_in(key, b * 1_000_003 + n), 3)
            keys = jax.random.normal(kk, (b, hkv, n, d), jnp.float32)
            values = jax.random.normal(kv, (b, hkv, n, d), jnp.float32)
            codes = codes_of(keys)
            q = jax.random.normal(kq, (b, hq, d), jnp.float32)
            q_codes = codes_of(q)
            lengths = jnp.full((b,), n, jnp.int32)
            slots = jnp.arange(b, dtype=jnp.int32)
            row = {"batch": b, "n": n, "bytes_to_host_per_query": 4 * (1 + b + b * hq * (d + L)),
                   "bytes_to_device_per_query": 4 * b * hq * (d + 2),
                   "bytes_to_host_per_prefill": 4 * (1 + 2 * b + 2 * b * hkv * n * d + b * hkv * n * L)}
            for path in paths:
                p = _FAKE.get(path, path)
                with Store(b, hkv, d, n, K, L, storage="bf16", path=p) as s:
                    times = []
                    for _ in range(_PREFILLS.value):
                        start = time.perf_counter()
                        middle = jax.block_until_ready(s.prefill(slots, keys, values, codes, lengths, sink=0, local=0))
                        times.append(time.perf_counter() - start)
                    h = s.handle_array

                    @jax.jit
                    def loop(q0, calls):
                        def body(_, qc):
                            out, lse, _ = engine_store.query(h, slots, qc, q_codes, middle, path=p)
                            return q0 + 1e-30 * out  # data dependence on the previous call
                        return jax.lax.fori_loop(0, calls, body, q0)

                    jax.block_until_ready(loop(q, 3))  # compile + warm up
                    start = time.perf_counter()
                    jax.block_until_ready(loop(q, _CALLS.value))
                    per_call = (time.perf_counter() - start) / _CALLS.value
                    hq_np, qc_np, sl_np = np.asarray(q), np.asarray(q_codes), np.asarray(slots)
                    native._engine.store_query_np(s.handle, sl_np, hq_np, qc_np)
                    start = time.perf_counter()
                    reps = max(3, min(50, _CALLS.value))
                    for _ in range(reps):
                        native._engine.store_query_np(s.handle, sl_np, hq_np, qc_np)
                    engine = (time.perf_counter() - start) / reps
                    s.check()
                row[path] = {"query_us": 1e6 * per_call, "engine_query_us": 1e6 * engine,
                             "overhead_us": 1e6 * (per_call - engine),
                             "prefill_ms": 1e3 * float(np.median(times))}
                print(f"b={b} n={n} {path}: query {row[path]['query_us']:.0f} us (engine {row[path]['engine_query_us']:.0f}"
                      f", overhead {row[path]['overhead_us']:.0f}), prefill {row[path]['prefill_ms']:.1f} ms", flush=True)
            rows.append(row)
    result = {"machine": describe(), "backend": backend, "devices": [str(x) for x in jax.devices()],
              "shapes": {"hq": hq, "hkv": hkv, "d": d, "K": K, "L": L, "storage": "bf16"},
              "calls": _CALLS.value, "paths": paths, "rows": rows}
    print(f"\n{'batch':>5} {'n':>6} " + " ".join(f"{p + ' us':>14} {'ovh':>6} {'prefill ms':>10}" for p in paths))
    for r in rows:
        print(f"{r['batch']:>5} {r['n']:>6} " + " ".join(
            f"{r[p]['query_us']:>14.0f} {r[p]['overhead_us']:>6.0f} {r[p]['prefill_ms']:>10.1f}" for p in paths))
    from pigjax.eval.output import write_json

    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
