"""Task text for a haystack of size n, one builder per RULER generator; each draws from a fresh rng,
so the same n gives the same text; it returns (task text, answer prefix, references)."""

from __future__ import annotations

import random
import string

import numpy as np

from pigjax.errors import PigjaxError
from pigjax.eval.ruler.haystacks import _adjs_nouns, _common_words, _essay_words, _zeta, split_sentences
from pigjax.eval.ruler.tasks import _DEPTHS, _NEEDLE, _NOISE, Task


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
