"""Decode throughput and memory of sharded generation vs one device, same run (issue 15's figures).

  python scripts/bench_sharding.py                                   # SmolLM2-135M, batch 4, 2k prompts
  python scripts/bench_sharding.py --prompt_len 1024 --new_tokens 16 --attention dense

Three configurations of the same greedy generate call, each in its own processes so that each
gets the CPU devices it needs: one process with one device (the baseline), one process with a
2x2 mesh of 4 CPU devices, and two processes (scripts/launch.py, jax.distributed) with 2 devices
each on a 2x2 mesh. Reports decode tok/s, the ratio to the baseline, prefill seconds and each
process's peak RSS; checks that all three produce the same tokens. Writes JSON.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile

from absl import app, flags, logging

_ATTENTION = flags.DEFINE_list("attention", ["dense", "magicpig_k10l150"], "back-ends (pigjax.eval.harness names)")
_BATCH = flags.DEFINE_integer("batch", 4, "rows")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 2048, "prompt tokens per row")
_NEW = flags.DEFINE_integer("new_tokens", 32, "tokens generated per row")
_OUT = flags.DEFINE_string("out", "docs/results/bench_sharding.json", "JSON output")
_ROLE = flags.DEFINE_string("role", None, "internal: 'worker:<mesh>:<json path>' runs one configuration")


def _worker(mesh_text: str, out: str):
    import pigjax.distributed

    pigjax.distributed.initialize()
    import jax
    import numpy as np

    import pigjax
    from pigjax import sharding
    from pigjax.eval.harness import make_backend

    mesh = sharding.parse_mesh(mesh_text) if mesh_text else None
    model = pigjax.load(pigjax.distributed.main_first(pigjax.default_checkpoint), mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, model.config.vocab_size, _PROMPT_LEN.value).tolist() for _ in range(_BATCH.value)]
    result = {}
    for name in _ATTENTION.value:
        backend = make_backend(name, None)
        pigjax.generate(model, prompts, max_new_tokens=_NEW.value, attention=backend, mesh=mesh)  # compile
        gen = pigjax.generate(model, prompts, max_new_tokens=_NEW.value, attention=backend, mesh=mesh)
        result[name] = {"decode_tokens_per_second": gen.stats["decode_tokens_per_second"],
                        "prefill_seconds": gen.stats["prefill_seconds"], "tokens": gen.tokens}
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["devices"], result["processes"] = jax.device_count(), jax.process_count()
    rss = [result["peak_rss_gib"]]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rss = multihost_utils.process_allgather(np.float32(result["peak_rss_gib"])).tolist()
    result["peak_rss_gib_per_process"] = rss
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def _run(label, command, env, out):
    print(f"[bench] {label} ...", flush=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _ROLE.value:
        _, mesh_text, out = _ROLE.value.split(":", 2)
        return _worker(mesh_text, out)
    from pigjax.errors import PigjaxError
    from pigjax.eval.harness import check_backends, takes_fraction

    try:  # before any worker starts
        check_backends(_ATTENTION.value, None)
        if any(takes_fraction(n) for n in _ATTENTION.value):
            raise PigjaxError("bench_sharding runs back-ends without a fraction (not topk/quest/oracle)")
    except PigjaxError as e:
        raise SystemExit(f"bench_sharding: error: {e}") from None
    common = [f"--attention={','.join(_ATTENTION.value)}", f"--batch={_BATCH.value}",
              f"--prompt_len={_PROMPT_LEN.value}", f"--new_tokens={_NEW.value}"]
    from pigjax.distributed import COLLECTIVE_TIMEOUT_FLAGS

    me = os.path.abspath(__file__)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mesh, devices, processes in (("1 device", "", 1, 1), ("2x2 mesh, 1 process", "2x2", 4, 1),
                                                ("2x2 mesh, 2 processes", "2x2", 2, 2)):
            out = os.path.join(tmp, f"{len(runs)}.json")
            cmd = [sys.executable, me, *common, f"--role=worker:{mesh}:{out}"]
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                                             f"{COLLECTIVE_TIMEOUT_FLAGS}")
            if processes > 1:
                launch = os.path.join(os.path.dirname(me), "launch.py")
                cmd = [sys.executable, launch, f"--processes={processes}", f"--local_devices={devices}", "--", *cmd[1:]]
            runs[label] = _run(label, cmd, env, out)
    from pigjax.machine import describe

    base = runs["1 device"]
    rows, table = [], []
    for label, r in runs.items():
        for name in _ATTENTION.value:
            same = r[name]["tokens"] == base[name]["tokens"]
            ratio = r[name]["decode_tokens_per_second"] / base[name]["decode_tokens_per_second"]
            rows.append({"config": label, "attention": name, "decode_tokens_per_second": r[name]["decode_tokens_per_second"],
                         "ratio_vs_one_device": ratio, "prefill_seconds": r[name]["prefill_seconds"],
                         "same_tokens_as_one_device": same, "peak_rss_gib_per_process": r["peak_rss_gib_per_process"]})
            table.append(f"| {label} | {name} | {r[name]['decode_tokens_per_second']:.1f} | {ratio:.2f}x | "
                         f"{r[name]['prefill_seconds']:.2f} | {'yes' if same else 'NO'} | "
                         f"{', '.join(f'{x:.2f}' for x in r['peak_rss_gib_per_process'])} |")
    print(f"batch {_BATCH.value}, prompt {_PROMPT_LEN.value}, {_NEW.value} new tokens; {describe()}")
    print("| config | attention | decode tok/s | vs 1 device | prefill s | same tokens | peak RSS GiB / process |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    with open(_OUT.value, "w") as f:
        json.dump({"machine": describe(), "batch": _BATCH.value, "prompt_len": _PROMPT_LEN.value,
                   "new_tokens": _NEW.value, "rows": rows}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
