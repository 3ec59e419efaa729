"""Validation loss past the training window: per-position teacher-forced loss of a
finished training run's model on held-out windows `factor` times longer than it was trained on.

For a `pigjax.train` work directory (run.json, and model/ written when the run stopped):

- the text is the run's validation split, packed exactly as training's validation packs it
  (`pigjax.train.Evaluator`: paragraphs in order joined by EOS, consecutive windows) but into
  windows of L = factor · T tokens, T the run's training window (`seq_len`);
- each window is scored in one parallel forward (`pigjax.families` logits, the function
  `pigjax.forward` computes) with the model's context raised to L: a Llama applies RoPE at
  positions it never saw in training; Memory Mosaics v1 and v2 (no positional encoding) run their
  parallel form over the longer window (v2's long-term memory with m = long_gap_min);
- the result is the mean loss at each position of the window, [L], over all windows (or the first
  `windows`), and its means over [kT, (k+1)T) for each k.

"Loss at 1x" is the mean over [T/2, T) (the end of the training window, where the context is as
long as training ever gave); "loss at `factor`x" the mean over [(factor-1)T, factor·T). Their ratio
is <= 1 when the model is no worse far past the training length than at its end.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pigjax.errors import PigjaxError
from pigjax.families import family_of


class LongContextError(PigjaxError):
    """A run directory that cannot be evaluated (missing, no final model, mismatched data)."""


def with_context(model, length: int):
    """The model with its context (max_position_embeddings) raised to at least `length`."""
    if length <= model.config.max_position_embeddings:
        return model
    return dataclasses.replace(model, config=dataclasses.replace(model.config, max_position_embeddings=length))


@partial(jax.jit, static_argnums=0)
def _token_losses(config, params, windows):
    """windows [B, L + 1] -> cross-entropy of each next-token prediction [B, L] (f32)."""
    tokens = windows[:, :-1]
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    logits = family_of(config).logits(params, config, tokens, lengths).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def token_losses(model, corpus, length: int, *, windows: int | None = None, batch: int = 8) -> np.ndarray:
    """Teacher-forced loss of every prediction in the first `windows` (None: all) validation windows
    of `length` tokens of `corpus` -> [windows, length] float64 (its mean over axis 0 is the
    per-position curve)."""
    from pigjax.train import Evaluator

    long = with_context(model, length)
    return Evaluator(partial(_token_losses, long.config), corpus, length, batch).losses(long.params, windows)


def summarize(losses, train_len: int, factor: int) -> dict:
    """Range means of token losses [windows, factor · train_len] (module docstring), and the
    difference "at factor x" - "at 1x" with its standard error over windows (both ranges come from
    the same windows, so it is a paired difference)."""
    from pigjax.eval.lm_compare import position_means

    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[1] != factor * train_len:
        raise LongContextError(f"token losses of shape {losses.shape} are not [windows, {factor} x {train_len}]")
    near = losses[:, train_len // 2:train_len].mean(axis=1)
    far = losses[:, (factor - 1) * train_len:].mean(axis=1)
    n = len(losses)
    return {"ranges": position_means(losses.mean(axis=0), edges=tuple(k * train_len for k in range(factor))),
            "at_1x": float(near.mean()), f"at_{factor}x": float(far.mean()), "ratio": float(far.mean() / near.mean()),
            "difference": float((far - near).mean()),
            "difference_se": _se(far - near),
            "per_window": {"at_1x": near.tolist(), f"at_{factor}x": far.tolist()},
            "definition": {"at_1x": [train_len // 2, train_len],
                           f"at_{factor}x": [(factor - 1) * train_len, factor * train_len]}}


def _se(x) -> float | None:
    """Standard error of the mean of x (None for fewer than 2 values)."""
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None


def versus(result: dict, base: dict, factor: int) -> dict | None:
    """How much more (> 0) or less the loss of `result` grows from 1x to factor x than that of
    `base`, window by window (the same windows: same data, training window and count), with its
    standard error: a paired difference in which the text's own variation cancels. None if the
    windows differ."""
    far = f"at_{factor}x"
    if (result["data"], result["length"], result["windows"]) != (base["data"], base["length"], base["windows"]):
        return None
    growth = [np.asarray(r["per_window"][far]) - np.asarray(r["per_window"]["at_1x"]) for r in (result, base)]
    return {"difference": float((growth[0] - growth[1]).mean()), "difference_se": _se(growth[0] - growth[1])}


def load_run(workdir):
    """(TrainConfig, Model, metrics.json or None) of a training run directory, with errors that
    name what is missing."""
    import pigjax
    from pigjax.train import TrainError, saved_config

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise LongContextError(f"run directory {workdir} does not exist")
    try:
        cfg = saved_config(workdir)
    except TrainError as e:
        raise LongContextError(str(e)) from None
    model_dir = workdir / "model"
    if not model_dir.is_dir():
        raise LongContextError(
            f"{model_dir} does not exist: the run in {workdir} has no final model (pigjax.train writes model/ "
            "when a run stops; run its command again, with --until_step <last saved step> to stop at once)")
    model = pigjax.load(model_dir)
    metrics_file = workdir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return cfg, model, metrics


def evaluate_run(workdir, factor: int = 4, *, windows: int | None = None, batch: int = 8, log=print) -> dict:
    """The per-position curve over windows of factor x the run's training window, and its summary."""
    from pigjax.train import prepare_data

    if not isinstance(factor, int) or factor < 1:
        raise LongContextError(f"factor must be a positive integer, got {factor!r}")
    cfg, model, metrics = load_run(workdir)
    corpus = prepare_data(cfg, log=lambda *_: None)
    if model.config.vocab_size < len(corpus.tokenizer) or (
            model.tokenizer is not None and model.tokenizer.get_vocab() != corpus.tokenizer.get_vocab()):
        raise LongContextError(f"{Path(workdir) / 'model'}: its tokenizer is not the one of the run's data "
                               f"({cfg.data}, vocabulary {cfg.vocab_size})")
    length = factor * cfg.seq_len
    paragraph = (len(corpus.val.tokens) + corpus.val.num_paragraphs) / corpus.val.num_paragraphs  # with its EOS
    losses = token_losses(model, corpus, length, windows=windows, batch=batch)
    n = len(losses)
    log(f"{workdir}: {n} windows of {length} tokens")
    final = (metrics or {}).get("final") or {}
    return {
        "workdir": str(workdir), "model": cfg.model, "config": model.config.to_dict(),
        "train_command": train_command(cfg), "seq_len": cfg.seq_len, "factor": factor, "length": length,
        "windows": n, "tokens": n * length, "data": [cfg.data, cfg.vocab_size, cfg.val_fraction],
        "mean_paragraph_tokens": paragraph,
        "param_count": (metrics or {}).get("param_count"),
        "tokens_seen": final.get("tokens_seen"), "finished": final.get("finished"),
        "val_loss_training_window": final.get("val_loss"),
        **summarize(losses, cfg.seq_len, factor),
        "per_position_loss": losses.mean(axis=0).tolist(),
    }


_V2_SETTINGS = ("short_window", "long_gap_min", "long_gap_max")


def train_command(cfg) -> str:
    """The scripts/train_mosaics.py command of a run: the settings that differ from the defaults."""
    from pigjax.train import _RESUMABLE_CHANGES, TrainConfig

    args = [f"--model {cfg.model}", f"--workdir {shlex.quote(str(cfg.workdir))}"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name != "lr" and (f.name in ("model", "workdir") or f.name in _RESUMABLE_CHANGES - {"data_cache"} or value == f.default
                or (f.name in _V2_SETTINGS and cfg.model != "mosaics2")):
            continue
        args.append(f"--{f.name} {value:g}" if isinstance(value, float) else f"--{f.name} {shlex.quote(str(value))}")
    return "python scripts/train_mosaics.py " + " ".join(args)


def report(runs: dict[str, str], out_prefix, factor: int = 4, *, windows: int | None = None, batch: int = 8,
           command: str | None = None, log=print) -> dict:
    """runs: {label: workdir}; writes <out_prefix>.json, .md and .png; returns the JSON dict."""
    from pigjax.eval.output import write_json_and_markdown
    from pigjax.machine import describe

    results = {label: evaluate_run(d, factor, windows=windows, batch=batch, log=log) for label, d in runs.items()}
    lengths = {r["seq_len"] for r in results.values()}
    if len(lengths) != 1:
        raise LongContextError(f"the runs were trained on different windows {sorted(lengths)}; compare like with like")
    t = lengths.pop()
    labels = list(results)
    base = labels[0]
    for label in labels[1:]:
        results[label][f"versus_{base}"] = versus(results[label], results[base], factor)
    out = {"factor": factor, "seq_len": t, "machine": describe(), "command": command, "runs": results}
    out_prefix = Path(out_prefix)
    write_json_and_markdown(str(out_prefix.with_suffix("")), out,
                            _markdown(out, out_prefix.with_suffix(".png").name))
    _plot(results, factor, t, out_prefix.with_suffix(".png"))
    return out


def _markdown(out: dict, png_name: str) -> str:
    results, factor, t, machine, command = out["runs"], out["factor"], out["seq_len"], out["machine"], out["command"]
    labels = list(results)
    base = labels[0]
    ranges = list(results[base]["ranges"])
    far = f"at_{factor}x"
    header = (["model", "parameters", "training tokens", f"val loss (windows of {t})"]
              + [f"positions {r}" for r in ranges]
              + [f"at 1x [{t // 2}, {t})", f"at {factor}x [{(factor - 1) * t}, {factor * t})", f"{factor}x / 1x", f"{factor}x - 1x (± s.e.)", f"{factor}x no worse than 1x",
                 f"({factor}x - 1x) - {base}'s (± s.e.)"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label in labels:
        r = results[label]
        tokens = "–" if r["tokens_seen"] is None else f"{r['tokens_seen']:,}" + ("" if r["finished"] else " (stopped early)")
        cells = [label, "–" if r["param_count"] is None else f"{r['param_count']:,}", tokens,
                 "–" if r["val_loss_training_window"] is None else f"{r['val_loss_training_window']:.4f}"]
        cells += [f"{r['ranges'][k]:.4f}" for k in ranges]
        cells += [f"{r['at_1x']:.4f}", f"{r[far]:.4f}", f"{r['ratio']:.4f}",
                  f"{r['difference']:+.4f}" + ("" if r["difference_se"] is None else f" ± {r['difference_se']:.4f}"),
                  "yes" if r["ratio"] <= 1 else "no"]
        vs = r.get(f"versus_{base}")
        cells.append("–" if vs is None else f"{vs['difference']:+.4f} ± {vs['difference_se']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = results[base]
    md = [f"# Validation loss past the training window ({factor}x)", "",
          f"Per-position teacher-forced loss on held-out Wikipedia paragraphs (the runs' validation split, "
          f"paragraphs in order joined by EOS) cut into {first['windows']} windows of {factor} x {t} = {factor * t} "
          f"tokens ({first['tokens']:,} tokens; a paragraph averages {first['mean_paragraph_tokens']:.0f} tokens with "
          f"its EOS, so a window holds about {factor * t / first['mean_paragraph_tokens']:.0f}), one parallel forward per window: the Llama applies RoPE at "
          f"positions past its training window, Memory Mosaics (no positional encoding) run their parallel form "
          f"over the whole window. \"positions a-b\": mean loss over positions a..b of the window (both "
          f"included); \"at 1x\" is the mean over [{t // 2}, {t}) (the end of the training window), \"at {factor}x\" over "
          f"[{(factor - 1) * t}, {factor * t}); \"{factor}x / 1x\" is their ratio (<= 1: no worse at {factor}x the "
          f"training length than at 1x) and \"{factor}x - 1x\" their difference with its standard error over "
          f"windows (both ranges come from the same windows, so the difference is paired; one within about 2 s.e. "
          f"of 0 is not distinguishable from 0 on this text). The last column compares that growth with "
          f"{base}'s window by window (same windows), which cancels the variation of the text itself. "
          f"The validation loss column is the run's own final "
          f"evaluation on windows "
          f"of {t}.", "", *lines, "", f"![per-position loss]({png_name})", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores, JAX {machine['jax']} ({machine['jax_backend']}).",
          "", "Commands:", "", "```", *(results[k]["train_command"] for k in labels),
          *([command] if command else []), "```", ""]
    return "\n".join(md)


def _plot(results: dict, factor: int, t: int, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    k = max(t // 16, 1)
    for label, r in results.items():
        curve = np.asarray(r["per_position_loss"])
        x = np.arange(len(curve))
        xs, smooth = x[k - 1:] - (k - 1) / 2, np.convolve(curve, np.ones(k) / k, mode="valid")
        line, = ax1.plot(x, curve, lw=0.5, alpha=0.25)
        ax1.plot(xs, smooth, lw=1.5, color=line.get_color(), label=f"{label} (mean of {k} positions)")
        ax2.plot(xs, smooth - r["at_1x"], lw=1.5, color=line.get_color(),
                 label=f"{label}: {factor}x - 1x = {r['difference']:+.3f}"
                       + ("" if r["difference_se"] is None else f" ± {r['difference_se']:.3f}"))
    ax2.axhline(0, color="black", lw=0.8)
    ax2.axvspan(t // 2, t, color="gray", alpha=0.15, label="1x range")
    ax2.axvspan((factor - 1) * t, factor * t, color="tab:red", alpha=0.08, label=f"{factor}x range")
    for ax in (ax1, ax2):
        for j in range(1, factor):
            ax.axvline(j * t, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(f"position in the window (training window {t}: dashed lines at its multiples)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("validation loss")
    ax1.set_title(f"per-position validation loss, windows of {factor} x {t}")
    ax2.set_ylabel("loss - its mean over [T/2, T)")
    ax2.set_title(f"relative to the end of the training window (mean of {k} positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
