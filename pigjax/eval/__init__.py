"""Evaluation: RULER's synthetic long-context tasks (`ruler`) and long natural text (`text`)."""

from pigjax.eval.ruler import (
    TASKS, Sample, make_sample, make_samples, postprocess, score, string_match_all, string_match_part,
)
from pigjax.eval.text import long_text

__all__ = [
    "TASKS", "Sample", "long_text", "make_sample", "make_samples", "postprocess", "score", "string_match_all",
    "string_match_part",
]
