"""Quality vs fraction of middle keys read for each back-end family (the sampled-attention
frontier), one panel per metric, from the JSON the evaluation scripts wrote:

  python scripts/plot_frontier.py   # -> docs/results/ranked/frontier.png (+ .json with the points)

Panels: attention error (eval_decode_quality.py --skip_perplexity runs in docs/results/ranked/),
coverage (eval_coverage.py, docs/results/ranked/coverage.json), RULER average over the cells where
dense scores >= 20 (eval_ruler.py runs), decode-mode perplexity at 8k (eval_decode_quality.py).
A family's points are joined in order of fraction read; dense is a dashed line.
"""

import json
import os

from absl import app, flags

_ERRORS = flags.DEFINE_list("errors", [f"docs/results/ranked/error_{n}.json" for n in (
    "rankedlsh_2pct", "rankedlsh", "rankedlsh_5pct", "magicpig", "magicpig_k10l170")],
    "eval_decode_quality.py attention-error JSONs")
_COVERAGE = flags.DEFINE_string("coverage", "docs/results/ranked/coverage.json", "eval_coverage.py JSON")
_RULER = flags.DEFINE_list("ruler", ["docs/results/ruler/ruler.json", "docs/results/ruler_ranked_sketch/ruler.json",
                                     "docs/results/ruler_ranked_2pct/ruler.json"],
                           "eval_ruler.py JSONs (the first must hold dense)")
_PPL = flags.DEFINE_list("perplexity", ["docs/results/decode_quality_8k.json",
                                        "docs/results/decode_quality_8k_rankedlsh.json",
                                        "docs/results/decode_quality_8k_rankedlsh_budgets.json"],
                         "eval_decode_quality.py JSONs with perplexity")
_OUT = flags.DEFINE_string("out", "docs/results/ranked/frontier.png", "PNG (the points go to the same name .json)")

DENSE_FLOOR = 20.0
FAMILIES = ("rankedlsh", "topk", "quest", "magicpig", "oracle")


def family(name: str) -> str:
    return next((f for f in FAMILIES if name.startswith(f)), name)


def error_points(paths) -> dict:
    """{back-end: (fraction read, mean relative L2 over the sparse layers)}; a name measured in
    several runs (TopK / Quest at each RankedLSH budget) keeps each run's point, suffixed."""
    out = {}
    for path in paths:
        for name, r in json.load(open(path))["attention_error"]["backends"].items():
            sparse = [x for x in r["relative_l2"] if x > 0]
            key = name if name not in out else f"{name}@{r['fraction_read']:.3f}"
            out[key] = (r["fraction_read"] or 1.0, sum(sparse) / len(sparse))
    return out


def coverage_points(path) -> dict:
    """{back-end: (fraction, mass read)} averaged over the cells; TopK and oracle at each row's
    fraction."""
    rows = json.load(open(path))["rows"]
    acc = {}
    for r in rows:
        name = f"magicpig_k{r['config'].replace('x', 'l')}" if "x" in r["config"] else r["config"]
        for key, value in ((name, r["lsh"]), (f"topk@{name}", r["topk"]), (f"oracle@{name}", r["oracle"])):
            acc.setdefault(key, []).append((r["fraction"], value))
    return {k: (sum(f for f, _ in v) / len(v), sum(m for _, m in v) / len(v)) for k, v in acc.items()}


def ruler_points(paths) -> tuple[dict, float, int]:
    """({back-end: (mean fraction read, mean score)} over the cells where dense >= 20, dense's mean
    over those cells, the number of cells). A back-end without all of those cells (a partial run,
    or one of the cells where dense < 20 only) is left out, with a note, rather than averaged over
    fewer cells."""
    from pigjax.eval.harness import load_cells

    by = load_cells([p for p in paths if os.path.exists(p)])
    dense = {k: c["score"] for k, c in by.get("dense", {}).items()}
    keep = {k for k, s in dense.items() if s >= DENSE_FLOOR}
    out = {}
    for name, got in by.items():
        if not keep <= set(got):
            print(f"plot_frontier: RULER: {name} has {len(keep & set(got))} of the {len(keep)} cells; left out")
            continue
        cs = [got[k] for k in keep]
        fr = [c["fraction_read"] for c in cs if c["fraction_read"] is not None]
        out[name] = (sum(fr) / len(fr) if fr else 1.0, sum(c["score"] for c in cs) / len(cs))
    return out, sum(dense[k] for k in keep) / max(len(keep), 1), len(keep)


def perplexity_points(paths) -> dict:
    out = {}
    for p in paths:
        for name, r in json.load(open(p))["perplexity"].get("backends", {}).items():
            out[name] = (r["fraction_read"] or 1.0, r["perplexity"])
    return out


def main(_):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ruler, ruler_dense, ncells = ruler_points(_RULER.value)
    panels = [("attention rel. L2 error (lower is better)", error_points(_ERRORS.value), None),
              ("share of the middle's attention mass read", coverage_points(_COVERAGE.value), None),
              (f"RULER average, {ncells} cells with dense >= {DENSE_FLOOR:.0f}", ruler, ruler_dense),
              ("decode-mode perplexity, 8k tokens", perplexity_points(_PPL.value), None)]
    # A dense point (fraction 1) is drawn as a line.
    panels = [(t, pts, pts.pop("dense")[1] if "dense" in pts else line) for t, pts, line in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2))
    for ax, (title, points, dense_line) in zip(axes, panels):
        groups = {}
        for name, xy in points.items():
            groups.setdefault(family(name.split("@")[0]), []).append((xy, name))
        for fam, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([x for (x, _), _ in pts], [y for (_, y), _ in pts], "o-", label=fam, markersize=5)
        if dense_line is not None:
            ax.axhline(dense_line, color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of middle keys read")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: sampled-attention frontier", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    fig.savefig(_OUT.value, dpi=110)
    points = {title: {"dense": dense_line, "points": pts} for title, pts, dense_line in panels}
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
        json.dump(points, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
