"""The matrix products of a decode step on the CPU (docs/algorithm.md §4, "Decode projections on the CPU").

At a handful of rows (a decode step: batch x 1 token) a projection is bound by reading its weight
once, and XLA:CPU's dot runs well below the memory bandwidth there (BUILD.md, "Decode
projections"). `for_rows` gives the models' Flax projections a `dot_general` that hands such
products to the engine's `native.small_matmul`, which streams the weight in address order;
`tied_logits` does the same for the tied embedding. Everything else (prefill, training, a device
mesh, GPUs) keeps `lax.dot_general`. Inference only: the engine's kernel has no gradient.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
from jax import lax

from pigjax import sharding
from pigjax.engine import native
from pigjax.engine import store as engine

# Rows up to which the engine's kernel beats XLA's dot (at 16 it is 1.0-2x, past that it is
# compute-bound: BUILD.md, "Decode projections").
MAX_ROWS = 16
_DTYPES = (jnp.float32, jnp.bfloat16)  # of x and of the weight; a bf16 x is widened (exactly) to f32


def native_applies(rows: int) -> bool:
    """Whether a product of `rows` rows runs in the engine: few rows, CPU backend, no mesh, and not
    switched off by PIGJAX_DECODE_PROJECTIONS=xla (read when a step is traced; for A/B runs)."""
    if os.environ.get("PIGJAX_DECODE_PROJECTIONS", "engine") == "xla":
        return False
    return rows <= MAX_ROWS and engine.default_path() == "ffi" and sharding.current_mesh() is None


def supports(*arrays) -> bool:
    """Whether the kernel takes these dtypes (f32 or bf16 each)."""
    return all(a.dtype in _DTYPES for a in arrays)


def _as_matmul(lhs, rhs, dimension_numbers):
    """(K, N) when the product is lhs[..., K] . rhs[K, ...] (contracting lhs's trailing dims with
    rhs's leading dims in order, no batch dims) and the dtypes suit the kernel, else None."""
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = tuple(d % lhs.ndim for d in lc), tuple(d % rhs.ndim for d in rc)
    n_c = len(lc)
    if lb or rb or lc != tuple(range(lhs.ndim - n_c, lhs.ndim)) or rc != tuple(range(n_c)):
        return None
    if not supports(lhs, rhs):
        return None
    return math.prod(lhs.shape[lhs.ndim - n_c:]), math.prod(rhs.shape[n_c:])


def small_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for the models' projections, by the engine when the product is a plain
    few-row matmul (`_as_matmul`), else by XLA."""
    kn = _as_matmul(lhs, rhs, dimension_numbers)
    n_c = len(dimension_numbers[0][0])
    rows = math.prod(lhs.shape[:lhs.ndim - n_c])
    if kn is None or not native_applies(rows):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    k, n = kn
    out = native.small_matmul(lhs.reshape(rows, k).astype(jnp.float32), rhs.reshape(k, n))
    dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    return out.reshape(lhs.shape[:lhs.ndim - n_c] + rhs.shape[n_c:]).astype(dtype)


def for_rows(rows: int):
    """The `dot_general` for a step of `rows` rows: `small_dot_general` when the engine applies,
    else None (Flax's default, `lax.dot_general`)."""
    return small_dot_general if native_applies(rows) else None


def tied_logits(x, embedding):
    """x [..., hidden] . embedding[V, hidden]^T in f32 by the engine (the tied embedding as the output
    projection; x and embedding f32 or bf16); call it where `native_applies` and `supports`."""
    rows = math.prod(x.shape[:-1])
    out = native.small_matmul(x.reshape(rows, x.shape[-1]).astype(jnp.float32), embedding, w_nk=True)
    return out.reshape(x.shape[:-1] + (embedding.shape[0],))
