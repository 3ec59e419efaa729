"""A decode step's projections on the CPU: the engine's few-row matmul vs XLA's dot, same run.

  python scripts/bench_projections.py                  # SmolLM2-135M shapes, batch 1, 4, 8, f32 and bf16
  python scripts/bench_projections.py --batches 4 --dtypes float32

Times the jitted greedy decode loop of `bench_common` (as bench_decode does) with dense attention over a short context
(`--context`, so that the weights, not the KV cache, bound the step) twice per case: with the
engine's `native.small_matmul` for the projections and the logits (`pigjax.models.projection`, the
default) and with XLA's dot (PIGJAX_DECODE_PROJECTIONS=xla, read when a step is traced). The two
loops alternate for `--rounds` rounds and each reports its median, so drift on a shared machine
hits both. Random weights of SmolLM2-135M's shapes (bench_decode --weights random); bf16 casts every
parameter (`Model.astype`: bf16 activations too). Prints a table and writes JSON.
"""

import os
import time

from absl import app, flags

from pigjax import cli

_BATCHES = flags.DEFINE_list("batches", ["1", "4", "8"], "rows per step")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "parameter dtypes")
_CONTEXT = flags.DEFINE_integer("context", 256, "tokens already in the cache", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 16, "decode steps per timing", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "alternating timings per mode", lower_bound=1)
_OUT = flags.DEFINE_string("out", "docs/results/bench_projections.json", "JSON output")
cli.ints(_BATCHES, 1)
cli.among(_DTYPES, ("float32", "bfloat16"))

MODES = ("engine", "xla")


def loops(config, params, batch, context, steps):
    """{mode: (jitted loop, its cache, first token)}, each traced under its PIGJAX_DECODE_PROJECTIONS."""
    import jax
    import jax.numpy as jnp

    import pigjax
    from bench_common import decode_loop

    out = {}
    for mode in MODES:
        os.environ["PIGJAX_DECODE_PROJECTIONS"] = mode
        backend = pigjax.Dense()
        cache = backend.init_cache(config, batch, context + steps * (2 + 2 * _ROUNDS.value), 0, params_dtype(params))
        cache = cache.replace(lengths=jnp.full((batch,), context, jnp.int32))
        run = decode_loop(config, backend)
        tok = jnp.ones((batch,), jnp.int32)
        cache, tok = jax.block_until_ready(run(params, cache, tok, 2))  # traces and compiles here
        out[mode] = [run, cache, tok]
    os.environ.pop("PIGJAX_DECODE_PROJECTIONS")
    return out


def params_dtype(params):
    import jax

    return jax.tree.leaves(params)[0].dtype


def time_case(config, params, batch):
    import jax
    import numpy as np

    runs = loops(config, params, batch, _CONTEXT.value, _STEPS.value)
    times = {mode: [] for mode in MODES}
    for _ in range(_ROUNDS.value):
        for mode in MODES:
            run, cache, tok = runs[mode]
            start = time.perf_counter()
            cache, tok = jax.block_until_ready(run(params, cache, tok, _STEPS.value))
            times[mode].append(1e3 * (time.perf_counter() - start) / _STEPS.value)
            runs[mode][1:] = [cache, tok]
    return {mode: float(np.median(t)) for mode, t in times.items()}


def main(_):
    import jax.numpy as jnp

    from bench_common import random_model
    from pigjax.eval.output import write_json
    from pigjax.machine import describe
    from pigjax.models import llama

    model = random_model()
    rows = []
    for dtype in _DTYPES.value:
        params = llama.unstack_layers(model.astype(jnp.dtype(dtype)).params)
        for batch in (int(b) for b in _BATCHES.value):
            ms = time_case(model.config, params, batch)
            rows.append({"dtype": dtype, "batch": batch, "context": _CONTEXT.value,
                         "engine_ms_per_step": ms["engine"], "xla_ms_per_step": ms["xla"],
                         "speedup": ms["xla"] / ms["engine"]})
            print(f"  {dtype} batch {batch}: engine {ms['engine']:.1f} ms, xla {ms['xla']:.1f} ms", flush=True)
    print(f"\n{'dtype':>9} {'batch':>5} {'engine ms/step':>15} {'xla ms/step':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['batch']:>5} {r['engine_ms_per_step']:>15.1f} {r['xla_ms_per_step']:>12.1f} "
              f"{r['speedup']:>7.2f}x")
    machine = describe()
    print(f"machine: {machine}")
    write_json(_OUT.value, {"benchmark": "bench_projections", "machine": machine, "steps": _STEPS.value,
                                "rounds": _ROUNDS.value, "results": rows})


if __name__ == "__main__":
    app.run(main)
