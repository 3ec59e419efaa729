"""Running on a device mesh: rows over the "data" axis, heads and the MLP's hidden units over "model".

A mesh is a plain `jax.sharding.Mesh` with the two axes named "data" and "model" (either may have
size 1), e.g. `jax.make_mesh((2, 2), ("data", "model"))`. pigjax uses it with JAX's own SPMD
partitioner: parameters and inputs are placed with `NamedSharding`s (`param_shardings`,
`batch_sharding`), jitted code is traced under `jax.set_mesh`, and the only hand-partitioned
pieces are the engine's calls, which run per shard inside `shard_map` (`pigjax.engine.store`):
each device's rows and heads live in its own engine store, on the host that owns the device, so
attention never crosses hosts. docs/scaling.md has the layout and its costs.

Megatron-style model parallelism: q/k/v projections split by heads, o_proj by its input heads,
gate/up by hidden unit, down_proj by its input (one all-reduce after attention and one after the
MLP per layer), the vocabulary of the embedding and of lm_head split too. When the KV heads (or
the query heads) do not divide the "model" axis — SmolLM2-135M has 3 KV heads — attention is
replicated over "model" (every model shard computes all heads; the MLP is still split): padding
heads would change the parameter tree and waste as much compute.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pigjax.errors import ConfigError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


def check_mesh(mesh) -> Mesh:
    """The mesh with both axes of type Auto (what pigjax's jitted code is written for), or
    ConfigError naming what is wrong."""
    if not isinstance(mesh, Mesh):
        raise ConfigError(f"mesh must be a jax.sharding.Mesh with axes {AXES}, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if sorted(names) != sorted(AXES):
        raise ConfigError(f"mesh axes must be named {AXES} (either may have size 1), got {names}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))


def axis_size(mesh, name: str) -> int:
    return int(dict(mesh.shape).get(name, 1))


def check_batch(mesh: Mesh, batch: int, what: str = "batch"):
    d = axis_size(mesh, DATA)
    if batch % d:
        raise ConfigError(f"{what} of {batch} rows does not divide over the mesh's 'data' axis of size {d}")


def heads_axis(num_heads: int, num_kv_heads: int, mesh=None) -> str | None:
    """"model" when both head counts divide the model axis (attention is split by heads), else None
    (attention replicated over "model"). `mesh` defaults to the mesh being traced under."""
    mesh = current_mesh() if mesh is None else mesh
    m = 1 if mesh is None else axis_size(mesh, MODEL)
    if m > 1 and num_heads % m == 0 and num_kv_heads % m == 0:
        return MODEL
    return None


def config_heads_axis(config, mesh=None) -> str | None:
    """`heads_axis` for a model config (Memory Mosaics: one key per head, so KV heads = heads)."""
    heads = config.num_attention_heads
    return heads_axis(heads, getattr(config, "num_key_value_heads", heads), mesh)


def current_mesh():
    """The mesh jitted code is being traced under (`jax.set_mesh`), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names:
        return None
    return mesh


@contextlib.contextmanager
def use(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` for a checked mesh; nothing for None."""
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


# Leaf name -> spec of its trailing dims, by role: "heads" (split when attention is), "mlp"
# (split whenever model > 1), "vocab". Leaves not named here are replicated. Leading dims
# (the stacked layer axis) are never split. The two families' names do not clash.
_PARAM_RULES = {
    # Llama (models/llama.py)
    ("q_proj", "kernel"): (None, "heads", None),
    ("k_proj", "kernel"): (None, "heads", None),
    ("v_proj", "kernel"): (None, "heads", None),
    ("o_proj", "kernel"): ("heads", None, None),
    ("gate_proj", "kernel"): (None, "mlp"),
    ("up_proj", "kernel"): (None, "mlp"),
    ("down_proj", "kernel"): ("mlp", None),
    ("lm_head", "kernel"): (None, "vocab"),
    ("embed", "embedding"): ("vocab", None),  # both families
    # Memory Mosaics (models/mosaics.py): heads folded into the projections' output (H·hs);
    # per-head parameters and the persistent memory's banks lead with the head axis.
    ("key_proj", "kernel"): (None, "heads"),
    ("value_proj", "kernel"): (None, "heads"),
    ("c_proj", "kernel"): ("heads", None),
    ("keys", "decay"): ("heads",),
    ("keys", "key_scale"): ("heads",),
    ("ctx", "peek"): ("heads",),
    ("ctx", "value_scale"): ("heads",),
    ("pmem", "out_scale"): ("heads",),
    ("pmem", "bank_keys"): ("heads", None, None),
    ("pmem", "bank_values"): ("heads", None, None),
}


def param_specs(config, params, mesh: Mesh):
    """A PartitionSpec per parameter leaf (stacked or per-layer trees alike)."""
    heads = config_heads_axis(config, mesh)
    split = MODEL if axis_size(mesh, MODEL) > 1 else None
    roles = {"heads": heads, "mlp": split, "vocab": split}

    def spec(path, leaf):
        names = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        trailing = next((r for key, r in _PARAM_RULES.items() if names[-len(key):] == key), None)
        if trailing is None or leaf.ndim < len(trailing):
            return P()
        dims = [roles[r] if r else None for r in trailing]
        for i, axis in enumerate(dims):  # a dim the axis does not divide stays whole
            if axis and leaf.shape[leaf.ndim - len(dims) + i] % axis_size(mesh, axis):
                dims[i] = None
        return P(*([None] * (leaf.ndim - len(dims)) + dims))

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(config, params, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, params, mesh))


def shard_params(config, params, mesh: Mesh):
    """params placed on the mesh (a no-op for leaves already there)."""
    return jax.device_put(params, param_shardings(config, params, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Arrays whose leading axis is the batch: rows split over "data", the rest whole."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def put_batch(mesh: Mesh | None, *arrays):
    """Host arrays [B, ...] placed with rows over "data" (unchanged without a mesh). In a
    multi-process run every process passes the same whole array and keeps its own rows."""
    if mesh is None:
        return arrays
    out = []
    for a in arrays:
        a = np.asarray(a)
        sharding = batch_sharding(mesh, a.ndim)
        out.append(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]))
    return tuple(out)


def replicate(mesh: Mesh | None, tree):
    """A pytree with every leaf not yet on the mesh replicated on all its devices (leaves must then
    be equal on every process); leaves already placed on the mesh are kept."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(a):
        if isinstance(a, jax.Array) and getattr(a.sharding, "mesh", None) == mesh:
            return a
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree)


def gather(x) -> np.ndarray:
    """A (possibly multi-process) array as one NumPy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _spec(ndim: int, heads: str | None) -> P:
    """Engine operands and results lead with [batch, heads, ...] (or [batch])."""
    return P(DATA) if ndim == 1 else P(DATA, heads)


def engine_shards(fn, handle, slots, args, out_ranks, heads: str | None):
    """fn(handle, slots, *args) run on each device's own engine store.

    A rank-0 `handle` is one store: a plain call. A [data, model] grid of handles (a
    `pigjax.engine.grid.StoreGrid`, one store per device) runs `fn` per shard in `shard_map`
    with that shard's handle, rows and heads (`heads`: "model" or None, see `heads_axis`), so no
    engine call crosses devices. Slots are `k·batch + row`: a shard's local slot is
    `k·(batch / data) + local row`. With heads replicated, every model shard holds the same rows
    and returns the same results, so they are taken as replicated (check_vma=False)."""
    if handle.ndim == 0:
        return fn(handle, slots, *args)
    if current_mesh() is None:
        raise ConfigError("a grid of engine stores (one per device) needs its mesh: trace under jax.set_mesh(mesh)")
    batch, rows = slots.shape[0], slots.shape[0] // handle.shape[0]

    def local(h, s, *a):
        return fn(h.reshape(()), (s // batch) * rows + s % rows, *a)

    in_specs = (P(DATA, MODEL), P(DATA), *(_spec(a.ndim, heads) for a in args))
    out_specs = tuple(_spec(r, heads) for r in out_ranks)
    return jax.shard_map(local, in_specs=in_specs, out_specs=out_specs if len(out_specs) > 1 else out_specs[0],
                         check_vma=False)(handle, slots, *args)


def rows_and_heads(fn, *sharded, replicated=(), heads: str | None):
    """fn(*sharded, *replicated) per shard for arrays `sharded` laid out [batch, heads, ...] (or
    [batch]) and the first result likewise (e.g. an FFI kernel, which XLA cannot partition
    itself); a plain call outside a mesh."""
    if current_mesh() is None:
        return fn(*sharded, *replicated)
    in_specs = (*(_spec(a.ndim, heads) for a in sharded), *(P() for _ in replicated))
    return jax.shard_map(fn, in_specs=in_specs, out_specs=_spec(sharded[0].ndim, heads),
                         check_vma=False)(*sharded, *replicated)


def make_mesh(data: int, model: int) -> Mesh:
    """A ("data", "model") mesh over all devices of all processes (one process: its first
    data·model devices), a process's devices adjacent on
    "model": model shards (heads, MLP) then all-reduce within a host and data shards (rows, their
    engine stores) never talk (docs/scaling.md)."""
    devices = jax.devices()
    n = data * model
    # One process may use the first n of its devices; several must each bring all theirs.
    if data < 1 or model < 1 or n > len(devices) or (jax.process_count() > 1 and n != len(devices)):
        raise ConfigError(f"a mesh of data {data} x model {model} needs {max(data, 1) * max(model, 1)} devices; "
                          f"there are {len(devices)} ({jax.process_count()} process(es))")
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % model and model % local:
        raise ConfigError(f"the 'model' axis ({model}) must divide, or be a multiple of, each process's "
                          f"{local} devices")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))[:n]
    return Mesh(np.array(ordered).reshape(data, model), AXES, axis_types=(AxisType.Auto,) * 2)


def parse_mesh(text: str | None) -> Mesh | None:
    """"DATAxMODEL" (e.g. "2x2") -> `make_mesh(DATA, MODEL)`; None or "" -> None."""
    if not text:
        return None
    try:
        data, model = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"mesh must be written DATAxMODEL, e.g. 2x2, got {text!r}") from None
    return make_mesh(data, model)
