"""Side-by-side report of two training runs (pigjax.train work directories): validation
losses and their ratio, loss curves against tokens, and the per-position loss (the paper's Fig. 8:
a model that learns in context predicts later positions of a window better)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pigjax.errors import PigjaxError


def _load_run(workdir) -> dict:
    path = Path(workdir) / "metrics.json"
    if not path.is_file():
        raise PigjaxError(f"{path} does not exist: is {workdir} a finished training run's --workdir?")
    metrics = json.loads(path.read_text())
    if not metrics.get("final"):
        raise PigjaxError(f"{path} has no final evaluation")
    return metrics


def position_means(per_position: list[float], edges=(0, 8, 32, 64, 128)) -> dict:
    """Mean loss over position ranges [a, b) (the last range runs to the window's end)."""
    x = np.asarray(per_position)
    bounds = [e for e in edges if e < len(x)] + [len(x)]
    return {f"{a}-{b - 1}": float(x[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])}


def compare(runs: dict[str, str], out_prefix) -> dict:
    """runs: {label: workdir}; writes <out_prefix>.json, .md and .png; returns the JSON dict.
    The ratio is each run's final validation loss over the first run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {label: _load_run(d) for label, d in runs.items()}
    first = next(iter(metrics))
    summary = {}
    for label, m in metrics.items():
        f = m["final"]
        summary[label] = {
            "workdir": str(runs[label]), "model": m["model"], "config": m["config"],
            "param_count": m["param_count"], "param_count_non_embedding": m["param_count_non_embedding"],
            "steps": f["step"], "tokens_seen": f["tokens_seen"], "finished": f["finished"],
            "tokens_per_second": m["tokens_per_second"], "train_seconds": m["train_seconds"],
            "final_train_loss": float(np.mean(m["train"]["loss"][-20:])),
            "val_loss": f["val_loss"], "val_tokens": f["val_tokens"],
            "val_loss_ratio_to_" + first: f["val_loss"] / metrics[first]["final"]["val_loss"],
            "per_position_loss_by_range": position_means(f["per_position_loss"]),
            "per_position_loss": f["per_position_loss"],
        }
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".json").write_text(json.dumps(summary, indent=1))

    labels = list(summary)
    ranges = list(summary[first]["per_position_loss_by_range"])
    lines = [
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]

    def row(name, fmt):
        lines.append(f"| {name} | " + " | ".join(fmt(summary[k]) for k in labels) + " |")

    row("parameters", lambda s: f"{s['param_count']:,} ({s['param_count_non_embedding']:,} non-embedding)")
    row("training tokens", lambda s: f"{s['tokens_seen']:,}" + ("" if s["finished"] else " (stopped early)"))
    row("training tokens/s", lambda s: f"{s['tokens_per_second'] or 0:.0f}")
    row("final train loss (last 20 steps)", lambda s: f"{s['final_train_loss']:.4f}")
    row("validation loss", lambda s: f"{s['val_loss']:.4f}")
    row(f"validation loss / {first}'s", lambda s: f"{s['val_loss_ratio_to_' + first]:.4f}")
    for r in ranges:
        row(f"val loss at positions {r}", lambda s, r=r: f"{s['per_position_loss_by_range'][r]:.4f}")
    md = ["# " + " vs ".join(labels), "",
          f"Validation: {summary[first]['val_tokens']:,} tokens of held-out Wikipedia paragraphs "
          "(windows of the training length). Per-position loss: mean loss of the prediction at each "
          "position of the window (the paper's Fig. 8).", "", *lines, "",
          f"![curves]({out_prefix.with_suffix('.png').name})", ""]
    out_prefix.with_suffix(".md").write_text("\n".join(md))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, m in metrics.items():
        tps = m["tokens_per_step"]
        loss = np.asarray(m["train"]["loss"])
        k = max(min(len(loss) // 50, 25), 1)
        steps = np.asarray(m["train"]["step"])[k - 1:]
        line, = ax1.plot(steps * tps, np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.2, label=f"{label} train")
        if m["val"]["step"]:
            ax1.plot(np.asarray(m["val"]["step"]) * tps, m["val"]["loss"], "o--", ms=3, color=line.get_color(),
                     label=f"{label} validation")
        ax2.plot(np.arange(1, len(m["final"]["per_position_loss"]) + 1), m["final"]["per_position_loss"],
                 lw=1.2, label=label)
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax1.set_title("loss curves")
    ax2.set_xscale("log")
    ax2.set_xlabel("tokens of context (position in the window + 1)")
    ax2.set_ylabel("validation loss")
    ax2.set_title("per-position validation loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_prefix.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return summary
