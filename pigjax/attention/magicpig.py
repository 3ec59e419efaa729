"""`pigjax.MagicPIG`: the MagicPIG back-end of the decode path (docs/algorithm.md §2).

Prefill is dense. For every sparse layer it then centers the prompt's keys by the mean of their
middle, hashes them with one shared SimHash projection (drawn from `seed`) and hands the middle to
the engine (slot = sparse-layer index × batch + row), keeping only the exact window — sink, local
and the tokens generated later — in the model-side cache. `sample_cap` < 1 bounds what a head
reads: past ⌈sample_cap·n⌉ sampled keys, a uniform subset of that many, reweighted so the estimate
stays unbiased (docs/algorithm.md §2.6). A decode step computes q, its codes and
the window's partial softmax on the model side, calls the engine once per layer for all rows and
heads, and merges the two by log-sum-exp. Dense layers keep a full cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from pigjax.attention.backend import KV, Cache, Runtime, StepContext, init_kv, native_cpu, write_kv, write_rows
from pigjax.attention.dense import attend
from pigjax.attention.softmax import merge, partial_softmax
from pigjax.attention.sparse import SparseBackend, SparseShared, count_reads
from pigjax.attention.split import exact_positions, middle_bounds, middle_mask
from pigjax.engine import native
from pigjax.engine import store as engine
from pigjax.engine.grid import open_store
from pigjax.errors import ConfigError, PigjaxError
from pigjax.sampling import check_seed

MAX_TABLE_BITS = 8192  # K·L: the projection is [d, K·L] and every key's codes cost d·K·L flops


@struct.dataclass
class Window:
    """A sparse layer's model-side state: the exact tokens (centered keys) and the centering."""

    k: jax.Array  # [B, Hkv, W, d]: sink, local, then generated tokens, in position order
    v: jax.Array  # [B, Hkv, W, d]
    mu: jax.Array  # [B, Hkv, d] f32: mean of the middle keys (docs/algorithm.md §2.2)
    counts: jax.Array  # [B] int32: middle tokens in the engine (orders queries after the prefill)


@struct.dataclass
class EngineRef:
    """What jitted code needs to reach an engine store (the `Runtime.arrays` of `resources`)."""

    handle: jax.Array  # rank-0 int32: the engine store (a StoreGrid's: [data, model], one per device)
    proj: jax.Array  # [d, K·L] f32: the SimHash projection
    heads: str | None = struct.field(pytree_node=False, default=None)  # how a StoreGrid splits heads


@struct.dataclass
class EngineShared(SparseShared):
    engine: EngineRef
    filled: jax.Array  # [B] int32: window slots in use
    values_read: jax.Array  # f32: middle value rows read, summed like `read` (which counts key rows)


def window_softmax(q, k, v, filled):
    """(o [B, Hq, d], lse [B, Hq]) of q [B, Hq, d] f32 over the window slots 0..filled[b] of k, v
    [B, Hkv, W, d]: by the engine's decode attention on the CPU backend (one call instead of a
    handful of small XLA ops per layer), else `partial_softmax`."""
    if k.dtype in (jnp.float32, jnp.bfloat16) and native_cpu():
        return native.decode_attention(q, k, v, (filled + 1).astype(jnp.int32), with_lse=True)
    seen = (jnp.arange(k.shape[2])[None, :] <= filled[:, None])[:, None, None]
    return partial_softmax(q, k, v, seen)


def center(k, lengths, sink: int, local: int):
    """Subtract the mean of each (row, KV head)'s middle keys from all its keys, k [B, Hkv, n, d]
    (docs/algorithm.md §2.2): a constant shift of each head's scores, so the softmax is unchanged."""
    mask = middle_mask(k.shape[2], lengths, sink, local)[:, None, :, None]
    count = jnp.maximum(jnp.sum(mask, axis=2, keepdims=True), 1)
    return k - jnp.sum(jnp.where(mask, k, 0.0), axis=2, keepdims=True) / count


@dataclasses.dataclass(frozen=True)
class MagicPIG(SparseBackend):
    K: int = 10
    L: int = 150
    eps: float = 1e-4
    seed: int = dataclasses.field(default=0, compare=False)  # data (the projection): no recompile per seed
    storage: str = "bf16"  # the engine's K/V precision ("bf16" or "f32")
    path: str | None = None  # "ffi", "cuda-ffi", "cuda-async" or "callback" (default: engine.default_path())
    sample_cap: float = 1.0  # most keys a head's sample reads, as a fraction of n (1: no cap)
    name = "magicpig"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.K, int) or isinstance(self.K, bool) or not 1 <= self.K <= native.MAX_K:
            raise ConfigError(f"{self.name}: K must be an int in [1, {native.MAX_K}], got {self.K!r}")
        if not isinstance(self.L, int) or isinstance(self.L, bool) or self.L < 2:
            raise ConfigError(f"{self.name}: L must be an int >= 2, got {self.L!r}")
        if self.K * self.L > MAX_TABLE_BITS:
            raise ConfigError(f"{self.name}: K·L = {self.K * self.L} is too large (at most {MAX_TABLE_BITS})")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise ConfigError(f"{self.name}: eps must be a finite number > 0, got {self.eps!r}")
        check_seed(self.name, self.seed, ConfigError)
        if self.storage not in ("bf16", "f32"):
            raise ConfigError(f"{self.name}: storage must be 'bf16' or 'f32', got {self.storage!r}")
        if self.path is not None and self.path not in engine.PATHS:
            raise ConfigError(f"{self.name}: path must be None or one of {', '.join(map(repr, engine.PATHS))}, "
                              f"got {self.path!r}")
        if (isinstance(self.sample_cap, bool) or not isinstance(self.sample_cap, (int, float))
                or not 0 < self.sample_cap <= 1):
            raise ConfigError(f"{self.name}: sample_cap must be a fraction in (0, 1], got {self.sample_cap!r}")

    @property
    def sketch_tables(self) -> int:
        """Tables the engine store keeps per token as a sketch instead of bucket lists (RankedLSH's
        ranking; none here)."""
        return 0

    def exact_width(self, prompt_capacity: int) -> int:
        """Window slots for the exact prompt tokens (sink and local) of prompts up to that length."""
        return min(self.sink + self.local, prompt_capacity)

    def sparse_layers(self, n_layers: int) -> tuple:
        dense = self.dense_layer_set(n_layers)
        return tuple(i for i in range(n_layers) if i not in dense)

    def projection(self, head_dim: int) -> jax.Array:
        return jax.random.normal(jax.random.key(self.seed), (head_dim, self.K * self.L), jnp.float32)

    @contextlib.contextmanager
    def resources(self, config, batch: int, capacity: int):
        """An engine store with a slot per (sparse layer, row) for `capacity` prompt tokens. Its bytes
        are estimated before anything is allocated: settings that would not fit raise ConfigError."""
        slots = max(1, len(self.sparse_layers(config.num_hidden_layers)) * batch)
        try:  # MagicPIG never appends: the estimate counts the prompt's tables only
            store = open_store(slots, config.num_key_value_heads, config.head_dim, capacity, self.K, self.L,
                               self.eps, self.storage, self.path, appends=False, num_heads=config.num_attention_heads,
                               sketch_tables=self.sketch_tables)
        except PigjaxError as e:
            raise ConfigError(f"{self.name} (K={self.K}, L={self.L}, batch {batch}, {capacity} prompt tokens): {e}") from None
        with store:
            yield Runtime(EngineRef(store.handle_array, self.projection(config.head_dim), getattr(store, "heads", None)),
                          store)

    def init_cache(self, config, batch, capacity, window, dtype, runtime: EngineRef = None) -> Cache:
        if runtime is None:
            raise ConfigError(f"{self.name}: init_cache needs the runtime of `resources(...)` (an engine store)")
        dense = self.dense_set(config)
        hkv, d = config.num_key_value_heads, config.head_dim
        # The exact prompt tokens never outnumber the prompt: size by capacity, not by sink + local alone.
        width = self.exact_width(capacity) + window
        layers = []
        for i in range(config.num_hidden_layers):
            if i in dense:
                layers.append(init_kv(batch, hkv, capacity, d, dtype))
            else:
                kv = init_kv(batch, hkv, width, d, dtype)
                layers.append(Window(kv.k, kv.v, jnp.zeros((batch, hkv, d), jnp.float32),
                                     jnp.zeros((batch,), jnp.int32)))
        shared = EngineShared(jnp.zeros((batch,), jnp.int32), jnp.zeros(()), jnp.zeros(()), runtime,
                              jnp.zeros((batch,), jnp.int32), jnp.zeros(()))
        return Cache(tuple(layers), jnp.zeros((batch,), jnp.int32), shared)

    def _codes(self, x, rt: EngineRef):
        return engine.simhash_codes(x.astype(jnp.float32), rt.proj, self.K, self._path(), rt.heads)

    def _path(self):
        return self.path or engine.default_path()

    def attend_layer(self, layer, state, shared: EngineShared, q, k, v, ctx: StepContext):
        self.check_step(ctx, q.shape[1])
        if isinstance(state, KV):  # a dense layer
            state = write_kv(state, k, v, ctx.starts)
            return attend(q, state.k, state.v, ctx.positions, ctx.fresh), state, None
        slots = self.slots(layer, ctx.n_layers, q.shape[0])
        if ctx.fresh:
            return self._prefill(state, shared.engine, slots, q, k, v, ctx)
        return self._decode(state, shared, slots, q, k, v, ctx)

    def _prefill(self, state: Window, rt: EngineRef, slots, q, k, v, ctx):
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, d]
        out = attend(q, kt, vt, ctx.positions, fresh=True)
        return out, self.ingest(state, rt, slots, kt, vt, ctx.num_new), None

    def layer_slots(self, config, layer: int, batch: int):
        if layer in self.dense_set(config):
            return None
        return self.slots(layer, config.num_hidden_layers, batch)

    def ingest_layer(self, config, state, shared, kv: KV, lengths, slots):
        if isinstance(state, KV):
            return super().ingest_layer(config, state, shared, kv, lengths, slots)
        return self.ingest(state, shared.engine, slots, kv.k, kv.v, lengths)

    def ingest(self, state: Window, rt: EngineRef, slots, kt, vt, lengths) -> Window:
        """A prompt's keys/values [B, Hkv, T, d] (rows of `lengths` tokens) into the engine and the
        window: center by the middle's mean, hash, build the tables, keep sink and local exact."""
        k32, v32 = kt.astype(jnp.float32), vt.astype(jnp.float32)
        kc = center(k32, lengths, self.sink, self.local)
        mu = (k32 - kc)[:, :, 0]
        counts = engine.prefill(rt.handle, slots, kc, v32, self._codes(kc, rt), lengths,
                                sink=self.sink, local=self.local, path=self._path(), heads=rt.heads)
        width = self.exact_width(kt.shape[2])
        pos, valid = exact_positions(lengths, self.sink, self.local, width)
        take = lambda x: jnp.where(valid[:, None, :, None],
                                   jnp.take_along_axis(x, jnp.minimum(pos, x.shape[2] - 1)[:, None, :, None], axis=2), 0)
        win_k = state.k.at[:, :, :width].set(take(kc).astype(state.k.dtype))
        win_v = state.v.at[:, :, :width].set(take(vt).astype(state.v.dtype))
        return Window(win_k, win_v, mu, counts)

    def slots(self, layer: int, n_layers: int, batch: int):
        """Engine slots of a sparse layer's rows."""
        return self.sparse_layers(n_layers).index(layer) * batch + jnp.arange(batch, dtype=jnp.int32)

    def _decode(self, state: Window, shared: EngineShared, slots, q, k, v, ctx):
        rt = shared.engine
        b, _, hq, d = q.shape
        kc = (k.astype(jnp.float32) - state.mu[:, None]).astype(state.k.dtype)  # [B, 1, Hkv, d]
        win_k, win_v = write_rows(state.k, kc, shared.filled), write_rows(state.v, v, shared.filled)
        q1 = q[:, 0].astype(jnp.float32)
        out_g, lse_g = window_softmax(q1, win_k, win_v, shared.filled)
        out_s, lse_s, keys, values = self.engine_query(rt, slots, q1, state.counts)
        out, _ = merge(out_g, lse_g, out_s, lse_s)
        lo, hi = middle_bounds(shared.prompt_len, self.sink, self.local)
        reads = count_reads(jnp.sum(keys, axis=1).astype(jnp.float32), hi - lo, ctx.num_new, hq)
        live = (ctx.num_new > 0).astype(jnp.float32)
        reads = jnp.append(reads, jnp.sum(jnp.sum(values, axis=1).astype(jnp.float32) * live))
        return out[:, None].astype(q.dtype), Window(win_k, win_v, state.mu, state.counts), reads

    def engine_query(self, rt: EngineRef, slots, q, dep):
        """The engine's partial softmax of q [B, Hq, d] f32 over `slots`' stored tokens (`dep`: an
        int32 [B] produced after their prefill) -> (out, lse, keys read [B, Hq], values read [B, Hq]).
        MagicPIG reads a key and its value for each sampled token (docs/algorithm.md §2.4)."""
        out, lse, sampled = engine.query(rt.handle, slots, q, self._codes(q, rt), dep, sample_cap=self.sample_cap,
                                         path=self._path(), heads=rt.heads)
        return out, lse, sampled, sampled

    def finish_step(self, shared: EngineShared, ctx: StepContext, reads):
        if ctx.fresh:  # the exact prompt tokens: sink and local
            lo, hi = middle_bounds(ctx.num_new, self.sink, self.local)
            filled = lo + ctx.num_new - hi
        else:
            filled = shared.filled + ctx.num_new
        counted = [r[2] for r in reads if r is not None and not ctx.fresh]
        values = shared.values_read + (sum(counted) if counted else 0.0)
        return super().finish_step(shared, ctx, reads).replace(filled=filled, values_read=values)

    def stats(self, config, cache_dtype, cache=None, runtime: Runtime | None = None) -> dict:
        stats = self.base_stats(config, cache_dtype, cache)
        n = config.num_hidden_layers
        n_sparse = len(self.sparse_layers(n))
        # Per prompt token, averaged over layers: only dense layers keep it on the model side.
        stats["cache_bytes_per_token_per_layer"] *= (n - n_sparse) / n
        stats.update(K=self.K, L=self.L, storage=self.storage, sample_cap=self.sample_cap)
        # fraction_read counts a middle token whose key or value row is read; here each apart.
        total = float(cache.shared.total) if cache is not None else 0.0
        stats["fraction_keys_read"] = stats["fraction_read"]
        stats["fraction_values_read"] = float(cache.shared.values_read) / total if total > 0 else None
        if runtime is not None and runtime.store is not None and not runtime.store.closed:
            info = runtime.store.info()
            stored = sum(info["middle_counts"]) + sum(info["appended_counts"])
            if stored:
                # Engine bytes per middle token of a sparse layer (all KV heads), averaged over layers.
                stats["host_bytes_per_token_per_layer"] = info["bytes_allocated"] / stored * n_sparse / n
                stats["host_bytes_per_token_per_sparse_layer"] = info["bytes_allocated"] / stored
        return stats
