"""Run RULER over tasks x contexts x attention back-ends with `pigjax.generate`; write JSON and a
Markdown table (used by scripts/eval_ruler.py).

Back-end names map to objects of the top-level `pigjax` package:

  dense             pigjax.Dense()
  magicpig_k10l150  pigjax.MagicPIG(K=10, L=150)
  magicpig_k10l170  pigjax.MagicPIG(K=10, L=170)
  magicpig_k8l75    pigjax.MagicPIG(K=8, L=75)
  rankedlsh         pigjax.RankedLSH() (defaults: about 3.3% read)
  rankedlsh_2pct    pigjax.RankedLSH(top=0.006) (about 2%)
  rankedlsh_5pct    pigjax.RankedLSH(top=0.035) (about 5%)
  topk              pigjax.TopK(fraction=f)
  quest             pigjax.Quest(page=16, fraction=f)
  quest_dense01     pigjax.Quest(page=16, fraction=f, dense_layers=(0, 1)): Quest's public code keeps
                    layers 0 and 1 dense (pigjax's default is MagicPIG's (0, n_layers // 2))
  quest_p8          pigjax.Quest(page=8, fraction=f)   (analysis: Quest with smaller pages at the same
  quest_p4          pigjax.Quest(page=4, fraction=f)    budget; Quest's public default is 16)
  oracle            pigjax.Oracle(fraction=f)

For topk/quest/oracle, `f` is a given number, or with fraction="auto" the
`Generation.stats["fraction_read"]` that the first MagicPIG back-end of the list measured on the
same batch of prompts (or, without one, the first RankedLSH back-end): those back-ends then run after it, at equal measured fraction.
`topk:rankedlsh_5pct` (any fraction back-end, a colon, an engine back-end of the same list) names
the reference explicitly, so one run can hold TopK at the fractions of several budgets. Each batch
is prefilled once for all back-ends (`pigjax.generate` with a list: prefill is dense for all; the
fraction back-ends are deferred entries of that list).
Decoding is greedy; each generate call's stats are recorded.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from pigjax.errors import PigjaxError
from pigjax.eval import ruler

BACKENDS: dict[str, tuple[str, dict]] = {
    "dense": ("Dense", {}),
    "magicpig_k10l150": ("MagicPIG", {"K": 10, "L": 150}),
    "magicpig_k10l170": ("MagicPIG", {"K": 10, "L": 170}),
    "magicpig_k8l75": ("MagicPIG", {"K": 8, "L": 75}),
    "rankedlsh": ("RankedLSH", {}),
    "rankedlsh_2pct": ("RankedLSH", {"top": 0.006}),
    "rankedlsh_5pct": ("RankedLSH", {"top": 0.035}),
    "topk": ("TopK", {}),
    "quest": ("Quest", {"page": 16}),
    "quest_dense01": ("Quest", {"page": 16, "dense_layers": (0, 1)}),
    "quest_p8": ("Quest", {"page": 8}),
    "quest_p4": ("Quest", {"page": 4}),
    "oracle": ("Oracle", {}),
}
FRACTION_BACKENDS = ("topk", "quest", "quest_dense01", "quest_p8", "quest_p4", "oracle")
ENGINE_PREFIXES = ("magicpig", "rankedlsh")  # back-ends whose measured fraction can be the reference
DENSE_FLOOR = 20.0  # averages are taken over the cells where dense scores at least this


def split_name(name: str) -> tuple[str, str | None]:
    """'topk:rankedlsh_5pct' -> ('topk', 'rankedlsh_5pct'): a fraction back-end and the engine
    back-end whose measured fraction it takes; 'topk' -> ('topk', None)."""
    base, _, ref = name.partition(":")
    return base, ref or None


def takes_fraction(name: str) -> bool:
    """Whether the back-end runs at a given or measured fraction (topk/quest/oracle, with or
    without an explicit reference)."""
    return split_name(name)[0] in FRACTION_BACKENDS


def _backend_class(name: str):
    import pigjax

    base, ref = split_name(name)
    if ref is not None and base not in FRACTION_BACKENDS:
        raise PigjaxError(f"{name!r}: only {', '.join(FRACTION_BACKENDS)} take a ':reference' back-end")
    if ref is not None and (ref not in BACKENDS or not ref.startswith(ENGINE_PREFIXES)):
        raise PigjaxError(f"{name!r}: the reference must be a MagicPIG or RankedLSH back-end, got {ref!r}")
    name = base
    if name not in BACKENDS:
        raise PigjaxError(f"unknown attention back-end {name!r}; known: {', '.join(BACKENDS)}")
    cls_name = BACKENDS[name][0]
    cls = getattr(pigjax, cls_name, None)
    if cls is None:
        raise PigjaxError(f"attention back-end {name!r} is not available: this pigjax has no pigjax.{cls_name} yet")
    return cls


def make_backend(name: str, fraction: float | None = None):
    """The attention object for a back-end name (`fraction` is needed by topk/quest/oracle)."""
    cls = _backend_class(name)
    kwargs = dict(BACKENDS[split_name(name)[0]][1])
    if takes_fraction(name):
        if fraction is None or not 0 < fraction <= 1:
            raise PigjaxError(f"back-end {name!r} needs a fraction in (0, 1], got {fraction!r}")
        kwargs["fraction"] = float(fraction)
    return cls(**kwargs)


def check_backends(names: Sequence[str], fraction) -> None:
    """Fail early (before any generation) on unknown/unavailable back-ends or a missing fraction."""
    if not names:
        raise PigjaxError("no attention back-end given")
    if len(set(names)) != len(names):
        raise PigjaxError(f"a back-end is listed twice: {', '.join(names)}")
    for name in names:
        _backend_class(name)
        ref = split_name(name)[1]
        if ref is not None and fraction != "auto":
            raise PigjaxError(f"{name!r} takes {ref}'s measured fraction, which a given fraction ({fraction}) contradicts")
        if ref is not None and ref not in names:
            raise PigjaxError(f"{name!r} takes {ref}'s measured fraction: add {ref} to the list")
    if fraction == "auto" and any(takes_fraction(n) for n in names) and reference_backend(names) is None:
        raise PigjaxError("fraction=auto takes topk/quest/oracle's fraction from a MagicPIG (or RankedLSH) back-end; "
                          "add one (e.g. magicpig_k10l150) to the list or give a number")


def reference_backend(names: Sequence[str], name: str | None = None) -> str | None:
    """The back-end whose measured fraction topk/quest/oracle (or `name`, when it names its own
    with ':') take with fraction="auto": the first MagicPIG one, else the first RankedLSH one,
    else None."""
    if name is not None and split_name(name)[1] is not None:
        return split_name(name)[1]
    for prefix in ENGINE_PREFIXES:
        found = next((n for n in names if n.startswith(prefix)), None)
        if found is not None:
            return found
    return None


def run_at_fractions(names: Sequence[str], run_one: Callable[[str, object], dict], fraction: float | None = None) -> dict:
    """{name: run_one(name, back-end)} for each name: the engine back-ends first, then
    topk/quest/oracle at `fraction`, or (None) at the "fraction_read" that run_one returned for
    their reference back-end (`reference_backend`). The rule RULER applies per batch, for
    evaluations that run each back-end once (eval_decode_quality.py)."""
    results = {}
    for name in [n for n in names if not takes_fraction(n)] + [n for n in names if takes_fraction(n)]:
        f = None
        if takes_fraction(name):
            f = fraction if fraction is not None else results[reference_backend(names, name)]["fraction_read"]
        results[name] = run_one(name, make_backend(name, f))
    return results


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, bool, type(None))):
        return x
    if isinstance(x, int):
        return int(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def run_ruler(model, *, tasks: Sequence[str] = ruler.TASKS, contexts: Sequence[int] = (2048, 4096, 8192),
              samples: int = 20, attention: Sequence[str] = ("dense",), fraction="auto", seed: int = ruler.DEFAULT_SEED,
              batch: int = 4, format: str = "chat", out_dir=None, progress: bool = True, resume: bool = False,
              config: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Generate and score every (back-end, task, context) cell; write ruler.json/ruler.md to out_dir
    after each cell (so partial runs keep what they did). With `resume`, the (task, context) cells
    of out_dir/ruler.json that have every back-end, made with the same samples, seed, batch and
    format, are kept and not run again. Returns the results dict."""
    import pigjax

    if model.tokenizer is None:
        raise PigjaxError("RULER needs the checkpoint's tokenizer; this checkpoint has none")
    for t in tasks:
        if t not in ruler.TASK_SPECS:
            raise PigjaxError(f"unknown RULER task {t!r}; known: {', '.join(ruler.TASKS)}")
    if fraction != "auto":
        fraction = float(fraction)
    check_backends(attention, fraction)
    if batch < 1 or samples < 1:
        raise PigjaxError("batch and samples must be positive")
    max_ctx = model.config.max_position_embeddings
    for c in contexts:
        if c > max_ctx:
            raise PigjaxError(f"context {c} exceeds the model's context ({max_ctx})")

    cells = [(t, int(c)) for c in contexts for t in tasks]
    t0 = time.perf_counter()
    data = {cell: ruler.make_samples(model.tokenizer, cell[0], cell[1], samples, seed=seed, format=format)
            for cell in cells}
    build_seconds = time.perf_counter() - t0
    log(f"built {samples * len(cells)} samples in {build_seconds:.1f} s")

    order = [n for n in attention if not takes_fraction(n)] + [n for n in attention if takes_fraction(n)]
    reference = reference_backend(attention)
    results = {
        "config": {
            "tasks": list(tasks), "contexts": [int(c) for c in contexts], "samples": samples, "seed": seed,
            "attention": list(attention), "fraction": fraction, "fraction_reference": reference
            if fraction == "auto" else None, "batch": batch, "format": format, "decoding": "greedy",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git_commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "sample_build_seconds": build_seconds, **(config or {}),
        },
        "cells": [],
    }

    done, origin = _resumable(out_dir, results["config"], order) if resume else ({}, None)
    if done:
        results["config"]["resumed_from"] = origin
        results["cells"] = [c for t, c_ in cells for c in done.get((t, c_), [])]
        log(f"resuming: {len(results['cells']) // len(order)} cells kept from {out_dir}/ruler.json")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order) * (len(cells) - len(done)) * samples, unit="sample", desc="ruler")
    try:
        for task, ctx in cells:
            if (task, ctx) in done:
                continue
            if bar is not None:
                bar.set_postfix_str(f"{task} {ctx}")
            cell_results = _run_cell(pigjax, model, order, fraction, task, ctx, data[(task, ctx)], batch,
                                     lambda n: bar.update(n) if bar is not None else None)
            results["cells"].extend(cell_results)
            if out_dir is not None:
                write_results(results, out_dir)
    finally:
        if bar is not None:
            bar.close()
    return results


def _resumable(out_dir, config: dict, names) -> tuple[dict, dict | None]:
    """({(task, context): cells of every back-end in `names`}, that run's commit and date) from
    out_dir/ruler.json, which must have used the same samples, seed, batch and format."""
    path = Path(out_dir) / "ruler.json" if out_dir is not None else None
    if path is None or not path.exists():
        return {}, None
    try:
        old = json.loads(path.read_text())
        same = all(old["config"].get(k) == config[k] for k in ("samples", "seed", "batch", "format"))
    except (ValueError, KeyError, TypeError) as e:
        raise PigjaxError(f"cannot resume from {path}: {e}") from None
    if not same:
        raise PigjaxError(f"cannot resume from {path}: it was made with other samples/seed/batch/format")
    by = {}
    for c in old["cells"]:
        by.setdefault((c["task"], c["context"]), {})[c["attention"]] = c
    done = {key: [found[n] for n in names] for key, found in by.items() if all(n in found for n in names)}
    return done, {k: old["config"].get(k) for k in ("commit", "date")}


def _run_cell(pigjax, model, names, fraction, task, ctx, samples, batch, advance) -> list[dict]:
    """All back-ends on one (task, context) cell, each batch of prompts prefilled once for all of
    them. topk/quest/oracle come last, deferred: they run at the fraction that the reference
    MagicPIG back-end measured on that batch (or at the given one)."""
    spec = ruler.TASK_SPECS[task]
    order = sorted(range(len(samples)), key=lambda i: samples[i].length)  # similar lengths share a batch
    plain = [n for n in names if not takes_fraction(n)]
    by_fraction = [n for n in names if takes_fraction(n)]
    acc = {n: {"texts": {}, "reasons": {}, "calls": [], "seconds": 0.0, "fractions": []} for n in names}

    def fraction_of(gens, name) -> float:
        if fraction != "auto":
            return round(float(fraction), 6)
        ref = reference_backend(names, name)
        f = gens[plain.index(ref)].stats.get("fraction_read")
        if f is None:
            raise PigjaxError(f"{ref} reported no fraction_read in its stats; give --fraction")
        return round(float(f), 6)

    for lo in range(0, len(order), batch):
        rows = order[lo: lo + batch]
        backends = [make_backend(n) for n in plain] + [
            (lambda gens, n=n: make_backend(n, fraction_of(gens, n))) for n in by_fraction]
        start = time.perf_counter()
        gens = pigjax.generate(model, [samples[i].prompt_ids for i in rows], max_new_tokens=spec.tokens_to_generate,
                               temperature=0.0, attention=backends)
        shared = (time.perf_counter() - start) / len(gens)  # the shared prefill, split evenly
        for name, gen in zip(plain + by_fraction, gens):
            a = acc[name]
            for r, i in enumerate(rows):
                a["texts"][i], a["reasons"][i] = gen.texts[r], gen.finish_reasons[r]
            a["calls"].append({"rows": [samples[i].index for i in rows], **_jsonable(gen.stats)})
            a["seconds"] += shared
            if name in by_fraction:
                a["fractions"].append((len(rows), fraction_of(gens, name)))
            advance(len(rows))
    return [_cell(name, acc[name], task, ctx, samples) for name in names]


def _cell(name, a, task, ctx, samples) -> dict:
    preds = [a["texts"][i] for i in range(len(samples))]
    cell_score, per_sample = ruler.score(task, preds, [s.outputs for s in samples])
    calls = a["calls"]
    weights = [len(c["rows"]) for c in calls]
    fr = [c.get("fraction_read") for c in calls]
    fraction_read = (sum(w * x for w, x in zip(weights, fr)) / sum(weights)) if all(x is not None for x in fr) else None
    used = a["fractions"]
    fraction_used = sum(w * f for w, f in used) / sum(w for w, _ in used) if used else None
    compile_seconds = sum(c.get("compile_seconds", 0.0) for c in calls)
    seconds = a["seconds"]
    return {
        "attention": name, "backend": repr(make_backend(name, fraction_used)), "task": task, "context": ctx,
        "score": cell_score, "samples": len(samples), "fraction_read": fraction_read, "fraction_used": fraction_used,
        "mean_prompt_tokens": sum(s.length for s in samples) / len(samples),
        "seconds": seconds, "seconds_per_sample": seconds / len(samples),
        "seconds_per_sample_excluding_compile": (seconds - compile_seconds) / len(samples),
        "calls": calls,
        "predictions": [{"index": s.index, "prompt_tokens": s.length, "haystack": s.haystack, "outputs": s.outputs,
                         "prediction": preds[i], "finish_reason": reasons_i, "score": per_sample[i]}
                        for i, (s, reasons_i) in enumerate(zip(samples, [a["reasons"][j] for j in range(len(samples))]))],
    }


def write_results(results: dict, out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "ruler.json", out / "ruler.md"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    tmp.replace(js)
    md.write_text(markdown(results))
    return js, md


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(results: dict) -> str:
    """Table task x context x back-end, averages over cells where dense >= 20, and run stats."""
    cfg = results["config"]
    names = [n for n in cfg["attention"] if any(c["attention"] == n for c in results["cells"])]
    by = {(c["attention"], c["task"], c["context"]): c for c in results["cells"]}
    keys = [(t, c) for t in cfg["tasks"] for c in cfg["contexts"]]
    fmt = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [
        "# RULER",
        "",
        f"Model: {cfg.get('checkpoint', '?')}; format {cfg['format']}; {cfg['samples']} samples a cell; seed "
        f"{cfg['seed']}; greedy; RULER scoring (string_match_all, x100). {cfg['date']}, commit "
        f"{(cfg.get('commit') or '?')[:10]}, {cfg.get('machine', '')}.",
        "",
        "| task | context | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for t, c in keys:
        row = [fmt(by[(n, t, c)]["score"]) if (n, t, c) in by else "–" for n in names]
        lines.append(f"| {t} | {c} | " + " | ".join(row) + " |")
    has_dense = "dense" in names
    eligible = [(t, c) for t, c in keys if not has_dense or (
        ("dense", t, c) in by and by[("dense", t, c)]["score"] >= DENSE_FLOOR)]
    label = f"**average** (dense ≥ {DENSE_FLOOR:.0f}: {len(eligible)} cells)" if has_dense else "**average** (all cells)"
    avg = [_mean([by[(n, t, c)]["score"] for t, c in eligible if (n, t, c) in by]) for n in names]
    lines.append(f"| {label} | | " + " | ".join(fmt(a) for a in avg) + " |")
    lines += ["", "| back-end | fraction given | mean fraction read | s / sample | s / sample (no compile) | "
              "decode tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for n in names:
        cs = [c for c in results["cells"] if c["attention"] == n]
        given = _mean([c.get("fraction_used") for c in cs])
        tok_s = _mean([call.get("decode_tokens_per_second") for c in cs for call in c["calls"]])
        row = [f"{given:.4f}" if given is not None else "–",
               f"{_mean([c['fraction_read'] for c in cs]):.4f}" if _mean([c["fraction_read"] for c in cs]) is not None
               else "–",
               f"{_mean([c['seconds_per_sample'] for c in cs]):.2f}",
               f"{_mean([c['seconds_per_sample_excluding_compile'] for c in cs]):.2f}",
               fmt(tok_s)]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load_cells(paths: Sequence) -> dict[str, dict[tuple[str, int], dict]]:
    """{back-end: {(task, context): cell}} from several ruler.json files. Runs that measured one
    back-end on different cells are merged; a back-end measured again on a cell it already has (TopK
    at another budget) is kept apart under `name@<the run's folder>`."""
    by: dict[str, dict] = {}
    for path in paths:
        run: dict[str, dict] = {}
        try:
            for c in json.loads(Path(path).read_text())["cells"]:
                run.setdefault(c["attention"], {})[(c["task"], c["context"])] = c
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PigjaxError(f"cannot read RULER results {path}: {e!r}") from None
        for name, cells in run.items():
            if name in by and by[name].keys() & cells.keys():
                name = f"{name}@{Path(path).parent.name}"
            by.setdefault(name, {}).update(cells)
    return by


__all__ = ["BACKENDS", "FRACTION_BACKENDS", "check_backends", "load_cells", "make_backend", "markdown", "run_at_fractions",
           "run_ruler", "split_name", "takes_fraction", "write_results"]
