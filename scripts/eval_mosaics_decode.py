"""Decode-mode perplexity of the trained Memory Mosaics model with exact vs sampled (MagicPIG)
retrieval of its contextual memory, on held-out Wikipedia text (the training run's validation
paragraphs, joined by EOS and cut into consecutive sequences):

  python scripts/eval_mosaics_decode.py     # contexts 1k and 4k, 8 sequences each, prefill 1/4

Each sequence: prefill the first quarter (exact), then feed the rest one token per step through
the decoding back-end (pigjax.eval.perplexity.teacher_forced). The model was trained on 256-token
windows; Memory Mosaics has no positional encoding, so its recurrent form runs past that (the
config's context is raised to the sequence length). Writes JSON and a Markdown table.
"""

import dataclasses
import json
import time

from absl import app, flags

from pigjax import cli

_MODEL = flags.DEFINE_string("model", "checkpoints/runs/mosaics/model", "Memory Mosaics checkpoint")
_RUN = flags.DEFINE_string("run", "checkpoints/runs/mosaics/run.json", "its training run (data settings)")
_CONTEXTS = flags.DEFINE_list("contexts", "1024,4096", "sequence lengths (tokens)")
_SEQUENCES = flags.DEFINE_integer("sequences", 8, "sequences per context (one batch)")
_PREFILL = flags.DEFINE_float("prefill", 0.25, "prefill as a fraction of the context")
_ATTENTION = flags.DEFINE_list("attention", "exact,k10l150,k10l150_all,k10l150_all_f32",
                               "exact | k<K>l<L> (MagicPIG, default dense layers 0 and n/2) | k<K>l<L>_all "
                               "(every layer sampled); suffixes _c: centered keys, _f32: f32 engine storage")
_OUT = flags.DEFINE_string("out", "docs/results/mosaics_decode", "output prefix (.json, .md)")
cli.existing(_MODEL, "train one with scripts/train_mosaics.py")
cli.existing(_RUN, "written by scripts/train_mosaics.py")
cli.ints(_CONTEXTS, 16)
cli.matching(_ATTENTION, r"exact|k\d+l\d+(_all)?(_c)?(_f32)?", "back-ends: exact or k<K>l<L>[_all][_c][_f32]")


def make_attention(name: str):
    import re

    import pigjax
    from pigjax.models.mosaics_memory import MosaicsSampled

    if name == "exact":
        return None
    m = re.fullmatch(r"k(\d+)l(\d+)(_all)?(_c)?(_f32)?", name)
    if not m:
        raise ValueError(f"unknown back-end {name!r}")
    magicpig = pigjax.MagicPIG(K=int(m[1]), L=int(m[2]), dense_layers=() if m[3] else None,
                               storage="f32" if m[5] else "bf16")
    return MosaicsSampled(magicpig, center=bool(m[4]))


def sequences(corpus, context: int, n: int):
    """The first n consecutive `context`-token sequences of the validation stream."""
    import numpy as np

    from pigjax import data as data_lib

    packer = data_lib.Packer(corpus.val, context, corpus.eos_id, shuffle=False)
    if packer.windows_per_epoch < n:
        raise ValueError(f"validation text holds {packer.windows_per_epoch} sequences of {context} tokens, not {n}")
    return np.stack([packer.window(g)[:context] for g in range(n)])


def main(_):
    from tqdm import tqdm

    import pigjax
    from pigjax import data as data_lib
    from pigjax.eval.output import write_json_and_markdown
    from pigjax.eval.perplexity import perplexity, teacher_forced
    from pigjax.machine import describe

    run = json.load(open(_RUN.value))
    corpus = data_lib.prepare(run["data"], run.get("data_cache"), vocab_size=run["vocab_size"],
                              val_fraction=run["val_fraction"])
    model = pigjax.load(_MODEL.value)
    contexts = [int(c) for c in _CONTEXTS.value]
    names = _ATTENTION.value
    result = {"machine": describe(), "model": _MODEL.value, "sequences": _SEQUENCES.value,
              "text": "hotpotqa validation paragraphs (the training run's split), joined by EOS", "contexts": {}}
    jobs = [(c, name) for c in contexts for name in names]
    bar = tqdm(jobs, desc="decode-mode perplexity")
    for context, name in bar:
        bar.set_postfix(context=context, attention=name)
        tokens = sequences(corpus, context, _SEQUENCES.value)
        prefill = int(context * _PREFILL.value)
        # No positional encoding: the recurrent form runs past the training window.
        long = dataclasses.replace(model, config=dataclasses.replace(model.config, max_position_embeddings=context))
        start = time.perf_counter()
        out = teacher_forced(long, tokens, prefill, make_attention(name))
        s = out["stats"]
        entry = result["contexts"].setdefault(str(context), {"prefill": prefill, "backends": {}})
        entry["backends"][name] = {
            "perplexity": perplexity(out["logp"]), "fraction_read": s.get("fraction_read"),
            "fraction_read_sampled_layers": s.get("fraction_read_sampled_layers"),
            "dense_layers": s.get("dense_layers"), "storage": s.get("storage"),
            "seconds": time.perf_counter() - start, "decoded_tokens": int(out["logp"].size),
            "host_bytes_per_token_per_layer": s["host_bytes_per_token_per_layer"]}
        tqdm.write(f"{context} {name}: {entry['backends'][name]}")

    lines = ["# Memory Mosaics: decode-mode perplexity, exact vs sampled retrieval", "",
             f"Model: `{_MODEL.value}` (5.25M parameters, trained on 256-token windows). Text: {result['text']}; "
             f"{_SEQUENCES.value} sequences per context, prefill (exact) of the first {_PREFILL.value:.0%}, then "
             f"teacher-forced decoding of the rest through the back-end. Machine: {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores.", "",
             "Sampled: MagicPIG K/L on the contextual memory, sink 4 and the 64 most recent pairs exact, older pairs "
             "in the engine (prompt pairs at prefill, later ones appended as they leave the window); `_all`: every "
             "layer sampled (else layers 0 and 2 stay exact); `_c`: centered keys (else raw); `_f32`: f32 engine "
             "storage (else bf16). "
             "Fraction read: engine pairs sampled / engine pairs (sampled layers); with window: counting the exact "
             "window as read. Seconds: wall time on a shared machine (other jobs ran), not a benchmark.", "",
             "| context | prefill | retrieval | perplexity | vs exact | fraction read | with window | seconds |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for context, entry in result["contexts"].items():
        exact = entry["backends"].get("exact", {}).get("perplexity")
        for name, r in entry["backends"].items():
            rel = f"{100 * (r['perplexity'] / exact - 1):+.2f}%" if exact else "–"
            fr = "–" if r["fraction_read"] is None else f"{r['fraction_read']:.4f}"
            fw = "–" if r["fraction_read_sampled_layers"] is None else f"{r['fraction_read_sampled_layers']:.4f}"
            lines.append(f"| {context} | {entry['prefill']} | {name} | {r['perplexity']:.3f} | {rel} | {fr} | {fw} "
                         f"| {r['seconds']:.0f} |")
    lines += ["", "Command: `python scripts/eval_mosaics_decode.py " +
              f"--contexts {','.join(map(str, contexts))} --sequences {_SEQUENCES.value} "
              f"--attention {','.join(names)}`"]
    write_json_and_markdown(_OUT.value, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
