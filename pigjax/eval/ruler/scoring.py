"""RULER's scoring (its eval/evaluate.py and eval/synthetic/constants.py)."""

from __future__ import annotations

import re
from typing import Sequence


from pigjax.errors import PigjaxError
from pigjax.eval.ruler.tasks import TASK_SPECS, TASKS


def postprocess(prediction: str | None) -> str:
    """RULER's postprocessing: strip, control characters -> newlines, strip."""
    if prediction is None:
        return ""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all_per_sample(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    return [100.0 * sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)]


def string_match_part_per_sample(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> list[float]:
    return [100.0 * max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs)]


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive) x 100, rounded to 2."""
    return round(sum(string_match_all_per_sample(preds, refs)) / len(preds), 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of whether any reference is found (case-insensitive) x 100, rounded to 2."""
    return round(sum(string_match_part_per_sample(preds, refs)) / len(preds), 2)


_METRICS = {"string_match_all": (string_match_all, string_match_all_per_sample),
            "string_match_part": (string_match_part, string_match_part_per_sample)}


def score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """RULER's score of raw predictions for `task`: (cell score, per-sample scores), both x 100."""
    if task not in TASK_SPECS:
        raise PigjaxError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if len(predictions) != len(references) or not predictions:
        raise PigjaxError("score needs as many predictions as references, at least one")
    cell, per_sample = _METRICS[TASK_SPECS[task].metric]
    preds = [postprocess(p) for p in predictions]
    return cell(preds, references), per_sample(preds, references)
