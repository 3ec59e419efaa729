"""Memory Mosaics v2 (docs/algorithm.md §3A): the block of `MosaicsConfig(version=2)`.

`pigjax.models.mosaics` runs it (its `MosaicsModel`, `apply`, `step`, `init_state` pick the block
and state of the config's version). Per block, with x the block input after LayerNorm:

    short-term memory   gated keys (below), v1's one-step-peek values, pairs 1 <= T - t <= h
    long-term memory    the same with its own parameters, pairs T - t >= m
    persistent memory   SwiGLU feed-forward:  down(silu(gate x) * up x)
    block               x += Short(LN x) + Long(LN x);  x += SwiGLU(LN x)

    gated keys          k̄_t = e^{w_g·x_t} W_φ x_t + e^{-|w_λ·x_t|} k̄_{t-1},  k_t = k̄_t/‖k̄_t‖
                        (w_g, w_λ one row per head: `gain_proj`, `decay_proj`)
    retrieval           y_T = Σ_{t ∈ S(T)} softmax_t(β(n) k_T·k_t) v_t,  n = |S(T)|
                        β(n) = softplus(p1) n^{sigmoid(pa)} + softplus(p0), per head and memory

The recurrent state of a layer holds, per memory, the gated average's state, the pending value
projection and the key/value buffers (values one step late, docs/algorithm.md §3.6).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pigjax.models.mosaics_config import MosaicsConfig
from pigjax.models.mosaics_parts import (Span, _at, _layer_norm, _linear, _merge_heads, _split_heads, exact_memory,
                                         normalize, peek_values, retrieve, ring_memory)

GATED_CHUNK = 16  # time steps per chunk of the parallel gated average


def gated_average(x: jax.Array, log_keep: jax.Array, log_gain: jax.Array, init: jax.Array) -> jax.Array:
    """k̄_t = e^{log_gain_t} x_t + e^{log_keep_t} k̄_{t-1}, k̄_{-1} = init.

    x [B, H, T, hs]; log_keep (<= 0), log_gain [B, H, T]; init [B, H, hs]. In chunks of
    GATED_CHUNK steps: k̄_i = Σ_{j<=i} e^{Λ_i - Λ_j + log_gain_j} x_j + e^{Λ_i} (state before the
    chunk), Λ the cumulative sum of log_keep inside the chunk, so every decay factor is <= 1.
    """
    b, h, t, hs = x.shape
    c = min(GATED_CHUNK, t)
    n = -(-t // c)
    causal = jnp.tril(jnp.ones((c, c), bool))

    def chunk(state, inputs):
        xc, keep, gain = inputs  # [B, H, C, hs], [B, H, C], [B, H, C]
        cum = jnp.cumsum(keep, axis=-1)
        exponent = jnp.where(causal, cum[..., :, None] - cum[..., None, :] + gain[..., None, :], 0.0)
        weights = jnp.where(causal, jnp.exp(exponent), 0.0)  # (the inner where keeps gradients finite)
        y = jnp.einsum("bhij,bhjd->bhid", weights, xc) + jnp.exp(cum)[..., None] * state[:, :, None, :]
        return y[:, :, -1], y

    pad = n * c - t  # zeros after the end (keep e^0 = 1, no input): causal, harmless
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    log_keep, log_gain = (jnp.pad(a, ((0, 0), (0, 0), (0, pad))) for a in (log_keep, log_gain))
    split = lambda a: jnp.moveaxis(a.reshape(b, h, n, c, *a.shape[3:]), 2, 0)
    _, ys = jax.lax.scan(chunk, init, (split(x), split(log_keep), split(log_gain)))
    return jnp.moveaxis(ys, 0, 2).reshape(b, h, n * c, hs)[:, :, :t]


class GatedKeys(nn.Module):
    """W_φ, the gated average with gain e^{w_g·x} and decay e^{-|w_λ·x|} per head, then normalise."""

    config: MosaicsConfig

    @nn.compact
    def __call__(self, h, init):
        c = self.config
        d, heads = c.hidden_size, c.num_attention_heads
        phi = _split_heads(_linear(d, d, "key_proj")(h), c)
        log_gain = _linear(heads, d, "gain_proj")(h).transpose(0, 2, 1)  # [B, H, T]
        log_keep = -jnp.abs(_linear(heads, d, "decay_proj")(h)).transpose(0, 2, 1)
        kbar = gated_average(phi, log_keep, log_gain, init)
        return normalize(kbar), kbar


_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(x) = 1


def bandwidth(module: nn.Module, heads: int, n: jax.Array) -> jax.Array:
    """β(n) = β1 n^α + β0 [B or 1, H, T] for pair counts n [B or 1, T] (docs/algorithm.md §3A.2).
    n^α is computed as e^{α log max(n, 1)}: where n = 0 nothing is visible and β is unused."""
    p0 = module.param("bandwidth_base", nn.initializers.constant(_SOFTPLUS_INV_1), (heads,))
    p1 = module.param("bandwidth_scale", nn.initializers.constant(_SOFTPLUS_INV_1), (heads,))
    pa = module.param("bandwidth_exponent", nn.initializers.zeros, (heads,))
    log_n = jnp.log(jnp.maximum(n, 1).astype(jnp.float32))[:, None, :]
    alpha = jax.nn.sigmoid(pa)[None, :, None]
    return jax.nn.softplus(p1)[None, :, None] * jnp.exp(alpha * log_n) + jax.nn.softplus(p0)[None, :, None]


@struct.dataclass
class MemoryState:
    """One memory's recurrent state (short- or long-term)."""

    leak: jax.Array  # [B, H, hs] the gated average k̄ of the last token
    pending_value: jax.Array  # [B, H, hs] W_v x of the last token: its value needs the next token
    keys: jax.Array  # [B, H, S, hs] long-term: S = capacity, slot t holds k_t; short-term: a ring (ring_memory)
    values: jax.Array  # [B, H, S, hs] the same for v_t (written one step later)


@struct.dataclass
class LayerState:
    """One v2 block's recurrent state (stacked over layers in `mosaics.State`)."""

    short: MemoryState
    long: MemoryState


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def zero_layers(config: MosaicsConfig, batch: int, capacity: int, dtype) -> LayerState:
    """The empty layers of a v2 state (`mosaics.init_state` wraps them in a `mosaics.State`)."""
    n, h, hs = config.num_hidden_layers, config.num_attention_heads, config.head_size

    def memory(slots):
        return MemoryState(*(jnp.zeros((n, batch, h, hs), dtype) for _ in range(2)),
                           *(jnp.zeros((n, batch, h, slots, hs), dtype) for _ in range(2)))

    # the short-term memory sees the last h pairs: a ring of h slots (fewer if the capacity is smaller)
    return LayerState(memory(min(config.short_window, capacity)), memory(capacity))


class Memory(nn.Module):
    """A v2 contextual memory (short- or long-term, by the Span it is called with)."""

    config: MosaicsConfig
    deterministic: bool
    recurrent: bool
    memory: Callable | None = None  # recurrent form: the store + retrieval (default mosaics.exact_memory)

    @nn.compact
    def __call__(self, h, state: MemoryState | None, count, num_new, span: Span):
        c = self.config
        heads, (b, t) = c.num_attention_heads, h.shape[:2]
        values = peek_values(self, heads)
        init = state.leak if self.recurrent else jnp.zeros((b, heads, c.head_size), h.dtype)
        k, kbar = GatedKeys(c, name="keys")(h, init)
        vx = _split_heads(_linear(c.hidden_size, c.hidden_size, "value_proj")(h), c)
        pos = jnp.arange(t)[None, :] + (0 if count is None else count[:, None])  # [B or 1, T]
        q = k * bandwidth(self, heads, span.count(pos))[..., None].astype(k.dtype)
        if not self.recurrent:
            nxt = jnp.concatenate([vx[:, :, 1:], jnp.zeros_like(vx[:, :, :1])], axis=2)  # x_{T+1} = 0
            dropout = nn.Dropout(c.dropout, deterministic=self.deterministic)
            y, new_state = retrieve(q, k, values(vx, nxt), span.visible(pos, pos), dropout), None
        else:
            prev = jnp.concatenate([state.pending_value[:, :, None], vx], axis=2)
            vals = values(prev[:, :, :-1], prev[:, :, 1:])
            if span.window is not None:  # the short-term memory: a ring of h slots
                y, stored = ring_memory(state, q, k, vals, count, num_new, span)
            else:
                y, stored = (self.memory or exact_memory)(state, q, k, vals, count, span)
            last, has_new = jnp.maximum(num_new - 1, 0), (num_new > 0)[:, None, None]
            new_state = dict(leak=jnp.where(has_new, _at(kbar, last), state.leak),
                             pending_value=jnp.where(has_new, _at(vx, last), state.pending_value), **stored)
        out = _linear(c.hidden_size, c.hidden_size, "c_proj", 1.0 / math.sqrt(c.num_hidden_layers))
        return out(_merge_heads(y)), new_state


class SwiGLU(nn.Module):
    """The persistent memory of v2: down(silu(gate x) * up x), width config.ffn_size."""

    config: MosaicsConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        d, f = c.hidden_size, c.ffn_size
        hidden = nn.silu(_linear(f, d, "gate_proj")(h)) * _linear(f, d, "up_proj")(h)
        return _linear(d, f, "down_proj", 1.0 / math.sqrt(c.num_hidden_layers))(hidden)


class Block(nn.Module):
    """Pre-LN: x += Short(LN(x)) + Long(LN(x)); x += SwiGLU(LN(x)). `long_gap` is m (may be traced)."""

    config: MosaicsConfig
    deterministic: bool
    recurrent: bool
    memory: Callable | None = None  # the long-term memory's recurrent store (see Memory)

    @nn.compact
    def __call__(self, x, state: LayerState | None, count, num_new, long_gap):
        c, det, rec = self.config, self.deterministic, self.recurrent
        resid_dropout = nn.Dropout(c.dropout, deterministic=det)
        h = _layer_norm(c, "ln_1")(x)
        ys, short = Memory(c, det, rec, name="short")(h, state and state.short, count, num_new,
                                                      Span(1, c.short_window))
        yl, long = Memory(c, det, rec, self.memory, name="long")(h, state and state.long, count, num_new,
                                                                 Span(long_gap))
        x = x + resid_dropout(ys + yl)
        x = x + resid_dropout(SwiGLU(c, name="ffn")(_layer_norm(c, "ln_2")(x)))
        if not rec:
            return x, None
        return x, state.replace(short=state.short.replace(**short), long=state.long.replace(**long))
