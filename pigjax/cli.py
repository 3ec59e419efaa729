"""Flag checks shared by the command-line scripts (absl). A bad value stops the script while its
flags are parsed, with absl's one-line "FATAL Flags parsing error: flag --name=...: why", before
any model is loaded or any worker is started."""

from __future__ import annotations

import os
import re

from absl import flags


def _is_int(x) -> bool:
    return re.fullmatch(r"\s*-?\d+\s*", str(x)) is not None


def ints(holder, minimum: int = 1) -> None:
    """A list flag of integers, each >= minimum."""
    flags.register_validator(holder, lambda v: bool(v) and all(_is_int(x) and int(x) >= minimum for x in v),
                             message=f"takes comma-separated integers >= {minimum}")


def among(holder, choices) -> None:
    """A list flag whose entries are all among `choices` (None, the flag's unset value, passes)."""
    flags.register_validator(holder, lambda v: v is None or (bool(v) and all(x in choices for x in v)),
                             message=f"takes some of: {', '.join(choices)}")


def matching(holder, pattern: str, what: str) -> None:
    """A list flag whose entries all match `pattern` (described to the user as `what`)."""
    flags.register_validator(holder, lambda v: bool(v) and all(re.fullmatch(pattern, x) for x in v),
                             message=f"takes comma-separated {what}")


def existing(holder, hint: str = "") -> None:
    """A path flag that must exist."""
    flags.register_validator(holder, lambda v: v is not None and os.path.exists(v),
                             message="no such file or directory" + (f" ({hint})" if hint else ""))


__all__ = ["among", "existing", "ints", "matching"]
