"""Exact causal attention over a KV cache, with GQA and per-row query positions."""

import dataclasses

import jax
import jax.numpy as jnp

from pigjax import sharding
from pigjax.attention.backend import KV, Backend, Cache, StepContext, init_kv, native_cpu, write_kv
from pigjax.engine import native
from pigjax.engine import store as engine


REDUCE_MIN_BATCH = 2  # decode batches from this size use the fused multiply+reduce form
PREFILL_BLOCK = 256  # query block of a fresh prefill; bounds the score matrix and skips masked keys


def attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, fresh: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over cache slots s <= the query's position.

    q: [B, T, H, d]; k, v: [B, Hkv, S, d] (slot s holds position s); positions: [B, T] int32.
    `fresh` (static) says every row's queries sit at positions 0..T-1 (a prefill into an empty
    cache): query block i then needs only slots below (i+1)·PREFILL_BLOCK, which skips the masked
    upper triangle and the unused capacity. On the CPU backend without a mesh a fresh prefill runs
    the engine's fused kernel (`native.prefill_attention`: no score matrix in memory, 3.7x XLA's
    blocks at 2k tokens), and a decode step (T = 1) the engine's decode kernel, which reads each
    row only up to its own position.
    """
    t, s = q.shape[1], k.shape[2]
    if t == 1 and not fresh and engine.default_path() == "ffi":
        return _decode_native(q, k, v, positions)
    if not fresh:
        return _attend_block(q, k, v, positions)
    if native_cpu():
        return _prefill_native(q.astype(jnp.float32), k, v).astype(q.dtype)
    return _prefill_blocks(q, k, v, positions)


def _prefill_blocks(q, k, v, positions):
    """A fresh prefill's attention in XLA, query block by query block."""
    t, s = q.shape[1], k.shape[2]
    outs = []
    for lo in range(0, t, PREFILL_BLOCK):
        hi = min(lo + PREFILL_BLOCK, t)
        kv = min(hi, s)
        outs.append(_attend_block(q[:, lo:hi], k[:, :, :kv], v[:, :, :kv], positions[:, lo:hi]))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


@jax.custom_vjp
def _prefill_native(q, k, v):
    """`native.prefill_attention`, differentiable: under differentiation (training) the forward and
    its gradient are the XLA form's, as before the kernel; inference runs the kernel."""
    return native.prefill_attention(q, k, v)


def _prefill_xla(q, k, v):
    return _prefill_blocks(q, k, v, jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2]))


def _prefill_native_fwd(q, k, v):
    return jax.vjp(_prefill_xla, q, k, v)  # (output, the VJP function: a pytree of residuals)


def _prefill_native_bwd(back, g):
    return back(g)


_prefill_native.defvjp(_prefill_native_fwd, _prefill_native_bwd)


def _decode_native(q, k, v, positions):
    """`attend` of one query per row by `native.decode_attention` (per shard under a mesh). The
    same function as `_attend_block` for positions >= 0 (a row at position p sees slots 0..p)."""
    b, _, h, d = q.shape
    lengths = jnp.clip(positions[:, 0] + 1, 0, k.shape[2]).astype(jnp.int32)
    heads = sharding.heads_axis(h, k.shape[1])
    out = sharding.rows_and_heads(native.decode_attention, q[:, 0].astype(jnp.float32), k, v, lengths,
                                  heads=heads)
    return out[:, None].astype(q.dtype)


def _attend_block(q, k, v, positions):
    """Query head h reads KV head h // (H / Hkv). Computed in float32 whatever the cache dtype
    (XLA:CPU has no bf16 x bf16 -> f32 dot, and fp32 accumulation is what we want anyway)."""
    b, t, h, d = q.shape
    dtype = q.dtype
    hkv, s = k.shape[1], k.shape[2]
    f32 = jnp.float32
    q = q.reshape(b, t, hkv, h // hkv, d).astype(f32)
    if t > 1 or b < REDUCE_MIN_BATCH:
        return _attend_many(q, k.astype(f32), v.astype(f32), positions).reshape(b, t, h, d).astype(dtype)
    # Batched decode: multiply + reduce lets XLA fuse the caller's slice of this layer out of the
    # stacked cache instead of copying it for a dot (per step with SmolLM2 shapes: batch 2 31 vs
    # 63 ms, batch 8 at 2k context 125 vs 178 ms; at batch 1 the dot wins, 25 vs 46 ms).
    scores = jnp.sum(q[:, 0, :, :, None, :] * k.astype(f32)[:, :, None], axis=-1)[:, :, :, None] * (d ** -0.5)
    visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    # Slot 0 is always visible (position >= 0), so no row is fully masked and no NaN arises.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[:, :, :, 0, :, None] * v.astype(f32)[:, :, None], axis=-2)[:, None]
    return out.reshape(b, t, h, d).astype(dtype)


def _attend_many(q, k, v, positions):
    """`_attend_block` as matrix products, q [B, T, Hkv, G, d] f32: each KV head's G·T queries as
    the rows of one matrix, so both products and the softmax keep XLA's natural dot
    layout ([B, Hkv, G·T, S]) and the score matrix is never transposed (in a 2k-token prefill,
    transposing and masking it in separate passes cost more than the products)."""
    b, t, hkv, g, d = q.shape
    s = k.shape[2]
    qm = q.transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    scores = jnp.einsum("bkmd,bksd->bkms", qm, k) * (d ** -0.5)
    visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(jnp.tile(visible, (1, g, 1))[:, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkms,bksd->bkmd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4)


@dataclasses.dataclass(frozen=True)
class Dense(Backend):
    """Exact attention over the whole model-side KV cache: the default back-end."""

    name = "dense"

    def init_cache(self, config, batch, capacity, window, dtype, runtime=None) -> Cache:
        layers = tuple(init_kv(batch, config.num_key_value_heads, capacity, config.head_dim, dtype)
                       for _ in range(config.num_hidden_layers))
        return Cache(layers, jnp.zeros((batch,), jnp.int32), None)

    def attend_layer(self, layer, state: KV, shared, q, k, v, ctx: StepContext):
        state = write_kv(state, k, v, ctx.starts)
        return attend(q, state.k, state.v, ctx.positions, ctx.fresh), state, None

    def stats(self, config, cache_dtype, cache=None, resources=None) -> dict:
        itemsize = jnp.dtype(cache_dtype).itemsize
        per_layer = 2 * config.num_key_value_heads * config.head_dim * itemsize
        return {
            "attention": self.name,
            "fraction_read": 1.0,
            "cache_bytes_per_token_per_layer": per_layer,
            "host_bytes_per_token_per_layer": 0.0,
        }
