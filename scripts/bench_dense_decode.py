"""Dense decode attention: the engine's kernel (`native.decode_attention`) against the masked `jnp`
form it replaced, per layer, in the same run.

  python scripts/bench_dense_decode.py                       # SmolLM2 shapes, 4 (batch, slots) cases
  python scripts/bench_dense_decode.py --cases 1x2304,4x32768

Each case runs a jitted `fori_loop` of decode steps over `--layers` layers, each step writing its
row into the layer's cache (in place, as a decode step does) and then attending over slots
0..position with one query per head; the time per layer is the loop's time / (steps x layers).
SmolLM2 shapes: 3 KV / 9 query heads, d 64, f32 cache. Prints a table and writes JSON.
"""

import time

from absl import app, flags

from pigjax import cli

_CASES = flags.DEFINE_list("cases", ["1x2304", "8x2304", "4x8192", "4x32768"], "BATCHxSLOTS cases")
_LAYERS = flags.DEFINE_integer("layers", 4, "layers (separate caches) per step")
_STEPS = flags.DEFINE_integer("steps", 20, "decode steps timed")
_OUT = flags.DEFINE_string("out", "docs/results/bench_dense_decode.json", "JSON output")
cli.matching(_CASES, r"[1-9]\d*x[1-9]\d*", "BATCHxSLOTS cases (e.g. 4x8192)")

KV_HEADS, Q_HEADS, HEAD_DIM = 3, 9, 64


def decode_loop(attend, batch, slots, layers, steps):
    """A jitted loop of `steps` decode steps over `layers` caches, attending with `attend`."""
    import jax
    import jax.numpy as jnp

    from pigjax.attention.backend import write_rows

    @jax.jit
    def run(q, ks, vs):
        def body(i, carry):
            ks, vs, total = carry
            pos = slots - steps - 1 + i
            x, new_k, new_v = q, [], []
            for layer in range(layers):
                row = x[:, :, :KV_HEADS]  # [B, 1, Hkv, d]: a new key/value row that depends on the step
                k = write_rows(ks[layer], row, jnp.full((batch,), pos, jnp.int32))
                v = write_rows(vs[layer], row, jnp.full((batch,), pos, jnp.int32))
                x = attend(x, k, v, jnp.full((batch, 1), pos, jnp.int32)) * 0.5 + x
                new_k.append(k)
                new_v.append(v)
            return tuple(new_k), tuple(new_v), total + x.sum()
        return jax.lax.fori_loop(0, steps, body, (ks, vs, 0.0))[2]
    return run


def time_case(batch, slots, layers, steps):
    import jax
    import jax.numpy as jnp

    from pigjax.attention import dense

    q = jnp.full((batch, 1, Q_HEADS, HEAD_DIM), 0.01, jnp.float32)
    ks = tuple(jax.random.normal(jax.random.key(i), (batch, KV_HEADS, slots, HEAD_DIM)) for i in range(layers))
    vs = tuple(jax.random.normal(jax.random.key(100 + i), (batch, KV_HEADS, slots, HEAD_DIM)) for i in range(layers))
    row = {"batch": batch, "slots": slots}
    for name, attend in (("jnp", dense._attend_block), ("kernel", dense._decode_native)):
        run = decode_loop(attend, batch, slots, layers, steps)
        jax.block_until_ready(run(q, ks, vs))  # compile + warm up
        start = time.perf_counter()
        jax.block_until_ready(run(q, ks, vs))
        row[f"{name}_ms_per_layer"] = 1e3 * (time.perf_counter() - start) / (steps * layers)
    row["speedup"] = row["jnp_ms_per_layer"] / row["kernel_ms_per_layer"]
    # K and V bytes a layer reads up to the attended position (about the whole cache here)
    row["kernel_gb_per_s"] = 2 * batch * KV_HEADS * slots * HEAD_DIM * 4 / row["kernel_ms_per_layer"] / 1e6
    return row


def main(_):
    from pigjax.machine import describe

    rows = []
    for case in _CASES.value:
        batch, slots = (int(x) for x in case.split("x"))
        rows.append(time_case(batch, slots, _LAYERS.value, _STEPS.value))
        r = rows[-1]
        print(f"  b{batch} S{slots}: jnp {r['jnp_ms_per_layer']:.3f} ms, kernel {r['kernel_ms_per_layer']:.3f} ms",
              flush=True)
    result = {"machine": describe(), "shapes": {"kv_heads": KV_HEADS, "q_heads": Q_HEADS, "head_dim": HEAD_DIM},
              "layers": _LAYERS.value, "steps": _STEPS.value, "rows": rows}
    print("\n| batch | slots | jnp form ms/layer | kernel ms/layer | speedup | kernel GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['slots']} | {r['jnp_ms_per_layer']:.3f} | {r['kernel_ms_per_layer']:.3f} | "
              f"{r['speedup']:.2f}x | {r['kernel_gb_per_s']:.1f} |")
    print(f"machine: {result['machine']}")
    from pigjax.eval.output import write_json

    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
