"""MagicPIG's sampled-attention estimator in plain NumPy (float64): slow and obvious, for tests.

Follows docs/algorithm.md §2 step by step; the C++ engine and `lsh_attention` must agree with it.
"""

from __future__ import annotations

import numpy as np

from pigjax.attention.split import middle_bounds


def simhash_codes(x: np.ndarray, proj: np.ndarray, K: int) -> np.ndarray:
    """x [..., d], proj [d, K·L] -> int32 codes [..., L]; bit j of table l = x·proj[:, l·K+j] > 0."""
    bits = (np.asarray(x, np.float64) @ np.asarray(proj, np.float64)) > 0
    bits = bits.reshape(bits.shape[:-1] + (-1, K))
    return (bits * (1 << np.arange(K))).sum(-1).astype(np.int32)


def sampling_probability(cos: np.ndarray, K: int, L: int) -> np.ndarray:
    """u = P(>= 2 of L tables collide) when one table collides with P = (1 - θ/π)^K."""
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    P = (1.0 - theta / np.pi) ** K
    u = 1.0 - (1.0 - P) ** L - L * P * (1.0 - P) ** (L - 1)
    return np.clip(u, 0.0, 1.0)


def sampled_attention(q, k, v, k_codes, q_codes, K: int, L: int, eps: float = 1e-4, sample_cap: float = 1.0):
    """The sampled part for one sequence: q [Hq, d]; centered middle keys k, values v [Hkv, n, d];
    k_codes [Hkv, n, L]; q_codes [Hq, L]. S is thinned to the sample cap (`thin_sample`, its
    1/a weight added to lse). -> out [Hq, d], lse [Hq] (−inf if S is empty), sampled [Hq] (|S|),
    mask [Hq, n] (S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    hq, d = q.shape
    hkv, n = k.shape[:2]
    group = hq // hkv
    out, lse = np.zeros((hq, d)), np.full(hq, -np.inf)
    mask = np.zeros((hq, n), bool)
    for h in range(hq):
        kh, vh = k[h // group], v[h // group]
        collisions = (k_codes[h // group] == q_codes[h][None, :]).sum(-1)
        mask[h], log_inv_a = thin_sample(collisions >= 2, n, q_codes[h], 0, sample_cap)
        if not mask[h].any():
            continue
        ks, vs = kh[mask[h]], vh[mask[h]]
        norms = np.linalg.norm(ks, axis=-1) * np.linalg.norm(q[h])
        cos = np.where(norms > 0, ks @ q[h] / np.where(norms > 0, norms, 1), 0.0)
        u = sampling_probability(cos, K, L)
        scores = ks @ q[h] / np.sqrt(d) + np.log(1.0 / (u + eps))
        m = scores.max()
        weights = np.exp(scores - m)
        lse[h] = m + np.log(weights.sum()) + log_inv_a
        out[h] = weights @ vs / weights.sum()
    return out, lse, mask.sum(-1), mask


def sketch_estimates(k, codes, q_codes, K: int, rank_tables: int) -> np.ndarray:
    """The ranked query's score estimates (docs/algorithm.md §2.9) for keys k [n, d] with codes
    [n, L] and query codes q_codes [L]: f32 |k| · f32 cos(π·D/B), D = the bits of tables
    [0, rank_tables) by which a key's codes differ from the query's, B = rank_tables·K."""
    xor = (codes[:, :rank_tables] ^ q_codes[None, :rank_tables]).astype(np.int64)
    dist = sum((xor >> b) & 1 for b in range(K)).sum(-1)
    norms = np.sqrt(np.sum(np.asarray(k, np.float64) ** 2, axis=-1)).astype(np.float32)
    return norms * np.cos(np.pi * dist / (rank_tables * K)).astype(np.float32)


def _fmix32(h):
    h = np.asarray(h, np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def thin_hash(indices, n: int, q_codes, first_table: int) -> np.ndarray:
    """The engine's thinning order of sampled keys (ffi/src/query_rows.h): a murmur3 mix of each
    index and a seed from n and the query's codes of the sampling tables [first_table, L) (uint32
    arithmetic)."""
    with np.errstate(over="ignore"):
        seed = _fmix32(np.uint32(n % 2**32) ^ np.uint32(0x9E3779B9))
        for c in np.asarray(q_codes)[first_table:]:
            seed = _fmix32(seed + np.uint32(int(c) % 2**32))
        return _fmix32(seed ^ (np.asarray(indices, np.uint32) * np.uint32(0x9E3779B1)))


def thin_sample(rest, n: int, q_codes, first_table: int, sample_cap: float):
    """The sample cap (docs/algorithm.md §2.6): rest [n] (MagicPIG's S, RankedLSH's S ∖ T) ->
    (kept mask, log(1/a)); past c = max(1, ⌈sample_cap·n⌉) keys, the c first in the order
    (thin_hash, index) are kept, each with probability a = c / |rest|."""
    idx = np.flatnonzero(rest)
    cap = max(1, int(np.ceil(sample_cap * n)))
    if len(idx) <= cap:
        return rest, 0.0
    h = thin_hash(idx, n, q_codes, first_table).astype(np.int64)
    kept = np.zeros_like(rest)
    kept[idx[np.lexsort((idx, h))[:cap]]] = True
    return kept, float(np.log(len(idx) / cap))


def ranked_selection(q, k, codes, q_codes, K: int, rank_tables: int, top: float, refine: float,
                     sample_cap: float = 1.0):
    """The ranked query's sets for one query head q [d] over keys k [n, d] with codes [n, L] and
    query codes q_codes [L] (docs/algorithm.md §2.9) -> masks [n] of R (keys scored), T (read
    exactly) and S' (sampled by the tables from rank_tables on, outside T, thinned to the cap),
    and log(1/a), the thinning's extra log weight on S'."""
    n, lr = k.shape[0], rank_tables
    m = min(n, int(np.ceil(top * n)))
    r = min(n, max(m, int(np.ceil(refine * m))))
    est = sketch_estimates(k, codes, q_codes, K, rank_tables)
    ranked = np.lexsort((np.arange(n), -est))[:r]
    dots = np.asarray(k, np.float64)[ranked] @ np.asarray(q, np.float64)
    r_mask, t_mask = np.zeros(n, bool), np.zeros(n, bool)
    r_mask[ranked] = True
    t_mask[ranked[np.lexsort((ranked, -dots))[:m]]] = True
    s_mask = (codes[:, lr:] == q_codes[None, lr:]).sum(-1) >= 2
    kept, log_inv_a = thin_sample(s_mask & ~t_mask, n, q_codes, lr, sample_cap)
    return r_mask, t_mask, kept, log_inv_a


def ranked_attention(q, k, v, k_codes, q_codes, K: int, L: int, rank_tables: int, top: float, refine: float,
                     eps: float = 1e-4, sample_cap: float = 1.0):
    """The engine's ranked query (docs/algorithm.md §2.9) for one sequence, arguments as
    `sampled_attention`: T = the ⌈top·n⌉ highest q·k among the ⌈refine·top·n⌉ keys with the highest
    `sketch_estimates` (ties: lower index first), weight 1; S = ≥ 2 collisions
    in the other tables, S' = S ∖ T thinned to the sample cap, weight 1/((u + eps)·a) with u for
    L − rank_tables tables.
    -> out [Hq, d], lse [Hq], keys read [Hq] (|R ∪ S'|), values read [Hq] (|T ∪ S'|), T mask [Hq, n]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    hq, d = q.shape
    hkv, n = k.shape[:2]
    group, lr = hq // hkv, rank_tables
    out, lse = np.zeros((hq, d)), np.full(hq, -np.inf)
    keys, values, t_mask = np.zeros(hq, np.int64), np.zeros(hq, np.int64), np.zeros((hq, n), bool)
    for h in range(hq):
        kh, vh, codes = k[h // group], v[h // group], k_codes[h // group]
        r_mask, t_mask[h], rest, log_inv_a = ranked_selection(q[h], kh, codes, q_codes[h], K, rank_tables, top,
                                                              refine, sample_cap)
        keys[h] = (r_mask | rest).sum()
        values[h] = (t_mask[h] | rest).sum()
        norms = np.linalg.norm(kh[rest], axis=-1) * np.linalg.norm(q[h])
        cos = np.where(norms > 0, kh[rest] @ q[h] / np.where(norms > 0, norms, 1), 0.0)
        u = sampling_probability(cos, K, L - lr)
        scores = np.concatenate([kh[t_mask[h]] @ q[h] / np.sqrt(d),
                                 kh[rest] @ q[h] / np.sqrt(d) + np.log(1.0 / (u + eps)) + log_inv_a])
        if len(scores) == 0:
            continue
        rows = np.concatenate([vh[t_mask[h]], vh[rest]])
        weights = np.exp(scores - scores.max())
        lse[h] = scores.max() + np.log(weights.sum())
        out[h] = weights @ rows / weights.sum()
    return out, lse, keys, values, t_mask


def exact_attention(q, k, v, positions):
    """Exact partial softmax of q [Hq, d] over the listed positions of k, v [Hkv, n, d]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    hq, d = q.shape
    group = hq // k.shape[0]
    out, lse = np.zeros((hq, d)), np.full(hq, -np.inf)
    if len(positions) == 0:
        return out, lse
    for h in range(hq):
        scores = k[h // group][positions] @ q[h] / np.sqrt(d)
        m = scores.max()
        w = np.exp(scores - m)
        lse[h], out[h] = m + np.log(w.sum()), w @ v[h // group][positions] / w.sum()
    return out, lse


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial softmaxes (output, log-sum-exp) into one; −inf parts contribute nothing."""
    m = np.maximum(lse_a, lse_b)
    a = np.where(np.isfinite(lse_a), np.exp(lse_a - m), 0.0)
    b = np.where(np.isfinite(lse_b), np.exp(lse_b - m), 0.0)
    return (a[..., None] * out_a + b[..., None] * out_b) / (a + b)[..., None]


def split(n: int, sink: int, local: int):
    """Exact positions (sink + local window) and the hashed middle [sink, n − local) of n tokens."""
    start, stop = (int(x) for x in middle_bounds(n, sink, local))
    exact = np.concatenate([np.arange(start), np.arange(stop, n)]).astype(np.int64)
    return exact, np.arange(start, stop)


def lsh_attention(q, k, v, proj, K: int, L: int, sink: int = 4, local: int = 64, eps: float = 1e-4,
                  lengths=None, sample_cap: float = 1.0):
    """Whole estimator (docs/algorithm.md §2) for q [B, Hq, d], k, v [B, Hkv, n, d] -> (out [B, Hq, d], sampled [B, Hq])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, d = q.shape
    n = k.shape[2]
    lengths = np.full(b, n) if lengths is None else np.asarray(lengths)
    out, sampled = np.zeros((b, hq, d)), np.zeros((b, hq), np.int64)
    for r in range(b):
        exact, middle = split(int(lengths[r]), sink, local)
        mu = k[r][:, middle].mean(axis=1, keepdims=True) if len(middle) else np.zeros((k.shape[1], 1, d))
        kc = k[r] - mu  # centering shifts every score of a head by the same q·μ: softmax unchanged
        o_g, lse_g = exact_attention(q[r], kc, v[r], exact)
        o_s, lse_s, sampled[r], _ = sampled_attention(
            q[r], kc[:, middle], v[r][:, middle], simhash_codes(kc[:, middle], proj, K),
            simhash_codes(q[r], proj, K), K, L, eps, sample_cap)
        out[r] = merge(o_g, lse_g, o_s, lse_s)
    return out, sampled
