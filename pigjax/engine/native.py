"""JAX bindings for the C++ CPU engine (``pigjax._engine``).

Importing this module registers every XLA FFI handler the engine exports with
``jax.ffi.register_ffi_target(name, capsule, platform="cpu")`` (once per process).

The LSH store also has handlers for XLA's CUDA platform, in the separate module
``pigjax._engine_cuda`` (ffi/src/cuda_handlers.cc; built only with ``PIGJAX_CUDA``, BUILD.md):
:func:`cuda_handlers` imports it on first use, connects it to this engine's store registry and
registers its targets for ``platform="CUDA"``.

SimHash codes (docs/algorithm.md §2.3): for ``x [..., d]`` and ``proj [d, K*L]``, table ``l``
uses columns ``[l*K, (l+1)*K)``; bit ``j`` is ``x @ proj[:, l*K+j] > 0``; the code is
``sum_j bit_j << j`` (LSB first), an int32 in ``[0, 2**K)``.

* :func:`simhash_codes` calls the C++ kernel through ``jax.ffi.ffi_call``. It is
  jittable, works in ``lax.scan`` and under ``jax.vmap`` (``vmap_method="expand_dims"``;
  the handler broadcasts batch dims, so a shared ``proj`` is never copied), and runs on
  the **CPU backend only** (the target is registered for ``platform="cpu"``).
* :func:`simhash_codes_reference` is the same function in plain ``jnp``; use it on
  other backends, or when differentiating through code that calls it.
* :func:`decode_attention` is exact attention of one decode query per head over a dense KV
  cache, each row read only up to its own length (the CPU path of ``attention.dense``).
* :func:`small_matmul` is ``x @ w`` (or ``x @ w.T``) for few rows of x, f32 or bf16 weights,
  by a kernel that streams w once (the CPU path of a decode step's projections).
* :func:`simhash_codes_np` runs the same kernel on NumPy arrays outside JAX, or (with
  ``kernel="legacy"``) the single-thread kernel of commit 4ac4b4a; for tests and benchmarks.

The C++ kernel is a blocked matrix product that splits rows over the engine's thread pool
(``num_threads()`` workers by default; ``pigjax._engine.set_num_threads`` resizes it). At a
given SIMD level its codes do not depend on the thread count and equal the legacy kernel's
bit for bit (same multiply-adds in the same order). BUILD.md, "SimHash", has the figures and
why the dot products are not left to XLA's dot.

The two agree except where a dot product is within float32 rounding of 0 (the kernels
accumulate in a different order / with FMA); exactly-zero and NaN dot products give 0 bits
in both.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pigjax import _engine

__all__ = [
    "MAX_K",
    "simhash_codes",
    "simhash_codes_reference",
    "simd_level",
    "hardware_simd_level",
    "set_simd_level",
    "cpu_features",
    "num_threads",
    "simhash_codes_np",
    "decode_attention",
    "prefill_attention",
    "small_matmul",
    "write_rows",
    "cuda_handlers",
    "cuda_unavailable_reason",
    "load_fake_cuda_handlers",
    "take_deferred_error",
]

MAX_K = 16
SIMHASH_TARGET = "pigjax_simhash_codes"
DECODE_ATTENTION_TARGET = "pigjax_decode_attention"
PREFILL_ATTENTION_TARGET = "pigjax_prefill_attention"
SMALL_MATMUL_TARGET = "pigjax_small_matmul"
WRITE_ROWS_TARGET = "pigjax_write_rows"

simd_level = _engine.simd_level
hardware_simd_level = _engine.hardware_simd_level
set_simd_level = _engine.set_simd_level
cpu_features = _engine.cpu_features
num_threads = _engine.num_threads
simhash_codes_np = _engine.simhash_codes_np


def _register_targets() -> None:
    for name, capsule in _engine.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


_register_targets()  # module import runs once per process

_cuda = {"checked": False, "module": None, "reason": "not checked yet"}


def _connect(module_name: str, platform: str):
    import importlib
    module = importlib.import_module(module_name)
    module.connect(_engine.engine_api())
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)
    return module


def cuda_handlers() -> bool:
    """Whether the CUDA store targets (``pigjax_cuda_lsh_*`` and ``pigjax_cuda_async_lsh_*``) are registered.
    The first call imports ``pigjax._engine_cuda`` when JAX's default device is a CUDA GPU, connects
    it to this engine and registers its targets; the answer is then fixed for the process (the
    reason for False: :func:`cuda_unavailable_reason`)."""
    if not _cuda["checked"]:
        _cuda["checked"] = True
        device = jax.devices()[0]
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        if device.platform not in ("gpu", "cuda") or "rocm" in version:
            _cuda["reason"] = f"JAX's default device is {device.platform!r} ({version or 'no version'}), not a CUDA GPU"
        else:
            try:
                _cuda["module"] = _connect("pigjax._engine_cuda", "CUDA")
                _cuda["reason"] = ""
            except ImportError as e:
                _cuda["reason"] = (f"pigjax._engine_cuda is not importable ({e}); build it with "
                                   "-DPIGJAX_CUDA=ON (BUILD.md, CUDA handlers)")
    return _cuda["module"] is not None


def cuda_unavailable_reason() -> str:
    """Why :func:`cuda_handlers` is False ("" when it is True)."""
    cuda_handlers()
    return _cuda["reason"]


_fake = {}


def take_deferred_error(handle: int) -> str | None:
    """The first engine error of an asynchronous CUDA call (path "cuda-async") on store `handle`
    since the last take, from whichever CUDA handler modules this process loaded; None if none."""
    for module in (_cuda["module"], _fake.get("module")):
        if module is not None:
            message = module.take_deferred_error(int(handle))
            if message is not None:
                return message
    return None


def load_fake_cuda_handlers():
    """TEST ONLY: import ``pigjax._engine_cuda_fake`` (the CUDA handlers compiled against a fake
    CUDA runtime, ffi/tests/fake_cuda; built with -DPIGJAX_CUDA_FAKE=ON), connect it and register
    its targets ``pigjax_test_cuda_lsh_*`` for the CPU platform. Returns the module (ImportError
    if it was not built)."""
    if "module" not in _fake:
        _fake["module"] = _connect("pigjax._engine_cuda_fake", "cpu")
    return _fake["module"]


def _static_k(K) -> int:
    if isinstance(K, (bool, np.bool_)):
        raise ValueError(f"simhash: K must be an int in [1, {MAX_K}], got {K!r}")
    try:
        k = operator.index(K)
    except TypeError:
        raise ValueError(
            f"simhash: K must be a static Python int in [1, {MAX_K}], got {type(K).__name__} "
            f"{K!r} (a traced K is not supported; mark it static under jit)") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"simhash: K must be in [1, {MAX_K}], got {k}")
    return k


def _check_shapes(x, proj, k: int) -> int:
    """Checks ranks and sizes; returns L."""
    if x.ndim < 1:
        raise ValueError(f"simhash: x must have shape [..., d], got a scalar (shape {x.shape})")
    if proj.ndim != 2:
        raise ValueError(f"simhash: proj must have shape [d, K*L] (rank 2), got shape {proj.shape}")
    d, m = proj.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"simhash: x's last dim ({x.shape[-1]}) must equal proj's row count d ({d}); "
            f"x {x.shape}, proj {proj.shape}")
    if m % k != 0:
        raise ValueError(f"simhash: proj has {m} columns, which is not a multiple of K={k}")
    return m // k


def _as_array(a):
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        a = jnp.asarray(a)
    return a


def simhash_codes(x, proj, K) -> jax.Array:
    """SimHash codes via the C++ FFI kernel (CPU backend).

    Args:
      x: float32 ``[..., d]`` (any leading dims).
      proj: float32 ``[d, K*L]``.
      K: static int in ``[1, 16]``, bits per table.

    Returns:
      int32 ``[..., L]``.
    """
    k = _static_k(K)
    x = _as_array(x)
    proj = _as_array(proj)
    for name, a in (("x", x), ("proj", proj)):
        if a.dtype != np.float32:
            raise ValueError(
                f"simhash: {name} must be float32, got {a.dtype} (cast with .astype(jnp.float32))")
    L = _check_shapes(x, proj, k)
    call = jax.ffi.ffi_call(
        SIMHASH_TARGET,
        jax.ShapeDtypeStruct(tuple(x.shape[:-1]) + (L,), jnp.int32),
        vmap_method="expand_dims",
    )
    return call(x, proj, K=np.int32(k))


def simhash_codes_reference(x, proj, K) -> jax.Array:
    """Pure-``jnp`` SimHash codes; same contract as :func:`simhash_codes`, any float dtype."""
    k = _static_k(K)
    x = _as_array(x)
    proj = _as_array(proj)
    for name, a in (("x", x), ("proj", proj)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"simhash: {name} must be a floating dtype, got {a.dtype}")
    L = _check_shapes(x, proj, k)
    rows = math.prod(x.shape[:-1])
    if rows * proj.shape[1] <= SIMHASH_CHUNK_DOTS:
        return _codes_of_rows(x, proj, k, L)
    # A long prompt's dots [rows, K*L] would take gigabytes on a GPU: hash it in row chunks.
    flat = x.reshape(rows, x.shape[-1])
    chunk = max(1, SIMHASH_CHUNK_DOTS // proj.shape[1])
    codes = jax.lax.map(lambda r: _codes_of_rows(r, proj, k, L), flat, batch_size=chunk)
    return codes.reshape(tuple(x.shape[:-1]) + (L,))


SIMHASH_CHUNK_DOTS = 2**26  # dot products one jnp SimHash pass holds at most (256 MB in f32)


def _codes_of_rows(x, proj, k: int, L: int) -> jax.Array:
    dots = jnp.matmul(x, proj, precision=jax.lax.Precision.HIGHEST)
    bits = (dots > 0).reshape(tuple(x.shape[:-1]) + (L, k)).astype(jnp.int32)
    weights = jnp.left_shift(jnp.int32(1), jnp.arange(k, dtype=jnp.int32))
    return jnp.sum(bits * weights, axis=-1, dtype=jnp.int32)


def _check_attention_dtypes(where: str, q, k, v):
    """The attention kernels' dtypes: q float32; k and v both float32 or both bfloat16."""
    if q.dtype != jnp.float32:
        raise ValueError(f"{where}: q must be float32, got {q.dtype}")
    if k.dtype != v.dtype or k.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"{where}: k and v must both be float32 or both bfloat16, got {k.dtype} and {v.dtype}")


def decode_attention(q, k, v, lengths, *, with_lse: bool = False):
    """softmax(q k^T / sqrt(d)) v of one query per head over the first ``lengths[b]`` slots of
    row b, by the C++ kernel (CPU backend; ffi/src/decode_attention.h).

    Args:
      q: float32 ``[B, Hq, d]``; query head h reads KV head ``h // (Hq / Hkv)``.
      k, v: ``[B, Hkv, S, d]``, both float32 or both bfloat16.
      lengths: int32 ``[B]`` in ``[0, S]``; slots past a row's length are never read, and a row
        of length 0 gets zeros.

    Returns:
      float32 ``[B, Hq, d]``, accumulated in float32; with ``with_lse``, also the log-sum-exp of
      each head's scores, float32 ``[B, Hq]`` (-inf for a row of length 0): the partial softmax
      that `pigjax.attention.softmax.merge` combines with another part.
    """
    _check_attention_dtypes("decode_attention", q, k, v)
    if lengths.dtype != jnp.int32:
        raise ValueError(f"decode_attention: lengths must be int32, got {lengths.dtype}")
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:2], jnp.float32))
    out, lse = jax.ffi.ffi_call(DECODE_ATTENTION_TARGET, out_types, vmap_method="sequential")(q, k, v, lengths)
    return (out, lse) if with_lse else out


def prefill_attention(q, k, v):
    """Causal softmax(q k^T / sqrt(d)) v of a fresh prefill by the C++ kernel (CPU backend;
    ffi/src/prefill_attention.h): query t of every row sits at position t and sees slots 0..t.

    Args:
      q: float32 ``[B, T, Hq, d]``; query head h reads KV head ``h // (Hq / Hkv)``.
      k, v: ``[B, Hkv, S, d]`` with ``S >= T``, both float32 or both bfloat16; slots past T are
        never read.

    Returns:
      float32 ``[B, T, Hq, d]``, accumulated in float32.
    """
    _check_attention_dtypes("prefill_attention", q, k, v)
    call = jax.ffi.ffi_call(PREFILL_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q, k, v)


def write_rows(buf, rows, starts) -> jax.Array:
    """``buf`` [B, H, S, d] with ``rows`` [B, T, H, d] written at slots ``starts[b] + t`` of row b,
    slots outside [0, S) dropped, by the C++ engine (CPU backend; ffi/src/write_rows.h): the
    result aliases ``buf``, so a loop-carried cache is written in place whatever its dtype.

    Args:
      buf: ``[B, H, S, d]``, any dtype.
      rows: ``[B, T, H, d]``, buf's dtype.
      starts: int32 ``[B]``.
    """
    if buf.ndim != 4 or rows.ndim != 4 or rows.dtype != buf.dtype:
        raise ValueError(f"write_rows: buf [B, H, S, d] and rows [B, T, H, d] of one dtype, got "
                         f"{buf.dtype} {buf.shape} and {rows.dtype} {rows.shape}")
    b, h, _, d = buf.shape
    if rows.shape[0] != b or rows.shape[2:] != (h, d):
        raise ValueError(f"write_rows: rows {rows.shape} do not fit buf {buf.shape}")
    if starts.dtype != jnp.int32 or starts.shape != (b,):
        raise ValueError(f"write_rows: starts must be int32 [{b}], got {starts.dtype} {starts.shape}")
    call = jax.ffi.ffi_call(WRITE_ROWS_TARGET, jax.ShapeDtypeStruct(buf.shape, buf.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(buf, rows, starts)


def small_matmul(x, w, *, w_nk: bool = False) -> jax.Array:
    """``x @ w`` (``x @ w.T`` with ``w_nk``) by the C++ kernel (CPU backend; ffi/src/small_matmul.h),
    for few rows of x: it reads w once in address order, so a decode step's projection runs at
    memory bandwidth (XLA's dot does not at a handful of rows; BUILD.md, "Decode projections").

    Args:
      x: float32 ``[M, K]``.
      w: ``[K, N]`` (``[N, K]`` with ``w_nk``), float32 or bfloat16 (widened in registers).

    Returns:
      float32 ``[M, N]``, accumulated in float32 over k in order.
    """
    if x.dtype != jnp.float32 or x.ndim != 2:
        raise ValueError(f"small_matmul: x must be a float32 [M, K] array, got {x.dtype} {x.shape}")
    if w.dtype not in (jnp.float32, jnp.bfloat16) or w.ndim != 2:
        raise ValueError(f"small_matmul: w must be a float32 or bfloat16 2-d array, got {w.dtype} {w.shape}")
    k, n = (w.shape[1], w.shape[0]) if w_nk else w.shape
    if x.shape[1] != k:
        layout = "[N, K]" if w_nk else "[K, N]"
        raise ValueError(f"small_matmul: x {x.shape} and w {w.shape} (w is {layout}) disagree on K")
    call = jax.ffi.ffi_call(SMALL_MATMUL_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, w, w_nk=bool(w_nk))
