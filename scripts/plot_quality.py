"""Accuracy and perplexity vs fraction of middle keys read, per back-end, from the JSON written by
scripts/eval_ruler.py and scripts/eval_decode_quality.py:

  python scripts/plot_quality.py   # -> docs/results/quality_vs_fraction.png
"""

import json
import os

from absl import app, flags

_RULER = flags.DEFINE_string("ruler", "docs/results/ruler/ruler.json", "eval_ruler.py output")
_QUALITY = flags.DEFINE_string("quality", "docs/results/decode_quality_8k.json", "eval_decode_quality.py output")
_OUT = flags.DEFINE_string("out", "docs/results/quality_vs_fraction.png", "PNG")

DENSE_FLOOR = 20.0


def ruler_points(path):
    """{back-end: (mean fraction read, mean score over cells where dense >= 20)}."""
    cells = json.load(open(path))["cells"]
    dense = {(c["task"], c["context"]): c["score"] for c in cells if c["attention"] == "dense"}
    keep = {k for k, s in dense.items() if s >= DENSE_FLOOR}
    out = {}
    for name in dict.fromkeys(c["attention"] for c in cells):
        cs = [c for c in cells if c["attention"] == name and (c["task"], c["context"]) in keep]
        if cs:
            fr = [c["fraction_read"] for c in cs if c["fraction_read"] is not None]
            out[name] = (sum(fr) / len(fr) if fr else 1.0, sum(c["score"] for c in cs) / len(cs))
    return out


def main(_):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if os.path.exists(_RULER.value):
        panels.append(("RULER score (cells where dense >= 20)", ruler_points(_RULER.value)))
    if os.path.exists(_QUALITY.value):
        q = json.load(open(_QUALITY.value))
        if "backends" in q.get("perplexity", {}):
            panels.append((f"decode-mode perplexity ({q['perplexity']['tokens']} tokens)",
                           {n: (r["fraction_read"] or 1.0, r["perplexity"]) for n, r in q["perplexity"]["backends"].items()}))
        panels.append(("attention rel. L2 error (mean over layers)",
                       {n: (r["fraction_read"] or 1.0, sum(r["relative_l2"]) / len(r["relative_l2"]))
                        for n, r in q["attention_error"]["backends"].items()}))
    if not panels:
        raise SystemExit("no results to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (title, points) in zip(axes, panels):
        for name, (x, y) in points.items():
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of middle keys read (sparse layers)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct: quality vs keys read", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    fig.savefig(_OUT.value, dpi=110)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
