"""Attention coverage (analysis): how much of the middle's exact attention each scheme reads.

For a decode query the middle (the keys MagicPIG hashes) carries attention weights a_i (softmax
over the middle alone). A scheme that reads key i with probability r_i covers Σ a_i r_i of that
mass in expectation. At one budget (the expected fraction f of the middle read):
  LSH       r_i = u_i, MagicPIG's sampling probability (docs/algorithm.md §2.5: q vs the centred key, >= 2
            of L tables of K bits collide), in expectation over the random projections;
  TopK      r_i = 1 for the round(f·n) largest a_i; "pooled": the same total count per query
            given to its heads by weight (the upper bound of any per-head budget);
  oracle    r_i = 1 - (1 - a_i)^m, m = round(f·n) draws from a (pigjax.Oracle).
  RankedLSH r_i = P(i in T ∪ S) (docs/algorithm.md §2.9), estimated over `draws` random projections
            (the reference's selection on the centred keys); its f is the measured fraction of keys
            read (|R ∪ S| / n), and TopK / oracle are evaluated again at that f.
  Quest     r_i = 1 for the middle keys of the pages pigjax.Quest selects (`quest_selection`); its f
            is the fraction of middle keys those pages hold, TopK is evaluated at each head's own
            count of keys read, and "best pages" is the largest mass any choice of as many pages
            could cover (the pages ranked by their true mass): Quest <= best pages, and the gaps
            Quest -> best pages -> TopK split Quest's loss into what its upper bound mis-ranks and
            what reading whole pages costs (best pages may hold a few more middle keys than
            Quest's pages where pages straddle the sink or the local window).
The key with the largest weight matters most for retrieval: its u is reported too. Queries,
keys and values are those of a dense forward, as in `attention_error`.
"""

from __future__ import annotations

import math

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
    """TopK and oracle coverage of weights a [P, Hq, n] at m = round(f·n) keys per head; and
    `topk_pooled`: the same m·Hq keys per query spread over its heads by weight (the largest a over
    all heads): the most mass any per-head budget at that total could read, the bound on what a
    per-head rule such as vAttention's could add to TopK's coverage."""
    m = max(1, round(f * n))
    top = -np.sort(-a, axis=-1)[..., :m]
    p, hq = a.shape[0], a.shape[1]
    pooled = -np.sort(-a.reshape(p, hq * n), axis=-1)[:, : m * hq]
    return {"topk": float(top.sum(-1).mean()), "topk_pooled": float(pooled.sum(-1).mean() / hq),
            "oracle": float((a * (1.0 - (1.0 - a) ** m)).sum(-1).mean())}


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
                r, t, s, _ = ranked_selection(q[p, h], kc[g[h]], codes[g[h]], q_codes[p, h], K, backend.rank_tables,
                                              backend.top, backend.refine, backend.sample_cap)
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


def quest_selection(q, k, lo: int, hi: int, page: int, m: int):
    """pigjax.Quest's choice (baselines.Quest) in NumPy: q [P, Hq, d] decode queries, k [Hkv, S, d]
    the keys of positions 0..S-1, middle [lo, hi). Pages are [i·page, (i+1)·page) of absolute
    positions, each bounded by the elementwise min/max of its middle keys; each query head keeps the
    m pages with the largest Σ_j max(q_j·max_j, q_j·min_j). Returns (chosen [P, Hq, S] bool, the
    middle keys of the kept pages; bound [P, Hq, pages], −inf for pages without middle keys)."""
    hq, (hkv, s, d) = q.shape[1], k.shape
    g = np.repeat(np.arange(hkv), hq // hkv)
    pages = -(-s // page)
    pos = np.arange(pages * page)
    in_mid = (pos >= lo) & (pos < hi)
    kp = np.zeros((hkv, pages * page, d))
    kp[:, :s] = k
    kmax = np.where(in_mid[None, :, None], kp, -np.inf).reshape(hkv, pages, page, d).max(2)
    kmin = np.where(in_mid[None, :, None], kp, np.inf).reshape(hkv, pages, page, d).min(2)
    has = in_mid.reshape(pages, page).any(-1)
    with np.errstate(invalid="ignore"):  # q_j = 0 times ±inf on pages without middle keys
        bound = np.maximum(q[:, :, None, :] * kmax[g][None], q[:, :, None, :] * kmin[g][None]).sum(-1)
    bound = np.where(has, bound, -np.inf)
    top = np.argsort(-bound, axis=-1, kind="stable")[..., :m]
    kept = np.zeros(bound.shape, bool)
    np.put_along_axis(kept, top, True, axis=-1)
    chosen = np.repeat(kept, page, axis=-1)[..., :s] & in_mid[None, None, :s]
    return chosen, bound


def _quest_layer_coverage(q, k, lo: int, hi: int, page: int, fraction: float) -> dict:
    """Quest's coverage (module docstring) at `fraction` of the middle: q [P, Hq, d], k [Hkv, S, d]."""
    n, s = hi - lo, k.shape[1]
    m = max(1, math.ceil(fraction * n / page))  # pigjax.Quest's page budget
    chosen, _ = quest_selection(q, k, lo, hi, page, m)
    a, _, _ = _weights(q, k[:, lo:hi])
    c = chosen[..., lo:hi]
    t = c.sum(-1)  # keys read per query head
    cum = np.cumsum(-np.sort(-a, axis=-1), axis=-1)
    topk = np.take_along_axis(cum, np.maximum(t, 1)[..., None] - 1, -1)[..., 0]
    pages = -(-s // page)
    full = np.zeros(a.shape[:2] + (pages * page,))
    full[..., lo:hi] = a
    page_mass = full.reshape(a.shape[:2] + (pages, page)).sum(-1)
    best = -np.sort(-page_mass, axis=-1)[..., :m]
    top1 = np.take_along_axis(c, a.argmax(-1)[..., None], -1)[..., 0]
    return {"fraction": float(t.mean() / n), "pages": m, "quest": float((a * c).sum(-1).mean()),
            "best_pages": float(best.sum(-1).mean()), "topk": float(topk.mean()),
            "top1_weight": float(a.max(-1).mean()), "top1_read": float(top1.mean())}


def coverage(model, tokens: np.ndarray, prefill: int, *, configs, sink: int, local: int,
             sparse_layers, ranked=(), draws: int = 4, seed: int = 0, quest=(), page: int = 16,
             quest_layers=None) -> dict:
    """{(K, L): per sparse layer, the coverage of decode positions prefill..T-1} of one sequence
    `tokens` [T] whose first `prefill` tokens were prefilled (middle = [sink, prefill - local)); and
    {name: the same} for each (name, RankedLSH back-end) of `ranked` (`draws` projections each);
    and {("quest", f): the same for pigjax.Quest(page, fraction=f)} for each f of `quest`, over
    `quest_layers` (default: `sparse_layers`)."""
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
    out.update({("quest", f): [] for f in quest})
    rng = np.random.default_rng(seed)
    lo, hi = int(middle[0]), int(middle[-1]) + 1
    for layer in (sparse_layers if quest_layers is None else quest_layers) if quest else ():
        q, k, _ = qkv[layer]
        q = np.asarray(q[0, prefill:t], np.float64)
        kt = np.asarray(k[0][:, :t], np.float64)
        for f in quest:
            out[("quest", f)].append({"layer": int(layer), **_quest_layer_coverage(q, kt, lo, hi, page, f)})
    for layer in sparse_layers:
        q, k, _ = qkv[layer]
        q = np.asarray(q[0, prefill:t], np.float64)
        km = np.asarray(k[0][:, middle], np.float64)
        for c in configs:
            out[tuple(c)].append({"layer": int(layer), **_layer_coverage(q, km, *c)})
        for name, backend in ranked:
            out[name].append({"layer": int(layer), **_ranked_layer_coverage(q, km, backend, rng, draws)})
    return out
