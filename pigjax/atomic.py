"""Atomic directory writes: a directory appears whole or not at all.

The content is written into a hidden temporary sibling that is renamed into place only once it is
complete, so a reader never sees half a checkpoint or half a data cache (a killed writer leaves
only a `.NAME.partial-*` sibling behind).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temporary directory; on success it replaces `path` (removed first if it exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
