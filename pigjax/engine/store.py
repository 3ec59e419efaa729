"""The C++ LSH store (ffi/src/lsh_store.*) from Python and from jitted code.

A `Store` owns, per (sequence slot, KV head), the centered middle keys, values, key norms and L
SimHash tables of a prefilled sequence, plus an optional append buffer of later tokens. Its jittable
operations are ordered by data: `prefill` returns the middle counts, which `append` and `query` take
as an input (`append` returns the totals, which the next call takes). Two paths reach the same C++ code:

- "ffi" (JAX's CPU backend): XLA FFI custom calls with `has_side_effect=True`, so XLA never hoists
  or drops them; about 0.2 µs of overhead per call.
- "callback" (any backend, e.g. a GPU): `io_callback` into the engine's NumPy entry points; JAX
  copies the inputs to the host and the results back (tens of µs plus the copies). An engine
  error there does not raise inside the callback (see `_CallbackErrors`): the call returns NaN
  and -1 results and the error is raised by the `Store` that made the call (eagerly, or at
  `check()` / `close()`), or by `raise_callback_error(handle)` for module-function callers.

The default is "ffi" when JAX's default backend is the CPU, else "callback".
"""

from __future__ import annotations

import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental import io_callback

from pigjax.engine import native  # registers the FFI targets
from pigjax.errors import PigjaxError

_engine = native._engine


class Store:
    """A handle to an engine store; free it with `close()` or a `with` block (also freed at exit)."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, capacity: int, K: int, L: int,
                 eps: float = 1e-4, storage: str = "bf16", path: str | None = None):
        self.path = path or default_path()
        if self.path not in ("ffi", "callback"):
            raise PigjaxError(f"Store: path must be 'ffi' or 'callback', got {path!r}")
        try:
            self.handle = int(_engine.store_create(slots, kv_heads, head_dim, capacity, K, L, eps, storage))
        except ValueError as e:
            raise PigjaxError(f"Store: {e}") from None
        self.slots, self.kv_heads, self.head_dim, self.capacity = slots, kv_heads, head_dim, capacity
        self.K, self.L, self.eps, self.storage = K, L, eps, storage
        self._finalizer = weakref.finalize(self, _free_quietly, self.handle)

    def close(self):
        if getattr(self, "_pending", None) is not None:
            try:
                jax.block_until_ready(self._pending)
            except jax.errors.JaxRuntimeError:
                pass  # a failed ffi call: its result raises for whoever reads it
            self._pending = None
        self._finalizer()
        self.check()

    def check(self):
        """Raise PigjaxError for an engine error of a callback-path call (none on the ffi path,
        whose errors JAX raises itself)."""
        raise_callback_error(self.handle)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            self.close()
        except PigjaxError:
            if exc_type is None:  # don't hide the exception already in flight
                raise

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

    def query(self, slots, q, q_codes, dep):
        return self._track(query(self.handle_array, slots, q, q_codes, dep, path=self.path))

    def _track(self, result):
        """JAX dispatches asynchronously: keep the newest result so that `close()` waits for the
        calls in flight instead of freeing the store under them (they would fail: unknown handle).
        Jitted code that uses `handle_array` must block on its results before the store closes."""
        if not isinstance(jax.tree.leaves(result)[0], jax.core.Tracer):
            self._pending = result
            if self.path == "callback":
                jax.block_until_ready(result)
                self.check()
        return result


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


def raise_callback_error(handle: int):
    """Raise PigjaxError if a callback-path call on `handle` failed since the last check."""
    message = _callback_errors.take(int(handle))
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


def default_path() -> str:
    return "ffi" if jax.default_backend() == "cpu" else "callback"


def simhash_codes(x, proj, K: int, path: str | None = None):
    """SimHash codes of x [..., d] (see `pigjax.engine.native`): the C++ kernel on the "ffi" path, the
    same function in jnp elsewhere (the FFI target exists for the CPU backend only)."""
    if (path or default_path()) == "ffi":
        return native.simhash_codes(x, proj, K)
    return native.simhash_codes_reference(x, proj, K)


def prefill(handle, slots, keys, values, codes, lengths, *, sink: int, local: int, path: str = "ffi"):
    """Fill `slots` [B] of store `handle` (rank-0 int32) with centered keys, values [B, Hkv, n, d]
    f32 and their codes [B, Hkv, n, L] int32; positions [sink, length − local) are stored.
    -> middle counts [B] int32."""
    _check("prefill", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), keys=(keys, jnp.float32, 4),
           values=(values, jnp.float32, 4), codes=(codes, jnp.int32, 4), lengths=(lengths, jnp.int32, 1))
    result = jax.ShapeDtypeStruct(slots.shape, jnp.int32)
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_prefill_np(h, *a, sink, local), result)
        return io_callback(host, result, handle, slots, keys, values, codes, lengths, ordered=True)
    call = jax.ffi.ffi_call("pigjax_lsh_prefill", result, has_side_effect=True)
    return call(handle, slots, keys, values, codes, lengths, sink=np.int32(sink), local=np.int32(local))


def append(handle, slots, keys, values, codes, counts, dep, *, path: str = "ffi"):
    """Append the first counts[b] of T tokens of keys, values [B, Hkv, T, d] f32 (centered like
    the middle) and their codes [B, Hkv, T, L] int32 to prefilled `slots` [B] (beyond the paper:
    later queries may sample them, weighted like middle tokens). `dep` [B] is any int32 produced
    after the prefill or the previous append, to order the calls. -> totals [B] int32 (middle +
    appended tokens; pass it as the next call's `dep`)."""
    _check("append", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), keys=(keys, jnp.float32, 4),
           values=(values, jnp.float32, 4), codes=(codes, jnp.int32, 4), counts=(counts, jnp.int32, 1),
           dep=(dep, jnp.int32, 1))
    result = jax.ShapeDtypeStruct(slots.shape, jnp.int32)
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_append_np(h, *a[:-1]), result)  # a[-1]: dep
        return io_callback(host, result, handle, slots, keys, values, codes, counts, dep, ordered=True)
    call = jax.ffi.ffi_call("pigjax_lsh_append", result, has_side_effect=True)
    return call(handle, slots, keys, values, codes, counts, dep)


def query(handle, slots, q, q_codes, dep, *, path: str = "ffi"):
    """Sampled partial attention of q [B, Hq, d] (codes [B, Hq, L]) over `slots`; `dep` [B] is
    any int32 produced after the prefill (its middle counts), to order the calls.
    -> out [B, Hq, d] f32, lse [B, Hq] f32 (−inf where S is empty), sampled [B, Hq] int32."""
    _check("query", handle=(handle, jnp.int32, 0), slots=(slots, jnp.int32, 1), q=(q, jnp.float32, 3),
           q_codes=(q_codes, jnp.int32, 3), dep=(dep, jnp.int32, 1))
    b, hq, d = q.shape
    shapes = (jax.ShapeDtypeStruct((b, hq, d), jnp.float32), jax.ShapeDtypeStruct((b, hq), jnp.float32),
              jax.ShapeDtypeStruct((b, hq), jnp.int32))
    if path == "callback":
        host = _host(lambda h, *a: _engine.store_query_np(h, *a[:-1]), shapes)  # a[-1]: dep
        return io_callback(host, shapes, handle, slots, q, q_codes, dep, ordered=True)
    call = jax.ffi.ffi_call("pigjax_lsh_query", shapes, has_side_effect=True)
    return call(handle, slots, q, q_codes, dep)


def _free_quietly(handle: int):
    try:
        _engine.store_free(handle)
    except ValueError:
        pass  # already freed


def _check(op: str, **arrays):
    """dtype and rank checks with messages naming the argument (the engine re-checks shapes)."""
    for name, (a, dtype, rank) in arrays.items():
        if not hasattr(a, "dtype") or a.dtype != dtype or a.ndim != rank:
            got = f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            raise PigjaxError(f"Store.{op}: {name} must be a rank-{rank} {jnp.dtype(dtype).name} array, got {got}")
