"""Prompt by prompt, where each back-end's RULER answers differ from dense's, from eval_ruler.py JSONs:

  python scripts/ruler_agreement.py --ruler docs/results/ruler/ruler.json,docs/results/ruler_ranked_2pct/ruler.json

A cell's score hides which prompts changed: two back-ends one prompt apart may differ from dense
on one prompt or on nine. For every back-end this prints, over the (task, context) cells it shares
with dense (the same prompts: same seed and samples), the prompts it gets right that dense gets
wrong (gained) and those dense gets right that it gets wrong (lost). The first JSON must hold
dense; runs are combined as `pigjax.eval.harness.load_cells` does (a back-end measured again on
the same cells, e.g. TopK at another budget, is suffixed with the run's folder).
"""

import sys

from absl import app, flags

_RULER = flags.DEFINE_list("ruler", ["docs/results/ruler/ruler.json"], "eval_ruler.py JSONs (the first holds dense)")
_TASKS = flags.DEFINE_list("tasks", [], "only these tasks (default: all)")


def main(_):
    from pigjax.errors import PigjaxError
    from pigjax.eval.harness import load_cells

    try:
        by = {name: {k: [p["score"] for p in c["predictions"]] for k, c in cells.items()}
              for name, cells in load_cells(_RULER.value).items()}
    except PigjaxError as e:
        print(f"ruler_agreement: error: {e}", file=sys.stderr)
        return 1
    if "dense" not in by:
        raise app.UsageError("the first --ruler JSON holds no dense back-end")
    dense = by.pop("dense")
    print("| back-end | cells | prompts | gained vs dense | lost vs dense | where (task context: +gained -lost) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, cells in by.items():
        shared = [k for k in cells if k in dense and (not _TASKS.value or k[0] in _TASKS.value)
                  and len(cells[k]) == len(dense[k])]
        gained = lost = prompts = 0
        where = []
        for k in sorted(shared):
            # RULER scores are 0-100 per prompt (a share of the expected strings found)
            g = sum(max(0.0, s - d) for s, d in zip(cells[k], dense[k])) / 100
            lo = sum(max(0.0, d - s) for s, d in zip(cells[k], dense[k])) / 100
            gained, lost, prompts = gained + g, lost + lo, prompts + len(cells[k])
            if g or lo:
                where.append(f"{k[0]} {k[1]}: +{g:.1f} -{lo:.1f}")
        print(f"| {name} | {len(shared)} | {prompts} | {gained:.1f} | {lost:.1f} | {'; '.join(where)} |")


if __name__ == "__main__":
    app.run(main)
