"""Runs tests/sharding/multi_device/ in a pytest process with 4 CPU devices (JAX fixes the device
count when it starts, and the rest of the suite runs on one)."""

import os
import subprocess
import sys
from pathlib import Path

from pigjax.distributed import COLLECTIVE_TIMEOUT_FLAGS

HERE = Path(__file__).parent


def test_multi_device_suite():
    env = dict(os.environ, PIGJAX_MULTI_DEVICE="1",
               XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4 {COLLECTIVE_TIMEOUT_FLAGS}")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / "multi_device")],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=HERE.parent.parent)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout.splitlines()[-1]
