"""RULER's six tasks as data: templates, answer prefixes, parameters (`TASK_SPECS`), and `Sample`."""

from __future__ import annotations

import dataclasses
import re

import numpy as np



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
