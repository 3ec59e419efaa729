"""Decode-mode quality of attention back-ends on long Wikipedia text (hotpotqa paragraphs):

  python scripts/eval_decode_quality.py            # 8k tokens: prefill 2k, teacher-forced decode of 6k
  python scripts/eval_decode_quality.py --merge a.json,b.json --out c   # one table from several runs

1. Perplexity in decode mode: prefill `--prefill` tokens densely, then feed the rest one token per
   step through the back-end (pigjax.eval.perplexity.teacher_forced).
2. Attention-level error: each layer's attention output vs exact attention on the same q, k, v
   (those of a dense forward) at `--error_steps` decode positions after `--error_prefill` tokens
   (pigjax.eval.attention_error).
topk/quest/oracle run at the fraction of middle keys the reference engine back-end (the first MagicPIG
in --attention, else the first RankedLSH) measured in the same run, or at --fraction (e.g. that measured by an earlier run).
Writes JSON and a Markdown table.
"""

import json
import time
from pathlib import Path

from absl import app, flags

_ATTENTION = flags.DEFINE_list("attention", "dense,magicpig_k10l150,magicpig_k10l170,magicpig_k8l75,topk,quest",
                               "back-end names (see pigjax.eval.harness.BACKENDS)")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "text length for perplexity")
_PREFILL = flags.DEFINE_integer("prefill", 2048, "dense prefill before teacher-forced decoding")
_ERROR_PREFILL = flags.DEFINE_integer("error_prefill", 4032, "prefill of the attention-error run")
_ERROR_STEPS = flags.DEFINE_integer("error_steps", 64, "decode positions of the attention-error run")
_SEED = flags.DEFINE_integer("seed", 0, "text seed")
_FRACTION = flags.DEFINE_float("fraction", None, "fraction for topk/quest/oracle (default: the first MagicPIG's (else RankedLSH's), "
                                "measured in this run; each part of the run uses its own measurement)")
_MERGE = flags.DEFINE_list("merge", None, "instead of running: merge these JSON results of this script (same "
                           "settings) into --out, e.g. a run of the baselines added to an earlier one")
_SKIP_PPL = flags.DEFINE_bool("skip_perplexity", False, "only the attention-level error")
_OUT = flags.DEFINE_string("out", "docs/results/decode_quality", "output prefix (.json, .md)")


def _logged(run_one):
    """run_one, printing each back-end's result as it comes."""
    def run(name, backend):
        out = run_one(name, backend)
        print(f"  {name}: {out}"[:300], flush=True)
        return out
    return run


def markdown(result: dict) -> str:
    """Tables of attention-level error and decode-mode perplexity (vs dense when dense is there)."""
    import numpy as np

    lines = ["# Decode-mode quality", "",
             f"SmolLM2-135M-Instruct on hotpotqa Wikipedia paragraphs; machine: {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores.", ""]
    errs = result["attention_error"]["backends"]
    lines += [f"Attention-level error: relative L2 of each layer's attention output vs exact attention (same q, k, v), "
              f"mean over {result['attention_error']['steps']} decode positions after a "
              f"{result['attention_error']['prefill']}-token prefill.", "",
              "| back-end | fraction read | mean rel. L2 (sparse layers) | max over layers |", "|---|---:|---:|---:|"]
    for name, e in errs.items():
        sparse = [x for x in e["relative_l2"] if x > 0] or [0.0]
        fr = "–" if e["fraction_read"] is None else f"{e['fraction_read']:.4f}"
        if e.get("fraction_values_read") is not None and e["fraction_values_read"] != e["fraction_read"]:
            fr += f" (values {e['fraction_values_read']:.4f})"
        lines.append(f"| {name} | {fr} | {np.mean(sparse):.4f} | {max(e['relative_l2']):.4f} |")
    if "backends" in result["perplexity"]:
        p = result["perplexity"]
        dense = p["backends"].get("dense", {}).get("perplexity")
        lines += ["", f"Decode-mode perplexity: {p['tokens']} tokens, dense prefill of {p['prefill']}, teacher-forced "
                  "decode of the rest.", "",
                  "| back-end | fraction read | perplexity | vs dense | model-side bytes/token/layer | "
                  "host bytes/token/layer | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in p["backends"].items():
            fr = "–" if r["fraction_read"] is None else f"{r['fraction_read']:.4f}"
            rel = f"{100 * (r['perplexity'] / dense - 1):+.2f}%" if dense else "–"
            lines.append(f"| {name} | {fr} | {r['perplexity']:.3f} | {rel} | {r['cache_bytes_per_token_per_layer']:.0f} "
                         f"| {r['host_bytes_per_token_per_layer']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def merge(paths) -> dict:
    """One result from several runs of this script with the same settings (back-ends in order)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {**runs[0], "merged_from": list(paths)}
    for part in ("perplexity", "attention_error"):
        settings = {k: v for k, v in runs[0][part].items() if k != "backends"}
        out[part] = {**settings, "backends": {}}
        for path, run in zip(paths, runs):
            if {k: v for k, v in run[part].items() if k != "backends"} != settings:
                raise SystemExit(f"eval_decode_quality: {path} was run with other {part} settings than {paths[0]}")
            for name, r in run[part].get("backends", {}).items():
                if name in out[part]["backends"]:
                    raise SystemExit(f"eval_decode_quality: back-end {name} appears in more than one of {paths}")
                out[part]["backends"][name] = r
    return out


def main(_):

    import pigjax
    import pigjax.assets
    from pigjax.eval.attention_error import layer_errors
    from pigjax.eval.harness import check_backends, run_at_fractions
    from pigjax.eval.output import write_json_and_markdown
    from pigjax.eval.perplexity import perplexity, teacher_forced
    from pigjax.eval.text import long_text
    from pigjax.machine import describe

    if _MERGE.value:
        result = merge(_MERGE.value)
        write_json_and_markdown(_OUT.value, result, markdown(result))
        return
    names = _ATTENTION.value
    try:
        check_backends(names, "auto" if _FRACTION.value is None else _FRACTION.value)  # before the model load
    except pigjax.PigjaxError as e:
        raise SystemExit(f"eval_decode_quality: error: {e}") from None
    model = pigjax.load(pigjax.default_checkpoint())
    text = long_text(model.tokenizer, max(_TOKENS.value, _ERROR_PREFILL.value + _ERROR_STEPS.value), seed=_SEED.value)
    result = {"machine": describe(), "model": "SmolLM2-135M-Instruct", "text": "hotpotqa paragraphs",
              "perplexity": {"tokens": _TOKENS.value, "prefill": _PREFILL.value},
              "attention_error": {"prefill": _ERROR_PREFILL.value, "steps": _ERROR_STEPS.value}}

    print("attention-level error ...", flush=True)
    err_tokens = text[None, : _ERROR_PREFILL.value + _ERROR_STEPS.value]
    result["attention_error"]["backends"] = run_at_fractions(
        names, _logged(lambda name, b: layer_errors(model, err_tokens, _ERROR_PREFILL.value, {name: b})[name]),
        _FRACTION.value)

    if not _SKIP_PPL.value:
        print("decode-mode perplexity ...", flush=True)

        def ppl(name, backend):
            start = time.perf_counter()
            out = teacher_forced(model, text[None, : _TOKENS.value], _PREFILL.value, backend)
            return {"perplexity": perplexity(out["logp"]), "fraction_read": out["stats"].get("fraction_read"),
                    "fraction_values_read": out["stats"].get("fraction_values_read"),
                    "seconds": time.perf_counter() - start,
                    "cache_bytes_per_token_per_layer": out["stats"]["cache_bytes_per_token_per_layer"],
                    "host_bytes_per_token_per_layer": out["stats"]["host_bytes_per_token_per_layer"]}

        result["perplexity"]["backends"] = run_at_fractions(names, _logged(ppl), _FRACTION.value)

    write_json_and_markdown(_OUT.value, result, markdown(result))


if __name__ == "__main__":
    app.run(main)
