"""The C++ LSH store (ffi/src/store.*, query.*) from Python and from jitted code.

A `Store` owns, per (sequence slot, KV head), the centered middle keys, values, key norms and L
SimHash tables of a prefilled sequence, plus an optional append buffer of later tokens. Its jittable
operations are ordered by data: `prefill` returns the middle counts, which `append` and `query` take
as an input (`append` returns the totals, which the next call takes). Four paths reach the same C++ code:

- "ffi" (JAX's CPU backend): XLA FFI custom calls with `has_side_effect=True`, so XLA never hoists
  or drops them; about 0.2 µs of overhead per call.
- "cuda-ffi" (a CUDA GPU, with `pigjax._engine_cuda` built): the same custom calls registered for the
  CUDA platform (ffi/src/cuda_handlers.cc): the handler copies its operands from the GPU to pinned host
  buffers on XLA's stream, runs the engine and copies the results back; one host round trip per
  call, no Python. Errors are raised by JAX as on the "ffi" path. SimHash codes stay on the GPU (jnp).
- "cuda-async" (the same condition): the query and append handlers do not wait: they enqueue the
  copies, the engine's work (a host function the stream runs when it gets there) and the copies
  back, and return, so XLA keeps launching the step's GPU work meanwhile (docs/gpu_engine.md).
  Engine errors are then found after the handler returned: they are treated as on the "callback"
  path (NaN / -1 results, raised by the Store). Its prefill validates and returns the middle
  counts while the engine's background thread builds the tables, so the GPU goes on with the next
  layers; every later call on the store waits for the build inside the engine.
- "callback" (any backend, e.g. a GPU): `io_callback` into the engine's NumPy entry points; JAX
  copies the inputs to the host and the results back (tens of µs plus the copies). An engine
  error there does not raise inside the callback (see `_CallbackErrors`): the call returns NaN
  and -1 results and the error is raised by the `Store` that made the call (eagerly, or at
  `check()` / `close()`), or by `raise_callback_error(handle)` for module-function callers.

The default (`default_path`, the one place that picks) is "ffi" when JAX's default backend is the CPU,
"cuda-ffi" on a CUDA GPU when `pigjax._engine_cuda` is available, else "callback".

Memory: `estimate_bytes(...)` is what a store allocates with every slot full; `Store(...)` raises
PigjaxError when that exceeds `memory_limit()` (PIGJAX_ENGINE_MAX_BYTES, else MemAvailable).
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import io_callback

from pigjax import sharding
from pigjax.engine import native  # registers the FFI targets
from pigjax.errors import PigjaxError

_engine = native._engine


class Closing:
    """`with x:` closes x at the end; a close error is raised unless an exception is in flight."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            self.close()
        except PigjaxError:
            if exc_type is None:  # don't hide the exception already in flight
                raise


class Store(Closing):
    """A handle to an engine store; free it with `close()` or a `with` block (also freed at exit)."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, capacity: int, K: int, L: int,
                 eps: float = 1e-4, storage: str = "bf16", path: str | None = None, appends: bool = True,
                 sketch_tables: int = 0):
        """Raises PigjaxError naming the argument for a bad one, and for a store whose estimated
        bytes with every slot full (`estimate_bytes`) exceed `memory_limit()`. `appends=False`
        (a store that is only prefilled, as MagicPIG's) makes `append` an error and the estimate
        count prefilled tokens only. `sketch_tables` > 0 also keeps the codes of tables
        [0, sketch_tables) per token, packed, for `query_ranked` (docs/algorithm.md §2.9)."""
        self.path = check_path("Store", path)
        slots, kv_heads, head_dim, capacity, K, L, eps, storage = _store_args(
            "Store", slots=slots, kv_heads=kv_heads, head_dim=head_dim, capacity=capacity, K=K, L=L, eps=eps,
            storage=storage)
        appends = _bool_arg("Store", "appends", appends)
        sketch_tables = _int_arg("Store", "sketch_tables", sketch_tables, 0)
        try:
            self.handle = int(_engine.store_create(slots, kv_heads, head_dim, capacity, K, L, eps, storage, appends,
                                                   sketch_tables))
        except ValueError as e:
            raise PigjaxError(f"Store: {_strip(e)}") from None
        self.slots, self.kv_heads, self.head_dim, self.capacity = slots, kv_heads, head_dim, capacity
        self.K, self.L, self.eps, self.storage, self.appends = K, L, eps, storage, appends
        self.sketch_tables = sketch_tables
        self._finalizer = weakref.finalize(self, _free_quietly, self.handle)

    def close(self):
        """Free the store. Programs already dispatched that use it run first: on a GPU, where a
        jitted call can return before its engine calls ran, close waits for the device's work."""
        if getattr(self, "_pending", None) is not None:
            try:
                jax.block_until_ready(self._pending)
            except jax.errors.JaxRuntimeError:
                pass  # a failed ffi call: its result raises for whoever reads it
            self._pending = None
        if self.path != "ffi" and self._finalizer.alive:
            _finish_device_work()
        self._finalizer()
        self.check()

    def check(self):
        """Raise PigjaxError for an engine error of a callback-path or cuda-async-path call (none
        on the ffi and cuda-ffi paths, whose errors JAX raises itself)."""
        raise_callback_error(self.handle)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


    def info(self) -> dict:
        return _engine.store_info(self.handle)

    @property
    def handle_array(self) -> jax.Array:
        """The handle as a rank-0 int32 array: pass it to the module functions from jitted code
        (a runtime operand, so one compiled program serves every store)."""
        return jnp.asarray(self.handle, jnp.int32)

    def prefill(self, slots, keys, values, codes, lengths, *, sink: int, local: int):
        return self._track(prefill(self.handle_array, slots, keys, values, codes, lengths, sink=sink, local=local,
                                   path=self.path))

    def append(self, slots, keys, values, codes, counts, dep):
        return self._track(append(self.handle_array, slots, keys, values, codes, counts, dep, path=self.path))

    def query(self, slots, q, q_codes, dep, *, sample_cap: float = 1.0):
        return self._track(query(self.handle_array, slots, q, q_codes, dep, sample_cap=sample_cap, path=self.path))

    def query_ranked(self, slots, q, q_codes, dep, *, rank_tables: int, top: float, refine: float = 1.0,
                     sample_cap: float = 1.0):
        return self._track(query_ranked(self.handle_array, slots, q, q_codes, dep, rank_tables=rank_tables, top=top,
                                        refine=refine, sample_cap=sample_cap, path=self.path))

    def _track(self, result):
        """JAX dispatches asynchronously: keep the newest result so that `close()` waits for the
        calls in flight instead of freeing the store under them (they would fail: unknown handle).
        Jitted code that uses `handle_array` must block on its results before the store closes."""
        if not isinstance(jax.tree.leaves(result)[0], jax.core.Tracer):
            self._pending = result
            if self.path in _DEFERRED_ERRORS:
                jax.block_until_ready(result)
                self.check()
        return result


_INT64_MAX = 2**63 - 1


def _int_arg(where: str, name: str, value, low: int) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise PigjaxError(f"{where}: {name} must be an integer, got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise PigjaxError(f"{where}: {name} must be an integer, got {type(value).__name__} {value!r}") from None
    if v < low:
        raise PigjaxError(f"{where}: {name} must be >= {low}, got {v}")
    if v > _INT64_MAX:
        raise PigjaxError(f"{where}: {name} = {v} is too large")
    return int(v)


def _bool_arg(where: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise PigjaxError(f"{where}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _store_args(where: str, *, slots, kv_heads, head_dim, capacity, K, L, eps, storage):
    """Types and signs of a store's settings, each PigjaxError naming its argument; the engine
    checks the ranges (K in [1, 16], 2 <= L, K·L <= 65536, sizes, memory) with messages that name
    them too."""
    sizes = [_int_arg(where, name, value, 1) for name, value in
             (("slots", slots), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity))]
    K, L = _int_arg(where, "K", K, 1), _int_arg(where, "L", L, 2)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise PigjaxError(f"{where}: eps must be a number > 0, got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise PigjaxError(f"{where}: eps must be a finite number > 0, got {eps!r}")
    if not isinstance(storage, str) or storage not in ("f32", "bf16", "float32", "bfloat16"):
        raise PigjaxError(f"{where}: storage must be 'f32' or 'bf16', got {storage!r}")
    return (*sizes, K, L, float(eps), storage)


def _strip(e: ValueError) -> str:
    """The engine's message without the name of the `_engine` function it came from."""
    message = str(e)
    for prefix in ("store_create: ", "store_estimate_bytes: ", "store_memory_limit: "):
        message = message.removeprefix(prefix)
    return message


def estimate_bytes(slots: int, kv_heads: int, head_dim: int, capacity: int, K: int, L: int,
                   storage: str = "bf16", appends: bool = True, sketch_tables: int = 0) -> int:
    """Bytes a `Store(slots, kv_heads, head_dim, capacity, K, L, storage=storage, appends=appends,
    sketch_tables=sketch_tables)`
    allocates with every slot full: each (slot, KV head) holding `capacity` prefilled middle tokens
    or, with `appends`, `capacity` appended tokens if that takes more (4·L code bytes per token, vs
    2·L index bytes plus the tables' directories for a prefill). That is what `info()["bytes_allocated"]`
    then reports; arrays of 2 MiB or more are also rounded up to 2 MiB pages. Raises PigjaxError for a
    bad setting. `Store(...)` raises PigjaxError when this exceeds `memory_limit()`."""
    slots, kv_heads, head_dim, capacity, K, L, _, storage = _store_args(
        "estimate_bytes", slots=slots, kv_heads=kv_heads, head_dim=head_dim, capacity=capacity, K=K, L=L,
        eps=1e-4, storage=storage)
    appends = _bool_arg("estimate_bytes", "appends", appends)
    sketch_tables = _int_arg("estimate_bytes", "sketch_tables", sketch_tables, 0)
    try:
        return int(_engine.store_estimate_bytes(slots, kv_heads, head_dim, capacity, K, L, storage, appends,
                                                sketch_tables)["bytes"])
    except ValueError as e:
        raise PigjaxError(f"estimate_bytes: {_strip(e)}") from None


def memory_limit() -> int | None:
    """The bytes `Store(...)` may take (read now): PIGJAX_ENGINE_MAX_BYTES if set (e.g. "8G", or
    "unlimited" for None), else MemAvailable from /proc/meminfo, else None (no limit)."""
    try:
        return _engine.store_memory_limit()[0]
    except ValueError as e:
        raise PigjaxError(_strip(e)) from None


class _CallbackErrors:
    """Engine errors of callback-path calls, by store handle.

    A host callback must not raise on a GPU backend: with ordered effects JAX re-raises the first
    error from every later effectful call of the process; unordered, the process crashed (both seen
    with jax 0.11.2 on an H100). So the host function records the message here and returns NaN / -1
    results; the Python side raises it. The one piece of mutable state in this module, behind a lock
    because callbacks run on XLA's threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._errors: dict[int, str] = {}

    def record(self, handle: int, message: str):
        with self._lock:
            self._errors.setdefault(handle, message)  # the first error is the cause

    def take(self, handle: int) -> str | None:
        with self._lock:
            return self._errors.pop(handle, None)


_callback_errors = _CallbackErrors()


def _finish_device_work():
    """Wait until the programs dispatched so far on the accelerators have run: a device runs its
    programs in the order they were launched, so a trivial one launched now ends after them. (A
    cuda-async engine call that ran after its store was freed would record "unknown or freed
    store handle" and leave NaN results, maybe after `check()` had looked.) Nothing is done for
    the CPU's devices: the ffi path's errors surface in its results, and tests of the callback
    path found its programs done before the jitted call returned."""
    devices = [d for d in jax.local_devices() if d.platform != "cpu"]
    if devices:
        jax.block_until_ready([jax.device_put(np.int32(0), d) + 1 for d in devices])


def raise_callback_error(handle: int):
    """Raise PigjaxError if a callback-path or cuda-async-path call on `handle` failed since the
    last check (the engine's message; the cuda-async handlers record theirs in C++)."""
    message = _callback_errors.take(int(handle))
    _engine.store_wait_builds(int(handle))  # a background build's error is known when it is done
    if message is None:
        message = native.take_deferred_error(int(handle))
    if message is not None:
        raise PigjaxError(message)


def _host(fn, shapes):
    """fn(handle, *numpy args) for io_callback: engine errors become NaN / -1 results (see above)."""
    def call(handle, *args):
        try:
            return fn(int(handle), *map(np.asarray, args))
        except Exception as e:  # noqa: BLE001 -- nothing may escape into XLA (see above)
            _callback_errors.record(int(handle), str(e))
            return jax.tree.map(lambda s: np.full(s.shape, np.nan if s.dtype == jnp.float32 else -1, s.dtype), shapes)
    return call


PATHS = ("ffi", "cuda-ffi", "cuda-async", "callback")
# FFI target prefix per path (the targets are <prefix>_prefill, _append, _query, _query_ranked).
_FFI_TARGETS = {"ffi": "pigjax_lsh", "cuda-ffi": "pigjax_cuda_lsh", "cuda-async": "pigjax_cuda_async_lsh"}
# Paths whose engine errors surface after the call (the Store raises them): see _CallbackErrors.
_DEFERRED_ERRORS = ("cuda-async", "callback")


def default_path() -> str:
    """"ffi" on JAX's CPU backend; "cuda-ffi" on a CUDA GPU when the CUDA handlers are available
    (`native.cuda_handlers`); else "callback"."""
    if jax.default_backend() == "cpu":
        return "ffi"
    return "cuda-ffi" if native.cuda_handlers() else "callback"


def check_path(where: str, path) -> str:
    """`path` (None: `default_path()`) if it is one of PATHS and usable here, else PigjaxError."""
    if path is None:
        return default_path()
    if not isinstance(path, str) or path not in PATHS:
        raise PigjaxError(f"{where}: path must be {', '.join(map(repr, PATHS))} or None, got {path!r}")
    if path.startswith("cuda-") and not native.cuda_handlers():
        raise PigjaxError(f"{where}: path {path!r} is not available: {native.cuda_unavailable_reason()}")
    return path


def simhash_codes(x, proj, K: int, path: str | None = None, heads: str | None = None):
    """SimHash codes of x [..., d] (see `pigjax.engine.native`): the C++ kernel on the "ffi" path, the
    same function in jnp elsewhere (the FFI target exists for the CPU backend only). Under a mesh,
    x is [batch, heads, ..., d] and the kernel runs per shard (`heads`: see `pigjax.sharding`)."""
    if (path or default_path()) == "ffi":
        return sharding.rows_and_heads(lambda x, p: native.simhash_codes(x, p, K), x, replicated=(proj,),
                                       heads=heads)
    return native.simhash_codes_reference(x, proj, K)


def prefill(handle, slots, keys, values, codes, lengths, *, sink: int, local: int, path: str = "ffi",
            heads: str | None = None):
    """Fill `slots` [B] of store `handle` (rank-0 int32, or a `StoreGrid`'s [data, model] grid)
    with centered keys, values [B, Hkv, n, d] f32 and their codes [B, Hkv, n, L] int32; positions
    [sink, length − local) are stored. -> middle counts [B] int32. `heads`: how a grid splits the
    heads (`pigjax.sharding.engine_shards`)."""
    _check("prefill", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), keys=(keys, jnp.float32, 4),
           values=(values, jnp.float32, 4), codes=(codes, jnp.int32, 4), lengths=(lengths, jnp.int32, 1))
    return sharding.engine_shards(partial(_prefill, sink=sink, local=local, path=path), handle, slots,
                                  (keys, values, codes, lengths), (1,), heads)


def _prefill(handle, slots, keys, values, codes, lengths, *, sink, local, path):
    result = jax.ShapeDtypeStruct(slots.shape, jnp.int32)
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_prefill_np(h, *a, sink, local), result)
        return io_callback(host, result, handle, slots, keys, values, codes, lengths, ordered=True)
    call = jax.ffi.ffi_call(_FFI_TARGETS[path] + "_prefill", result, has_side_effect=True)
    return call(handle, slots, keys, values, codes, lengths, sink=np.int32(sink), local=np.int32(local))


def append(handle, slots, keys, values, codes, counts, dep, *, path: str = "ffi", heads: str | None = None):
    """Append the first counts[b] of T tokens of keys, values [B, Hkv, T, d] f32 (centered like
    the middle) and their codes [B, Hkv, T, L] int32 to prefilled `slots` [B] (beyond the paper:
    later queries may sample them, weighted like middle tokens). `dep` [B] is any int32 produced
    after the prefill or the previous append, to order the calls. -> totals [B] int32 (middle +
    appended tokens; pass it as the next call's `dep`)."""
    _check("append", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), keys=(keys, jnp.float32, 4),
           values=(values, jnp.float32, 4), codes=(codes, jnp.int32, 4), counts=(counts, jnp.int32, 1),
           dep=(dep, jnp.int32, 1))
    return sharding.engine_shards(partial(_append, path=path), handle, slots, (keys, values, codes, counts, dep),
                                  (1,), heads)


def _append(handle, slots, keys, values, codes, counts, dep, *, path):
    result = jax.ShapeDtypeStruct(slots.shape, jnp.int32)
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_append_np(h, *a[:-1]), result)  # a[-1]: dep
        return io_callback(host, result, handle, slots, keys, values, codes, counts, dep, ordered=True)
    call = jax.ffi.ffi_call(_FFI_TARGETS[path] + "_append", result, has_side_effect=True)
    return call(handle, slots, keys, values, codes, counts, dep)


def query(handle, slots, q, q_codes, dep, *, sample_cap: float = 1.0, path: str = "ffi", heads: str | None = None):
    """Sampled partial attention of q [B, Hq, d] (codes [B, Hq, L]) over `slots`; `dep` [B] is
    any int32 produced after the prefill (its middle counts), to order the calls. A head that
    samples more than ⌈sample_cap·n⌉ keys reads a uniform subset of that many, reweighted
    (docs/algorithm.md §2.6).
    -> out [B, Hq, d] f32, lse [B, Hq] f32 (−inf where S is empty), sampled [B, Hq] int32 (keys read)."""
    _check("query", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), q=(q, jnp.float32, 3),
           q_codes=(q_codes, jnp.int32, 3), dep=(dep, jnp.int32, 1))
    return sharding.engine_shards(partial(_query, sample_cap=sample_cap, path=path), handle, slots, (q, q_codes, dep),
                                  (3, 2, 2), heads)


def _query(handle, slots, q, q_codes, dep, *, sample_cap, path):
    b, hq, d = q.shape
    shapes = (jax.ShapeDtypeStruct((b, hq, d), jnp.float32), jax.ShapeDtypeStruct((b, hq), jnp.float32),
              jax.ShapeDtypeStruct((b, hq), jnp.int32))
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_query_np(h, *a[:-1], sample_cap), shapes)  # a[-1]: dep
        return io_callback(host, shapes, handle, slots, q, q_codes, dep, ordered=True)
    call = jax.ffi.ffi_call(_FFI_TARGETS[path] + "_query", shapes, has_side_effect=True)
    return call(handle, slots, q, q_codes, dep, sample_cap=np.float64(sample_cap))


def query_ranked(handle, slots, q, q_codes, dep, *, rank_tables: int, top: float, refine: float = 1.0,
                 sample_cap: float = 1.0, path: str = "ffi", heads: str | None = None):
    """The ranked query (docs/algorithm.md §2.9): per query head, the ⌈top·n⌉ best-scoring of the
    ⌈refine·top·n⌉ tokens with the highest score estimates |k|·cos(π·D/B) (D of the B bits of
    tables [0, rank_tables) differ from the query's; the store must keep their sketch:
    `sketch_tables=rank_tables`) read exactly, plus MagicPIG's importance sample over the other
    tables for the rest; when more than ⌈sample_cap·n⌉ of the rest are sampled, a uniform subset of
    that many is read, each weighted by the inverse of its chance of being kept. Arguments as `query`.
    -> out [B, Hq, d] f32, lse [B, Hq] f32, keys_read [B, Hq] int32, values_read [B, Hq] int32."""
    _check("query_ranked", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), q=(q, jnp.float32, 3),
           q_codes=(q_codes, jnp.int32, 3), dep=(dep, jnp.int32, 1))
    return sharding.engine_shards(partial(_query_ranked, rank_tables=rank_tables, top=top, refine=refine,
                                          sample_cap=sample_cap, path=path),
                                  handle, slots, (q, q_codes, dep), (3, 2, 2, 2), heads)


def _query_ranked(handle, slots, q, q_codes, dep, *, rank_tables, top, refine, sample_cap, path):
    b, hq, d = q.shape
    shapes = (jax.ShapeDtypeStruct((b, hq, d), jnp.float32), jax.ShapeDtypeStruct((b, hq), jnp.float32),
              jax.ShapeDtypeStruct((b, hq), jnp.int32), jax.ShapeDtypeStruct((b, hq), jnp.int32))
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_query_ranked_np(h, *a[:-1], rank_tables, top, refine, sample_cap),
                     shapes)
        return io_callback(host, shapes, handle, slots, q, q_codes, dep, ordered=True)
    call = jax.ffi.ffi_call(_FFI_TARGETS[path] + "_query_ranked", shapes, has_side_effect=True)
    return call(handle, slots, q, q_codes, dep, rank_tables=np.int32(rank_tables), top=np.float64(top),
                refine=np.float64(refine), sample_cap=np.float64(sample_cap))


def _free_quietly(handle: int):
    try:
        _engine.store_free(handle)
    except ValueError:
        pass  # already freed


def _check(op: str, **arrays):
    """dtype and rank checks with messages naming the argument (the engine re-checks shapes)."""
    for name, (a, dtype, rank) in arrays.items():
        ranks = (0, 2) if name == "handle" else (rank,)  # a handle, or a StoreGrid's [data, model] grid
        if not hasattr(a, "dtype") or a.dtype != dtype or a.ndim not in ranks:
            got = f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            want = "rank-0 (or a StoreGrid's [data, model])" if name == "handle" else f"rank-{rank}"
            raise PigjaxError(f"Store.{op}: {name} must be a {want} {jnp.dtype(dtype).name} array, got {got}")
