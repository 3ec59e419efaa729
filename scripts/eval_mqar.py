"""MQAR (multi-query associative recall) for Llama, Memory Mosaics v1 and v2 at (about) equal
parameters and equal steps: accuracy against sequence length and number of pairs.

  python scripts/eval_mqar.py                      # the small-scale run of docs/results/README.md
  python scripts/eval_mqar.py --steps 4000 --train_len 256 --hidden 128 --eval_sequences 512   # larger

Each model is trained on sequences of --train_len with a number of pairs drawn from --pairs
(pigjax.eval.mqar), then scored at every --eval_lengths x --eval_pairs cell (cells with T < 4P are
skipped). With --engine KxL,... the v2 model is also scored by teacher-forced decoding with its
long-term memory read by the engine (MagicPIG(K, L), or RankedLSH for a KxLrRtF[sC] setting, sink
--sink, local --local, every layer sampled) against exact decoding, at lengths up to --engine_max_len, with the fraction of the
long-term memory's engine pairs read. Writes <out>.json, <out>.md and <out>.png.
"""

import json
import re
import sys
from pathlib import Path

from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["llama", "mosaics", "mosaics2"], "models (pigjax.train.MODELS)")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "model width")
_LAYERS = flags.DEFINE_integer("layers", 2, "blocks")
_HEADS = flags.DEFINE_integer("heads", 4, "heads")
_VOCAB = flags.DEFINE_integer("vocab", 256, "vocabulary: keys [1, V/2), values [V/2, V)")
_TRAIN_LEN = flags.DEFINE_integer("train_len", 128, "training sequence length")
_PAIRS = flags.DEFINE_list("pairs", ["2", "4", "8", "16"], "numbers of pairs drawn in training")
_BATCH = flags.DEFINE_integer("batch", 32, "sequences per step")
_STEPS = flags.DEFINE_integer("steps", 600, "training steps (every model)")
_WARMUP = flags.DEFINE_integer("warmup", 50, "warm-up steps")
_LR = flags.DEFINE_list("lr", ["llama=3e-3", "mosaics=1e-2", "mosaics2=1e-2"], "peak learning rate per model")
_SHORT = flags.DEFINE_integer("short_window", 64, "v2: short-term window h (as in the paper, = long_gap_max: "
                                                              "no pair is out of both memories' reach)")
_GAP_MIN = flags.DEFINE_integer("long_gap_min", 16, "v2: long-term gap m at inference (smallest in training)")
_GAP_MAX = flags.DEFINE_integer("long_gap_max", 64, "v2: largest m in training")
_LENGTHS = flags.DEFINE_list("eval_lengths", ["64", "128", "256", "512", "1024"], "evaluation lengths")
_EVAL_PAIRS = flags.DEFINE_list("eval_pairs", ["4", "8", "16"], "evaluation numbers of pairs")
_SEQS = flags.DEFINE_integer("eval_sequences", 96, "evaluation sequences per cell")
_ENGINE = flags.DEFINE_list("engine", [], "KxL settings (e.g. 10x150,16x150c; c: centered keys; KxLrRtF: "
                            "RankedLSH with R ranking tables reading the top F exactly; sC: each sample capped at "
                            "C of the pairs): also score v2 "
                            "with its long-term memory read by the engine")
_SINK = flags.DEFINE_integer("sink", 0, "engine: exact sink pairs")
_LOCAL = flags.DEFINE_integer("local", 1, "engine: exact pairs just past the gap (>= 1)")
_ENGINE_MAX = flags.DEFINE_integer("engine_max_len", 256, "engine: longest evaluation length")
_ENGINE_SEQS = flags.DEFINE_integer("engine_sequences", 32, "engine: sequences per cell")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation and data seed")
_OUT = flags.DEFINE_string("out", "docs/results/mqar/mqar", "output path without extension")


def run_model(name, task, lengths, pairs, log):
    from pigjax import train as training
    from pigjax.eval import mqar
    from pigjax.model import Model, param_count

    lr = dict(item.split("=") for item in _LR.value)
    cfg = training.TrainConfig(model=name, hidden=_HIDDEN.value, layers=_LAYERS.value, heads=_HEADS.value,
                               seq_len=max(lengths), steps=_STEPS.value, warmup=_WARMUP.value,
                               lr=float(lr[name]), dropout=0.0, short_window=_SHORT.value,
                               long_gap_min=_GAP_MIN.value, long_gap_max=_GAP_MAX.value, seed=_SEED.value)
    built = training.build(cfg, task.vocab_size, 0)  # seq_len: the models' context (RoPE tables, capacity)
    tx, _ = training.optimizer(cfg)
    log(f"{name}: training {cfg.num_steps} steps at lr {cfg.lr}")
    params, losses, seconds = mqar.train(built, task, tx, cfg.num_steps, seed=_SEED.value, log=log)
    acc = {t: {p: mqar.accuracy(built.forward, params, task, t, p, _SEQS.value)
               for p in pairs if t >= 4 * p} for t in lengths}
    log(f"{name}: {json.dumps(acc)}")
    return Model(built.config, params, None), {
        "config": built.config.to_dict(), "params": param_count(params), "lr": cfg.lr, "steps": cfg.num_steps,
        "train_seconds": seconds, "final_loss": float(sum(losses[-50:]) / len(losses[-50:])), "accuracy": acc}


def parse_engine_setting(setting: str):
    """"KxL" (MagicPIG) or "KxLrRtF" (RankedLSH: R ranking tables, top F), each with an optional
    "sC" (sample cap C) and a trailing "c" (centered keys) -> (K, L, R or 0, F, C, centered)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:r(\d+)t([0-9.]+))?(?:s([0-9.]+))?(c?)", setting)
    if m is None:
        raise app.UsageError(f"--engine: {setting!r} is not KxL or KxLrRtF, each with an optional sC and a "
                             "trailing c (e.g. 16x150s0.05c, 16x52r50t0.03s0.04c)")
    k, l, rank, top, cap, center = m.groups()
    return int(k), int(l), int(rank or 0), float(top or 0.0), float(cap or 1.0), center == "c"


def engine_eval(model, task, lengths, pairs, log):
    """v2 by teacher-forced decoding: exact retrieval vs the long-term memory read by the engine."""
    import numpy as np

    import pigjax
    from pigjax.eval import mqar
    from pigjax.eval.perplexity import teacher_forced

    from pigjax.models.mosaics_memory import MosaicsSampled

    backends = {}
    for setting in _ENGINE.value:
        k, l, rank, top, cap, center = parse_engine_setting(setting)
        common = dict(K=k, L=l, sink=_SINK.value, local=_LOCAL.value, dense_layers=(), storage="f32", sample_cap=cap)
        if rank:
            mp = pigjax.RankedLSH(rank_tables=rank, top=top, **common)
            label = f"RankedLSH K{k}L{l} rank {rank} top {top:g}"
        else:
            mp = pigjax.MagicPIG(**common)
            label = f"K{k}L{l}"
        label += f" cap {cap:g}" if cap < 1 else ""
        backends[label + (" centered" if center else "")] = MosaicsSampled(mp, center=center)
    out = {"settings": list(backends), "sequences": _ENGINE_SEQS.value, "sink": _SINK.value, "local": _LOCAL.value, "cells": {}}
    for t in [t for t in lengths if t <= _ENGINE_MAX.value]:
        for p in [p for p in pairs if t >= 4 * p]:
            rng = np.random.default_rng([_SEED.value, 99, t, p])
            tokens, targets = mqar.make_batch(rng, _ENGINE_SEQS.value, t, p, task.vocab_size)
            scored = targets[:, 2 * p - 1:-1] >= 0  # logits[:, j] predict token 2p + j, made at 2p + j - 1
            cell = {}
            for label, att in (("exact", None), *backends.items()):
                res = teacher_forced(model, tokens, 2 * p, att, return_logits=True)
                hit = res["logits"].argmax(-1) == targets[:, 2 * p - 1:-1]
                cell[label] = float(np.sum(hit & scored) / np.sum(scored))
                if att is not None:
                    cell[label + " read"] = res["stats"]["fraction_read"]
            out["cells"][f"{t}/{p}"] = cell
            log(f"engine T={t} P={p}: {cell}")
    return out


def write_report(results, lengths, pairs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(results, indent=1))
    lines = ["| T | pairs | " + " | ".join(f"{m} ({r['params']:,} params)" for m, r in models.items()) + " |",
             "|---|---:|" + "---:|" * len(models)]
    for t in lengths:
        for p in pairs:
            if t >= 4 * p:
                lines.append(f"| {t} | {p} | " + " | ".join(f"{r['accuracy'][t][p]:.3f}" for r in models.values())
                             + " |")
    if results.get("engine"):
        e = results["engine"]
        frac = lambda x: "—" if x is None else f"{x:.3f}"
        title = (f"v2 ({e['sequences']} sequences per cell), teacher-forced decoding, exact vs its long-term "
                 f"memory read by the engine (sink {e['sink']}, local {e['local']}, every layer): accuracy "
                 f"(fraction of the long-term memory's engine pairs read):")
        lines += ["", title, "",
                  "| T/pairs | exact | " + " | ".join(e["settings"]) + " |", "|---|---:|" + "---:|" * len(e["settings"])]
        for cell, r in e["cells"].items():
            lines.append(f"| {cell} | {r['exact']:.3f} | "
                         + " | ".join(f"{r[s]:.3f} ({frac(r[s + ' read'])})" for s in e["settings"]) + " |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.6), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        for m, r in models.items():
            ts = [t for t in lengths if t >= 4 * p]
            ax.plot(ts, [r["accuracy"][t][p] for t in ts], "o-", label=m)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{p} pairs")
        ax.set_xlabel("sequence length")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    from pigjax.errors import PigjaxError
    from pigjax.eval import mqar

    lengths, pairs = [int(x) for x in _LENGTHS.value], [int(x) for x in _EVAL_PAIRS.value]
    for setting in _ENGINE.value:  # fail before training
        parse_engine_setting(setting)
    task = mqar.Task(vocab_size=_VOCAB.value, seq_len=_TRAIN_LEN.value, pairs=tuple(int(x) for x in _PAIRS.value),
                     batch=_BATCH.value)
    log = lambda msg: print(msg, flush=True)
    try:
        results = {"task": {"vocab": task.vocab_size, "train_len": task.seq_len, "pairs": list(task.pairs),
                            "batch": task.batch, "eval_sequences": _SEQS.value}, "models": {}}
        for name in _MODELS.value:
            model, results["models"][name] = run_model(name, task, lengths, pairs, log)
            if name == "mosaics2" and _ENGINE.value:
                results["engine"] = engine_eval(model, task, lengths, pairs, log)
    except PigjaxError as e:
        print(f"eval_mqar: error: {e}", file=sys.stderr)
        return 1
    write_report(results, lengths, pairs, _OUT.value)
    print(Path(_OUT.value + ".md").read_text())
    print(f"wrote {_OUT.value}.json, .md, .png")
    return 0


if __name__ == "__main__":
    app.run(main)
