"""Llama-family decoder in Flax Linen, matching transformers' LlamaForCausalLM (docs/algorithm.md §4).

One code path serves prefill, decode and `pigjax.forward`: `step` runs the layers one by one; each
layer projects q, k, v (`Attention.qkv`), hands them to the attention back-end
(`Backend.attend_layer`, which writes k, v into that layer's cache state at each row's own offset
and attends), then applies o_proj and the MLP. The Flax modules define the parameter tree:
parameters of layer i live at index i of each leaf of `params["layers"]` (stacked by `nn.scan` at
init, the checkpoint layout); `unstack_layers` splits them for decoding.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pigjax.attention.backend import KV, Backend, Cache, StepContext
from pigjax.attention.dense import Dense
from pigjax.attention.dense import attend as dense_attend
from pigjax.models import projection
from pigjax.models.inputs import check_step, embed_checked, mark_overflow
from pigjax.models.llama_config import LlamaConfig, rope_inv_freq


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
    """The attention projections: `qkv` (with RoPE) before the back-end attends, `out` after.
    `dot_general`: the projections' product (None: lax.dot_general; `pigjax.models.projection`)."""

    config: LlamaConfig
    dot_general: Any = None

    def setup(self):
        c = self.config
        proj = partial(nn.DenseGeneral, use_bias=False, dot_general=self.dot_general)
        self.q_proj = proj((c.num_attention_heads, c.head_dim))
        self.k_proj = proj((c.num_key_value_heads, c.head_dim))
        self.v_proj = proj((c.num_key_value_heads, c.head_dim))
        self.o_proj = proj(c.hidden_size, axis=(-2, -1))

    def qkv(self, x, rope):
        """q [B, T, H, d], k, v [B, T, Hkv, d] of x [B, T, hidden]."""
        return apply_rope(self.q_proj(x), *rope), apply_rope(self.k_proj(x), *rope), self.v_proj(x)

    def out(self, attended):
        return self.o_proj(attended)

    def __call__(self, x, rope):
        """Causal self-attention of whole sequences (no cache): defines the parameters at init."""
        q, k, v = self.qkv(x, rope)
        b, t = q.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self.out(dense_attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, fresh=True))


class MLP(nn.Module):
    config: LlamaConfig
    dot_general: Any = None

    @nn.compact
    def __call__(self, x):
        dense = partial(nn.Dense, use_bias=False, dtype=x.dtype, dot_general=self.dot_general)
        f = self.config.intermediate_size
        gate = dense(f, name="gate_proj")(x)
        up = dense(f, name="up_proj")(x)
        return dense(self.config.hidden_size, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer, cacheless: defines the layer's parameters (`step` applies its parts)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, rope):
        eps = self.config.rms_norm_eps
        x = x + Attention(self.config, name="attn")(RMSNorm(eps, name="input_norm")(x), rope)
        x = x + MLP(self.config, name="mlp")(RMSNorm(eps, name="post_attn_norm")(x))
        return x, None


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
        x, _ = layers(c, name="layers")(x, rope_tables(c, positions))
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if c.tie_word_embeddings:
            return embed.attend(x)
        return nn.Dense(c.vocab_size, use_bias=False, dtype=x.dtype, name="lm_head")(x)


def _embed(params, config: LlamaConfig, tokens):
    embed = nn.Embed(config.vocab_size, config.hidden_size)
    return embed_checked(lambda ids: embed.apply({"params": params["embed"]}, ids), tokens, config.vocab_size)


def _logits(params, config: LlamaConfig, x):
    x = RMSNorm(config.rms_norm_eps).apply({"params": params["norm"]}, x)
    rows = x.shape[0] * x.shape[1]
    if config.tie_word_embeddings:
        embedding = params["embed"]["embedding"]
        if projection.native_applies(rows) and projection.supports(x, embedding):  # a decode step on the CPU
            return projection.tied_logits(x, embedding)
        logits = nn.Embed(config.vocab_size, config.hidden_size).apply(
            {"params": params["embed"]}, x, method="attend")
    else:
        logits = nn.Dense(config.vocab_size, use_bias=False, dtype=x.dtype,
                          dot_general=projection.for_rows(rows)).apply({"params": params["lm_head"]}, x)
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


def layer_step(p, config: LlamaConfig, layer: int, x, rope, cache: Cache, backend: Backend, ctx: StepContext):
    """Decoder layer `layer` (parameters `p`) on x [B, T, hidden] -> (x, layer state, reads)."""
    eps = config.rms_norm_eps
    dot = projection.for_rows(x.shape[0] * x.shape[1])  # decode steps: the engine's small matmul
    attn = Attention(config, dot)
    q, k, v = attn.apply({"params": p["attn"]}, RMSNorm(eps).apply({"params": p["input_norm"]}, x), rope,
                         method="qkv")
    out, state, reads = backend.attend_layer(layer, cache.layers[layer], cache.shared, q, k, v, ctx)
    x = x + attn.apply({"params": p["attn"]}, out, method="out")
    h = RMSNorm(eps).apply({"params": p["post_attn_norm"]}, x)
    return x + MLP(config, dot).apply({"params": p["mlp"]}, h), state, reads


def step(params, config: LlamaConfig, tokens: jax.Array, cache: Cache, num_new=None, backend: Backend = Dense(),
         fresh: bool = False, logits_at=None):
    """Run tokens [B, T] after each row's cached prefix: -> (logits [B, T, V] f32, cache).

    Row b's tokens sit at positions cache.lengths[b] + t. `num_new` [B] (default T) is how many of
    them are real; the rest are right padding, whose cache slots later tokens overwrite before any
    query can see them (a query at position p only sees slots <= p, all written by then).
    `fresh` (static): the cache is empty (all lengths 0), which lets prefill skip masked blocks.
    `backend` (static) owns the cache layout (`backend.init_cache`). Layers run one by one (not in
    a scan), each with its own cache buffer and, given `unstack_layers(params)`, its own weights.
    Tokens that do not fit the vocabulary or the cache raise eagerly and give NaN logits under jit
    (`pigjax.models.inputs`).
    `logits_at` [B] int32 (index into T): the logits of that token of each row only, [B, 1, V]. A
    prefill that samples from each prompt's last token skips the vocabulary projection of the
    others (at SmolLM2's shapes a fifth of a prompt's flops).
    """
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    if num_new is None:
        num_new = jnp.full((b,), t, jnp.int32)
    num_new = num_new.astype(jnp.int32)
    capacity = next((layer.k.shape[2] for layer in cache.layers if isinstance(layer, KV)), None)
    check_step("llama.step", config.vocab_size, tokens, cache.lengths, num_new, capacity)
    ctx = StepContext(positions, cache.lengths, num_new, fresh, config.num_hidden_layers)
    rope = rope_tables(config, positions)
    x = _embed(params, config, tokens)
    states, reads = [], []
    for i in range(config.num_hidden_layers):
        x, state, read = layer_step(layer_params(params, i), config, i, x, rope, cache, backend, ctx)
        states.append(state)
        reads.append(read)
    shared = backend.finish_step(cache.shared, ctx, reads)
    if logits_at is not None:
        x = jnp.take_along_axis(x, jnp.clip(logits_at, 0, t - 1).astype(jnp.int32)[:, None, None], axis=1)
    logits = mark_overflow(_logits(params, config, x), cache.lengths, num_new, capacity)
    return logits, Cache(tuple(states), cache.lengths + num_new, shared)


@partial(jax.jit, static_argnums=0)
def init_params(config: LlamaConfig, seed: int = 0):
    """flax's default initialisation (kernels N(0, 1/fan_in), norms 1)."""
    return LlamaModel(config).init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))["params"]


def param_shapes(config: LlamaConfig, dtype=jnp.float32):
    """The parameter tree's shapes/dtypes (no allocation): what conversion must produce."""
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(partial(LlamaModel(config).init, jax.random.key(0)), tok)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])
