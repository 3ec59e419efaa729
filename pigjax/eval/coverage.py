"""Attention coverage (analysis): how much of the middle's exact attention each scheme reads.

For a decode query the middle (the keys MagicPIG hashes) carries attention weights a_i (softmax
over the middle alone). A scheme that reads key i with probability r_i covers Σ a_i r_i of that
mass in expectation. At one budget (the expected fraction f of the middle read):
  LSH       r_i = u_i, MagicPIG's sampling probability (docs/algorithm.md §2.5: q vs the centred key, >= 2
            of L tables of K bits collide), in expectation over the random projections;
  TopK      r_i = 1 for the round(f·n) largest a_i;
  oracle    r_i = 1 - (1 - a_i)^m, m = round(f·n) draws from a (pigjax.Oracle).
  RankedLSH r_i = P(i in T ∪ S) (docs/algorithm.md §2.9), estimated over `draws` random projections
            (the reference's selection on the centred keys); its f is the measured fraction of keys
            read (|R ∪ S| / n), and TopK / oracle are evaluated again at that f.
The key with the largest weight matters most for retrieval: its u is reported too. Queries,
keys and values are those of a dense forward, as in `attention_error`.
"""

from __future__ import annotations

import numpy as np

from pigjax.eval.attention_error import record_qkv
from pigjax.attention.reference import ranked_selection, sampling_probability, simhash_codes, split
from pigjax.models import llama


def _weights(q, km):
    """Attention weights a [P, Hq, n] over the middle keys km [Hkv, n, d] and the centred keys."""
    hq, (hkv, _, d) = q.shape[1], km.shape
    g = np.repeat(np.arange(hkv), hq // hkv)
    s = np.einsum("phd,hnd->phn", q, km[g]) / np.sqrt(d)
    a = np.exp(s - s.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True), km - km.mean(axis=1, keepdims=True), g


def _at_fraction(a, f: float, n: int) -> dict:
    m = max(1, round(f * n))
    top = -np.sort(-a, axis=-1)[..., :m]
    return {"topk": float(top.sum(-1).mean()), "oracle": float((a * (1.0 - (1.0 - a) ** m)).sum(-1).mean())}


def _ranked_layer_coverage(q, km, backend, rng, draws: int) -> dict:
    """RankedLSH's coverage (module docstring): q [P, Hq, d], km [Hkv, n, d], float64."""
    a, kc, g = _weights(q, km)
    n, d = km.shape[1], km.shape[2]
    K, L = backend.K, backend.L
    read = np.zeros(a.shape)  # P(i in T ∪ S), averaged over draws
    fraction = 0.0
    for _ in range(draws):
        proj = rng.normal(size=(d, K * L))
        codes, q_codes = simhash_codes(kc, proj, K), simhash_codes(q, proj, K)
        for p in range(q.shape[0]):
            for h in range(q.shape[1]):
                r, t, s = ranked_selection(q[p, h], kc[g[h]], codes[g[h]], q_codes[p, h], K, backend.rank_tables,
                                           backend.top, backend.refine)
                read[p, h] += (t | s) / draws
                fraction += (r | s).sum() / (n * draws * q.shape[0] * q.shape[1])
    top1 = np.take_along_axis(read, a.argmax(-1)[..., None], -1)[..., 0]
    return {"fraction": fraction, "lsh": float((a * read).sum(-1).mean()), **_at_fraction(a, fraction, n),
            "top1_weight": float(a.max(-1).mean()), "top1_u": float(top1.mean())}


def _layer_coverage(q, km, K: int, L: int) -> dict:
    """q [P, Hq, d] (decode queries), km [Hkv, n, d] (the middle's keys), float64."""
    a, kc, g = _weights(q, km)
    n_middle = km.shape[1]
    cos = np.einsum("phd,hnd->phn", q, kc[g]) / (
        np.linalg.norm(q, axis=-1)[..., None] * np.linalg.norm(kc[g], axis=-1)[None] + 1e-30)
    u = sampling_probability(cos, K, L)
    f = float(u.mean())
    top1 = np.take_along_axis(u, a.argmax(-1)[..., None], -1)[..., 0]
    return {"fraction": f, "lsh": float((a * u).sum(-1).mean()), **_at_fraction(a, f, n_middle),
            "top1_weight": float(a.max(-1).mean()), "top1_u": float(top1.mean())}


def coverage(model, tokens: np.ndarray, prefill: int, *, configs, sink: int, local: int,
             sparse_layers, ranked=(), draws: int = 4, seed: int = 0) -> dict:
    """{(K, L): per sparse layer, the coverage of decode positions prefill..T-1} of one sequence
    `tokens` [T] whose first `prefill` tokens were prefilled (middle = [sink, prefill - local)); and
    {name: the same} for each (name, RankedLSH back-end) of `ranked` (`draws` projections each)."""
    _, middle = split(prefill, sink, local)
    if len(middle) == 0 or prefill >= len(tokens):
        raise ValueError(f"coverage: need sink + local < prefill < {len(tokens)} tokens, got prefill {prefill}")
    params = llama.unstack_layers(model.params)
    # Causal: padding after the last token leaves q/k of the real positions unchanged, and lengths
    # rounded up to 256 share compiled forwards.
    t = len(tokens)
    padded = np.zeros(-(-t // 256) * 256, np.int32)
    padded[:t] = tokens
    qkv = record_qkv(params, padded[None], config=model.config)
    out = {tuple(c): [] for c in configs}
    out.update({name: [] for name, _ in ranked})
    rng = np.random.default_rng(seed)
    for layer in sparse_layers:
        q, k, _ = qkv[layer]
        q = np.asarray(q[0, prefill:t], np.float64)
        km = np.asarray(k[0][:, middle], np.float64)
        for c in configs:
            out[tuple(c)].append({"layer": int(layer), **_layer_coverage(q, km, *c)})
        for name, backend in ranked:
            out[name].append({"layer": int(layer), **_ranked_layer_coverage(q, km, backend, rng, draws)})
    return out
