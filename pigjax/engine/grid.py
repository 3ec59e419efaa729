"""`StoreGrid`: one engine store per device of a mesh, for sharded decoding (docs/scaling.md).

Device (i, j) of a ("data", "model") mesh holds the rows of data shard i and, when attention is
split by heads, the KV heads of model shard j (else all of them). Its store lives in the process
that owns the device, so in a multi-process run each host keeps only its own rows' keys, values and
tables. Jitted code receives the handles as one [data, model] int32 array sharded over both axes;
`pigjax.sharding.engine_shards` hands each shard its own handle inside `shard_map`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pigjax import sharding
from pigjax.engine.store import Closing, Store, estimate_bytes, memory_limit
from pigjax.errors import PigjaxError


class StoreGrid(Closing):
    """Stores of `slots` = k·batch slots and `kv_heads` heads split over `mesh` (see module doc);
    the same interface as `Store` where backends use it (`handle_array`, `info`, `check`, `close`)."""

    def __init__(self, mesh, heads: str | None, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 K: int, L: int, eps: float = 1e-4, storage: str = "bf16", path: str | None = None,
                 appends: bool = True, sketch_tables: int = 0):
        d, m = sharding.axis_size(mesh, sharding.DATA), sharding.axis_size(mesh, sharding.MODEL)
        if slots % d:
            raise PigjaxError(f"StoreGrid: {slots} slots do not split over a 'data' axis of {d}")
        local_heads = kv_heads // m if heads else kv_heads
        args = (slots // d, local_heads, head_dim, capacity, K, L)
        devices = [(idx, dev) for idx, dev in np.ndenumerate(mesh.devices) if dev.process_index == jax.process_index()]
        total = estimate_bytes(*args, storage=storage, appends=appends, sketch_tables=sketch_tables) * len(devices)
        limit = memory_limit()
        if limit is not None and total > limit:
            raise PigjaxError(f"StoreGrid: {len(devices)} stores of this process need ~{total / 2**30:.2f} GiB, "
                              f"more than the {limit / 2**30:.2f} GiB it may use (PIGJAX_ENGINE_MAX_BYTES)")
        self.mesh, self.heads, self.model_shards = mesh, heads, m
        self.stores: dict[tuple, Store] = {}
        try:
            for idx, _ in devices:
                self.stores[idx] = Store(*args, eps=eps, storage=storage, path=path, appends=appends,
                                         sketch_tables=sketch_tables)
        except PigjaxError:
            self.close()
            raise
        self.path = next(iter(self.stores.values())).path
        self._devices = dict(devices)

    @property
    def handle_array(self) -> jax.Array:
        """[data, model] int32, device (i, j) holding the handle of its own store."""
        sharding_ = NamedSharding(self.mesh, P(sharding.DATA, sharding.MODEL))
        shards = [jax.device_put(np.full((1, 1), store.handle, np.int32), self._devices[idx])
                  for idx, store in self.stores.items()]
        return jax.make_array_from_single_device_arrays(self.mesh.devices.shape, sharding_, shards)

    def info(self) -> dict:
        """This process's stores together: bytes summed; per-slot counts of model shard 0's stores
        (the other model shards hold the same rows, other heads or copies)."""
        infos = {idx: store.info() for idx, store in self.stores.items()}
        j0 = min(j for _, j in infos)
        first = [info for (_, j), info in sorted(infos.items()) if j == j0]
        return {"bytes_allocated": sum(info["bytes_allocated"] for info in infos.values()),
                "middle_counts": [c for info in first for c in info["middle_counts"]],
                "appended_counts": [c for info in first for c in info["appended_counts"]]}

    def check(self):
        for store in self.stores.values():
            store.check()

    @property
    def closed(self) -> bool:
        return all(store.closed for store in self.stores.values())

    def close(self):
        errors = []
        for store in self.stores.values():
            try:
                store.close()
            except PigjaxError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def open_store(slots: int, kv_heads: int, head_dim: int, capacity: int, K: int, L: int, eps: float = 1e-4,
               storage: str = "bf16", path: str | None = None, appends: bool = True, num_heads: int | None = None,
               sketch_tables: int = 0):
    """A `Store`, or under a mesh (`jax.set_mesh`) a `StoreGrid` splitting heads as the model does
    (`num_heads`: the query heads, default `kv_heads`)."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty:
        return Store(slots, kv_heads, head_dim, capacity, K, L, eps, storage, path, appends, sketch_tables)
    heads = sharding.heads_axis(num_heads or kv_heads, kv_heads, mesh)
    return StoreGrid(mesh, heads, slots, kv_heads, head_dim, capacity, K, L, eps, storage, path, appends, sketch_tables)
