"""What haystacks are made of: wonderwords' word lists, common words, Paul Graham's essays split
into sentences, and the zeta distribution of fwe."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources


from pigjax import assets
from pigjax.errors import PigjaxError
from pigjax.eval.ruler.tasks import _SENTENCE_END


@lru_cache(maxsize=None)
def _wonderwords(name: str) -> tuple[str, ...]:
    try:
        text = resources.files("wonderwords").joinpath("assets", name).read_text()
    except ModuleNotFoundError:
        raise PigjaxError("RULER's word lists need the PyPI package wonderwords: pip install wonderwords") from None
    return tuple(w.rstrip() for w in text.splitlines())


@lru_cache(maxsize=None)
def _adjs_nouns() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(_wonderwords("adjectivelist.txt")))), tuple(sorted(set(_wonderwords("nounlist.txt"))))


@lru_cache(maxsize=None)
def _common_words() -> tuple[str, ...]:
    return tuple(sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt")
                            + _wonderwords("verblist.txt"))))


@lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
    """The essays as one stream of words (RULER: whitespace runs collapsed, split on spaces)."""
    with open(assets.eval_data_path("PaulGrahamEssays.json")) as f:
        text = json.load(f)["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after [.!?] + whitespace when an upper-case letter, a digit, a
    quote or a bracket follows (stands in for nltk's punkt, whose data is not shipped)."""
    text = text.strip()
    return _SENTENCE_END.split(text) if text else []


def _zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (Euler-Maclaurin after 100 terms; exact pi^2/6 at 2)."""
    if alpha == 2.0:
        return math.pi ** 2 / 6
    n = 100
    head = sum(k ** -alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12
