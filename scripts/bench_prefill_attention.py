"""A fresh prefill's causal attention on the CPU: the engine's fused kernel (`native.prefill_attention`)
against XLA's query blocks (`dense._prefill_blocks`), same inputs, same run; then, with `--step`, the
whole prefill step of the embedded SmolLM2 (`llama.step`, fresh) with each form.

  python scripts/bench_prefill_attention.py                       # one layer at 2048 and 8192 tokens
  python scripts/bench_prefill_attention.py --step --out docs/results/bench_prefill_attention_xeon.json

Shapes default to SmolLM2-135M's (9 query / 3 KV heads, d 64), f32, batch 1. Times are the best of
`--repeats` rounds of 3 calls, the two forms alternating. Prints a table and writes JSON.
"""

import time

from absl import app, flags

from pigjax import cli

_LENGTHS = flags.DEFINE_list("lengths", ["2048", "8192"], "prompt lengths (tokens)")
_HQ = flags.DEFINE_integer("hq", 9, "query heads")
_HKV = flags.DEFINE_integer("hkv", 3, "KV heads")
_D = flags.DEFINE_integer("d", 64, "head dim")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed rounds per form (best kept)")
_STEP = flags.DEFINE_bool("step", False, "also time the embedded SmolLM2's 2048-token prefill step with each form")
_OUT = flags.DEFINE_string("out", "out/bench_prefill_attention.json", "JSON output")
cli.ints(_LENGTHS)


def best_ms(forms: dict, args, repeats: int) -> dict:
    """Best time of `repeats` rounds of 3 calls per form (ms), the forms alternating."""
    import jax

    for f in forms.values():
        jax.block_until_ready(f(*args))  # compile
    times = {name: [] for name in forms}
    for _ in range(repeats):
        for name, f in forms.items():
            start = time.perf_counter()
            for _ in range(3):
                jax.block_until_ready(f(*args))
            times[name].append((time.perf_counter() - start) / 3 * 1e3)
    return {name: min(t) for name, t in times.items()}


def layer_rows():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pigjax.attention import dense
    from pigjax.engine import native

    rows, rng = [], np.random.default_rng(0)
    for t in map(int, _LENGTHS.value):
        q = jnp.asarray(rng.normal(size=(1, t, _HQ.value, _D.value)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(1, _HKV.value, t, _D.value)), jnp.float32) for _ in range(2))
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        forms = {"xla": jax.jit(lambda q, k, v: dense._prefill_blocks(q, k, v, positions)),
                 "kernel": jax.jit(native.prefill_attention)}
        ms = best_ms(forms, (q, k, v), _REPEATS.value)
        diff = float(jnp.abs(forms["xla"](q, k, v) - forms["kernel"](q, k, v)).max())
        flops = 4 * _HQ.value * _D.value * t * (t + 1) / 2  # q.k and p.v over the causal half
        rows.append({"tokens": t, "xla_ms": ms["xla"], "kernel_ms": ms["kernel"], "speedup": ms["xla"] / ms["kernel"],
                     "kernel_gflops": flops / ms["kernel"] / 1e6, "max_abs_diff": diff})
        print(f"{t:>6} tokens: XLA {ms['xla']:8.1f} ms, kernel {ms['kernel']:7.1f} ms ({ms['xla'] / ms['kernel']:.2f}x, "
              f"{flops / ms['kernel'] / 1e6:.0f} GFLOP/s), max |diff| {diff:.1e}", flush=True)
    return rows


def step_row(t: int = 2048) -> dict:
    """The embedded SmolLM2's fresh prefill step of t tokens with the kernel and with XLA's blocks
    (`dense.native_cpu` patched to False while the second form is traced)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pigjax
    from pigjax.attention import dense
    from pigjax.models import llama

    model = pigjax.load(pigjax.default_checkpoint(), tokenizer=False)
    params, config = llama.unstack_layers(model.params), model.config
    tokens = jnp.asarray(np.random.default_rng(0).integers(100, 40000, size=(1, t)), jnp.int32)
    last = jnp.full((1,), t - 1, jnp.int32)

    def form(use_kernel: bool):
        def run(p, tok):
            cache = pigjax.Dense().init_cache(config, 1, t, 0, jnp.float32)
            return llama.step(p, config, tok, cache, fresh=True, logits_at=last)[0]

        saved = dense.native_cpu
        dense.native_cpu = saved if use_kernel else (lambda: False)
        try:  # traced and compiled now, under the chosen form
            return jax.jit(run).lower(params, tokens).compile()
        finally:
            dense.native_cpu = saved

    ms = best_ms({"xla": form(False), "kernel": form(True)}, (params, tokens), _REPEATS.value)
    print(f"prefill step, {t} tokens: XLA attention {ms['xla'] / 1e3:.2f} s, kernel {ms['kernel'] / 1e3:.2f} s", flush=True)
    return {"tokens": t, "xla_step_s": ms["xla"] / 1e3, "kernel_step_s": ms["kernel"] / 1e3}


def main(_):
    from pigjax.eval.output import write_json
    from pigjax.machine import describe

    result = {"machine": describe(), "shapes": {"hq": _HQ.value, "hkv": _HKV.value, "d": _D.value, "dtype": "f32"},
              "layer": layer_rows(), "step": step_row() if _STEP.value else None}
    print(f"\n{'tokens':>6} {'XLA ms':>8} {'kernel ms':>9} {'speedup':>7} {'GFLOP/s':>7}")
    for r in result["layer"]:
        print(f"{r['tokens']:>6} {r['xla_ms']:>8.1f} {r['kernel_ms']:>9.1f} {r['speedup']:>6.2f}x {r['kernel_gflops']:>7.0f}")
    print(f"machine: {result['machine']}")
    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
