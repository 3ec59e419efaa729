"""Checks of a step's tokens against the vocabulary and the cache, shared by the models' `step`.

Eagerly (concrete arrays) a bad step raises `PigjaxError`. Under jit values cannot raise, so the
step marks what it cannot compute instead of returning a plausible wrong answer: an out-of-range
token id embeds as NaN, which attention carries to every position of its row (the row's logits are
NaN), and a row whose tokens run past the cache's capacity gets NaN logits for the whole step.
Shapes are static: more tokens in one step than the cache holds raises under jit too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pigjax.errors import PigjaxError


def check_step(name: str, vocab_size: int, tokens, starts, num_new, capacity: int | None):
    """Raise PigjaxError for tokens [B, T] that do not fit: T > capacity always; out-of-vocabulary
    ids among each row's first num_new[b] tokens and starts + num_new > capacity when the arrays
    are concrete. `capacity` None: the cache has no fixed number of positions to check."""
    b, t = tokens.shape
    if capacity is not None and t > capacity:
        raise PigjaxError(f"{name}: {t} tokens in one step exceed the cache's capacity ({capacity} positions)")
    if any(isinstance(x, jax.core.Tracer) for x in (tokens, starts, num_new)):
        return
    tokens, starts, num_new = np.asarray(tokens), np.asarray(starts), np.asarray(num_new)
    problem = out_of_vocabulary(tokens, np.arange(t)[None, :] < num_new[:, None], vocab_size)
    if problem:
        raise PigjaxError(f"{name}: {problem}")
    if capacity is not None and np.any(starts + num_new > capacity):
        row = int(np.argmax(starts + num_new > capacity))
        raise PigjaxError(f"{name}: row {row} holds {int(starts[row])} tokens; {int(num_new[row])} more exceed the "
                          f"cache's capacity ({capacity} positions)")


def out_of_vocabulary(tokens: np.ndarray, real: np.ndarray, vocab_size: int) -> str | None:
    """What is wrong with the first id outside [0, vocab_size) where `real` holds, or None."""
    bad = real & ((tokens < 0) | (tokens >= vocab_size))
    if not bad.any():
        return None
    row, col = map(int, np.argwhere(bad)[0])
    return f"token id {int(tokens[row, col])} at [{row}, {col}] is outside the vocabulary [0, {vocab_size})"


def embed_checked(embed, tokens, vocab_size: int):
    """embed(tokens) with NaN rows where an id lies outside [0, vocab_size) (jnp.take would wrap
    negative ids and fill large ones)."""
    valid = (tokens >= 0) & (tokens < vocab_size)
    x = embed(jnp.where(valid, tokens, 0))
    return jnp.where(valid[..., None], x, jnp.nan)


def mark_overflow(logits, starts, num_new, capacity: int | None):
    """logits [B, T, V] with NaN for rows whose new tokens run past `capacity`."""
    if capacity is None:
        return logits
    over = starts + num_new > capacity
    return jnp.where(over[:, None, None], jnp.nan, logits)
