"""Attention-level error of sparse back-ends on real prompts: every layer's attention output vs
exact attention, with the same queries, keys and values (those of a dense forward), in decode mode.

A dense forward of the whole prompt records each layer's q, k, v. The first `prefill` positions
become each back-end's prefilled cache (MagicPIG: tables over the middle); positions
prefill..T-1 are then decoded one by one through the back-end's `attend_layer` (so the window
grows as in generation), and each layer's output is compared with Dense's on the same inputs.
Errors therefore do not compound across layers: this isolates the attention estimate.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pigjax.attention import Dense
from pigjax.attention.backend import KV, StepContext
from pigjax.models import llama


@dataclasses.dataclass(frozen=True)
class _Recorder(Dense):
    """Dense attention whose layer state also carries the layer's queries."""

    name = "recorder"

    def attend_layer(self, layer, state, shared, q, k, v, ctx):
        out, state, _ = super().attend_layer(layer, state, shared, q, k, v, ctx)
        return out, (state, q), None


@partial(jax.jit, static_argnames=("config",))
def record_qkv(params, tokens, *, config):
    """Per layer (q [B, T, Hq, d], k [B, Hkv, T, d], v [B, Hkv, T, d]) of a dense forward."""
    b, t = tokens.shape
    dtype = jax.tree.leaves(params)[0].dtype
    rec = _Recorder()
    cache = rec.init_cache(config, b, t, 0, dtype)
    _, cache = llama.step(params, config, tokens, cache, None, rec, fresh=True)
    return tuple((q, kv.k, kv.v) for kv, q in cache.layers)


@partial(jax.jit, static_argnames=("config", "backend", "prefill"))
def _decode_outputs(qkv, runtime, *, config, backend, prefill):
    """Attention outputs [steps, n_layers, B, Hq, d] of decode positions prefill..T-1."""
    b, t = qkv[0][0].shape[:2]
    prefix = tuple(KV(k[:, :, :prefill], v[:, :, :prefill]) for _, k, v in qkv)
    lengths = jnp.full((b,), prefill, jnp.int32)
    cache = backend.from_prefill(config, prefix, lengths, t, t - prefill, qkv[0][0].dtype, runtime)
    n = config.num_hidden_layers

    def body(cache, pos):
        ctx = StepContext(jnp.full((b, 1), pos, jnp.int32), jnp.full((b,), pos, jnp.int32),
                          jnp.ones((b,), jnp.int32), False, n)
        states, reads, outs = [], [], []
        for i, (q, k, v) in enumerate(qkv):
            sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, pos, 1, axis)  # noqa: E731
            out, state, read = backend.attend_layer(i, cache.layers[i], cache.shared, sl(q, 1),
                                                    sl(k, 2).transpose(0, 2, 1, 3), sl(v, 2).transpose(0, 2, 1, 3), ctx)
            states.append(state)
            reads.append(read)
            outs.append(out[:, 0].astype(jnp.float32))
        shared = backend.finish_step(cache.shared, ctx, reads)
        return cache.replace(layers=tuple(states), lengths=cache.lengths + 1, shared=shared), jnp.stack(outs)

    cache, outs = jax.lax.scan(body, cache, jnp.arange(prefill, t))
    return outs, cache


def layer_errors(model, tokens, prefill: int, backends) -> dict:
    """{backend name: {"relative_l2": [per layer], "fraction_read": f}}; relative L2 is the mean over
    decode positions, rows and query heads of ||o - o_dense|| / ||o_dense||."""
    config = model.config
    params = llama.unstack_layers(model.params)
    qkv = record_qkv(params, jnp.asarray(tokens, jnp.int32), config=config)
    exact, _ = _decode_outputs(qkv, None, config=config, backend=Dense(), prefill=prefill)
    exact = np.asarray(exact)
    norm = np.linalg.norm(exact, axis=-1)
    results = {}
    for name, backend in backends.items():
        with backend.resources(config, tokens.shape[0], prefill) as runtime:
            outs, cache = _decode_outputs(qkv, runtime.arrays, config=config, backend=backend, prefill=prefill)
            jax.block_until_ready((outs, cache))  # before the engine store is freed
            stats = backend.stats(config, model.dtype, cache, runtime)
        err = np.linalg.norm(np.asarray(outs) - exact, axis=-1) / np.maximum(norm, 1e-30)
        results[name] = {"relative_l2": err.mean(axis=(0, 2, 3)).tolist(), "fraction_read": stats.get("fraction_read")}
        for key in ("fraction_keys_read", "fraction_values_read"):  # the engine back-ends count both
            if key in stats:
                results[name][key] = stats[key]
    return results
