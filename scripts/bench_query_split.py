"""Batch-1 query time of the LSH store by parallel shape, in one process.

  python scripts/bench_query_split.py [out.json]

SmolLM2 shapes: 3 KV / 9 q heads, d 64, K 10, L 150, bf16, random keys. The modes of
set_query_split alternate query by query: 0 one task per KV head, 1 split within a KV head (phases
merged by log-sum-exp), 2 tasks per part of a KV head's query heads. Prints a table and writes
JSON (default docs/results/bench_query_split.json).
"""
import json
import os
import sys
import time

import numpy as np

import pigjax._engine as E

K, L, d, hkv, hq = 10, 150, 64, 3, 9
rng = np.random.default_rng(0)
proj = rng.normal(size=(d, K * L)).astype(np.float32)
pw = (1 << np.arange(K)).astype(np.int32)

def codes_of(x):
    flat = x.reshape(-1, d)
    out = np.empty((flat.shape[0], L), np.int32)
    for i in range(0, flat.shape[0], 8192):
        bits = (flat[i:i + 8192] @ proj) > 0
        out[i:i + 8192] = (bits.reshape(-1, L, K) * pw).sum(-1)
    return out.reshape(x.shape[:-1] + (L,))

threads = E.get_num_threads()
rows = []
for n in (8192, 32768, 131072):
    k = rng.normal(size=(1, hkv, n, d)).astype(np.float32)
    v = rng.normal(size=(1, hkv, n, d)).astype(np.float32)
    kc = codes_of(k)
    h = E.store_create(1, hkv, d, n, K, L, 1e-4, "bf16")
    slots = np.zeros(1, np.int32)
    E.store_prefill_np(h, slots, k, v, kc, np.array([n], np.int32), 0, 0)
    qs = [rng.normal(size=(1, hq, d)).astype(np.float32) for _ in range(8)]
    qcs = [codes_of(q) for q in qs]
    for q, qc in zip(qs, qcs):
        E.store_query_np(h, slots, q, qc)
    reps = max(30, int(300 * 8192 / n))
    modes = (0, 1, 2)
    times = {m: [] for m in modes}
    outs = {}
    for r in range(reps):
        q, qc = qs[r % 8], qcs[r % 8]
        for mode in modes:
            E.set_query_split(mode)
            t0 = time.perf_counter()
            o, lse, smp = E.store_query_np(h, slots, q, qc)
            times[mode].append(time.perf_counter() - t0)
            if r < 8: outs[(mode, r)] = (o, lse, smp)
    E.set_query_split(-1)
    err = max(np.abs(outs[(m, r)][0] - outs[(0, r)][0]).max() / np.abs(outs[(0, r)][0]).max()
              for r in range(8) for m in modes)
    same = all((outs[(m, r)][2] == outs[(0, r)][2]).all() for r in range(8) for m in modes)
    E.store_free(h)
    ms = {m: float(np.median(times[m]) * 1e3) for m in modes}
    rows.append(dict(n=n, per_kv_head_ms=ms[0], split_within_head_ms=ms[1], split_by_query_heads_ms=ms[2],
                     sampled_fraction=float(smp.mean() / n), max_rel_diff=float(err), same_counts=bool(same)))
    print(f"n={n:6d} threads={threads} per KV head {ms[0]:.3f} ms  within a head {ms[1]:.3f} ms  "
          f"by query heads {ms[2]:.3f} ms  S/n {smp.mean() / n:.2%}  max rel diff {err:.1e} same counts {same}",
          flush=True)

cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
print(f"\n{cpu}, {os.cpu_count()} cores, {threads} engine threads, SIMD {E.simd_level()}")
print("| n | per KV head (0) ms | within a head (1) ms | by query heads (2) ms | 1 vs 0 | 2 vs 0 |")
print("|---|---|---|---|---|---|")
for r in rows:
    a, b, c = r["per_kv_head_ms"], r["split_within_head_ms"], r["split_by_query_heads_ms"]
    print(f"| {r['n']} | {a:.3f} | {b:.3f} | {c:.3f} | {a / b:.2f}x | {a / c:.2f}x |")
out = sys.argv[1] if len(sys.argv) > 1 else "docs/results/bench_query_split.json"
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
with open(out, "w") as f:
    json.dump({"benchmark": "query_split", "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
                                                       "simd": E.simd_level()}, "rows": rows}, f, indent=2)
print(f"wrote {out}")
