"""`lsh_attention`: MagicPIG's whole estimator in one call (docs/algorithm.md §2), for analysis and tests.

The model side (JAX) centers keys and hashes them; the engine builds tables over the middle and
returns the sampled partial softmax (o_S, lse_S); JAX computes the exact sink/local part and merges
the two by log-sum-exp.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pigjax.attention.magicpig import center
from pigjax.attention.softmax import merge, partial_softmax
from pigjax.attention.split import middle_mask
from pigjax.engine import native
from pigjax.engine.store import Store, simhash_codes
from pigjax.errors import PigjaxError


def exact_part(q, k, v, lengths, sink: int, local: int):
    """Partial softmax (o_G, lse_G) of q [B, Hq, d] over each row's sink and local positions."""
    n = k.shape[2]
    visible = (jnp.arange(n)[None, :] < lengths[:, None]) & ~middle_mask(n, lengths, sink, local)
    return partial_softmax(q, k, v, visible[:, None, None])


@partial(jax.jit, static_argnames=("K", "sink", "local", "path"))
def _prepare(q, k, lengths, proj, *, K, sink, local, path=None):
    kc = center(k, lengths, sink, local)
    return kc, simhash_codes(kc, proj, K, path), simhash_codes(q, proj, K, path)


@partial(jax.jit, static_argnames=("sink", "local"))
def _finish(q, kc, v, lengths, out_s, lse_s, *, sink, local):
    out_g, lse_g = exact_part(q, kc, v, lengths, sink, local)
    return merge(out_g, lse_g, out_s, lse_s)[0]


def _validate(q, k, v, proj, K, L, sink, local, lengths):
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise PigjaxError(f"lsh_attention: need q [B, Hq, d] and k, v [B, Hkv, n, d]; got q {q.shape}, "
                          f"k {k.shape}, v {v.shape}")
    b, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise PigjaxError(f"lsh_attention: q {q.shape} does not fit k {k.shape} (batch, head_dim, or "
                          "query heads not a multiple of KV heads)")
    if not 1 <= K <= native.MAX_K or L < 2:
        raise PigjaxError(f"lsh_attention: need 1 <= K <= {native.MAX_K} and L >= 2, got K={K}, L={L}")
    if proj.shape != (d, K * L):
        raise PigjaxError(f"lsh_attention: proj must be [d, K·L] = [{d}, {K * L}], got {proj.shape}")
    if sink < 0 or local < 1:
        raise PigjaxError(f"lsh_attention: need sink >= 0 and local >= 1, got sink={sink}, local={local}")
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > k.shape[2]:
        raise PigjaxError(f"lsh_attention: lengths must be {b} values in [1, {k.shape[2]}], got {lengths}")


def lsh_attention(q, k, v, proj, *, K: int, L: int, sink: int = 4, local: int = 64, eps: float = 1e-4,
                  lengths=None, storage: str = "f32", path: str | None = None):
    """MagicPIG attention of q [B, Hq, d] over k, v [B, Hkv, n, d] with tables from proj [d, K·L].

    Returns (out [B, Hq, d] float32, sampled [B, Hq] int32 = |S| per head). `lengths` [B] marks
    right-padded rows. A temporary engine store holds the tables and is freed before returning;
    `storage` and `path` are the Store's (K/V precision; "ffi", "cuda-ffi", "cuda-async" or "callback").
    """
    q, k, v, proj = (jnp.asarray(a, jnp.float32) for a in (q, k, v, proj))
    lengths = np.full(q.shape[0], k.shape[2] if k.ndim == 4 else 0, np.int32) if lengths is None \
        else np.asarray(lengths, np.int32)
    _validate(q, k, v, proj, K, L, sink, local, lengths)
    b, hkv, n, d = k.shape
    kc, k_codes, q_codes = _prepare(q, k, lengths, proj, K=K, sink=sink, local=local, path=path)
    slots = jnp.arange(b, dtype=jnp.int32)
    with Store(b, hkv, d, max(n, 1), K, L, eps, storage, path) as store:
        counts = store.prefill(slots, kc, v, k_codes, jnp.asarray(lengths), sink=sink, local=local)
        out_s, lse_s, sampled = store.query(slots, q, q_codes, counts)
        out = _finish(q, kc, v, jnp.asarray(lengths), out_s, lse_s, sink=sink, local=local)
        jax.block_until_ready((out, sampled))
    return out, sampled
