"""Parts shared by Memory Mosaics v1 (`pigjax.models.mosaics`) and v2 (`pigjax.models.mosaics_v2`):
normalisation, kernel-regression retrieval, which pairs a query sees (`Span`), the recurrent
form's exact memory, one-step-peek values, layer helpers (docs/algorithm.md §3, §3A)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pigjax.models.mosaics_config import MosaicsConfig

_NORM_EPS = 1e-12


def normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, 1e-12) over the last axis; finite gradient at x = 0 (unlike ‖x‖ itself)."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def retrieve(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array, dropout=None) -> jax.Array:
    """Σ_s softmax_s(q·k_s) v_s over visible slots; a query that sees no slot gets 0.

    q [B, H, T, hs]; keys, values [B, H, S, hs]; visible [B or 1, T, S] bool.
    """
    scores = jnp.einsum("bhtd,bhsd->bhts", q, keys)
    mask = visible[:, None]
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    # A fully masked row softmaxes to a uniform distribution; the mask then zeroes it (y_0 = 0).
    weights = jax.nn.softmax(scores, axis=-1) * mask
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhts,bhsd->bhtd", weights, values)


def _linear(features: int, fan_in: int, name: str, scale: float = 1.0) -> nn.Dense:
    """Linear without bias, N(0, scale / sqrt(fan_in))."""
    return nn.Dense(features, use_bias=False, kernel_init=nn.initializers.normal(scale / math.sqrt(fan_in)), name=name)


# Heads are laid out [B, H, T, hs] inside the memories (the buffers' layout; measured faster on
# XLA:CPU than [B, T, H, hs] for the retrieval einsums).
def _split_heads(x: jax.Array, config: MosaicsConfig) -> jax.Array:
    b, t, _ = x.shape
    return x.reshape(b, t, config.num_attention_heads, config.head_size).transpose(0, 2, 1, 3)


def _merge_heads(y: jax.Array) -> jax.Array:
    b, h, t, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, t, h * hs)


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, H, T, hs] at time index[b] of each row -> [B, H, hs]."""
    return jnp.take_along_axis(x, index[:, None, None, None], axis=2)[:, :, 0]


@dataclasses.dataclass(frozen=True)
class Span:
    """Which pairs the query at position T sees: t with gap <= T - t (<= window, if one).

    v1's contextual memory is Span() (every earlier pair); v2's short-term memory
    Span(1, h) and its long-term memory Span(m) (docs/algorithm.md §3A.3). `gap` may be traced.
    """

    gap: int | jax.Array = 1
    window: int | None = None

    def visible(self, query_pos: jax.Array, slot_pos: jax.Array) -> jax.Array:
        """[..., T, S] bool for query positions [..., T] and slot positions [..., S]."""
        age = query_pos[..., :, None] - slot_pos[..., None, :]
        ok = age >= self.gap
        return ok if self.window is None else ok & (age <= self.window)

    def count(self, query_pos: jax.Array) -> jax.Array:
        """n = |S(T)|, the pairs the query at each position sees."""
        n = jnp.maximum(query_pos - self.gap + 1, 0)
        return n if self.window is None else jnp.minimum(n, jnp.maximum(self.window - self.gap + 1, 0))


def exact_memory(state, q, k, vals, count, span: Span = Span()):
    """The recurrent form's contextual memory: write keys k [B, H, T, hs] to slots count..count+T-1
    and values vals (of slots count-1..count+T-2) to the buffers, then retrieve with queries q over
    the slots `span` lets each position see. -> (y [B, H, T, hs], the new buffer fields).
    `ContextMemory.memory` may replace it (e.g. sampled retrieval, pigjax.models.mosaics_memory)
    with another function of the same signature."""
    b, _, t, _ = k.shape
    rows, steps = jnp.arange(b)[:, None], jnp.arange(t)[None, :]
    capacity = state.keys.shape[2]
    key_slots = count[:, None] + steps
    value_slots = key_slots - 1
    value_slots = jnp.where(value_slots < 0, capacity, value_slots)  # no slot -1: dropped
    # (the scatter's update is laid out [B, T, H, hs]: indexed axes first)
    keys = state.keys.at[rows, :, key_slots].set(k.transpose(0, 2, 1, 3).astype(state.keys.dtype), mode="drop")
    values = state.values.at[rows, :, value_slots].set(vals.transpose(0, 2, 1, 3).astype(state.values.dtype),
                                                      mode="drop")
    visible = span.visible(key_slots, jnp.arange(capacity)[None, :])
    return retrieve(q, keys, values, visible), dict(keys=keys, values=values)


def ring_memory(state, q, k, vals, count, num_new, span: Span):
    """`exact_memory` for a memory with a window (v2's short-term memory, Span(gap, h)) in a ring
    of W >= h slots instead of a buffer per position: slot s holds the key of the newest position
    p ≡ s (mod W) below `count`, and its value from one step later on (the value of p = count − 1
    arrives now, as vals[:, :, 0]). Each query reads the ring (patched with that value) and the
    new pairs; then only the newest W of the row's `num_new` [B] new keys and values are written,
    so padded positions never overwrite a pair still in reach."""
    b, _, t, _ = k.shape
    width, rows = state.keys.shape[2], jnp.arange(b)[:, None]
    last = count[:, None] - 1
    old_pos = last - jnp.mod(last - jnp.arange(width)[None, :], width)  # [B, W]; < 0: empty slot
    old_values = jnp.where((old_pos == last)[:, None, :, None], vals[:, :, :1].astype(state.values.dtype), state.values)
    new_pos = count[:, None] + jnp.arange(t)[None, :]  # [B, T]
    keys = jnp.concatenate([state.keys, k.astype(state.keys.dtype)], axis=2)
    values = jnp.concatenate([old_values, vals[:, :, 1:].astype(state.values.dtype),
                              jnp.zeros_like(old_values[:, :, :1])], axis=2)  # the newest pair's value: unknown yet
    filled = jnp.concatenate([old_pos >= 0, jnp.ones((b, t), bool)], axis=1)
    visible = span.visible(new_pos, jnp.concatenate([old_pos, new_pos], axis=1)) & filled[:, None, :]
    y = retrieve(q, keys, values, visible)
    end = (count + num_new)[:, None]

    def slots(pos, stop):  # ring slots of positions in [end - W, stop), else out of range (dropped)
        return jnp.where((pos >= jnp.maximum(end - width, 0)) & (pos < stop), jnp.mod(pos, width), width)

    # (the scatter's update is laid out [B, T, H, hs]: indexed axes first)
    new_keys = state.keys.at[rows, :, slots(new_pos, end)].set(
        k.transpose(0, 2, 1, 3).astype(state.keys.dtype), mode="drop")
    new_values = state.values.at[rows, :, slots(new_pos - 1, end - 1)].set(
        vals.transpose(0, 2, 1, 3).astype(state.values.dtype), mode="drop")
    return y, dict(keys=new_keys, values=new_values)


def peek_values(module: nn.Module, heads: int) -> Callable:
    """Create `module`'s value parameters (peek m_h, scale r_h; docs/algorithm.md §3.2) and return
    values(this, nxt) = e^{10 r_h} · normalize((1 - m_h) nxt + m_h this) for [B, H, T, hs] inputs."""
    m = module.param("peek", nn.initializers.uniform(1.0), (heads,))[:, None, None]
    r = module.param("value_scale", nn.initializers.constant(-0.05), (heads,))

    def values(this, nxt):
        return jnp.exp(10.0 * r)[:, None, None] * normalize((1.0 - m) * nxt + m * this)

    return values


def _layer_norm(config: MosaicsConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_bias=False, use_fast_variance=False, name=name)


