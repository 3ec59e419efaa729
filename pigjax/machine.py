"""What a benchmark states about the machine it ran on."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    import jax

    from pigjax.engine import native

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    device = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "device": device.device_kind if device.platform != "cpu" else "cpu",
            "engine_simd": native.simd_level(), "engine_threads": native.num_threads()}
