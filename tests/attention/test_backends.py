"""Attention back-ends in the decode path: MagicPIG (engine), TopK, Quest, Oracle vs Dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pigjax
from pigjax import LlamaConfig
from pigjax.eval.perplexity import teacher_forced
from pigjax.models import llama


@pytest.fixture(scope="module")
def tiny():
    """A random 4-layer GQA Llama (hidden 64, 4 query / 2 KV heads of 16) with peaked attention."""
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    params = llama.LlamaModel(config).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 2.0 if p.ndim > 1 else p, params)  # sharper attention
    return pigjax.Model(config, params)


def _tokens(n, rows=2, seed=0):
    return np.random.default_rng(seed).integers(0, 97, (rows, n)).astype(np.int32)


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_k1_with_many_tables_equals_dense(tiny):
    """K=1, L=400: every key collides in >= 2 tables, u ~ 1, so the estimate is exact attention."""
    toks = _tokens(300)
    dense = teacher_forced(tiny, toks, 200, return_logits=True)
    pig = teacher_forced(tiny, toks, 200, pigjax.MagicPIG(K=1, L=400, storage="f32"), return_logits=True)
    assert _max_rel(pig["logits"], dense["logits"]) < 1e-3
    assert pig["stats"]["fraction_read"] > 0.999


def test_sample_cap_bounds_the_read_and_stays_close(tiny):
    """K=1, L=400 samples every key; a cap of 10% reads a tenth of them, reweighted (its
    unbiasedness: tests/engine/test_store.py): the decode stays close to dense."""
    toks = _tokens(300)
    dense = teacher_forced(tiny, toks, 200)
    capped = teacher_forced(tiny, toks, 200, pigjax.MagicPIG(K=1, L=400, storage="f32", sample_cap=0.1))
    assert capped["stats"]["fraction_read"] == pytest.approx(0.1, abs=0.01)
    assert capped["stats"]["sample_cap"] == 0.1
    assert abs(np.mean(capped["logp"]) - np.mean(dense["logp"])) < 0.3
    assert np.all(np.isfinite(capped["logp"]))


def test_window_covering_the_prompt_equals_dense(tiny):
    """sink + local >= n: nothing is sampled; every decode step past the window is exact."""
    toks = _tokens(120)
    dense = teacher_forced(tiny, toks, 60, return_logits=True)
    pig = teacher_forced(tiny, toks, 60, pigjax.MagicPIG(K=10, L=150, sink=4, local=64), return_logits=True)
    np.testing.assert_allclose(pig["logits"], dense["logits"], atol=2e-5 * np.abs(dense["logits"]).max())
    assert pig["stats"]["fraction_read"] is None  # no middle keys at all


def test_topk_and_quest_at_fraction_one_equal_dense(tiny):
    toks = _tokens(260)
    dense = teacher_forced(tiny, toks, 200, return_logits=True)
    for backend in (pigjax.TopK(1.0), pigjax.Quest(page=16, fraction=1.0)):
        out = teacher_forced(tiny, toks, 200, backend, return_logits=True)
        np.testing.assert_allclose(out["logits"], dense["logits"], atol=1e-5 * np.abs(dense["logits"]).max())
        assert out["stats"]["fraction_read"] == pytest.approx(1.0)


def test_sparse_backends_read_what_they_say(tiny):
    toks = _tokens(400)
    dense = teacher_forced(tiny, toks, 300)
    for backend, lo, hi in ((pigjax.TopK(0.1), 0.1, 0.12), (pigjax.Quest(fraction=0.1), 0.09, 0.2),
                            (pigjax.Oracle(fraction=0.1), 0.001, 0.1), (pigjax.MagicPIG(K=8, L=75), 0.002, 0.5)):
        out = teacher_forced(tiny, toks, 300, backend)
        assert lo <= out["stats"]["fraction_read"] <= hi, (backend.name, out["stats"]["fraction_read"])
        # Sparse decode changes the numbers but not beyond recognition.
        assert abs(np.mean(out["logp"]) - np.mean(dense["logp"])) < 0.5, backend.name


def test_magicpig_generation_past_the_window_and_ragged_rows(tiny):
    """Rows of different lengths decode in one batch exactly as they do alone (each row's slots
    and tables are its own), including generated tokens beyond sink + local."""
    prompts = [_tokens(300, 1, 5)[0].tolist(), _tokens(170, 1, 6)[0].tolist(), _tokens(40, 1, 7)[0].tolist()]
    backend = pigjax.MagicPIG(K=6, L=40, local=16)
    batch = pigjax.generate(tiny, prompts, max_new_tokens=40, attention=backend)
    for i, p in enumerate(prompts):
        alone = pigjax.generate(tiny, [p], max_new_tokens=40, attention=backend)
        assert alone.tokens[0] == batch.tokens[i]
    assert 0 < batch.stats["fraction_read"] < 1


def test_short_prompt_magicpig_equals_dense_greedy(tiny):
    prompts = [[5, 17, 33, 8], [9] * 30]
    dense = pigjax.generate(tiny, prompts, max_new_tokens=24)
    pig = pigjax.generate(tiny, prompts, max_new_tokens=24, attention=pigjax.MagicPIG())
    assert pig.tokens == dense.tokens


def test_callback_path_equals_ffi_path(tiny):
    """The io_callback path (what a GPU default backend uses) gives the FFI path's numbers."""
    toks = _tokens(200, rows=1)
    ffi = teacher_forced(tiny, toks, 150, pigjax.MagicPIG(K=6, L=30, path="ffi"), return_logits=True)
    cb = teacher_forced(tiny, toks, 150, pigjax.MagicPIG(K=6, L=30, path="callback"), return_logits=True)
    np.testing.assert_allclose(cb["logits"], ffi["logits"], rtol=1e-5, atol=1e-5)


def test_switching_backends_does_not_recompile_dense(tiny):
    compiles = []

    def listener(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    prompt = [_tokens(100, 1, 9)[0].tolist()]
    pigjax.generate(tiny, prompt, max_new_tokens=8)
    pigjax.generate(tiny, prompt, max_new_tokens=8, attention=pigjax.MagicPIG(K=6, L=30))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = pigjax.generate(tiny, prompt, max_new_tokens=8)
        pig_again = pigjax.generate(tiny, prompt, max_new_tokens=8, attention=pigjax.MagicPIG(K=6, L=30))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and again.stats["compile_seconds"] == 0.0 and pig_again.stats["compile_seconds"] == 0.0


def test_baseline_fraction_is_data_not_a_recompile(tiny):
    """TopK/Quest at different fractions share compiled programs (the fraction is passed as data)
    and each still reads its own fraction."""
    compiles = []

    def listener(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    prompt = [_tokens(400, 1, 3)[0].tolist()]
    read = {}
    for f in (0.2, 0.13, 0.45):
        gens = pigjax.generate(tiny, prompt, max_new_tokens=12, attention=[pigjax.TopK(f), pigjax.Quest(fraction=f)])
        read[f] = [g.stats["fraction_read"] for g in gens]
        if f == 0.2:
            jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        assert compiles == []
        for f, (topk, quest) in read.items():
            assert f <= topk <= f + 0.02 and f - 0.02 <= quest <= f + 0.1, (f, topk, quest)
        assert pigjax.TopK(0.2) == pigjax.TopK(0.45) != pigjax.TopK(0.2, local=32)
        # Oracle's number of draws is static: fractions share a program below a power-of-two cap.
        assert pigjax.Oracle(fraction=0.2) == pigjax.Oracle(fraction=0.24) != pigjax.Oracle(fraction=0.3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_memory_stats(tiny):
    toks = _tokens(600, rows=1)
    pig = teacher_forced(tiny, toks, 500, pigjax.MagicPIG(K=10, L=150))["stats"]
    dense = pigjax.Dense().stats(tiny.config, jnp.float32)
    # Dense layers 0 and 2 of 4 keep every token on the model side; sparse layers only a window.
    assert pig["cache_bytes_per_token_per_layer"] == pytest.approx(dense["cache_bytes_per_token_per_layer"] / 2)
    per_head = pig["host_bytes_per_token_per_sparse_layer"] / tiny.config.num_key_value_heads
    assert 2 * 16 * 2 + 4 + 150 * 2 <= per_head  # bf16 K and V, a norm, 16-bit indices, plus offsets


@pytest.mark.parametrize("kwargs, match", [
    (dict(K=16, L=1000), "too large"),
    (dict(local=0), "local"),
    (dict(K=0), "K must"),
    (dict(L=1), "L must"),
    (dict(storage="f16"), "storage"),
    (dict(sample_cap=0.0), r"sample_cap must be a fraction in \(0, 1\]"),
    (dict(sample_cap=2), "sample_cap"),
])
def test_bad_magicpig_configs(kwargs, match):
    with pytest.raises(pigjax.ConfigError, match=match):
        pigjax.MagicPIG(**kwargs)


def test_dense_layers_out_of_range(tiny):
    with pytest.raises(pigjax.ConfigError, match=r"dense_layers \[7\] out of range"):
        pigjax.generate(tiny, [[1, 2, 3]], max_new_tokens=2, attention=pigjax.MagicPIG(dense_layers=(0, 7)))
    with pytest.raises(pigjax.ConfigError, match="fraction"):
        pigjax.TopK(0.0)


def test_list_of_backends_shares_the_prefill(tiny):
    """generate with a list of back-ends equals one call per back-end."""
    prompts = [_tokens(220, 1, 11)[0].tolist(), _tokens(90, 1, 12)[0].tolist()]
    backends = [pigjax.Dense(), pigjax.MagicPIG(K=6, L=40, local=16), pigjax.TopK(0.1, local=16)]
    together = pigjax.generate(tiny, prompts, max_new_tokens=12, attention=backends)
    assert [g.stats["attention"] for g in together] == ["dense", "magicpig", "topk"]
    for backend, gen in zip(backends, together):
        assert pigjax.generate(tiny, prompts, max_new_tokens=12, attention=backend).tokens == gen.tokens
    with pytest.raises(pigjax.PigjaxError, match="single attention back-end"):
        pigjax.generate(tiny, prompts, max_new_tokens=2, attention=backends, stream=lambda r, t: None)


def test_attention_level_error(tiny):
    """Same q, k, v for every back-end: exact ones give 0; MagicPIG's estimate errs on sparse layers only."""
    from pigjax.eval.attention_error import layer_errors

    toks = _tokens(240, rows=1, seed=4)
    res = layer_errors(tiny, toks, 200, {"dense": pigjax.Dense(), "topk1": pigjax.TopK(1.0),
                                         "pig": pigjax.MagicPIG(K=8, L=40)})
    assert max(res["dense"]["relative_l2"]) == 0.0 and max(res["topk1"]["relative_l2"]) < 1e-5
    pig = res["pig"]["relative_l2"]
    assert pig[0] == 0.0 and pig[2] == 0.0  # dense layers 0 and n // 2
    assert 0.0 < pig[1] < 1.0 and 0.0 < pig[3] < 1.0
    assert 0 < res["pig"]["fraction_read"] < 1


def test_kth_largest_matches_top_k():
    from pigjax.attention.baselines import _kth_largest

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 3, 300)).astype(np.float32)
    x[0, :, :, :200] = -np.inf  # masked keys
    x[1] = np.round(x[1], 1)  # ties
    x[2, 0, 0] = -x[2, 0, 0] * 1e-30  # tiny numbers of both signs
    m = np.array([7, 150, 300], np.int32)
    got = np.asarray(_kth_largest(jnp.asarray(x), jnp.asarray(m)))[..., 0]
    want = -np.sort(-x, axis=-1)[np.arange(3)[:, None, None], np.arange(2)[None, :, None], np.arange(3)[None, None, :],
                                 (m - 1)[:, None, None]]
    np.testing.assert_array_equal(got, want)
    assert np.isneginf(np.asarray(_kth_largest(jnp.asarray(x), jnp.asarray([250, 1, 1], jnp.int32)))[0]).all()


def test_coverage_expectation_matches_simhash_draws():
    """LSH coverage is an expectation over projections: it matches counting >= 2 collisions of
    simhash codes over many projection draws; TopK at the same budget bounds every scheme."""
    from pigjax.eval.coverage import _layer_coverage
    from pigjax.attention.reference import simhash_codes

    rng = np.random.default_rng(0)
    d, n, sink, K, L = 16, 300, 4, 3, 12
    k = rng.normal(size=(1, sink + n + 8, d))
    q = k[:, sink + 7] + 0.5 * rng.normal(size=(1, d))  # [P=1, Hq=1, d]: one key stands out
    q = q[None]
    got = _layer_coverage(q, k[:, sink:sink + n], K, L)
    km = k[0, sink:sink + n]
    kc = km - km.mean(0)
    s = q[0, 0] @ km.T / np.sqrt(d)
    a = np.exp(s - s.max())
    a /= a.sum()
    hits = []
    for _ in range(400):
        proj = rng.normal(size=(d, K * L))
        same = simhash_codes(kc, proj, K) == simhash_codes(q[0], proj, K)  # [n, L]
        hits.append(same.sum(-1) >= 2)
    r = np.mean(hits, axis=0)
    assert abs(got["fraction"] - r.mean()) < 0.02
    assert abs(got["lsh"] - (a * r).sum()) < 0.03
    assert got["top1_u"] == pytest.approx(r[a.argmax()], abs=0.06)
    assert got["topk"] >= got["oracle"] - 1e-12 and got["topk"] >= got["lsh"] - 0.02
    assert 0 < got["lsh"] < 1 and got["top1_weight"] == pytest.approx(a.max())


def test_pooled_topk_spends_the_same_keys_where_the_mass_is():
    """`topk_pooled` gives the query's m·H keys to its heads by weight: equal to TopK when the heads
    are alike, above it when one head is peaked and one flat, and equal to a hand count."""
    from pigjax.eval.coverage import _at_fraction

    flat = np.full(10, 0.1)
    peaked = np.array([0.5, 0.2, 0.15, 0.15, 0, 0, 0, 0, 0, 0])
    same = _at_fraction(np.stack([peaked, peaked])[None], 0.2, 10)
    assert same["topk_pooled"] == pytest.approx(same["topk"]) == pytest.approx(0.7)
    got = _at_fraction(np.stack([peaked, flat])[None], 0.2, 10)  # m = 2 a head, 4 in all
    assert got["topk"] == pytest.approx((0.7 + 0.2) / 2)
    assert got["topk_pooled"] == pytest.approx((0.5 + 0.2 + 0.15 + 0.15) / 2)  # all 4 to the peaked head


def test_coverage_fraction_matches_magicpig_reads(tiny):
    """On a model's own q/k, the expected fraction equals what the MagicPIG back-end reads."""
    from pigjax.eval.attention_error import layer_errors
    from pigjax.eval.coverage import coverage

    toks = _tokens(240, rows=1, seed=4)
    backend = pigjax.MagicPIG(K=8, L=40)
    read = layer_errors(tiny, toks, 200, {"pig": backend})["pig"]["fraction_read"]
    sparse = backend.sparse_layers(tiny.config.num_hidden_layers)
    got = coverage(tiny, toks[0], 200, configs=[(8, 40)], sink=4, local=64, sparse_layers=sparse)[(8, 40)]
    expected = np.mean([x["fraction"] for x in got])
    assert expected == pytest.approx(read, rel=0.1)
    with pytest.raises(ValueError, match="prefill"):
        coverage(tiny, toks[0], 60, configs=[(8, 40)], sink=4, local=64, sparse_layers=sparse)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_seeds_are_data_not_a_recompile(tiny):
    """MagicPIG's and Oracle's seeds reach the jitted code as data: new seeds compile nothing, keep
    resident memory flat (each recompile kept ~75 MB before) and still draw different projections."""
    prompt = [_tokens(300, 1, 5)[0].tolist()]
    run = lambda seed: pigjax.generate(tiny, prompt, max_new_tokens=8, attention=[
        pigjax.MagicPIG(K=4, L=12, seed=seed), pigjax.Oracle(fraction=0.1, seed=seed)])
    run(0)
    compiles, reads, rss = [], set(), []
    listener = lambda event, seconds, **_: compiles.append(event) if event.endswith("backend_compile_duration") else 0
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in range(1, 7):
            magicpig, oracle = run(seed)
            reads.add(round(magicpig.stats["fraction_read"], 6))
            rss.append(_rss_bytes())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert len(reads) > 1  # the seed still changes the projection
    assert rss[-1] - rss[0] < 30e6, rss
    assert pigjax.MagicPIG(seed=1) == pigjax.MagicPIG(seed=2) and pigjax.Oracle(seed=1) == pigjax.Oracle(seed=2)
    with pytest.raises(pigjax.ConfigError, match="seed"):
        pigjax.MagicPIG(seed=2**70)


def test_window_is_sized_by_the_prompt_not_by_sink_and_local(tiny):
    """MagicPIG(sink=10**6, local=10**6) used to allocate a 2M-slot window per sparse layer (killed
    at 24 GB on a 600-token prompt); the exact window now holds at most the capacity."""
    from pigjax.attention.magicpig import EngineRef, Window

    huge = pigjax.MagicPIG(sink=10**6, local=10**6)
    ref = EngineRef(jnp.int32(0), jnp.zeros((16, huge.K * huge.L)))
    cache = jax.eval_shape(lambda: huge.init_cache(tiny.config, 2, 640, 64, jnp.float32, ref))
    widths = {layer.k.shape[2] for layer in cache.layers if isinstance(layer, Window)}
    assert widths == {640 + 64}
    prompt = [_tokens(600, 1, 2)[0].tolist()]
    got = pigjax.generate(tiny, prompt, max_new_tokens=6, attention=huge)
    assert got.tokens == pigjax.generate(tiny, prompt, max_new_tokens=6).tokens  # all exact = dense


def test_large_k_tables_stay_small(tiny):
    """K=16, L=512 used to take a 2^16-entry offset table per table per (row, KV head): 13.2 GB for
    one 600-token SmolLM2 row. Short blocks now use compact tables (same sampled sets)."""
    prompt = [_tokens(600, 1, 4)[0].tolist()]
    stats = pigjax.generate(tiny, prompt, max_new_tokens=4, attention=pigjax.MagicPIG(K=16, L=512)).stats
    per_head = stats["host_bytes_per_token_per_sparse_layer"] / tiny.config.num_key_value_heads
    assert per_head < 8 * 512  # (index, code) pairs and bucket offsets; 4·512·65537/600 ≈ 224 KB before


def test_magicpig_that_will_not_fit_is_refused_before_allocating(tiny, monkeypatch):
    monkeypatch.setenv("PIGJAX_ENGINE_MAX_BYTES", "1M")
    with pytest.raises(pigjax.ConfigError, match=r"magicpig \(K=10, L=150, batch 1, .*needs ~.* more than the 1 MB"):
        pigjax.generate(tiny, [_tokens(300, 1)[0].tolist()], max_new_tokens=4, attention=pigjax.MagicPIG())


def test_quest_backend_follows_the_numpy_page_rule():
    """pigjax.Quest's decode attention equals attention over the window plus the middle keys of the
    pages `quest_selection` (Quest's public rule: per-page min/max of the cached keys, per query
    head Σ_j max(q_j·max_j, q_j·min_j), top pages) keeps; the bound is an upper bound of q·k on every
    page, and a key planted along a query is always read."""
    from pigjax.attention.backend import KV
    from pigjax.attention.baselines import BaselineShared
    from pigjax.eval.coverage import quest_selection

    rng = np.random.default_rng(1)
    b, hkv, g, s, d, page, n = 1, 2, 3, 230, 16, 16, 200
    q = rng.normal(size=(b, hkv * g, d))
    k = rng.normal(size=(b, hkv, s, d))
    v = rng.normal(size=(b, hkv, s, d))
    k[0, 1, 77] = 4 * q[0, 5]  # query head 5 (KV head 1) has one outstanding middle key
    lo, hi = 4, n - 64
    backend = pigjax.Quest(page=page, fraction=0.1)
    m = int(np.ceil(0.1 * (hi - lo) / page))
    shared = BaselineShared(jnp.array([n]), jnp.zeros(()), jnp.zeros(()), jnp.float32(0.1), jnp.zeros((2,), jnp.uint32))
    pos = np.arange(s)
    visible = jnp.asarray(pos[None] <= 210)
    middle = jnp.asarray(((pos >= lo) & (pos < hi))[None])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    out, read = backend.sparse_attend(3, f32(q), KV(f32(k), f32(v)), visible, middle, jnp.array([hi - lo]), shared, None)
    chosen, bound = quest_selection(q[0][None], k[0], lo, hi, page, m)
    chosen = chosen[0]  # [Hq, S]
    assert chosen[5, 77] and chosen.any(-1).all()
    assert int(read[0]) == chosen.sum()
    gi = np.repeat(np.arange(hkv), g)
    mask = (pos <= 210)[None] & (~((pos >= lo) & (pos < hi))[None] | chosen)
    sc = np.einsum("hd,hsd->hs", q[0], k[0][gi]) / np.sqrt(d)
    w = np.where(mask, np.exp(sc - sc.max(-1, keepdims=True)), 0.0)
    want = np.einsum("hs,hsd->hd", w / w.sum(-1, keepdims=True), v[0][gi])
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=2e-5)
    # the bound is >= every middle key's q·k in its page
    qk = np.einsum("hd,hsd->hs", q[0], k[0][gi])
    for p in range(bound.shape[-1]):
        keys = [i for i in range(p * page, min(s, (p + 1) * page)) if lo <= i < hi]
        if keys:
            assert np.all(bound[0, :, p] >= qk[:, keys].max(-1) - 1e-9)
        else:
            assert np.all(np.isneginf(bound[0, :, p]))


def test_quest_coverage_matches_quest_reads(tiny):
    """Quest's coverage counts the keys the Quest back-end reads on the same q/k; reading every page
    covers the whole middle; Quest covers no more than the best pages or TopK at its count of keys."""
    from pigjax.eval.attention_error import layer_errors
    from pigjax.eval.coverage import coverage

    toks = _tokens(240, rows=1, seed=4)
    backend = pigjax.Quest(fraction=0.1)
    read = layer_errors(tiny, toks, 200, {"quest": backend})["quest"]["fraction_read"]
    sparse = pigjax.MagicPIG().sparse_layers(tiny.config.num_hidden_layers)
    got = coverage(tiny, toks[0], 200, configs=[], sink=4, local=64, sparse_layers=sparse, quest=(0.1, 1.0))
    assert np.mean([x["fraction"] for x in got[("quest", 0.1)]]) == pytest.approx(read, rel=1e-6)
    assert all(x["quest"] == pytest.approx(1.0) and x["fraction"] == 1.0 for x in got[("quest", 1.0)])
    for x in got[("quest", 0.1)]:
        assert 0 < x["quest"] <= min(x["best_pages"], x["topk"]) + 1e-12 and x["pages"] == 1
