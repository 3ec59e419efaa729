"""Prompts fitted to a token budget: rendering (chat or base), the haystack-size search, and
`make_sample(s)`."""

from __future__ import annotations

import hashlib
import math
import random
from typing import Callable


from pigjax.errors import PigjaxError
from pigjax.eval.ruler.builders import _build_cwe, _build_fwe, _build_niah, _build_vt, _vt_text
from pigjax.eval.ruler.haystacks import _common_words, _essay_words, _zeta
from pigjax.eval.ruler.tasks import DEFAULT_SEED, FORMATS, TASK_SPECS, TASKS, Sample, Task


def _render(tokenizer, fmt: str, text: str, prefix: str) -> tuple[str, list[int]]:
    if fmt == "chat":
        head = tokenizer.apply_chat_template([{"role": "user", "content": text.lstrip()}],
                                             add_generation_prompt=True, tokenize=False)
        prompt = head + prefix.lstrip()
        return prompt, list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if fmt == "base":
        prompt = text + prefix
        return prompt, list(tokenizer(prompt)["input_ids"])
    raise PigjaxError(f"format must be one of {FORMATS}, got {fmt!r}")


def _fit(count: Callable[[int], int], budget: int, lo: int, hi: int, guess: int | None = None) -> int:
    """Largest n in [lo, hi] with count(n) <= budget, for a count that grows about linearly with n:
    secant steps from the measured points, then bisection. Raises if `lo` does not fit."""
    seen: dict[int, int] = {}

    def c(n):
        if n not in seen:
            seen[n] = count(n)
        return seen[n]

    if c(lo) > budget:
        raise PigjaxError(f"even the smallest sample ({c(lo)} tokens) exceeds the budget of {budget} tokens")
    ok, bad = lo, None  # c(ok) <= budget < c(bad)
    x = min(max(guess if guess is not None else lo + 8, lo + 1), hi)
    prev = lo
    for step in range(100):
        if ok >= hi or (bad is not None and bad - ok <= 1):
            break
        cx = c(x)
        if cx <= budget:
            ok = max(ok, x)
        else:
            bad = x if bad is None else min(bad, x)
        if ok >= hi or (bad is not None and bad - ok <= 1):
            break
        top = hi if bad is None else bad - 1
        slope = (cx - c(prev)) / (x - prev) if x != prev else 0.0
        if step < 8 and slope > 0:  # secant from the best fitting point
            nxt = ok + int((budget - c(ok)) // slope)
        elif bad is not None:
            nxt = (ok + bad) // 2
        else:
            nxt = ok + max(1, (ok - lo) // 4)
        prev, x = x, min(max(nxt, ok + 1), top)
    return ok


_ICL_CONTEXT, _ICL_STEP = 500, 5  # RULER's one-shot vt example: fitted to 500 tokens in steps of 5 lines
_icl_noise: dict[int, tuple[object, int]] = {}


def _vt_icl_lines(tokenizer, task: Task) -> int:
    """Noise lines of vt's one-shot example for this tokenizer (found once, as RULER does)."""
    hit = _icl_noise.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        def count(m):
            text, prefix, names = _vt_text(task, random.Random(DEFAULT_SEED), _ICL_STEP * m, 3)
            return len(tokenizer(text + prefix + " " + " ".join(names), add_special_tokens=False)["input_ids"])

        m = _fit(count, _ICL_CONTEXT - task.tokens_to_generate, 1, 200, guess=15)
        hit = _icl_noise[id(tokenizer)] = (tokenizer, _ICL_STEP * m)
    return hit[1]


_BUILDERS = {"niah": _build_niah, "variable_tracking": _build_vt, "common_words_extraction": _build_cwe,
             "freq_words_extraction": _build_fwe}


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def make_sample(tokenizer, task: str, context: int, index: int, *, seed: int = DEFAULT_SEED,
                format: str = "chat") -> Sample:
    """Sample `index` of `task` fitted to `context` tokens: len(prompt_ids) <= context - tokens_to_generate.

    Deterministic in (task, context, index, seed, format) for a given tokenizer.
    """
    if task not in TASK_SPECS:
        raise PigjaxError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if format not in FORMATS:
        raise PigjaxError(f"format must be one of {FORMATS}, got {format!r}")
    spec = TASK_SPECS[task]
    budget = int(context) - spec.tokens_to_generate
    sample_seed = _seed_of("ruler", task, context, index, seed)
    extra = {}
    if spec.kind == "variable_tracking":
        extra = dict(icl_lines=_vt_icl_lines(tokenizer, spec), icl_seed=_seed_of("ruler-icl", task, context, index, seed))

    def build(n):
        return _BUILDERS[spec.kind](spec, random.Random(sample_seed), n, int(context), **extra)

    def count(n):
        text, prefix, _ = build(n)
        return len(_render(tokenizer, format, text, prefix)[1])

    a = spec.args
    if spec.kind == "niah":
        lo = 1 if a["type_haystack"] == "essay" else max(a["num_needle_k"], a["num_needle_q"]) * a["num_needle_v"]
        hi = len(_essay_words()) if a["type_haystack"] == "essay" else 4 * budget
    elif spec.kind == "common_words_extraction":
        lo, hi = a["num_cw"], len(_common_words())
    elif spec.kind == "freq_words_extraction":
        lo, hi = math.ceil(_zeta(a["alpha"]) * 4 ** a["alpha"]), 4 * budget  # from where all 3 answers occur
    else:
        lo, hi = 1, 4 * budget
    try:  # no guess carried over from other samples: the search path, hence n, is this sample's own
        n = _fit(count, budget, lo, hi)
    except PigjaxError as e:
        raise PigjaxError(f"{task} does not fit in {context} tokens with {spec.tokens_to_generate} to generate: {e}") from None
    text, prefix, outputs = build(n)
    prompt, ids = _render(tokenizer, format, text, prefix)
    return Sample(task=task, context=int(context), index=int(index), seed=int(seed), format=format, input=text,
                  answer_prefix=prefix.lstrip() if format == "chat" else prefix, prompt=prompt, prompt_ids=ids,
                  outputs=[str(o) for o in outputs], tokens_to_generate=spec.tokens_to_generate, haystack=n)


def make_samples(tokenizer, task: str, context: int, num_samples: int, *, seed: int = DEFAULT_SEED,
                 format: str = "chat") -> list[Sample]:
    """Samples 0 .. num_samples-1 of `task` at `context` tokens (see `make_sample`)."""
    return [make_sample(tokenizer, task, context, i, seed=seed, format=format) for i in range(num_samples)]
