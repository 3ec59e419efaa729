"""RULER (niah_single_1/2, niah_multikey_1, vt, cwe, fwe) with pigjax.generate, per attention back-end.

  python scripts/eval_ruler.py --attention dense --samples 5 --contexts 1024,2048
  python scripts/eval_ruler.py --attention dense,magicpig_k10l150,topk,quest --contexts 2048,4096,8192
  python scripts/eval_ruler.py --attention magicpig_k8l75,oracle --fraction 0.05 --tasks niah_single_2

Writes <out>/ruler.json (per-sample predictions, per-cell scores, each generate call's stats) and
<out>/ruler.md (task x context x back-end table; per-back-end averages over the cells where dense
scores >= 20). topk/quest/oracle read --fraction of the keys, or with --fraction=auto the mean
fraction that the first MagicPIG back-end of --attention read on the same cell.
"""

import sys

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint dir (default: embedded SmolLM2, converted on first use)")
_TASKS = flags.DEFINE_list("tasks", "niah_single_1,niah_single_2,niah_multikey_1,vt,cwe,fwe", "RULER tasks")
_CONTEXTS = flags.DEFINE_list("contexts", "2048,4096,8192", "context lengths in tokens (prompt + tokens to generate)")
_SAMPLES = flags.DEFINE_integer("samples", 20, "samples per (task, context) cell")
_SEED = flags.DEFINE_integer("seed", 42, "sample construction seed (RULER's default is 42)")
_ATTENTION = flags.DEFINE_list("attention", "dense", "back-ends: dense, magicpig_k10l150, magicpig_k10l170, "
                               "magicpig_k8l75, rankedlsh, rankedlsh_2pct, rankedlsh_5pct, topk, quest, quest_dense01, quest_p8, quest_p4, oracle; "
                               "topk:rankedlsh_5pct (any of the last six, ':', an engine back-end of the list) runs "
                               "at that back-end's measured fraction")
_FRACTION = flags.DEFINE_string("fraction", "auto", "fraction of keys for topk/quest/oracle, or 'auto' (the "
                                "first MagicPIG back-end's measured fraction on the same cell)")
_BATCH = flags.DEFINE_integer("batch", 4, "prompts per generate call (prompts of similar length are grouped)")
_FORMAT = flags.DEFINE_enum("format", "chat", ["chat", "base"], "chat template with the answer prefix pre-filled, "
                            "or base completion (input + answer prefix)")
_OUT = flags.DEFINE_string("out", "docs/results/ruler", "output directory for ruler.json and ruler.md")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_RESUME = flags.DEFINE_bool("resume", False, "keep the complete cells of <out>/ruler.json (same samples, seed, "
                            "batch, format) and run only the others")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    import jax.numpy as jnp

    import pigjax
    from pigjax.eval import harness

    try:
        contexts = [int(c) for c in _CONTEXTS.value]
        fraction = _FRACTION.value if _FRACTION.value == "auto" else float(_FRACTION.value)
        harness.check_backends(_ATTENTION.value, fraction)  # before the (slow) model load
        checkpoint = _CHECKPOINT.value or pigjax.default_checkpoint()
        model = pigjax.load(checkpoint, dtype=jnp.bfloat16 if _DTYPE.value == "bfloat16" else None)
        results = harness.run_ruler(
            model, tasks=_TASKS.value, contexts=contexts, samples=_SAMPLES.value, attention=_ATTENTION.value,
            fraction=fraction, seed=_SEED.value, batch=_BATCH.value, format=_FORMAT.value, out_dir=_OUT.value,
            progress=_PROGRESS.value, resume=_RESUME.value, config={"checkpoint": str(checkpoint), "dtype": _DTYPE.value},
            log=lambda s: print(s, file=sys.stderr))
    except ValueError as e:  # PigjaxError is a ValueError; so is a bad --contexts/--fraction number
        print(f"eval_ruler: error: {e}", file=sys.stderr)
        return 1
    print(harness.markdown(results))
    print(f"wrote {_OUT.value}/ruler.json and {_OUT.value}/ruler.md")
    return 0


if __name__ == "__main__":
    app.run(main)
