"""Attention coverage of LSH sampling vs TopK and oracle sampling at the same budget (analysis).

  python scripts/eval_coverage.py                       # niah + fwe at 2k, 5 samples, K10L150/K10L170/K8L75
  python scripts/eval_coverage.py --tasks niah_single_2 --contexts 4096 --configs 10x150
  python scripts/eval_coverage.py --configs 10x150 --ranked rankedlsh_2pct,rankedlsh,rankedlsh_5pct
  python scripts/eval_coverage.py --configs= --quest 0.033,0.1,0.25 --tasks fwe,niah_single_2

Each RULER prompt is teacher-forced with its reference answer (RULER's outputs joined by ", ");
the answer tokens are the decode queries. Per sparse layer: the expected share of the middle's
attention mass whose keys are read (see pigjax/eval/coverage.py), averaged over layers, queries,
heads and samples. RankedLSH back-ends (--ranked, harness names) are estimated over --draws random
projections each, at their measured fraction of keys read, with TopK and oracle at that fraction.
Quest (--quest, fractions of the middle; pigjax.Quest with --page) is evaluated on every layer: its
share, the best share as many whole pages could hold, TopK at Quest's count of keys read, and how
often the largest-weight key is read; the means are over Quest's default sparse layers (all but 0
and n/2) and over layers 2.. (`quest_dense01`), with a per-layer table.
Writes <out>.json and <out>.md.
"""

import sys

import numpy as np
from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint dir (default: embedded SmolLM2)")
_TASKS = flags.DEFINE_list("tasks", "niah_single_1,niah_single_2,niah_multikey_1,fwe", "RULER tasks")
_CONTEXTS = flags.DEFINE_list("contexts", "2048", "context lengths in tokens")
_SAMPLES = flags.DEFINE_integer("samples", 5, "samples per (task, context)")
_SEED = flags.DEFINE_integer("seed", 42, "RULER sample seed")
_CONFIGS = flags.DEFINE_list("configs", "10x150,10x170,8x75", "LSH configurations KxL")
_RANKED = flags.DEFINE_list("ranked", [], "RankedLSH back-ends (pigjax.eval.harness names, e.g. rankedlsh)")
_DRAWS = flags.DEFINE_integer("draws", 4, "random projections per RankedLSH estimate")
_QUEST = flags.DEFINE_list("quest", [], "fractions of the middle for pigjax.Quest coverage (e.g. 0.033,0.1)")
_PAGE = flags.DEFINE_integer("page", 16, "Quest's page size")
_SINK = flags.DEFINE_integer("sink", 4, "exact sink tokens")
_LOCAL = flags.DEFINE_integer("local", 64, "exact local window")
_OUT = flags.DEFINE_string("out", "docs/results/coverage", "output stem (.json and .md)")

_COLUMNS = ("fraction", "lsh", "topk", "topk_pooled", "oracle", "top1_weight", "top1_u")
_QUEST_COLUMNS = ("fraction", "quest", "best_pages", "topk", "top1_weight", "top1_read")


def _parse(config: str) -> tuple[int, int]:
    try:
        K, L = (int(x) for x in config.lower().split("x"))
    except ValueError:
        raise ValueError(f"--configs entries are KxL (e.g. 10x150), got {config!r}") from None
    if K < 1 or L < 2:
        raise ValueError(f"--configs {config!r}: need K >= 1 and L >= 2")
    return K, L


def markdown(result: dict) -> str:
    lines = ["# Attention coverage at equal budget", "",
             "Share of the middle's exact attention mass whose keys are read, in expectation: MagicPIG's "
             "LSH sampling (u over the centred keys, >= 2 collisions), TopK and oracle sampling at the "
             "same fraction of the middle; `TopK pooled` = as many keys per query as TopK reads, spread over the query's "
             "heads by weight (the most any per-head budget could read); `top1 u` = LSH probability of reading the key with the largest "
             "weight. RankedLSH rows (K×L column = its name): the share read by its top set and sample (T ∪ S), "
             "at its measured fraction of keys read, over random projections. Mean over sparse layers, "
             "answer queries, heads and samples.", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores; commit {(result['commit'] or '?')[:10]}; "
             f"{result['samples']} samples a cell; sink {result['sink']}, local {result['local']}.", "",
             "| task | context | K×L | fraction | LSH | TopK | TopK pooled | oracle | top-1 weight | top-1 u |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['task']} | {row['context']} | {row['config']} | "
                     + " | ".join(f"{row[c]:.3f}" for c in _COLUMNS) + " |")
    if result.get("quest_rows"):
        lines += ["", f"## Quest (page {result['page']})", "",
                  "Share of the middle's attention mass read by Quest's pages; `best pages` = the most mass as "
                  "many pages could hold; TopK at Quest's own count of keys read per head; `top-1 read` = how "
                  "often the largest-weight key is read. Layers: Quest's default sparse layers "
                  f"{result['quest_sparse']} or `quest_dense01`'s (2..).", "",
                  "| task | context | fraction given | layers | pages | fraction read | Quest | best pages | TopK "
                  "| top-1 weight | top-1 read |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["quest_rows"]:
            for name, key in (("default", "mean"), ("2..", "mean_dense01")):
                x = row[key]
                lines.append(f"| {row['task']} | {row['context']} | {row['given']} | {name} | {row['pages']} | "
                             + " | ".join(f"{x[c]:.3f}" for c in _QUEST_COLUMNS) + " |")
        lines += ["", "Per layer: Quest / best pages / TopK (mean over answer queries, heads, samples).", "",
                  "| layer | " + " | ".join(f"{r['task']} {r['context']} f={r['given']}" for r in result["quest_rows"])
                  + " |", "|---:|" + "---:|" * len(result["quest_rows"])]
        for i, layer in enumerate(result["quest_rows"][0]["layers"]):
            lines.append(f"| {layer['layer']} | " + " | ".join(
                "{quest:.2f} / {best_pages:.2f} / {topk:.2f}".format(**r["layers"][i]) for r in result["quest_rows"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import pigjax
    from pigjax.eval import ruler
    from pigjax.eval.coverage import coverage
    from pigjax.eval.harness import _git_commit, make_backend
    from pigjax.eval.output import write_json_and_markdown
    from pigjax.machine import describe

    try:
        configs = [_parse(c) for c in _CONFIGS.value]
        ranked = [(name, make_backend(name)) for name in _RANKED.value]
        if any(not isinstance(b, pigjax.RankedLSH) for _, b in ranked):
            raise ValueError(f"--ranked takes RankedLSH back-ends, got {_RANKED.value}")
        contexts = [int(c) for c in _CONTEXTS.value]
        model = pigjax.load(_CHECKPOINT.value or pigjax.default_checkpoint())
        if model.tokenizer is None:
            raise ValueError("eval_coverage needs the checkpoint's tokenizer; this checkpoint has none")
        n_layers = model.config.num_hidden_layers
        sparse = pigjax.MagicPIG().sparse_layers(n_layers)
        quest = [float(f) for f in _QUEST.value]
        quest_sparse = pigjax.Quest(fraction=0.5).dense_layer_set(n_layers)
        quest_sparse = [i for i in range(n_layers) if i not in quest_sparse]
        rows, quest_rows = [], []
        for task in _TASKS.value:
            for context in contexts:
                per = {c: [] for c in configs}
                per.update({name: [] for name, _ in ranked})
                per.update({("quest", f): [] for f in quest})
                for s in ruler.make_samples(model.tokenizer, task, context, _SAMPLES.value, seed=_SEED.value):
                    answer = model.tokenizer.encode(" " + ", ".join(s.outputs), add_special_tokens=False)
                    tokens = np.asarray(s.prompt_ids + list(answer))
                    got = coverage(model, tokens, s.length, configs=configs, sink=_SINK.value,
                                   local=_LOCAL.value, sparse_layers=sparse, ranked=ranked, draws=_DRAWS.value,
                                   quest=quest, page=_PAGE.value, quest_layers=range(n_layers))
                    for c in per:
                        per[c] += got[c]
                for c, layers in per.items():
                    if isinstance(c, tuple) and c[0] == "quest":
                        by_layer = [{"layer": i, **{k: float(np.mean([x[k] for x in layers if x["layer"] == i]))
                                                    for k in _QUEST_COLUMNS + ("pages",)}} for i in range(n_layers)]
                        mean = lambda keep: {k: float(np.mean([x[k] for x in by_layer if x["layer"] in keep]))  # noqa: E731
                                             for k in _QUEST_COLUMNS + ("pages",)}
                        quest_rows.append({"task": task, "context": context, "given": c[1],
                                           "pages": round(mean(quest_sparse)["pages"], 1), "mean": mean(quest_sparse),
                                           "mean_dense01": mean(range(2, n_layers)), "layers": by_layer})
                        continue
                    rows.append({"task": task, "context": context, "config": c if isinstance(c, str) else f"{c[0]}x{c[1]}",
                                 **{c: float(np.mean([x[c] for x in layers])) for c in _COLUMNS}})
                print(f"{task} {context} done", file=sys.stderr, flush=True)
    except ValueError as e:  # PigjaxError is a ValueError
        print(f"eval_coverage: error: {e}", file=sys.stderr)
        return 1
    result = {"machine": describe(), "commit": _git_commit(), "samples": _SAMPLES.value, "sink": _SINK.value,
              "local": _LOCAL.value, "sparse_layers": list(sparse), "draws": _DRAWS.value,
              "ranked": {name: repr(b) for name, b in ranked}, "rows": rows,
              "page": _PAGE.value, "quest_sparse": quest_sparse if quest else None, "quest_rows": quest_rows}
    write_json_and_markdown(_OUT.value, result, markdown(result))
    return 0


if __name__ == "__main__":
    app.run(main)
