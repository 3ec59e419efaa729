"""Atomic directory writes: a directory appears whole or not at all, and a replace never loses both
the old and the new content, even when the writer is killed (SIGKILL, power loss) at any point.

Writing `DIR` uses hidden siblings named `.DIR.<kind>-<pid>-<host>-<random>`:

1. the content is written into `.DIR.partial-*`;
2. once complete, it is renamed `.DIR.new-*`;
3. an existing `DIR` is renamed aside to `.DIR.old-*`;
4. `.DIR.new-*` is renamed `DIR`;
5. the old copy is renamed `.DIR.trash-*` and removed.

Each step is one rename, so after a kill at any point either `DIR` is whole (old or new), or it is
missing and a whole copy lies in `.DIR.new-*` (written completely) or `.DIR.old-*` (the previous
content). `recover(DIR)` (run by the next write, and by `pigjax.load` of a missing checkpoint)
puts such a copy back in place, preferring the new one, and removes the leftovers whose writer is
gone: a process on this host whose pid no longer exists. Leftovers of live writers, or of writers
on other hosts, are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
_LEFTOVER = re.compile(r"(?P<kind>partial|new|old|trash)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_]*)-(?P<rand>[A-Za-z0-9_]+)")
# Older pigjax versions wrote `.DIR.partial-XXXXXXXX` (tempfile.mkdtemp) without the writer's pid.
_LEGACY = re.compile(r"partial-[A-Za-z0-9_]{8}")
RESTORABLE = ("new", "old")  # whole copies, in order of preference


@dataclasses.dataclass(frozen=True)
class Leftover:
    path: Path
    kind: str  # partial (being written), new (complete), old (previous content), trash (being removed)
    pid: int
    host: str

    @property
    def writer_gone(self) -> bool:
        """True only when the writer certainly no longer runs (same host, pid not alive)."""
        if self.host != _HOST or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # PermissionError: alive, owned by another user
            return False
        return False


def leftovers(path: Path) -> list[Leftover]:
    """The hidden siblings that writes of `path` left (or are leaving) in its parent directory."""
    path = Path(path)
    prefix = f".{path.name}."
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        if name.startswith(prefix):
            m = _LEFTOVER.fullmatch(name[len(prefix):])
            if m:
                found.append(Leftover(path.parent / name, m["kind"], int(m["pid"]), m["host"]))
    return found


def legacy_leftovers(path: Path) -> list[Path]:
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if n.startswith(prefix) and _LEGACY.fullmatch(n[len(prefix):])]


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> bool:
    """Remove a leftover directory; warn (and keep it) if that fails."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        warnings.warn(f"could not remove {path}: {e}; remove it by hand", stacklevel=3)
        return False


def restorable(path: Path) -> Leftover | None:
    """The whole copy `recover` would put in place of a missing `path` (a dead writer's), if any."""
    copies = [l for l in leftovers(path) if l.kind in RESTORABLE and l.writer_gone]
    if not copies:
        return None
    return max(copies, key=lambda l: (RESTORABLE[::-1].index(l.kind), _mtime(l.path)))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def recover(path: Path, *, clean: bool = True) -> Path | None:
    """Finish what a killed writer of `path` left: if `path` is missing and a whole copy of a dead
    writer exists (`.new-*`, else `.old-*`), rename it into place (warning) and return its former
    path. With `clean`, also remove every leftover of a dead writer that is no longer needed.
    Raises OSError if the restoring rename fails."""
    path = Path(path)
    restored = None
    if not _exists(path):
        copy = restorable(path)
        if copy is not None:
            os.rename(copy.path, path)
            restored = copy.path
            warnings.warn(
                f"{path} was missing after an interrupted write (pid {copy.pid} was killed); restored the "
                f"{'newly written' if copy.kind == 'new' else 'previous'} copy from {copy.path.name}",
                stacklevel=2,
            )
    if clean:
        for leftover in leftovers(path):
            if leftover.writer_gone and _exists(leftover.path):
                _remove(leftover.path)
        legacy = legacy_leftovers(path)
        if legacy:
            warnings.warn(
                f"{', '.join(str(p) for p in legacy)}: left by an interrupted write of an older pigjax "
                "(its writer cannot be identified); remove it by hand if no write of "
                f"{path} is running", stacklevel=2,
            )
    return restored


def probe_writable(path: Path) -> None:
    """Raise OSError unless a sibling of `path` can be created (its nearest existing ancestor
    directory is writable); creates no directories of its own."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise NotADirectoryError(f"{parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-{_HOST}-", dir=parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(parent)) from None


def _replace(new: Path, path: Path) -> None:
    """Put the complete directory `new` at `path` (steps 3-5 of the module docstring)."""
    if not _exists(path):
        os.rename(new, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)  # put the old content back; `new` is removed by the caller
        raise
    trash = _sibling(path, "trash")
    try:
        os.rename(old, trash)
    except OSError:
        trash = old
    _remove(trash)


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yield a temporary directory; on success it replaces `path` (which may exist) atomically.

    On an exception the temporary directory is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-{_HOST}-", dir=path.parent))
    try:
        yield tmp
        new = _sibling(path, "new")
        os.rename(tmp, new)
        tmp = new
        _replace(new, path)
    except BaseException:
        # A partial copy is garbage; a complete one is kept only if `path` is missing (a failed
        # replace whose rollback failed too), so that `recover` can put it in place.
        if _exists(tmp) and (".partial-" in tmp.name or _exists(path)):
            _remove(tmp)
        raise
