"""Partial softmaxes and their log-sum-exp merge (docs/algorithm.md §2.6).

Attention over a key set that splits into disjoint parts (an exact window and a sampled middle)
is computed one part at a time, each as (output, log-sum-exp), and the parts are merged exactly.
A part with no key has lse = −inf and contributes nothing. Everything runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """[B, Hkv, G, S] float32 scores q·k/√d of one query per head, q [B, Hq, d], k [B, Hkv, S, d]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    # multiply + reduce (not a dot) lets XLA fuse the cast of a bf16 cache into the reduction.
    return jnp.sum(qg[:, :, :, None, :] * k.astype(jnp.float32)[:, :, None], axis=-1) * d ** -0.5


def softmax_part(scores: jax.Array, mask: jax.Array, v: jax.Array):
    """(o [B, Hkv, G, d], lse [B, Hkv, G]) of the softmax of `scores` [B, Hkv, G, S] over the masked
    slots. lse is −inf and o is 0 where a head sees no slot, so that `merge` ignores it."""
    scores = jnp.where(mask, scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    return jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, None], axis=-2), lse


def partial_softmax(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
    """(o [B, Hq, d], lse [B, Hq]) of one query per head over k, v [B, Hkv, S, d] where `mask`
    (broadcastable to [B, Hkv, Hq/Hkv, S]) holds."""
    b, hq, d = q.shape
    out, lse = softmax_part(group_scores(q, k), mask, v)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def merge(out_a, lse_a, out_b, lse_b):
    """(o, lse) of the union of two disjoint key sets from their partial softmaxes; −inf = empty."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a, b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # exp(−inf) = 0
    total = jnp.maximum(a + b, jnp.finfo(jnp.float32).tiny)
    out = (a[..., None] * out_a + b[..., None] * out_b) / total[..., None]
    return out, m + jnp.log(total)
