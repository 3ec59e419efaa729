"""Attention coverage (analysis): how much of the middle's exact attention each scheme reads.

For a decode query the middle (the keys MagicPIG hashes) carries attention weights a_i (softmax
over the middle alone). A scheme that reads key i with probability r_i covers Σ a_i r_i of that
mass in expectation. At one budget (the expected fraction f of the middle read):
  LSH       r_i = u_i, MagicPIG's sampling probability (docs/algorithm.md §2.5: q vs the centred key, >= 2
            of L tables of K bits collide), in expectation over the random projections;
  TopK      r_i = 1 for the round(f·n) largest a_i;
  oracle    r_i = 1 - (1 - a_i)^m, m = round(f·n) draws from a (pigjax.Oracle).
The key with the largest weight matters most for retrieval: its u is reported too. Queries,
keys and values are those of a dense forward, as in `attention_error`.
"""

from __future__ import annotations

import numpy as np

from pigjax.eval.attention_error import record_qkv
from pigjax.attention.reference import sampling_probability, split
from pigjax.models import llama


def _layer_coverage(q, km, K: int, L: int) -> dict:
    """q [P, Hq, d] (decode queries), km [Hkv, n, d] (the middle's keys), float64."""
    hq, (hkv, n_middle, d) = q.shape[1], km.shape
    kc = km - km.mean(axis=1, keepdims=True)
    g = np.repeat(np.arange(hkv), hq // hkv)  # KV head of each query head
    s = np.einsum("phd,hnd->phn", q, km[g]) / np.sqrt(d)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    cos = np.einsum("phd,hnd->phn", q, kc[g]) / (
        np.linalg.norm(q, axis=-1)[..., None] * np.linalg.norm(kc[g], axis=-1)[None] + 1e-30)
    u = sampling_probability(cos, K, L)
    f = float(u.mean())
    m = max(1, round(f * n_middle))
    top = -np.sort(-a, axis=-1)[..., :m]
    top1 = np.take_along_axis(u, a.argmax(-1)[..., None], -1)[..., 0]
    return {"fraction": f, "lsh": float((a * u).sum(-1).mean()), "topk": float(top.sum(-1).mean()),
            "oracle": float((a * (1.0 - (1.0 - a) ** m)).sum(-1).mean()),
            "top1_weight": float(a.max(-1).mean()), "top1_u": float(top1.mean())}


def coverage(model, tokens: np.ndarray, prefill: int, *, configs, sink: int, local: int,
             sparse_layers) -> dict:
    """{(K, L): per sparse layer, the coverage of decode positions prefill..T-1} of one sequence
    `tokens` [T] whose first `prefill` tokens were prefilled (middle = [sink, prefill - local))."""
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
    for layer in sparse_layers:
        q, k, _ = qkv[layer]
        q = np.asarray(q[0, prefill:t], np.float64)
        km = np.asarray(k[0][:, middle], np.float64)
        for K, L in out:
            out[(K, L)].append({"layer": int(layer), **_layer_coverage(q, km, K, L)})
    return out
