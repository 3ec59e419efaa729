"""The one split of a prompt into sink, middle and local window (docs/algorithm.md §2.1).

A prompt of n tokens splits into the sink [0, lo), the middle [lo, hi) and the local window
[hi, n) with lo = min(sink, n) and hi = max(lo, n − local). Sparse back-ends attend exactly to
sink and local (and to generated tokens) and read only part of the middle. Every user of the split
(the back-ends, the engine call, the NumPy reference, the evaluations) goes through these functions.
Written with `jnp`, they take Python ints, NumPy or JAX arrays (and return JAX arrays).
"""

from __future__ import annotations

import jax.numpy as jnp


def middle_bounds(n, sink: int, local: int):
    """[lo, hi) of the middle of prompts of n tokens (n: an int or an array of lengths)."""
    lo = jnp.minimum(sink, n)
    return lo, jnp.maximum(lo, n - local)


def middle_mask(width: int, n, sink: int, local: int):
    """[B, width] bool: which positions 0..width-1 of rows of n [B] tokens lie in the middle."""
    lo, hi = middle_bounds(n, sink, local)
    p = jnp.arange(width)[None, :]
    return (p >= lo[:, None]) & (p < hi[:, None])


def exact_positions(n, sink: int, local: int, width: int):
    """Positions of each row's exact prompt tokens (sink, then local) in order, for window slots
    0..width-1, and which slots hold one: (pos [B, width] int32 >= 0, valid [B, width] bool)."""
    lo, hi = middle_bounds(n, sink, local)
    j = jnp.arange(width)[None, :]
    pos = jnp.where(j < lo[:, None], j, hi[:, None] + (j - lo[:, None]))
    return jnp.maximum(pos, 0), pos < n[:, None]
