"""Decoding back-ends of a Memory Mosaics model: exact retrieval, and sampled (MagicPIG) retrieval
over the contextual memory (v1) or the long-term memory (v2) (beyond the papers).

`for_attention(attention)` maps what `pigjax.generate(attention=...)` and
`pigjax.eval.perplexity.teacher_forced` take (None, Dense(), MagicPIG(...)) to one of them. Both
have the same interface: `resources`, `init_state`, `step(params, config, tokens, state, num_new,
fresh)` and `stats`.

Sampled retrieval, per layer outside `magicpig.dense_layers` (default (0, n_layers // 2), as for
Llama) and per row and head:

- The memory sees the pairs at least `gap` steps old (v1: gap 1, every earlier pair; v2's
  long-term memory: gap m = long_gap_min, docs/algorithm.md §3A.4). The exact window on the model
  side holds the first `sink` pairs and a ring of the `local + gap` newest positions, of which the
  `local` oldest are complete pairs the query sees (the newest key's value needs the next token,
  docs/algorithm.md §3). Pairs in between live in the C++ engine (`pigjax.engine.store`): those of the prompt at prefill, and each
  pair that leaves the ring afterwards (`append`; sampled and weighted like prompt pairs, so the
  estimator stays unbiased). The recent context is so always exact and the old one sampled.
- A step merges the window's exact partial softmax with the engine's sampled one by log-sum-exp.
- No centering by default: keys are unit vectors times e^{b_h}, so the kernel k_T·k_t =
  e^{2 b_h} cos θ is a function of the angle alone, and SimHash's collision probability of the raw
  keys is a monotone function of the score: the ideal case for MagicPIG's importance sampling.
  `center=True` subtracts the mean of the prompt's engine keys (per row and head) from every
  stored key, window included (the softmax is unchanged; the hashed and the scored key stay the
  same vector): it spreads keys that share a direction (leaky averages do) over the hash's
  buckets, so fewer are read, but the sampling probability then tracks q·k/‖k − μ‖, not the score.
- The engine divides scores by √d and so does `partial_softmax`: the query is k_T·√hs, so both
  compute the model's kernel score k_T·k_t.
- The persistent memory, v2's short-term memory and the prefill are exact. Prefill is one chunk from an empty state
  (`fresh=True`); then one token per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pigjax.attention.backend import Runtime
from pigjax.attention.dense import Dense
from pigjax.attention.magicpig import EngineRef, MagicPIG, center
from pigjax.attention.softmax import merge, partial_softmax
from pigjax.attention.sparse import count_reads
from pigjax.engine import store as engine
from pigjax.engine.grid import open_store
from pigjax.errors import ConfigError, PigjaxError
from pigjax.models import mosaics, mosaics_v2
from pigjax.models.inputs import check_step, embed_checked
from pigjax.models.mosaics_config import MosaicsConfig


def for_attention(attention):
    """The decoding back-end of a Memory Mosaics model for `attention` (None, Dense() or MagicPIG,
    including its subclass RankedLSH, whose engine query the sampled retrieval then uses)."""
    if isinstance(attention, (MosaicsExact, MosaicsSampled)):
        return attention
    if attention is None or isinstance(attention, Dense):
        return MosaicsExact()
    if isinstance(attention, MagicPIG):
        return MosaicsSampled(attention)
    raise PigjaxError(f"Memory Mosaics models decode with exact retrieval (attention=None or Dense()) or "
                      f"sampled retrieval (MagicPIG(...)), not {type(attention).__name__}")


@dataclasses.dataclass(frozen=True)
class MosaicsExact:
    """Exact kernel-regression retrieval over the whole contextual memory (the model's recurrent form)."""

    name = "exact-memory"

    def resources(self, config, batch: int, capacity: int):
        return contextlib.nullcontext(Runtime())

    def init_state(self, config, batch, capacity, dtype, runtime=None):
        return mosaics.init_state(config, batch, capacity, dtype)

    def step(self, params, config, tokens, state, num_new=None, fresh=False):
        return mosaics.step(params, config, tokens, state, num_new)

    def stats(self, config, cache_dtype, cache=None, runtime=None) -> dict:
        itemsize = jnp.dtype(cache_dtype).itemsize
        return {"attention": self.name, "fraction_read": 1.0,
                # a key and a value per context token (v1's contextual memory, v2's long-term memory)
                "cache_bytes_per_token_per_layer": 2 * config.hidden_size * itemsize,
                "host_bytes_per_token_per_layer": 0.0, **short_term_bytes(config, itemsize)}


def short_term_bytes(config: MosaicsConfig, itemsize: int) -> dict:
    """v2's short-term memory: a ring of h pairs per layer and row, whatever the context length."""
    return {} if config.version == 1 else {"short_term_bytes_per_layer": 2 * config.hidden_size * itemsize *
                                           config.short_window}


@struct.dataclass
class SampledLayer:
    """A sampled layer's state: the recurrent fields of `mosaics.LayerState`, an exact window in
    place of the full buffers, and what the engine holds and how much of it was read."""

    ctx_leak: jax.Array  # [B, H, hs]
    pmem_leak: jax.Array  # [B, H, hs]
    pending_value: jax.Array  # [B, H, hs]
    keys: jax.Array  # [B, H, W, hs] window, W = sink + local + 1 (see window_positions)
    values: jax.Array  # [B, H, W, hs]
    mu: jax.Array  # [B, H, hs] f32: subtracted from stored keys (0 unless centering)
    stored: jax.Array  # [B] int32: pairs in the engine (also orders the engine calls)
    read: jax.Array  # f32: engine pairs sampled, summed over steps, rows and heads
    total: jax.Array  # f32: engine pairs there were, same sum
    exact: jax.Array  # f32: window pairs read, same sum


@struct.dataclass
class SampledMemory:
    """v2's long-term memory in a sampled layer: the fields of `mosaics_v2.MemoryState` with a
    window in place of the full buffers, and the engine fields of `SampledLayer`."""

    leak: jax.Array  # [B, H, hs]
    pending_value: jax.Array  # [B, H, hs]
    keys: jax.Array  # [B, H, W, hs]
    values: jax.Array  # [B, H, W, hs]
    mu: jax.Array  # [B, H, hs]
    stored: jax.Array  # [B] int32
    read: jax.Array
    total: jax.Array
    exact: jax.Array


def _sampled_part(layer):
    """The sampled memory of a sampled layer (v1: the layer; v2: its long-term memory)."""
    return layer.long if isinstance(layer, mosaics_v2.LayerState) else layer


@struct.dataclass
class SampledState:
    layers: tuple  # per layer: an exact layer's state (unstacked), or SampledLayer (v1) /
    # mosaics_v2.LayerState(short exact, long SampledMemory) (v2)
    count: jax.Array  # [B] int32 tokens seen per row
    engine: EngineRef  # the engine store and the [hs, K·L] SimHash projection


def window_positions(last, sink: int, ring: int, width: int):
    """Position held by each window slot once the key of position `last` [B] is written, and
    whether it holds one. Slot p < sink holds position p; position p >= sink lives in slot
    sink + (p − sink) mod ring (the newest `ring` positions >= sink)."""
    j = jnp.arange(width)[None, :]
    last = last[:, None]
    pos = jnp.where(j < sink, j, last - jnp.mod(last - j, ring))
    valid = jnp.where(j < sink, j <= last, pos >= sink)
    return jnp.maximum(pos, 0), valid


def _slot(pos, sink: int, ring: int):
    return jnp.where(pos < sink, pos, sink + jnp.mod(pos - sink, ring))


@dataclasses.dataclass(frozen=True)
class MosaicsSampled:
    """Sampled retrieval with the engine and settings of a MagicPIG back-end (module docstring)."""

    magicpig: MagicPIG
    center: bool = False  # see the module docstring
    name = "magicpig-memory"

    def gap(self, config: MosaicsConfig) -> int:
        """How old a pair must be for the sampled memory to see it (docs/algorithm.md §3A.4)."""
        return 1 if config.version == 1 else config.long_gap_min

    def ring(self, gap: int) -> int:
        return self.magicpig.local + gap  # the local visible pairs and the gap's newest positions

    def sparse_layers(self, config: MosaicsConfig) -> tuple:
        return self.magicpig.sparse_layers(config.num_hidden_layers)

    @contextlib.contextmanager
    def resources(self, config: MosaicsConfig, batch: int, capacity: int):
        """An engine store with a slot per (sampled layer, row) for `capacity` pairs."""
        mp = self.magicpig
        slots = max(1, len(self.sparse_layers(config)) * batch)
        store = open_store(slots, config.num_attention_heads, config.head_size, capacity, mp.K, mp.L, mp.eps,
                           mp.storage, mp.path, sketch_tables=mp.sketch_tables)
        with store:
            yield Runtime(EngineRef(store.handle_array, mp.projection(config.head_size), getattr(store, "heads", None)),
                          store)

    def init_state(self, config: MosaicsConfig, batch, capacity, dtype, runtime=None) -> SampledState:
        if runtime is None:
            raise ConfigError("sampled Mosaics retrieval: init_state needs the runtime of `resources(...)`")
        sparse = self.sparse_layers(config)
        h, hs = config.num_attention_heads, config.head_size
        # positions never reach past the capacity
        width = min(self.magicpig.sink + self.ring(self.gap(config)), capacity)
        zeros = lambda *shape: jnp.zeros(shape, dtype)
        exact = jax.tree.map(lambda a: a[0], mosaics.init_state(config, batch, capacity, dtype).layers)  # one layer

        def sampled(*small):
            return (*small, zeros(batch, h, width, hs), zeros(batch, h, width, hs), jnp.zeros((batch, h, hs)),
                    jnp.zeros((batch,), jnp.int32), *(jnp.zeros(()) for _ in range(3)))

        layers = []
        for i in range(config.num_hidden_layers):
            if i not in sparse:
                layers.append(jax.tree.map(jnp.copy, exact))  # own buffers (steps donate them)
            elif config.version == 1:
                layers.append(SampledLayer(*sampled(*(zeros(batch, h, hs) for _ in range(3)))))
            else:
                long = SampledMemory(*sampled(*(zeros(batch, h, hs) for _ in range(2))))
                layers.append(exact.replace(short=jax.tree.map(jnp.copy, exact.short), long=long))
        return SampledState(tuple(layers), jnp.zeros((batch,), jnp.int32), runtime)

    def step(self, params, config: MosaicsConfig, tokens, state: SampledState, num_new=None, fresh=False):
        """The recurrent form (`mosaics.step`) with sampled retrieval in the sampled layers, the
        layers run one by one (each has its own state layout)."""
        b, t = tokens.shape
        if not fresh and t != 1:
            raise PigjaxError(f"sampled Mosaics retrieval: after the prefill, decode one token per step (got {t})")
        num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
        sparse = self.sparse_layers(config)
        check_step("sampled Mosaics retrieval", config.vocab_size, tokens, state.count, num_new, None)
        embed = nn.Embed(config.vocab_size, config.hidden_size)
        x = embed_checked(lambda ids: embed.apply({"params": params["embed"]}, ids), tokens, config.vocab_size)
        block = mosaics.block_class(config)
        extra = () if config.version == 1 else (config.long_gap_min,)  # v2: inference's m
        layers = []
        for i, layer in enumerate(state.layers):
            memory = None
            if i in sparse:
                slots = sparse.index(i) * b + jnp.arange(b, dtype=jnp.int32)
                memory = partial(self._memory, state.engine, slots, num_new, fresh)
            p = jax.tree.map(lambda a: a[i], params["layers"])
            x, layer = block(config, True, True, memory).apply({"params": p}, x, layer, state.count, num_new, *extra)
            layers.append(layer)
        x = mosaics._layer_norm(config, "ln_f").apply({"params": params["ln_f"]}, x)
        logits = embed.apply({"params": params["embed"]}, x, method="attend") / config.hidden_size**0.5
        return logits.astype(jnp.float32), state.replace(layers=tuple(layers), count=state.count + num_new)

    def _codes(self, x, rt: EngineRef):
        return self.magicpig._codes(x, rt)  # the MagicPIG back-end's hashing (same path choice)

    def _memory(self, rt: EngineRef, slots, num_new, fresh, state, q, k, vals, count, span: mosaics.Span):
        """`mosaics.exact_memory`'s contract: queries q and keys k [B, H, T, hs] of positions
        count.., vals the values of positions count-1.., `span` the pairs a query sees (at least
        span.gap old) -> (y [B, H, T, hs], new SampledLayer / SampledMemory fields)."""
        if span.window is not None:
            raise ConfigError("sampled Mosaics retrieval reads a memory without a window (v1's, v2's long-term)")
        if fresh:
            return self._prefill(rt, slots, num_new, state, q, k, vals, span)
        mp, ring = self.magicpig, self.ring(span.gap)
        b, h, _, hs = k.shape
        rows, last = jnp.arange(b), count
        width = state.keys.shape[2]
        # The value of pair count-1 completes now.
        prev = jnp.where(count >= 1, _slot(count - 1, mp.sink, ring), width)
        win_v = state.values.at[rows, :, prev].set(vals[:, :, 0].astype(state.values.dtype), mode="drop")
        # The new key takes the slot of the pair `ring` positions back, which leaves the window for
        # the engine (unless it is a sink pair or the row is finished).
        slot = _slot(count, mp.sink, ring)
        out_k, out_v = (x[rows, :, slot].astype(jnp.float32)[:, :, None] for x in (state.keys, win_v))
        leaving = ((num_new > 0) & (count - ring >= mp.sink)).astype(jnp.int32)
        stored = engine.append(rt.handle, slots, out_k, out_v, self._codes(out_k, rt), leaving, state.stored,
                               path=mp._path(), heads=rt.heads)
        new_k = k[:, :, 0].astype(jnp.float32) - state.mu
        win_k = state.keys.at[rows, :, slot].set(new_k.astype(state.keys.dtype))
        # Query: scaled so that both partial softmaxes (which divide by √hs) score q_T·k_t.
        q = q[:, :, 0].astype(jnp.float32) * hs**0.5
        pos, valid = window_positions(last, mp.sink, ring, width)
        seen = valid & (pos <= last[:, None] - span.gap)
        out_g, lse_g = partial_softmax(q, win_k, win_v, seen[:, None, None])
        out_s, lse_s, sampled, _ = mp.engine_query(rt, slots, q, stored)  # MagicPIG's or RankedLSH's
        y, _ = merge(out_g, lse_g, out_s, lse_s)
        read, total = count_reads(jnp.sum(sampled, axis=1).astype(jnp.float32), stored, num_new, h)
        exact = jnp.sum(jnp.sum(seen, axis=1) * (num_new > 0)).astype(jnp.float32) * h
        # The next append must follow this query (else the query could see a pair twice):
        # sampled >= 0, so this is `stored`, but XLA cannot know it.
        stored = stored + jnp.minimum(jnp.min(sampled, axis=1), 0)
        return y[:, :, None].astype(k.dtype), dict(keys=win_k, values=win_v, stored=stored, read=state.read + read,
                                                  total=state.total + total, exact=state.exact + exact)

    def _prefill(self, rt: EngineRef, slots, num_new, state, q, k, vals, span: mosaics.Span):
        """Exact retrieval over the prompt (from an empty state); its complete pairs between the sink
        and the window go to the engine, the rest to the window."""
        mp, ring = self.magicpig, self.ring(span.gap)
        b, h, t, hs = k.shape
        v = jnp.concatenate([vals[:, :, 1:], jnp.zeros_like(vals[:, :, :1])], axis=2)  # v[p]: pair p's value
        pos = jnp.arange(t)[None, :]
        y = mosaics.retrieve(q, k, v, span.visible(pos, pos))
        k32 = k.astype(jnp.float32)
        pairs = jnp.maximum(num_new - 1, 0)  # complete pairs: the last key waits for its value
        if self.center:
            k32 = center(k32, pairs, mp.sink, ring - 1)
        mu = k.astype(jnp.float32)[:, :, 0] - k32[:, :, 0]
        # the window keeps the ring's ring - 1 complete pairs; the engine those between it and the sink
        stored = engine.prefill(rt.handle, slots, k32, v.astype(jnp.float32), self._codes(k32, rt), pairs,
                                sink=mp.sink, local=ring - 1, path=mp._path(), heads=rt.heads)
        pos, valid = window_positions(num_new - 1, mp.sink, ring, state.keys.shape[2])
        take = lambda x: jnp.where(valid[:, None, :, None],
                                   jnp.take_along_axis(x, jnp.minimum(pos, t - 1)[:, None, :, None], axis=2), 0)
        return y, dict(keys=take(k32).astype(state.keys.dtype), values=take(v).astype(state.values.dtype),
                       mu=mu, stored=stored)

    def stats(self, config: MosaicsConfig, cache_dtype, cache: SampledState | None = None, runtime=None) -> dict:
        """fraction_read: engine pairs sampled / engine pairs there were (like MagicPIG on Llama);
        fraction_read_sampled_layers: the same with the exact window counted as read."""
        mp = self.magicpig
        n, sparse = config.num_hidden_layers, self.sparse_layers(config)
        itemsize = jnp.dtype(cache_dtype).itemsize
        stats = {"attention": self.name, "K": mp.K, "L": mp.L, "storage": mp.storage, "center": self.center,
                 "sink": mp.sink,
                 "local": mp.local, "dense_layers": [i for i in range(n) if i not in sparse],
                 "fraction_read": None, "fraction_read_sampled_layers": None,
                 # Per context token, averaged over layers: a key and a value in each layer whose
                 # growing memory stays exact (the dense layers).
                 "cache_bytes_per_token_per_layer": 2 * config.hidden_size * itemsize * (n - len(sparse)) / n,
                 "host_bytes_per_token_per_layer": 0.0, **short_term_bytes(config, itemsize)}
        if cache is not None:
            sampled = [_sampled_part(cache.layers[i]) for i in sparse]
            read, total, exact = (sum(float(getattr(s, f)) for s in sampled) for f in ("read", "total", "exact"))
            if total > 0:
                stats["fraction_read"] = read / total
            if total + exact > 0:
                stats["fraction_read_sampled_layers"] = (read + exact) / (total + exact)
        if runtime is not None and runtime.store is not None and not runtime.store.closed:
            info = runtime.store.info()
            stored = sum(info["middle_counts"]) + sum(info["appended_counts"])
            if stored:
                stats["host_bytes_per_token_per_layer"] = info["bytes_allocated"] / stored * len(sparse) / n
        return stats
