"""The paper's regime on one GPU: under a capped GPU memory, the largest batch dense attention and
MagicPIG can decode at a long context, with their tokens/s and per-token latency (issue 18; the model
of docs/gpu_engine.md says what to expect).

  python scripts/bench_capped_memory.py                         # caps 24,48 GB; 32k, 64k; 8B shapes
  python scripts/bench_capped_memory.py --caps_gb 24 --contexts 32768 --batches 1,2,4
  python scripts/bench_capped_memory.py --caps_gb 24 --contexts 32768 --batches dense:1,magicpig:1,magicpig:8
  JAX_PLATFORMS=cpu python scripts/bench_capped_memory.py --layers 1 --vocab_size 1024 --contexts 512 \\
      --batches 1,2 --steps 2 --caps_gb 0      # a smoke run of the script itself on a CPU (no cap, tiny)

Model: random bf16 weights of Llama-3.1-8B's shapes (32 layers, 32 q / 8 KV heads, d 128, vocab
128256; `--layers` and `--vocab_size` shrink it for smoke runs), bf16 cache. The cache is what a prefill of the
context would leave, from random bf16 K/V tiled to the context (no real prefill: only memory and
timing are measured). MagicPIG keeps sink + local tokens and its dense layers on the GPU and the
middle in the CPU engine (host RAM, not capped here; reported).

Each (cap, context, back-end, batch) runs in a child process with
XLA_PYTHON_CLIENT_MEM_FRACTION = cap / the GPU's memory (JAX's pool then holds at most the cap), so
an out-of-memory error ends only that child. Without `--batches`, batches 1, 2, 4, ... are tried
until one fails (out of memory or `--max_batch`), then the gap is bisected: the result is the
largest batch that ran. Each child decodes `--steps` steps after a 2-step warm-up: tokens/s =
batch x steps / seconds, per-token latency = ms per step. Writes JSON and prints a table.
"""

import functools
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

_CAPS = flags.DEFINE_list("caps_gb", ["24", "48"], "GPU memory caps in GB (0: no cap)")
_CONTEXTS = flags.DEFINE_list("contexts", ["32768", "65536"], "context lengths")
_BACKENDS = flags.DEFINE_list("backends", ["dense", "magicpig"], "back-ends")
_BATCHES = flags.DEFINE_list("batches", [], "batches to run (default: search for the largest); an item "
                             "'name:b' applies to back-end name only, e.g. dense:1,magicpig:1,magicpig:8")
def _batch_item_ok(item: str) -> bool:
    name, _, b = item.rpartition(":")
    return name in ("", "dense", "magicpig") and b.isdigit() and int(b) > 0


flags.register_validator("batches", lambda items: all(map(_batch_item_ok, items)),
                         message="--batches items must be positive integers, or dense:N / magicpig:N")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "largest batch the search tries")
_STEPS = flags.DEFINE_integer("steps", 16, "timed decode steps")
_LAYERS = flags.DEFINE_integer("layers", 32, "decoder layers (32 = Llama-3.1-8B; fewer for smoke runs)")
_VOCAB = flags.DEFINE_integer("vocab_size", 128256, "vocabulary (128256 = Llama-3.1-8B; smaller for smoke runs)")
_K = flags.DEFINE_integer("K", 10, "MagicPIG bits per table")
_L = flags.DEFINE_integer("L", 150, "MagicPIG tables")
_CHILD_TIMEOUT = flags.DEFINE_integer("child_timeout", 600, "seconds per child run")
_CHILD = flags.DEFINE_string("child", None, "internal: JSON spec of one run")
_OUT = flags.DEFINE_string("out", "out/bench_capped_memory.json", "JSON output")

# Llama-3.1-8B's config.json (shapes and RoPE; the weights here are random).
LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
LLAMA31_ROPE = dict(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def random_model(layers: int, vocab_size: int):
    """Random bf16 weights of Llama-3.1-8B's shapes, created leaf by leaf on the default device and
    already split per layer (`llama.unstack_layers`' form): no float32 copy and no second copy of the
    16 GB, which unstacking stacked leaves would need next to them."""
    import jax
    import jax.numpy as jnp

    from pigjax.models import llama
    from pigjax.models.llama_config import LlamaConfig, RopeConfig

    config = LlamaConfig(**{**LLAMA31_8B, "num_hidden_layers": layers, "vocab_size": vocab_size},
                         rope=RopeConfig(**LLAMA31_ROPE))
    shapes = llama.param_shapes(config, jnp.bfloat16)
    make = jax.jit(lambda i, shape: 0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(0), i), shape,
                                                             jnp.bfloat16), static_argnums=1)
    leaf = itertools.count()

    def fill(tree):  # matrices random (a key per leaf), vectors (norm scales) ones
        return jax.tree.map(lambda s: make(next(leaf), s.shape) if len(s.shape) > 1 else jnp.ones(s.shape, jnp.bfloat16),
                            tree)

    per_layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["layers"])
    params = fill({k: v for k, v in shapes.items() if k != "layers"})
    params["layers"] = tuple(fill(per_layer) for _ in range(layers))
    return config, params


def child(spec: dict) -> dict:
    """One run: build the cache of `batch` rows at `context`, decode, time."""
    import jax
    import jax.numpy as jnp

    import pigjax
    from pigjax.attention.backend import KV
    from pigjax.models import llama

    phases, t0 = {}, time.perf_counter()

    def phase(name):  # seconds since the last phase, printed as it ends: a timed-out child's log says where
        nonlocal t0
        now = time.perf_counter()
        phases[name] = now - t0
        t0 = now
        print(f"phase {name}: {phases[name]:.1f} s", file=sys.stderr, flush=True)

    config, params = random_model(spec["layers"], spec["vocab_size"])
    jax.block_until_ready(params)
    phase("weights")
    n, batch, steps = spec["context"], spec["batch"], spec["steps"]
    backend = pigjax.Dense() if spec["backend"] == "dense" else pigjax.MagicPIG(K=spec["K"], L=spec["L"])
    hkv, d = config.num_key_value_heads, config.head_dim
    src = 1024
    base = jax.random.normal(jax.random.key(1), (2, 1, hkv, src, d), jnp.bfloat16)

    def tiled(x):  # [1, Hkv, src, d] -> [batch, Hkv, n, d], row b rotated by b
        reps = -(-n // src)
        rows = [jnp.concatenate([jnp.roll(x[0], -b * 37, axis=1)] * reps, axis=1)[:, :n] for b in range(batch)]
        return jnp.stack(rows)

    class Layers(tuple):  # each layer's K/V made only when from_prefill reaches it
        def __iter__(self):
            return (KV(tiled(base[0]), tiled(base[1])) for _ in range(config.num_hidden_layers))

    capacity = n + steps + 8
    with backend.resources(config, batch, n) as runtime:
        start = time.perf_counter()
        cache = backend.from_prefill(config, Layers(), jnp.full((batch,), n, jnp.int32), capacity, steps + 8,
                                     jnp.bfloat16, runtime.arrays)
        jax.block_until_ready(cache)
        build = time.perf_counter() - start

        @functools.partial(jax.jit, donate_argnums=1)
        def run(p, cache, tok, steps):  # p an argument: weights closed over would be baked in as constants
            def body(_, carry):
                cache, tok = carry
                logits, cache = llama.step(p, config, tok[:, None], cache, None, backend)
                return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return jax.lax.fori_loop(0, steps, body, (cache, tok))

        tok = jnp.ones((batch,), jnp.int32)
        phase("cache_build")
        cache, tok = run(params, cache, tok, 2)
        jax.block_until_ready(tok)
        phase("compile_and_warmup")
        start = time.perf_counter()
        cache, tok = run(params, cache, tok, steps)
        jax.block_until_ready(tok)
        seconds = time.perf_counter() - start
        stats = backend.stats(config, jnp.bfloat16, cache, runtime)
    mem = jax.devices()[0].memory_stats() or {}
    return {"tokens_per_second": batch * steps / seconds, "ms_per_token": 1e3 * seconds / steps,
            "cache_build_seconds": build, "phase_seconds": phases, "peak_device_bytes": mem.get("peak_bytes_in_use"),
            "device_bytes_limit": mem.get("bytes_limit"), "fraction_read": stats.get("fraction_read"),
            "cache_bytes_per_token_per_layer": stats.get("cache_bytes_per_token_per_layer"),
            "host_bytes_per_token_per_layer": stats.get("host_bytes_per_token_per_layer")}


def batches_of(backend: str) -> list[int]:
    """The --batches items that apply to `backend` (plain numbers apply to every back-end)."""
    out = []
    for item in _BATCHES.value:
        name, _, b = item.rpartition(":")
        if name in ("", backend):
            out.append(int(b))
    return out


def gpu_total_bytes():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def run_child(spec: dict, cap_gb: float, total: int | None) -> dict:
    env = dict(os.environ)
    if cap_gb > 0:
        if total is None:
            return {"error": "no GPU memory size (nvidia-smi) to turn the cap into a fraction"}
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(cap_gb * 1e9 / total, 1.0):.4f}"
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={json.dumps(spec)}"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_CHILD_TIMEOUT.value)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr or e.stdout or ""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        done = [line for line in tail.splitlines() if line.startswith("phase ")]
        return {"error": f"timeout after {_CHILD_TIMEOUT.value} s", "phases_done": done, "log_tail": tail[-600:]}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout)[-2000:]
    oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    return {"error": "out of memory" if oom else f"exit {p.returncode}", "log_tail": tail[-600:]}


def main(_):
    if _CHILD.value:
        print("RESULT " + json.dumps(child(json.loads(_CHILD.value))), flush=True)
        return
    from pigjax.eval.output import write_json
    from pigjax.machine import describe

    total = gpu_total_bytes()
    runs = []
    result = {"machine": describe(), "gpu_total_bytes": total, "model": f"random bf16, Llama-3.1-8B shapes, "
              f"{_LAYERS.value} layers, vocabulary {_VOCAB.value}", "magicpig": {"K": _K.value, "L": _L.value},
              "steps": _STEPS.value, "runs": runs}
    for cap in map(float, _CAPS.value):
        for n in map(int, _CONTEXTS.value):
            for name in _BACKENDS.value:
                spec = {"backend": name, "context": n, "steps": _STEPS.value, "layers": _LAYERS.value,
                        "vocab_size": _VOCAB.value, "K": _K.value, "L": _L.value}
                results = {}

                def attempt(b):
                    if b not in results:
                        results[b] = run_child({**spec, "batch": b}, cap, total)
                        r = results[b]
                        what = r.get("error") or f"{r['tokens_per_second']:.1f} tok/s, {r['ms_per_token']:.1f} ms/token"
                        print(f"cap {cap:g} GB, n={n}, {name}, batch {b}: {what}", flush=True)
                    return "error" not in results[b]

                if _BATCHES.value:
                    for b in batches_of(name):
                        attempt(b)
                else:  # doubling, then bisection between the last success and the first failure
                    good, bad, b = 0, None, 1
                    while b <= _MAX_BATCH.value:
                        if attempt(b):
                            good, b = b, b * 2
                        else:
                            bad = b
                            break
                    if bad is not None:
                        while bad - good > 1:
                            mid = (good + bad) // 2
                            good, bad = (mid, bad) if attempt(mid) else (good, mid)
                ok = [b for b, r in results.items() if "error" not in r]
                best = max(ok) if ok else None
                runs.append({"cap_gb": cap, "context": n, "backend": name, "largest_batch": best,
                             "at_largest": results.get(best), "attempts": {str(b): r for b, r in sorted(results.items())}})
                write_json(_OUT.value, result)  # after each run: a stopped sweep keeps what it measured
    print(f"\n{'cap GB':>6} {'context':>8} {'backend':>9} {'batch':>5} {'tok/s':>8} {'ms/token':>9}")
    for r in runs:
        a = r["at_largest"] or {}
        print(f"{r['cap_gb']:>6g} {r['context']:>8} {r['backend']:>9} {str(r['largest_batch']):>5} "
              f"{a.get('tokens_per_second', float('nan')):>8.1f} {a.get('ms_per_token', float('nan')):>9.1f}")
    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
