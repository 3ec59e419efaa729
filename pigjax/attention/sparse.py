"""What every sparse back-end (MagicPIG and the baselines) shares: its settings, its state and
how it counts the middle keys it reads.

Prefill is dense for every back-end (as in MagicPIG): a prompt splits into sink, middle and local
(`pigjax.attention.split`); each decode step attends exactly to sink, local and generated tokens
(the window G) and reads only part of the middle. Layers in `dense_layers` stay dense.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
from flax import struct

from pigjax.attention.backend import Backend, Cache, StepContext
from pigjax.errors import ConfigError, PigjaxError


@struct.dataclass
class SparseShared:
    """The state a sparse back-end shares across layers (back-ends extend it with their own fields)."""

    prompt_len: jax.Array  # [B] tokens of the prefilled prompt (whose middle is sparse)
    read: jax.Array  # f32: middle keys read, summed over decode steps, sparse layers, query heads
    total: jax.Array  # f32: middle keys there were, same sum


def count_reads(read_per_row, n_middle, num_new, heads: int):
    """(read, total) over the rows that decoded a token this step."""
    live = (num_new > 0).astype(jnp.float32)
    return jnp.stack([jnp.sum(read_per_row * live), jnp.sum(n_middle.astype(jnp.float32) * heads * live)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseBackend(Backend):
    """Fields shared by sparse back-ends (keyword-only); `dense_layers=None` means (0, n_layers // 2)."""

    sink: int = 4
    local: int = 64
    dense_layers: tuple | None = None

    def __post_init__(self):
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ConfigError(f"{self.name}: sink must be an int >= 0, got {self.sink!r}")
        if not isinstance(self.local, int) or self.local < 1:
            raise ConfigError(f"{self.name}: local must be an int >= 1, got {self.local!r}")
        if self.dense_layers is not None:
            object.__setattr__(self, "dense_layers", tuple(sorted(set(int(i) for i in self.dense_layers))))

    def dense_set(self, config) -> tuple:
        return self.dense_layer_set(config.num_hidden_layers)

    def dense_layer_set(self, n: int) -> tuple:
        layers = (0, n // 2) if self.dense_layers is None else self.dense_layers
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"{self.name}: dense_layers {bad} out of range for a model of {n} layers [0, {n})")
        return tuple(sorted(set(layers)))

    def check_step(self, ctx: StepContext, t: int):
        if not ctx.fresh and t != 1:
            raise PigjaxError(f"{self.name}: after the prefill, decode one token per step (got {t})")

    def finish_step(self, shared: SparseShared, ctx: StepContext, reads):
        counted = [r for r in reads if r is not None]
        delta = sum(counted) if counted else jnp.zeros(2)
        if ctx.fresh:
            return shared.replace(prompt_len=ctx.num_new)
        return shared.replace(read=shared.read + delta[0], total=shared.total + delta[1])

    def fraction_read(self, cache: Cache | None):
        if cache is None:
            return None
        total = float(cache.shared.total)
        return float(cache.shared.read) / total if total > 0 else None

    def base_stats(self, config, cache_dtype, cache) -> dict:
        itemsize = jnp.dtype(cache_dtype).itemsize
        return {
            "attention": self.name,
            "fraction_read": self.fraction_read(cache),
            "dense_layers": list(self.dense_set(config)),
            "sink": self.sink, "local": self.local,
            "cache_bytes_per_token_per_layer": 2 * config.num_key_value_heads * config.head_dim * itemsize,
            "host_bytes_per_token_per_layer": 0.0,
        }


