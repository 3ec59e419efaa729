"""Multi-process runs on JAX's own runtime (`jax.distributed`): what `scripts/launch.py` sets up.

The launcher starts N processes with PIGJAX_COORDINATOR (host:port of process 0),
PIGJAX_NUM_PROCESSES, PIGJAX_PROCESS_ID and PIGJAX_LOCAL_DEVICES in their environment;
`initialize()` (called first by the scripts) turns them into `jax.distributed.initialize` with
that many CPU devices per process and Gloo collectives between processes. Without them it does
nothing: one process, as before.
"""

from __future__ import annotations

import os

import jax

from pigjax.errors import ConfigError

ENV = ("PIGJAX_COORDINATOR", "PIGJAX_NUM_PROCESSES", "PIGJAX_PROCESS_ID")
# XLA:CPU aborts the process when a collective waits for its peers longer than this (40 s by
# default): on a loaded machine, devices sharing few cores can be that late without being stuck.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                            "--xla_cpu_collective_timeout_seconds=900")


def patient_collectives():
    """Add COLLECTIVE_TIMEOUT_FLAGS to XLA_FLAGS (before JAX starts its CPU backend)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "collective_call_terminate_timeout" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAGS}".strip()


def initialize() -> bool:
    """Join the run described by the environment (see module doc); True if this is one."""
    if not os.environ.get("PIGJAX_COORDINATOR"):
        return False
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"a multi-process run needs {', '.join(ENV)}; missing {', '.join(missing)}")
    local = int(os.environ.get("PIGJAX_LOCAL_DEVICES", "1"))
    patient_collectives()
    jax.config.update("jax_num_cpu_devices", local)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["PIGJAX_COORDINATOR"],
                               num_processes=int(os.environ["PIGJAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["PIGJAX_PROCESS_ID"]))
    return True


def is_main() -> bool:
    """The process that prints and writes shared files (process 0)."""
    return jax.process_index() == 0


def main_first(fn):
    """fn() on process 0, then (after a barrier) on the others: for work that writes a shared cache
    the others then read (a tokenizer, a converted checkpoint). One process: just fn()."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if is_main() else None
    multihost_utils.sync_global_devices("pigjax.distributed.main_first")
    return result if is_main() else fn()
