"""What every attention back-end shares: the cache pytree, the per-step context, partial softmaxes.

A back-end is a frozen (hashable) dataclass passed to jitted code as a static argument. It owns the
layout of the cache: `init_cache` builds one state per layer (a dense layer's full K/V, a sparse
layer's exact window...) plus back-end-wide `shared` state, and `attend_layer` runs one layer's
attention for a step, returning the layer's new state. The model (`pigjax.models.llama.step`)
runs the layers one by one, so each layer's state is its own buffer: written, then read, in place
(a stacked cache updated inside a scan over layers was copied whole at every layer by XLA:CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Cache:
    layers: tuple  # one state per layer (the back-end's type for that layer)
    lengths: jax.Array  # [B] int32: tokens seen per row (the next token's position)
    shared: Any = None  # back-end-wide state (e.g. the engine handle, read counters)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]


@struct.dataclass
class KV:
    """Keys/values of one layer, slot s of row b holding position s."""

    k: jax.Array  # [B, Hkv, S, d]
    v: jax.Array  # [B, Hkv, S, d]


@struct.dataclass
class StepContext:
    """What a layer's attention needs to know about the step (same for all layers)."""

    positions: jax.Array  # [B, T] int32: position of each new token
    starts: jax.Array  # [B] int32: position of the first new token (= tokens cached before)
    num_new: jax.Array  # [B] int32: how many of the T new tokens are real (the rest is padding)
    fresh: bool = struct.field(pytree_node=False, default=False)  # prefill into an empty cache
    n_layers: int = struct.field(pytree_node=False, default=0)


def init_kv(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype) -> KV:
    shape = (batch, kv_heads, capacity, head_dim)
    return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """buf [B, H, S, d] <- new [B, T, H, d] at slots starts[b] .. starts[b]+T-1 of row b (a scatter
    of T rows per sequence, in place when buf is a loop carry). Out-of-range slots are dropped."""
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    slots = starts[:, None] + jnp.arange(t)[None, :]
    return buf.at[rows, :, slots].set(new.astype(buf.dtype), mode="drop")


def group_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """[B, Hkv, G, S] float32 scores q·k/√d of one query per head, q [B, Hq, d], k [B, Hkv, S, d]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    # multiply + reduce (not a dot) lets XLA fuse the cast of a bf16 cache into the reduction.
    return jnp.sum(qg[:, :, :, None, :] * k.astype(jnp.float32)[:, :, None], axis=-1) * d ** -0.5


def softmax_part(scores: jax.Array, mask: jax.Array, v: jax.Array):
    """(o [B, Hkv, G, d], lse [B, Hkv, G]) of the softmax of `scores` [B, Hkv, G, S] over the masked
    slots, in float32. lse is −inf and o is 0 where a head sees no slot, so that `merge` ignores it."""
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


@dataclasses.dataclass
class Runtime:
    """What one generation holds outside the jitted code: `arrays` (a pytree handed to
    `init_cache` inside jit, e.g. an engine handle) and the objects behind them (e.g. the store)."""

    arrays: Any = None
    store: Any = None


class Backend:
    """Defaults shared by back-ends; see Dense for the contract."""

    def resources(self, config, batch: int, capacity: int):
        """A context manager yielding the Runtime of one generation (Dense needs nothing)."""
        return contextlib.nullcontext(Runtime())

    def stats(self, config, cache_dtype, cache: Cache | None = None, resources=None) -> dict:
        raise NotImplementedError

    def from_prefill(self, config, prefix: tuple, lengths, capacity: int, window: int, dtype, runtime=None) -> Cache:
        """The cache this back-end's own prefill would leave, from a dense prefill's per-layer K/V
        (`prefix`: KV [B, Hkv, t, d] per layer, rows of `lengths` tokens). One dense prefill can so
        serve several back-ends (generate with a list of back-ends). Runs layer by layer (one
        jitted call each), so that the temporaries of one layer (e.g. MagicPIG's centered keys
        and codes) are freed before the next: at 32k tokens x 4 rows they are GBs per layer."""
        b = lengths.shape[0]
        cache = _init(self, config, b, capacity, window, jnp.dtype(dtype), runtime)
        layers = tuple(_ingest(self, config, state, cache.shared, kv, lengths, self.layer_slots(config, i, b))
                       for i, (state, kv) in enumerate(zip(cache.layers, prefix)))
        lengths, shared = _finish_prefill(self, config, cache.shared, lengths)
        return Cache(layers, lengths, shared)

    def layer_slots(self, config, layer: int, batch: int):
        """Engine slots of a layer's rows (None: the layer has none)."""
        return None

    def ingest_layer(self, config, state, shared, kv: KV, lengths, slots):
        t = kv.k.shape[2]
        return KV(state.k.at[:, :, :t].set(kv.k.astype(state.k.dtype)), state.v.at[:, :, :t].set(kv.v.astype(state.v.dtype)))


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _init(backend, config, batch, capacity, window, dtype, runtime):
    return backend.init_cache(config, batch, capacity, window, dtype, runtime)


@partial(jax.jit, static_argnums=(0, 1))
def _ingest(backend, config, state, shared, kv, lengths, slots):
    return backend.ingest_layer(config, state, shared, kv, lengths, slots)


@partial(jax.jit, static_argnums=(0, 1))
def _finish_prefill(backend, config, shared, lengths):
    b = lengths.shape[0]
    ctx = StepContext(jnp.zeros((b, 1), jnp.int32), jnp.zeros((b,), jnp.int32), lengths, True,
                      config.num_hidden_layers)
    return lengths + 0, backend.finish_step(shared, ctx, [None] * config.num_hidden_layers)
