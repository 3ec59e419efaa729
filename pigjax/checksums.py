"""Checksums of a checkpoint's arrays: what `pigjax.checkpoint.save` stores in pigjax.json and
`load` verifies, so that damaged parameter files raise instead of loading garbage.

CRC32 by default (the risk is accidental damage, not tampering; ~3.5x cheaper than SHA-256);
sha256 is accepted on load.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import jax
import numpy as np

from pigjax.errors import CheckpointError
from pigjax.sharding import gather

ALGORITHM = "crc32"


def _array_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _checksum(a, algorithm: str) -> str:
    a = np.ascontiguousarray(gather(a))  # a sharded multi-process array: the whole of it
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    data = a.reshape(-1).view(np.uint8)
    if algorithm == "crc32":
        return f"{zlib.crc32(data):08x}"
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256(data).hexdigest()
    raise ValueError(algorithm)


def checksums(params, algorithm: str = ALGORITHM) -> dict:
    """{"algorithm", "arrays": {tree path ("layers/attn/q_proj/kernel"): checksum of the array's
    little-endian C-order bytes}}: what `save` stores in pigjax.json."""
    return {"algorithm": algorithm,
            "arrays": {_array_name(p): _checksum(a, algorithm) for p, a in jax.tree.leaves_with_path(params)}}


def verify(params, meta: dict, path: Path, meta_name: str) -> None:
    """Raise CheckpointError unless `params` match the checksums in `meta` (read from path/meta_name)."""
    stored = meta.get("checksums")
    if stored is None:
        warnings.warn(f"{path} has no array checksums (written by an older pigjax), so its parameters cannot "
                      "be verified; save it again to add them", stacklevel=3)
        return
    meta_file = path / meta_name
    if not isinstance(stored, dict) or not isinstance(stored.get("arrays"), dict):
        raise CheckpointError(f"{meta_file}: 'checksums' is malformed")
    algorithm = stored.get("algorithm")
    if algorithm not in ("crc32", "sha256"):
        raise CheckpointError(f"{meta_file}: unknown checksum algorithm {algorithm!r} (pigjax knows crc32 and "
                              "sha256); load with verify=False to skip the check")
    got = checksums(params, algorithm)["arrays"]
    want = stored["arrays"]
    if set(got) != set(want):
        raise CheckpointError(f"{meta_file}: the checksums name arrays {sorted(set(want) ^ set(got))[:3]} that "
                              "the parameters do not have (or the reverse)")
    bad = [name for name in got if got[name] != want[name]]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{path / 'params'} is corrupt: {algorithm} checksum mismatch in array{'s' * (len(bad) > 1)} "
            f"{', '.join(bad[:5])}{more} (read {got[bad[0]]}, {meta_name} says {want[bad[0]]}); convert or save "
            "the model again (load(..., verify=False) skips this check)"
        )
