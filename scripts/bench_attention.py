"""One decode step of one layer, batch 1: the engine's sampled attention vs dense attention in JAX.

  python scripts/bench_attention.py                          # shapes llama8b and smollm2, n = 16k, 64k, 128k
  python scripts/bench_attention.py --shapes smollm2 --lengths 16384 --storage f32

Reports per (shape, n): engine query time; jitted dense attention over the same cache (f32 and
bf16 cache) in the same run; |S|/n; bytes the query touches and the GB/s that makes against this
machine's copy bandwidth (measured here); table build (prefill) time; bytes per token. Random
Gaussian keys/queries with a shared offset (centering removes it): |S|/n reflects random angles,
not a real model's attention. Prints a table and writes JSON.
"""

import json
import os
import time

from absl import app, flags, logging

from pigjax import cli

SHAPES = {"llama8b": (8, 32, 128), "smollm2": (3, 9, 64)}  # (KV heads, query heads, head_dim)
_SHAPES = flags.DEFINE_list("shapes", ["llama8b", "smollm2"], f"among {sorted(SHAPES)}")
_LENGTHS = flags.DEFINE_list("lengths", ["16384", "65536", "131072"], "context lengths n")
_K = flags.DEFINE_integer("K", 10, "bits per table")
_L = flags.DEFINE_integer("L", 150, "tables")
_STORAGE = flags.DEFINE_enum("storage", "bf16", ["bf16", "f32"], "engine K/V storage")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed query repetitions (median)")
_OUT = flags.DEFINE_string("out", "docs/results/bench_attention.json", "JSON output")
cli.among(_SHAPES, sorted(SHAPES))
cli.ints(_LENGTHS, 1024)


def median_seconds(fn, repeats):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(nbytes=1 << 30):
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    t = median_seconds(lambda: np.copyto(dst, src), 5)
    return 2 * nbytes / t / 1e9  # read + write


def bench_one(hkv, hq, d, n, K, L, storage, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pigjax.engine import native
    from pigjax.attention.dense import attend
    from pigjax.engine import Store

    rng = np.random.default_rng(0)
    offset = rng.normal(size=(1, 1, 1, d)).astype(np.float32)
    keys = jnp.asarray(rng.standard_normal((1, hkv, n, d), np.float32) + offset)
    values = jnp.asarray(rng.standard_normal((1, hkv, n, d), np.float32))
    q = jnp.asarray(rng.standard_normal((1, hq, d), np.float32))
    proj = jnp.asarray(rng.standard_normal((d, K * L), np.float32))
    lengths = jnp.asarray([n], jnp.int32)
    sink, local = 4, 64
    from pigjax.attention.magicpig import center

    kc = jax.jit(center, static_argnums=(2, 3))(keys, lengths, sink, local)
    k_codes = jax.jit(native.simhash_codes, static_argnums=2)(kc, proj, K)
    q_codes = native.simhash_codes(q, proj, K)
    slots = jnp.zeros((1,), jnp.int32)
    with Store(1, hkv, d, n, K, L, storage=storage) as store:
        jax.block_until_ready((kc, k_codes, values, q_codes))  # time the build alone, not the hashing
        builds = []
        for _ in range(2):  # the first prefill of a slot also page-faults its fresh memory
            start = time.perf_counter()
            counts = jax.block_until_ready(store.prefill(slots, kc, values, k_codes, lengths, sink=sink, local=local))
            builds.append(time.perf_counter() - start)
        query = jax.jit(lambda q, c, dep: store.query(slots, q, c, dep))
        t_query = median_seconds(lambda: jax.block_until_ready(query(q, q_codes, counts)), repeats)
        _, _, sampled = query(q, q_codes, counts)
        info = store.info()
    positions = jnp.full((1, 1), n - 1, jnp.int32)
    dense = jax.jit(attend)
    q4 = q[:, None]
    t_dense = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        k_, v_ = kc.astype(dtype), values.astype(dtype)
        t_dense[name] = median_seconds(lambda: jax.block_until_ready(dense(q4, k_, v_, positions)), max(3, repeats // 4))
    middle = n - sink - local
    frac = float(np.asarray(sampled).mean()) / middle
    elem = 2 if storage == "bf16" else 4
    # Bytes a query reads: the sampled K/V rows and fp32 norms (counted per query head: an upper
    # bound, as a group reads the union once), plus each query head's L buckets of uint16 indices
    # (expected size middle / 2^K) and their two int32 offsets.
    sampled_rows = float(np.asarray(sampled).sum())
    bytes_touched = sampled_rows * (2 * d * elem + 4) + hq * L * (middle / (1 << K) * 2 + 8)
    return {
        "kv_heads": hkv, "q_heads": hq, "head_dim": d, "n": n, "K": K, "L": L, "storage": storage,
        "query_ms": t_query * 1e3, "dense_f32_ms": t_dense["f32"] * 1e3, "dense_bf16_ms": t_dense["bf16"] * 1e3,
        "speedup_vs_dense_f32": t_dense["f32"] / t_query, "speedup_vs_dense_bf16": t_dense["bf16"] / t_query,
        "sampled_fraction": frac, "bytes_touched": bytes_touched, "query_gbs": bytes_touched / t_query / 1e9,
        "build_s": builds[1], "build_first_s": builds[0], "bytes_per_token": info.get("bytes_per_token"),
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from pigjax.machine import describe

    machine = {**describe(), "copy_gbs": copy_bandwidth_gbs()}
    print(f"machine: {machine}")
    rows = []
    for shape in _SHAPES.value:
        hkv, hq, d = SHAPES[shape]
        for n in map(int, _LENGTHS.value):
            r = {"shape": shape, **bench_one(hkv, hq, d, n, _K.value, _L.value, _STORAGE.value, _REPEATS.value)}
            rows.append(r)
            print(f"{shape:8s} n={n:6d}: query {r['query_ms']:7.2f} ms | dense f32 {r['dense_f32_ms']:7.2f} ms "
                  f"({r['speedup_vs_dense_f32']:.1f}x) bf16 {r['dense_bf16_ms']:7.2f} ms | |S|/n "
                  f"{100 * r['sampled_fraction']:.2f}% | {r['query_gbs']:.1f} GB/s | build {r['build_s']:.2f} s",
                  flush=True)
    print("\n| shape | n | query ms | dense f32 ms | x | dense bf16 ms | x | S/n | GB/s (copy "
          f"{machine['copy_gbs']:.0f}) | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['n']} | {r['query_ms']:.2f} | {r['dense_f32_ms']:.2f} | "
              f"{r['speedup_vs_dense_f32']:.1f}x | {r['dense_bf16_ms']:.2f} | {r['speedup_vs_dense_bf16']:.1f}x | "
              f"{100 * r['sampled_fraction']:.2f}% | {r['query_gbs']:.1f} | {r['build_s']:.2f} |")
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"benchmark": "attention", "machine": machine, "rows": rows}, f, indent=2)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
