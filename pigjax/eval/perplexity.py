"""Decode-mode evaluation: prefill a prefix, then feed the rest one token per step (teacher
forcing) through a back-end's decode path, as generation would see it.

`teacher_forced` returns each target token's log-probability (and, for small vocabularies, the
logits); `perplexity` summarises it. With a sparse back-end, every decode step after the prefill
is sparse, so this measures what sampling/selection costs in quality on real text. A Memory
Mosaics model runs its recurrent form with exact or sampled retrieval (pigjax.models.mosaics_memory).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pigjax.errors import PigjaxError
from pigjax.families import family_of


@partial(jax.jit, static_argnames=("config", "backend", "p", "return_logits"))
def _run(params, tokens, runtime, *, config, backend, p, return_logits):
    b, t = tokens.shape
    family = family_of(config)
    cache = family.init_cache(backend, config, b, t, t - p, jax.tree.leaves(params)[0].dtype, runtime)
    step = lambda tok, cache, fresh=False: family.step(params, config, tok, cache, None, backend, fresh)
    logits, cache = step(tokens[:, :p], cache, fresh=True)
    first = logits[:, -1]

    def body(cache, tok):
        logits, cache = step(tok[:, None], cache)
        return cache, logits[:, 0]

    cache, rest = jax.lax.scan(body, cache, tokens[:, p:-1].T)
    all_logits = jnp.concatenate([first[None], rest], axis=0).swapaxes(0, 1)  # [B, t - p, V]
    logp = jax.nn.log_softmax(all_logits, axis=-1)
    targets = tokens[:, p:]
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return token_logp, (all_logits if return_logits else None), cache


def teacher_forced(model, tokens, prefill: int, attention=None, return_logits: bool = False):
    """tokens [B, T] int (all rows full length). Prefill tokens[:, :prefill] densely, then decode
    tokens prefill..T-1 one per step with `attention` (default Dense(); MagicPIG(...) gives a
    Memory Mosaics model sampled retrieval).

    -> dict(logp [B, T - prefill]: log p(tokens[:, i] | tokens[:, :i]) for i >= prefill,
            logits [B, T - prefill, V] or None, stats: the back-end's stats).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or not 1 <= prefill < tokens.shape[1]:
        raise PigjaxError(f"teacher_forced: need tokens [B, T] and 1 <= prefill < T, got {tokens.shape}, {prefill}")
    b, t = tokens.shape
    if t > model.config.max_position_embeddings:
        raise PigjaxError(f"teacher_forced: {t} tokens exceed the model's context ({model.config.max_position_embeddings})")
    family = family_of(model.config)
    backend, params = family.decoder(attention), family.decode_params(model.params)
    with backend.resources(model.config, b, family.engine_capacity(prefill, t)) as runtime:
        logp, logits, cache = _run(params, tokens, runtime.arrays, config=model.config, backend=backend,
                                   p=prefill, return_logits=return_logits)
        jax.block_until_ready((logp, logits, cache))  # before the engine store is freed
        stats = backend.stats(model.config, model.dtype, cache, runtime)
    return {"logp": np.asarray(logp), "logits": None if logits is None else np.asarray(logits), "stats": stats}


def perplexity(logp) -> float:
    return float(math.exp(-float(np.mean(logp))))
