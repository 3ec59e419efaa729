"""`pigjax.forward`: logits of whole token batches, validated, for any model family."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pigjax import sharding
from pigjax.errors import PigjaxError
from pigjax.families import family_of
from pigjax.model import Model
from pigjax.models.inputs import out_of_vocabulary


def check_tokens(config, tokens, lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a [B, T] token batch and its row lengths; returns them as int32 arrays."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise PigjaxError(f"tokens must be a 2-D integer array [batch, time], got {tokens.dtype} {tokens.shape}")
    b, t = tokens.shape
    if b == 0 or t == 0:
        raise PigjaxError(f"tokens must be non-empty, got shape {tokens.shape}")
    if t > config.max_position_embeddings:
        raise PigjaxError(
            f"sequence of {t} tokens is longer than the model's context ({config.max_position_embeddings})"
        )
    lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
        raise PigjaxError(f"lengths must be {b} integers (one per row), got {lengths.dtype} {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > t:
        raise PigjaxError(f"lengths must lie in [1, {t}], got {lengths.tolist()}")
    valid = np.arange(t)[None, :] < lengths[:, None]
    problem = out_of_vocabulary(tokens, valid, config.vocab_size)
    if problem:
        raise PigjaxError(problem)
    return np.where(valid, tokens, 0).astype(np.int32), lengths.astype(np.int32)


@partial(jax.jit, static_argnums=1)
def _forward(params, config, tokens, lengths):
    logits = family_of(config).logits(params, config, tokens, lengths)
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return jnp.where(valid[..., None], logits, 0.0)


def forward(model: Model, tokens, lengths=None, *, mesh=None) -> jax.Array:
    """Logits [B, T, vocab] float32 for tokens [B, T] int32.

    `lengths` [B] marks right-padded rows: row b's tokens at t >= lengths[b] are ignored and their
    logits are 0. Valid positions do not depend on the padding (attention is causal).
    `mesh` (axes "data" and "model", `pigjax.sharding`): rows split over "data" (B must divide
    evenly), heads and the MLP over "model"; the logits come back sharded by rows.
    """
    tokens, lengths = check_tokens(model.config, tokens, lengths)
    if mesh is None:
        return _forward(model.params, model.config, tokens, lengths)
    mesh = sharding.check_mesh(mesh)
    sharding.check_batch(mesh, tokens.shape[0], "tokens: a batch")
    with sharding.use(mesh):
        params = sharding.shard_params(model.config, model.params, mesh)
        return _forward(params, model.config, *sharding.put_batch(mesh, tokens, lengths))
