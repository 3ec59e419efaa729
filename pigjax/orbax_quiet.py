"""Silence the stray asyncio reports orbax leaves behind when a checkpoint read or write fails.

A process-wide hook by nature (`sys.unraisablehook`, a logging filter): installed once, it drops
exactly those reports and passes every other one on. Used as `with OrbaxCall(): ...`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading

_orbax_state = {"installed": False, "calls": 0, "failed": False}
_orbax_lock = threading.Lock()
_TENSORSTORE_STATUS = re.compile(r"^[A-Z_]+: ")  # "OUT_OF_RANGE: Error reading ...", "DATA_LOSS: ..."


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def _is_closed_loop_callback(unraisable) -> bool:
    """RuntimeError('Event loop is closed') from loop.call_soon_threadsafe (a tensorstore thread)."""
    e = unraisable.exc_value
    return (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
            and any(c.co_name == "call_soon_threadsafe" and "asyncio" in c.co_filename
                    for c in _frames(unraisable.exc_traceback)))


class _UnretrievedTensorstoreErrors(logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for a tensorstore read nobody awaited
    (a tensorstore status error, raised in no frame outside asyncio)."""

    def filter(self, record):
        if not (_orbax_state["calls"] or _orbax_state["failed"]):
            return True
        e = record.exc_info[1] if record.exc_info else None
        return not (
            str(record.msg).startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
            and e is not None and _TENSORSTORE_STATUS.match(str(e))
            and all("asyncio" in c.co_filename for c in _frames(e.__traceback__))
        )


class OrbaxCall:
    """Around an orbax save/restore: silence the reports its failure leaves behind.

    orbax runs each call in a fresh asyncio loop (orbax.checkpoint._src.asyncio_utils.run_sync) that
    it closes as soon as the first tensorstore read or write fails; the others are still in flight.
    When they finish, tensorstore's threads call `loop.call_soon_threadsafe` on the closed loop
    (RuntimeError "Event loop is closed", printed as an unraisable exception), and their failed
    tasks, never awaited, are logged by asyncio ("Task exception was never retrieved") when
    collected: tracebacks on stderr after the clean CheckpointError, up to process exit. Exactly
    those reports are dropped while an orbax call runs and, once one has failed, for the rest of
    the process; every other report goes where it went before."""

    def __enter__(self):
        with _orbax_lock:
            if not _orbax_state["installed"]:
                previous = sys.unraisablehook

                def hook(unraisable):
                    if (_orbax_state["calls"] or _orbax_state["failed"]) and _is_closed_loop_callback(unraisable):
                        return
                    previous(unraisable)

                sys.unraisablehook = hook
                logging.getLogger("asyncio").addFilter(_UnretrievedTensorstoreErrors())
                _orbax_state["installed"] = True
            _orbax_state["calls"] += 1

    def __exit__(self, kind, value, tb):
        with _orbax_lock:
            _orbax_state["calls"] -= 1
            if kind is not None:
                _orbax_state["failed"] = True
        return False
