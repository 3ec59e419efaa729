"""Llama-family decoder in Flax Linen, matching transformers' LlamaForCausalLM (SPEC §4).

One code path serves prefill, decode and `pigjax.forward`: a step hands each layer's new keys and
values to the attention back-end, which writes them into that layer's cache state at each row's
own offset and attends. Parameters of layer i live at index i of each leaf of `params["layers"]`
(stacked by `nn.scan` at init, the checkpoint layout); `unstack_layers` splits them for decoding.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pigjax.attention import Dense
from pigjax.attention.base import Cache, StepContext
from pigjax.attention.dense import attend as dense_attend
from pigjax.config import LlamaConfig, rope_inv_freq


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


class Attention(nn.Module):
    """Projections and RoPE; the attention itself is `attend(q, k, v) -> (out, aux)`, supplied by
    the caller (the back-end's step for one layer, or causal self-attention at init)."""

    config: LlamaConfig
    attend: Callable

    @nn.compact
    def __call__(self, x, rope):
        c = self.config
        proj = partial(nn.DenseGeneral, use_bias=False, dtype=x.dtype)
        q = proj((c.num_attention_heads, c.head_dim), name="q_proj")(x)
        k = proj((c.num_key_value_heads, c.head_dim), name="k_proj")(x)
        v = proj((c.num_key_value_heads, c.head_dim), name="v_proj")(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, aux = self.attend(q, k, v)
        return proj(c.hidden_size, axis=(-2, -1), name="o_proj")(out), aux


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
    attend: Callable

    @nn.compact
    def __call__(self, x, rope):
        eps = self.config.rms_norm_eps
        h, aux = Attention(self.config, self.attend, name="attn")(RMSNorm(eps, name="input_norm")(x), rope)
        x = x + h
        x = x + MLP(self.config, name="mlp")(RMSNorm(eps, name="post_attn_norm")(x))
        return x, aux


def _self_attention(q, k, v):
    """Causal attention of a whole sequence over itself (no cache): the init-time attention."""
    b, t = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return dense_attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, fresh=True), None


class LlamaModel(nn.Module):
    """Defines the parameter tree (layers stacked on a leading axis by `nn.scan`) and a cacheless
    forward. Inference runs through `step`, which applies the same modules layer by layer."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed")
        x = embed(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,), length=c.num_hidden_layers)
        x, _ = layers(c, _self_attention, name="layers")(x, rope_tables(c, positions))
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_word_embeddings:
            return embed.attend(x)
        return nn.Dense(c.vocab_size, use_bias=False, dtype=x.dtype, name="lm_head")(x)


def _embed(params, config: LlamaConfig, tokens):
    return nn.Embed(config.vocab_size, config.hidden_size).apply({"params": params["embed"]}, tokens)


def _logits(params, config: LlamaConfig, x):
    x = RMSNorm(config.rms_norm_eps).apply({"params": params["norm"]}, x)
    if config.tie_word_embeddings:
        logits = nn.Embed(config.vocab_size, config.hidden_size).apply(
            {"params": params["embed"]}, x, method="attend")
    else:
        logits = nn.Dense(config.vocab_size, use_bias=False, dtype=x.dtype).apply({"params": params["lm_head"]}, x)
    return logits.astype(jnp.float32)


def layer_params(params, i: int):
    """Layer i's parameters, from stacked leaves or from `unstack_layers`' per-layer tuple."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return layers[i]
    return jax.tree.map(lambda p: p[i], layers)


@jax.jit
def unstack_layers(params):
    """params with "layers" as a tuple of per-layer trees: decode reads each layer's weights in
    place instead of slicing (copying) them out of the stacked leaves at every step."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda p: p[i], params["layers"]) for i in range(n))}


def step(params, config: LlamaConfig, tokens: jax.Array, cache: Cache, num_new=None, backend=Dense(),
         fresh: bool = False):
    """Run tokens [B, T] after each row's cached prefix: -> (logits [B, T, V] f32, cache).

    Row b's tokens sit at positions cache.lengths[b] + t. `num_new` [B] (default T) is how many of
    them are real; the rest are right padding, whose cache slots later tokens overwrite before any
    query can see them (a query at position p only sees slots <= p, all written by then).
    `fresh` (static): the cache is empty (all lengths 0), which lets prefill skip masked blocks.
    `backend` (static) owns the cache layout (`backend.init_cache`). Layers run one by one (not in
    a scan), each with its own cache buffer and, given `unstack_layers(params)`, its own weights.
    """
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    if num_new is None:
        num_new = jnp.full((b,), t, jnp.int32)
    num_new = num_new.astype(jnp.int32)
    ctx = StepContext(positions, cache.lengths, num_new, fresh, config.num_hidden_layers)
    rope = rope_tables(config, positions)
    x = _embed(params, config, tokens)
    states, reads = [], []
    for i in range(config.num_hidden_layers):
        def attend(q, k, v, i=i):
            out, state, read = backend.attend_layer(i, cache.layers[i], cache.shared, q, k, v, ctx)
            return out, (state, read)

        x, (state, read) = Block(config, attend).apply({"params": layer_params(params, i)}, x, rope)
        states.append(state)
        reads.append(read)
    shared = backend.finish_step(cache.shared, ctx, reads)
    return _logits(params, config, x), Cache(tuple(states), cache.lengths + num_new, shared)


def param_shapes(config: LlamaConfig, dtype=jnp.float32):
    """The parameter tree's shapes/dtypes (no allocation): what conversion must produce."""
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(partial(LlamaModel(config).init, jax.random.key(0)), tok)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])
