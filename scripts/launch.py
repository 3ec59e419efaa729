"""Run a pigjax script as N processes of one JAX program on this machine (jax.distributed).

  python scripts/launch.py --processes 2 --local_devices 2 -- scripts/generate.py --mesh 2x2 --prompt "Hi"

Each process gets PIGJAX_COORDINATOR (process 0's address on localhost), PIGJAX_NUM_PROCESSES,
PIGJAX_PROCESS_ID and PIGJAX_LOCAL_DEVICES; the script's `pigjax.distributed.initialize()` joins
them. Process 0's output passes through; the others' lines are prefixed with [pN]. If one process
fails, the others are stopped and the launcher exits with its status.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_PROCESSES = flags.DEFINE_integer("processes", 2, "number of processes", lower_bound=1)
_LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 1, "CPU devices per process", lower_bound=1)
_PORT = flags.DEFINE_integer("port", 0, "coordinator port (0: a free one)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _relay(stream, prefix: str, out):
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()


def main(argv):
    command = argv[1:]
    if not command:
        print("launch: give the script to run after --, e.g. -- scripts/generate.py --mesh 2x2", file=sys.stderr)
        return 2
    if command[0].endswith(".py"):
        command = [sys.executable] + command
    port = _PORT.value or _free_port()
    procs, relays = [], []
    for i in range(_PROCESSES.value):
        env = dict(os.environ, PIGJAX_COORDINATOR=f"localhost:{port}", PIGJAX_NUM_PROCESSES=str(_PROCESSES.value),
                   PIGJAX_PROCESS_ID=str(i), PIGJAX_LOCAL_DEVICES=str(_LOCAL_DEVICES.value))
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if i else None,
                             start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_relay, args=(p.stdout, "" if i == 0 else f"[p{i}] ",
                                                  sys.stdout if i == 0 else sys.stderr), daemon=True)
        t.start()
        relays.append(t)
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                print(f"launch: process {procs.index(failed[0])} exited with {status}; stopping the others",
                      file=sys.stderr)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM if status != 130 else signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in relays:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status


if __name__ == "__main__":
    app.run(main)
