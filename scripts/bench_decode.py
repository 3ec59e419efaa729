"""End-to-end decode throughput: MagicPIG (and RankedLSH) vs dense with SmolLM2 at long context, same run.

  python scripts/bench_decode.py                                   # 8k, 16k, 32k tokens, batch 4
  python scripts/bench_decode.py --contexts 32768 --steps 32

The cache holds real keys and values: SmolLM2's own K/V of `--source_tokens` tokens of Wikipedia
text (hotpotqa), each row rotated by a different offset and tiled to the context length. (A real
32k prefill of 4 rows would take hours on 2 cores, and SmolLM2 was trained to 8k: quality beyond
8k does not matter for timing.) `--weights random` uses random weights of SmolLM2-135M's shapes and random tokens instead (no
checkpoint needed, e.g. on a GPU machine without the model package; the sampled fraction then
differs from real text's). Both back-ends then run the same jitted greedy decode loop for
`--steps` steps; tokens/s = batch x steps / seconds. `--engine_paths cuda-ffi,callback` times MagicPIG
once per engine path (pigjax.engine.store: the CUDA FFI handler vs io_callback on a GPU). The prefill overhead of MagicPIG (centering,
hashing, table build) is measured separately on a real `--prefill_tokens` prefill through
`pigjax.generate` with both back-ends (one shared dense prefill, then each back-end's cache build). Prints a table and writes JSON.
"""

import dataclasses
import time

from absl import app, flags

from bench_common import decode_loop, random_model
from pigjax import cli

_CONTEXTS = flags.DEFINE_list("contexts", ["8192", "16384", "32768"], "context lengths")
_BATCH = flags.DEFINE_integer("batch", 4, "rows", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 24, "timed decode steps", lower_bound=1)
_SOURCE = flags.DEFINE_integer("source_tokens", 4096, "tokens of real text whose K/V are tiled", lower_bound=256)
_PREFILL = flags.DEFINE_integer("prefill_tokens", 8192, "prompt length of the prefill-overhead run (0: skip)",
                                lower_bound=0)
_K = flags.DEFINE_integer("K", 10, "MagicPIG bits per table")
_L = flags.DEFINE_integer("L", 150, "MagicPIG tables")
_RANKED = flags.DEFINE_bool("rankedlsh", True, "also time pigjax.RankedLSH (its defaults) in the same run")
_WEIGHTS = flags.DEFINE_enum("weights", "smollm2", ["smollm2", "random"],
                              "the embedded SmolLM2-135M-Instruct, or random weights of its shapes")
_ENGINE_PATHS = flags.DEFINE_list("engine_paths", [],
                                  "MagicPIG engine paths to time in the same run, e.g. cuda-ffi,callback on a GPU "
                                  "(default: the backend's default path); the first is the 'magicpig' column")
_OUT = flags.DEFINE_string("out", "docs/results/bench_decode.json", "JSON output")
cli.ints(_CONTEXTS, 1024)


def text_tokens(model, n, seed):
    """n tokens of Wikipedia text, or random ids for a model without a tokenizer."""
    import numpy as np

    if model.tokenizer is None:
        return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).astype(np.int32)
    from pigjax.eval.text import long_text

    return long_text(model.tokenizer, n, seed=seed)


def source_kv(model, n):
    """The model's K/V per layer ([1, Hkv, n, d] each) for n tokens of text."""
    import jax.numpy as jnp

    import pigjax

    tokens = text_tokens(model, n, seed=0)[None]
    cache = pigjax.Dense().init_cache(model.config, 1, n, 0, jnp.float32)
    step = jax_jit_step(model.config)
    _, cache = step(model.params, jnp.asarray(tokens), cache)
    return [(layer.k, layer.v) for layer in cache.layers], tokens[0]


def jax_jit_step(config):
    import jax

    from pigjax.models import llama

    return jax.jit(lambda p, t, c: llama.step(p, config, t, c, fresh=True))


def tiled(x, n, batch):
    """[1, H, m, d] -> [batch, H, n, d]: row b rotated by b·m/batch, repeated to n positions."""
    import jax.numpy as jnp

    m = x.shape[2]
    rows = [jnp.roll(x[0], -(b * m) // batch, axis=1) for b in range(batch)]
    reps = -(-n // m)
    return jnp.stack([jnp.concatenate([r] * reps, axis=1)[:, :n] for r in rows])


def build_cache(backend, config, kv, n, batch, capacity, window, runtime):
    """The cache a prefill of n tokens would leave, from the tiled real K/V (per back-end)."""
    import jax
    import jax.numpy as jnp

    from pigjax.attention.backend import KV

    class Tiled(tuple):  # tiles each layer's K/V only when from_prefill reaches it (memory)
        def __iter__(self):
            return (KV(tiled(k, n, batch), tiled(v, n, batch)) for k, v in kv)

    lengths = jnp.full((batch,), n, jnp.int32)
    cache = jax.block_until_ready(backend.from_prefill(config, Tiled(kv), lengths, capacity, window, jnp.float32,
                                                       runtime.arrays))
    runtime.ready()  # the tables too (built in the background on the cuda-async path)
    return cache


def bench_context(model, params, backend, kv, n, batch, steps):
    import jax
    import jax.numpy as jnp

    config = model.config
    capacity = n + steps + 8
    with backend.resources(config, batch, n) as runtime:
        start = time.perf_counter()
        cache = build_cache(backend, config, kv, n, batch, capacity, steps + 8, runtime)
        build = time.perf_counter() - start
        run = decode_loop(config, backend)
        tok = jnp.ones((batch,), jnp.int32)
        cache, tok = run(params, cache, tok, 2)  # compile + warm up
        jax.block_until_ready(tok)
        start = time.perf_counter()
        cache, tok = run(params, cache, tok, steps)
        jax.block_until_ready(tok)
        seconds = time.perf_counter() - start
        stats = backend.stats(config, jnp.float32, cache, runtime)
    return {"tokens_per_second": batch * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
            "cache_build_seconds": build, "fraction_read": stats.get("fraction_read"),
            "cache_bytes_per_token_per_layer": stats["cache_bytes_per_token_per_layer"],
            "host_bytes_per_token_per_layer": stats["host_bytes_per_token_per_layer"]}


def prefill_overhead(model, magic, n):
    """A real n-token prefill: the shared dense part, then each back-end's cache build."""
    import pigjax

    n = min(n, model.config.max_position_embeddings - 2)  # room for the 2 generated tokens
    prompt = [text_tokens(model, n, seed=1).tolist()]
    dense, pig = pigjax.generate(model, prompt, max_new_tokens=2, attention=[pigjax.Dense(), magic])
    shared = dense.stats["prefill_seconds"] - dense.stats["cache_build_seconds"]
    return {"tokens": n, "dense_prefill_seconds": shared,
            "dense_cache_build_seconds": dense.stats["cache_build_seconds"],
            "magicpig_cache_build_seconds": pig.stats["cache_build_seconds"],
            "overhead_ratio": pig.stats["prefill_seconds"] / dense.stats["prefill_seconds"]}


def _magicpig(pigjax):
    """The MagicPIG back-end of --K/--L, or exit with its one-line error."""
    try:
        return pigjax.MagicPIG(K=_K.value, L=_L.value)
    except ValueError as e:  # PigjaxError is a ValueError
        raise SystemExit(f"bench_decode: error: {e}") from None


def main(_):
    import pigjax
    import pigjax.assets
    from pigjax.machine import describe
    from pigjax.models import llama

    contexts, magic = [int(c) for c in _CONTEXTS.value], _magicpig(pigjax)
    batch, steps = _BATCH.value, _STEPS.value
    base = random_model() if _WEIGHTS.value == "random" else pigjax.load(pigjax.default_checkpoint())
    # RoPE extends past the trained 8k; only timing is measured beyond it.
    config = dataclasses.replace(base.config, max_position_embeddings=max(contexts) + steps + 64)
    model = dataclasses.replace(base, config=config)
    params = llama.unstack_layers(model.params)
    paths = _ENGINE_PATHS.value or [None]
    print(f"K/V of {_SOURCE.value} source tokens ...", flush=True)
    kv, _ = source_kv(model, _SOURCE.value)
    from pigjax.eval.output import write_json

    rows = []
    result = {"machine": describe(), "model": "SmolLM2-135M-Instruct (f32)" if _WEIGHTS.value == "smollm2" else
              "random weights, SmolLM2-135M shapes (f32)", "magicpig": {"K": _K.value, "L": _L.value},
              "rows": rows, "prefill": None}
    for n in contexts:
        row = {"context": n, "batch": batch, "steps": steps}
        row["dense"] = bench_context(model, params, pigjax.Dense(), kv, n, batch, steps)
        print(f"  n={n} dense: {row['dense']['tokens_per_second']:.1f} tok/s", flush=True)
        for path in paths:
            backend = dataclasses.replace(magic, path=path)
            m = bench_context(model, params, backend, kv, n, batch, steps)
            m["engine_path"] = backend._path()
            row.setdefault("magicpig", m)
            row.setdefault("magicpig_by_path", {})[m["engine_path"]] = m
            print(f"  n={n} magicpig [{m['engine_path']}]: {m['tokens_per_second']:.1f} tok/s "
                  f"(cache build {m['cache_build_seconds']:.2f} s)", flush=True)
        row["speedup"] = row["magicpig"]["tokens_per_second"] / row["dense"]["tokens_per_second"]
        if _RANKED.value:
            row["rankedlsh"] = bench_context(model, params, pigjax.RankedLSH(), kv, n, batch, steps)
            row["rankedlsh_speedup"] = row["rankedlsh"]["tokens_per_second"] / row["dense"]["tokens_per_second"]
            print(f"  n={n} rankedlsh: {row['rankedlsh']['tokens_per_second']:.1f} tok/s", flush=True)
        rows.append(row)
        write_json(_OUT.value, result)  # after each context: a run stopped early keeps what it measured
    prefill = prefill_overhead(base, magic, _PREFILL.value) if _PREFILL.value else None
    result["prefill"] = prefill
    print(f"\n{'context':>8} {'batch':>5} {'dense tok/s':>11} {'magicpig tok/s':>14} {'speedup':>7} "
          f"{'dense ms/step':>13} {'pig ms/step':>11} {'read':>6}")
    for r in rows:
        d, m = r["dense"], r["magicpig"]
        print(f"{r['context']:>8} {r['batch']:>5} {d['tokens_per_second']:>11.1f} {m['tokens_per_second']:>14.1f} "
              f"{r['speedup']:>6.2f}x {d['ms_per_step']:>13.1f} {m['ms_per_step']:>11.1f} {m['fraction_read']:>6.3f}")
        if "rankedlsh" in r:
            k = r["rankedlsh"]
            print(f"{'':>8} {'':>5} {'rankedlsh':>26}: {k['tokens_per_second']:.1f} tok/s, {k['ms_per_step']:.1f} ms/step, "
                  f"{r['rankedlsh_speedup']:.2f}x dense, read {k['fraction_read']:.3f}")
        for path, m in r["magicpig_by_path"].items():
            print(f"{'':>8} {'':>5} {'magicpig via ' + path:>26}: {m['tokens_per_second']:.1f} tok/s, "
                  f"{m['ms_per_step']:.1f} ms/step, cache build {m['cache_build_seconds']:.2f} s")
    if prefill:
        print(f"prefill of {prefill['tokens']} tokens: dense {prefill['dense_prefill_seconds']:.2f} s; cache build "
              f"dense {prefill['dense_cache_build_seconds']:.2f} s, magicpig {prefill['magicpig_cache_build_seconds']:.2f} s "
              f"(MagicPIG prefill / dense prefill = {prefill['overhead_ratio']:.2f}x)")
    print(f"machine: {result['machine']}")
    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
