"""The attention back-end contract, and the cache pytrees every back-end builds on.

A back-end is a frozen (hashable) dataclass passed to jitted code as a static argument; it owns the
layout of the cache. The model (`pigjax.models.llama.step`) computes each layer's q, k, v and hands
them to `Backend.attend_layer`; the layers run one by one, so each layer's state is its own buffer,
written then read in place (a stacked cache updated inside a scan over layers was copied whole at
every layer by XLA:CPU). See docs/architecture.md for the path of one decode step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from pigjax import sharding
from pigjax.engine import native
from pigjax.engine import store as engine


@struct.dataclass
class KV:
    """Keys/values of one layer, slot s of row b holding position s."""

    k: jax.Array  # [B, Hkv, S, d]
    v: jax.Array  # [B, Hkv, S, d]


@struct.dataclass
class Cache:
    """The decode state of a Llama-family model under one back-end."""

    layers: tuple  # one state per layer (KV, or the back-end's own type for its sparse layers)
    lengths: jax.Array  # [B] int32: tokens seen per row (the next token's position)
    shared: Any = None  # the back-end's `SharedState` type (None for Dense)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]


@struct.dataclass
class StepContext:
    """What a layer's attention needs to know about the step (same for all layers)."""

    positions: jax.Array  # [B, T] int32: position of each new token
    starts: jax.Array  # [B] int32: position of the first new token (= tokens cached before)
    num_new: jax.Array  # [B] int32: how many of the T new tokens are real (the rest is padding)
    fresh: bool = struct.field(pytree_node=False, default=False)  # prefill into an empty cache
    n_layers: int = struct.field(pytree_node=False, default=0)


@dataclasses.dataclass
class Runtime:
    """What one generation holds outside the jitted code: `arrays`, a pytree handed to
    `init_cache` inside jit (an engine handle and projection, a fraction), and `store`, the
    object behind them (an engine `Store`, or None)."""

    arrays: Any = None
    store: Any = None

    def ready(self):
        """Wait until the store has built what it was sent (the "cuda-async" prefill builds its
        tables in the background) and raise any error it deferred; then the cache is complete."""
        if self.store is not None:
            self.store.check()


def init_kv(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype) -> KV:
    shape = (batch, kv_heads, capacity, head_dim)
    return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """buf [B, H, S, d] <- new [B, T, H, d] at slots starts[b] .. starts[b]+T-1 of row b (a scatter
    of T rows per sequence, in place when buf is a loop carry). Out-of-range slots are dropped."""
    b, t = new.shape[:2]
    new = new.astype(buf.dtype)
    if buf.dtype == jnp.bfloat16 and t == 1 and native_cpu():
        # XLA:CPU scatters (or dynamic-update-slices) a bf16 buffer by converting all of it to f32
        # and back: at batch 8 with 512 cached tokens, 78 ms of a 107 ms decode step.
        return native.write_rows(buf, new, starts.astype(jnp.int32))
    slots = starts[:, None] + jnp.arange(t)[None, :]
    return buf.at[jnp.arange(b)[:, None], :, slots].set(new, mode="drop")


def native_cpu() -> bool:
    """Whether the engine's CPU kernels take the model-side work they have (cache writes, a window's
    partial softmax): the CPU backend without a device mesh."""
    return engine.default_path() == "ffi" and sharding.current_mesh() is None


def write_kv(state: KV, k, v, starts) -> KV:
    """The layer's KV with the step's k, v [B, T, Hkv, d] written at each row's `starts`."""
    return KV(write_rows(state.k, k, starts), write_rows(state.v, v, starts))


class Backend:
    """The contract of an attention back-end (Dense, MagicPIG, TopK, Quest, Oracle).

    A generation calls, in order: `resources` (once, around everything), `init_cache` (or
    `from_prefill` after a shared dense prefill), then per step `attend_layer` for each layer and
    `finish_step`; at the end `stats`. Everything but `resources` and `stats` runs under jit.
    """

    name: str = "backend"

    def resources(self, config, batch: int, capacity: int):
        """A context manager yielding the `Runtime` of one generation: what must exist outside the
        jitted code for `capacity` prompt tokens of `batch` rows (MagicPIG: an engine store), freed
        on exit. The default holds nothing."""
        return contextlib.nullcontext(Runtime())

    def init_cache(self, config, batch: int, capacity: int, window: int, dtype, runtime=None) -> Cache:
        """An empty cache: `capacity` slots for prompt + generated tokens, of which `window` for the
        generated ones alone (sparse back-ends size their exact window by it); `runtime` is the
        `Runtime.arrays` of `resources`."""
        raise NotImplementedError

    def attend_layer(self, layer: int, state, shared, q, k, v, ctx: StepContext):
        """One layer's attention for a step: write the step's keys/values k, v [B, T, Hkv, d] into the
        layer's `state` and attend with q [B, T, Hq, d]. -> (out [B, T, Hq, d], new state, reads):
        `reads` is None or [2] f32 (middle keys read, middle keys there were) for the fraction read."""
        raise NotImplementedError

    def finish_step(self, shared, ctx: StepContext, reads: list):
        """The back-end's shared state after all layers of a step (`reads`: each layer's)."""
        return shared

    def stats(self, config, cache_dtype, cache: Cache | None = None, runtime: Runtime | None = None) -> dict:
        """What a Generation reports: name, fraction of middle keys read, cache bytes per token."""
        raise NotImplementedError

    def layer_slots(self, config, layer: int, batch: int):
        """Engine slots of a layer's rows (None: the layer keeps no state in the engine)."""
        return None

    def ingest_layer(self, config, state, shared, kv: KV, lengths, slots):
        """A layer's state after a prompt's keys/values `kv` [B, Hkv, t, d] (rows of `lengths`
        tokens): by default they are copied into the layer's KV buffers."""
        t = kv.k.shape[2]
        return KV(state.k.at[:, :, :t].set(kv.k.astype(state.k.dtype)), state.v.at[:, :, :t].set(kv.v.astype(state.v.dtype)))

    def from_prefill(self, config, prefix: tuple, lengths, capacity: int, window: int, dtype, runtime=None) -> Cache:
        """The cache this back-end's own prefill would leave, from a dense prefill's per-layer KV
        (`prefix`), so that one dense prefill serves several back-ends. Runs layer by layer (a
        jitted call each), so that one layer's temporaries (MagicPIG's centered keys and codes:
        GBs at 32k tokens x 4 rows) are freed before the next."""
        b = lengths.shape[0]
        cache = _init(self, config, b, capacity, window, jnp.dtype(dtype), runtime)
        layers = tuple(_ingest(self, config, state, cache.shared, kv, lengths, self.layer_slots(config, i, b))
                       for i, (state, kv) in enumerate(zip(cache.layers, prefix)))
        lengths, shared = _finish_prefill(self, config, cache.shared, lengths)
        return Cache(layers, lengths, shared)


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
