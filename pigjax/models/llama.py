"""Llama-family decoder in Flax Linen, matching transformers' LlamaForCausalLM (SPEC §4).

One code path serves prefill, decode and `pigjax.forward`: a step writes the new tokens' keys and
values into an explicit KV cache at each row's own offset, then attends causally over the cache.
Layers are stacked with `nn.scan`, so parameters of layer i live at index i of each leaf of
`params["layers"]` and the graph is compiled once, not n_layers times.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pigjax.attention import Dense
from pigjax.config import LlamaConfig, rope_inv_freq


@struct.dataclass
class KVCache:
    """Keys/values of every layer, slot s of row b holding position s; `lengths` tokens are valid."""

    k: jax.Array  # [n_layers, B, Hkv, S, d]
    v: jax.Array  # [n_layers, B, Hkv, S, d]
    lengths: jax.Array  # [B] int32

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


def init_cache(config: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] (halves repeated), float32."""
    inv_freq = jnp.asarray(rope_inv_freq(config.rope, config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Split-halves rotation (transformers' rotate_half) in float32; x: [B, T, heads, d]."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def write_cache(cache: jax.Array, layer, new: jax.Array, starts: jax.Array) -> jax.Array:
    """cache [n_layers, B, Hkv, S, d] <- new [B, T, Hkv, d] at layer `layer`, slots
    starts[b] .. starts[b]+T-1 of row b: a scatter of T rows per sequence, done in place inside the
    decode loop (the cache is a loop carry), never a copy of the whole cache.

    Callers guarantee starts + T <= S (out-of-range slots would be dropped, not written).
    """
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    slots = starts[:, None] + jnp.arange(t)[None, :]
    return cache.at[layer, rows, :, slots].set(new.astype(cache.dtype), mode="drop")


class Attention(nn.Module):
    config: LlamaConfig
    backend: Dense
    fresh: bool  # the step starts from an empty cache (see attention.dense.attend)

    @nn.compact
    def __call__(self, x, layer, rope, cache_k, cache_v, starts, positions):
        c = self.config
        proj = partial(nn.DenseGeneral, use_bias=False, dtype=x.dtype)
        q = proj((c.num_attention_heads, c.head_dim), name="q_proj")(x)
        k = proj((c.num_key_value_heads, c.head_dim), name="k_proj")(x)
        v = proj((c.num_key_value_heads, c.head_dim), name="v_proj")(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cache_k = write_cache(cache_k, layer, k, starts)
        cache_v = write_cache(cache_v, layer, v, starts)
        out = self.backend.attend(q, cache_k[layer], cache_v[layer], positions, self.fresh)
        out = proj(c.hidden_size, axis=(-2, -1), name="o_proj")(out)
        return out, cache_k, cache_v


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        dense = partial(nn.Dense, use_bias=False, dtype=x.dtype)
        f = self.config.intermediate_size
        gate = dense(f, name="gate_proj")(x)
        up = dense(f, name="up_proj")(x)
        return dense(self.config.hidden_size, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    config: LlamaConfig
    backend: Dense
    fresh: bool

    @nn.compact
    def __call__(self, carry, layer, rope, starts, positions):
        x, cache_k, cache_v = carry
        eps = self.config.rms_norm_eps
        h, cache_k, cache_v = Attention(self.config, self.backend, self.fresh, name="attn")(
            RMSNorm(eps, name="input_norm")(x), layer, rope, cache_k, cache_v, starts, positions
        )
        x = x + h
        x = x + MLP(self.config, name="mlp")(RMSNorm(eps, name="post_attn_norm")(x))
        return (x, cache_k, cache_v), None


class LlamaModel(nn.Module):
    config: LlamaConfig
    backend: Dense = Dense()
    fresh: bool = False

    @nn.compact
    def __call__(self, tokens, cache_k, cache_v, starts, positions):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed")
        x = embed(tokens)
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
        )(c, self.backend, self.fresh, name="layers")
        # The whole cache is a scan carry updated in place; the scanned input is the layer index.
        (x, cache_k, cache_v), _ = layers(
            (x, cache_k, cache_v), jnp.arange(c.num_hidden_layers), rope_tables(c, positions), starts, positions
        )
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=x.dtype, name="lm_head")(x)
        return logits.astype(jnp.float32), cache_k, cache_v


def step(params, config: LlamaConfig, tokens: jax.Array, cache: KVCache, num_new=None, backend=Dense(),
         fresh: bool = False):
    """Run tokens [B, T] after each row's cached prefix: -> (logits [B, T, V] f32, cache).

    Row b's tokens sit at positions cache.lengths[b] + t. `num_new` [B] (default T) is how many of
    them are real; the rest are right padding, whose cache slots later tokens overwrite before any
    query can see them (a query at position p only sees slots <= p, all written by then).
    `fresh` (static): the cache is empty (all lengths 0), which lets prefill skip masked blocks.
    """
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, k, v = LlamaModel(config, backend, fresh).apply(
        {"params": params}, tokens, cache.k, cache.v, cache.lengths, positions
    )
    if num_new is None:
        num_new = jnp.full_like(cache.lengths, tokens.shape[1])
    return logits, KVCache(k, v, cache.lengths + num_new.astype(jnp.int32))


def param_shapes(config: LlamaConfig, dtype=jnp.float32):
    """The parameter tree's shapes/dtypes (no allocation): what conversion must produce."""
    cache = jax.ShapeDtypeStruct((config.num_hidden_layers, 1, config.num_key_value_heads, 1, config.head_dim), dtype)
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    starts = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(
        partial(LlamaModel(config).init, jax.random.key(0)), tok, cache, cache, starts, tok
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])
