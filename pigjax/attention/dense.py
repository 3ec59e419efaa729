"""Exact causal attention over a KV cache, with GQA and per-row query positions."""

import jax
import jax.numpy as jnp


def attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over cache slots s <= the query's position.

    q: [B, T, H, d]; k, v: [B, Hkv, S, d] (slot s holds position s); positions: [B, T] int32.
    Query head h reads KV head h // (H / Hkv). Computed in float32 whatever the cache dtype (XLA:CPU
    has no bf16 x bf16 -> f32 dot, and fp32 accumulation is what we want anyway); the result has
    q's dtype.
    """
    b, t, h, d = q.shape
    dtype = q.dtype
    hkv, s = k.shape[1], k.shape[2]
    f32 = jnp.float32
    q = q.reshape(b, t, hkv, h // hkv, d).astype(f32)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(f32)) * (d ** -0.5)
    visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    # Slot 0 is always visible (position >= 0), so no row is fully masked and no NaN arises.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(f32))
    return out.reshape(b, t, h, d).astype(dtype)
