"""Next-token selection: greedy, temperature, top-k, top-p, with one PRNG key per row."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from pigjax.errors import PigjaxError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static (hashable) sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not _real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise PigjaxError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _integer(self.top_k) or self.top_k < 1):
            raise PigjaxError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not _real(self.top_p) or not 0 < self.top_p <= 1):
            raise PigjaxError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def filter_logits(self, logits: jax.Array) -> jax.Array:
        """Temperature, then top-k, then top-p (the smallest set of tokens with mass >= p) on [B, V]."""
        logits = logits.astype(jnp.float32) / self.temperature
        neg = jnp.finfo(jnp.float32).min
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, neg, logits)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            # The most likely token always stays (mass_before = 0 < p).
            cutoff = jnp.min(jnp.where(mass_before < self.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, neg, logits)
        return logits

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        """logits [B, V], keys [B] (typed PRNG keys) -> tokens [B] int32."""
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = self.filter_logits(logits)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def check_seed(where: str, seed, error=PigjaxError):
    """A seed jax.random.key accepts: an integer in [-2**63, 2**63)."""
    if not _integer(seed) or not -2**63 <= seed < 2**63:
        raise error(f"{where}: seed must be an integer in [-2**63, 2**63), got {seed!r}")


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
