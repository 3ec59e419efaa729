"""The engine's ranked query (ffi/src/query_ranked.h, docs/algorithm.md §2.9) against its NumPy
reference, its unbiasedness over independent projections, its limits, and bad settings."""

import numpy as np
import pytest

from pigjax import PigjaxError
from pigjax import _engine
from pigjax.attention import reference as ref
from pigjax.engine import Store


def _store_with(store, k, v, k_codes, n0=None):
    """Prefill slots 0..B-1 of `store` with k, v [B, Hkv, n, d] (all middle); with n0, only the
    first n0 tokens are prefilled and the rest appended."""
    b, _, n, _ = k.shape
    n0 = n if n0 is None else n0
    slots = np.arange(b, dtype=np.int32)
    _engine.store_prefill_np(store.handle, slots, k[:, :, :n0], v[:, :, :n0], k_codes[:, :, :n0],
                             np.full(b, n0, np.int32), 0, 0)
    if n0 < n:
        _engine.store_append_np(store.handle, slots, k[:, :, n0:], v[:, :, n0:], k_codes[:, :, n0:],
                                np.full(b, n - n0, np.int32))
    return slots


def _inputs(seed, b=2, hq=6, hkv=2, n=600, d=16, K=6, L=40):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    proj = rng.normal(size=(d, K * L))
    return q, k, v, ref.simhash_codes(k, proj, K), ref.simhash_codes(q, proj, K)


@pytest.mark.parametrize("top, refine, n0, n, cap", [
    (0.03, 1.0, None, 600, 1.0), (0.03, 3.0, None, 600, 1.0), (0.1, 2.0, 450, 600, 1.0), (0.5, 1.0, None, 600, 1.0),
    (0.05, 2.0, 450, 600, 1.0), (0.01, 1.0, None, 9000, 1.0), (0.02, 2.0, 8500, 9000, 1.0),  # 9000: the sampled bound
    (0.03, 2.0, 450, 600, 0.02), (0.01, 1.0, 8500, 9000, 0.005)])  # the sample thinned to its cap
@pytest.mark.parametrize("layout", [-1, 1])  # auto (direct at n = 600, K = 6) and forced compact
@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
def test_selection_matches_numpy_reference(top, refine, n0, n, cap, layout, simd):
    """Same codes in: the same top set, sample (thinned to the cap), reads and output (middle and
    appended tokens), at each SIMD level of the sketch kernel."""
    K, L, lr = 6, 40, 15
    q, k, v, k_codes, q_codes = _inputs(1, n=n)
    _engine.set_table_layout(layout)
    previous = _engine.simd_level()
    if _engine.set_simd_level(simd) != simd:
        _engine.set_simd_level(previous)
        pytest.skip(f"this CPU has no {simd}")
    try:
        with Store(2, 2, 16, n, K, L, storage="f32", sketch_tables=lr) as store:
            slots = _store_with(store, k, v, k_codes, n0)
            out, lse, keys, values = _engine.store_query_ranked_np(store.handle, slots, q, q_codes, lr, top, refine,
                                                                   cap)
    finally:
        _engine.set_table_layout(-1)
        _engine.set_simd_level(previous)
    for r in range(2):
        o, l, kr, vr, t_mask = ref.ranked_attention(q[r], k[r], v[r], k_codes[r], q_codes[r], K, L, lr, top, refine,
                                                    sample_cap=cap)
        np.testing.assert_array_equal(keys[r], kr)
        np.testing.assert_array_equal(values[r], vr)
        np.testing.assert_allclose(out[r], o, atol=2e-5)
        np.testing.assert_allclose(lse[r], l, atol=2e-5)
        assert 0 < t_mask.sum(-1).min() and vr.max() < n  # a real selection, not everything
        if cap < 1:  # the cap binds: every head reads exactly T and ⌈cap·n⌉ sampled keys
            _, _, _, uncapped, _ = ref.ranked_attention(q[r], k[r], v[r], k_codes[r], q_codes[r], K, L, lr, top, refine)
            np.testing.assert_array_equal(vr, t_mask.sum(-1) + int(np.ceil(cap * n)))
            assert np.all(uncapped > vr)


def test_ties_in_estimates_break_by_index():
    """Equal norms, and every key's ranking codes equal the query's: the top set is the lowest
    indices (refine = 1); the query's codes differ from the keys' by 3 bits in the sampling tables
    (never sampled)."""
    n, d, K, L, lr = 200, 8, 4, 10, 4
    rng = np.random.default_rng(2)
    k = np.zeros((1, 1, n, d), np.float32)
    k[..., 0] = 1.0
    v = np.zeros((1, 1, n, d), np.float32)
    v[0, 0, :20, 0] = 1.0  # the first 20 keys carry a value
    k_codes = np.zeros((1, 1, n, L), np.int32)
    k_codes[..., lr:] = 7  # never sampled: the query's codes are all 0
    with Store(1, 1, d, n, K, L, storage="f32", sketch_tables=lr) as store:
        slots = _store_with(store, k, v, k_codes)
        q = rng.normal(size=(1, 1, d)).astype(np.float32)
        out, _, keys, values = _engine.store_query_ranked_np(store.handle, slots, q, np.zeros((1, 1, L), np.int32),
                                                             lr, 0.1, 1.0)
    assert keys[0, 0] == values[0, 0] == 20 and out[0, 0, 0] == pytest.approx(1.0)


def test_full_top_is_exact_and_zero_top_is_magicpig():
    K, L, lr = 6, 40, 15
    q, k, v, k_codes, q_codes = _inputs(3)
    with (Store(2, 2, 16, 600, K, L, storage="f32", sketch_tables=lr) as full,
          Store(2, 2, 16, 600, K, L - lr, storage="f32") as tail):
        slots = _store_with(full, k, v, k_codes)
        out, lse, keys, values = _engine.store_query_ranked_np(full.handle, slots, q, q_codes, lr, 1.0, 1.0)
        out0, lse0, keys0, values0 = _engine.store_query_ranked_np(full.handle, slots, q, q_codes, lr, 0.0, 1.0)
        _store_with(tail, k, v, np.ascontiguousarray(k_codes[..., lr:]))
        pig, pig_lse, sampled = _engine.store_query_np(tail.handle, slots, q, np.ascontiguousarray(q_codes[..., lr:]))
    kk, vv = (np.repeat(x.astype(np.float64), 3, axis=1) for x in (k, v))
    s = np.einsum("bhd,bhnd->bhn", q, kk) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out, np.einsum("bhn,bhnd->bhd", p / p.sum(-1, keepdims=True), vv), atol=1e-5)
    np.testing.assert_allclose(lse, s.max(-1) + np.log(p.sum(-1)), atol=1e-4)
    assert np.all(keys == 600) and np.all(values == 600)
    np.testing.assert_allclose(out0, pig, atol=1e-5)
    np.testing.assert_allclose(lse0, pig_lse, atol=1e-5)
    assert np.array_equal(keys0, sampled) and np.array_equal(values0, sampled)


@pytest.mark.parametrize("cap", [1.0, 0.03])
def test_remainder_is_unbiased_given_the_top_set(cap):
    """Over independent projections, the estimate's denominator and numerator minus their
    expectation given the top set T (exact part + sum over keys outside T of e^s·u/(u+eps), u for
    the sampling tables) average to 0 within 4 standard errors; dropping the weights does not.
    With a binding sample cap, the same holds, and dropping the thinning's 1/a weight does not."""
    rng = np.random.default_rng(0)
    trials, n, d, K, lr, ls, eps, top = 600, 400, 16, 3, 4, 8, 1e-4, 0.05
    L = lr + ls
    k = rng.normal(size=(n, d))
    k -= k.mean(0)
    v = rng.normal(size=(n, d))
    q = rng.normal(size=d) * 0.5
    s = k @ q / np.sqrt(d)
    u = ref.sampling_probability(k @ q / (np.linalg.norm(k, axis=1) * np.linalg.norm(q)), K, ls)
    keep = u / (u + eps)
    projs = rng.normal(size=(trials, d, K * L))
    k_codes = np.stack([ref.simhash_codes(k, p, K) for p in projs])[:, None].astype(np.int32)
    q_codes = np.stack([ref.simhash_codes(q[None], p, K) for p in projs]).astype(np.int32)
    kb = np.ascontiguousarray(np.broadcast_to(k, (trials, 1, n, d)), np.float32)
    vb = np.ascontiguousarray(np.broadcast_to(v, (trials, 1, n, d)), np.float32)
    qb = np.ascontiguousarray(np.broadcast_to(q, (trials, 1, d)), np.float32)
    with Store(trials, 1, d, n, K, L, eps, storage="f32", sketch_tables=lr) as store:
        slots = _store_with(store, kb, vb, k_codes)
        out, lse, _, values = _engine.store_query_ranked_np(store.handle, slots, qb, q_codes, lr, top, 2.0, cap)
    denom = np.exp(np.asarray(lse, np.float64))[:, 0]
    numer = denom[:, None] * np.asarray(out, np.float64)[:, 0]
    e = np.exp(s)
    t = np.stack([ref.ranked_attention(qb[i], kb[i], vb[i], k_codes[i], q_codes[i], K, L, lr, top, 2.0)[4][0]
                  for i in range(trials)])  # T per trial [trials, n]
    log_inv_a = np.array([ref.ranked_selection(qb[i, 0], kb[i, 0], k_codes[i, 0], q_codes[i, 0], K, lr, top, 2.0, cap)[3]
                          for i in range(trials)])
    assert np.all(t.sum(1) == 20) and 0.05 < t.mean(0).max() < 1.0  # T varies with the projection
    cond_denom = (t * e).sum(1) + (~t * e * keep).sum(1)
    cond_numer = (t * e) @ v + (~t * e * keep) @ v
    dev = denom - cond_denom
    se = dev.std() / np.sqrt(trials)
    assert abs(dev.mean()) < 4 * se, (dev.mean(), se)
    dev_n = numer - cond_numer
    assert np.all(np.abs(dev_n.mean(0)) < 4 * dev_n.std(0) / np.sqrt(trials) + 1e-9)
    # The test can fail: without the 1/(u + eps) weights the remainder is visibly biased.
    unweighted = (t * e).sum(1) + (~t * e * u).sum(1)
    assert abs((denom - unweighted).mean()) > 8 * se
    if cap < 1:  # thinned in most trials; without 1/a the sampled part shrinks by a on average
        assert np.mean(log_inv_a > 0) > 0.5 and np.all(values[log_inv_a > 0, 0] == 20 + 12)
        exact_t = (t * e).sum(1)
        no_thin_weight = exact_t + (denom - exact_t) * np.exp(-log_inv_a)
        assert abs((no_thin_weight - cond_denom).mean()) > 8 * se


@pytest.mark.parametrize("args, match", [
    ((39, 0.1, 1.0), r"rank_tables must be in \[1, L - 2\] = \[1, 38\]"),
    ((0, 0.1, 1.0), "rank_tables must be in"),
    ((12, 0.1, 1.0), r"rank_tables must equal the store's sketch_tables = 10 .*sketch_tables=12"),
    ((10, 1.5, 1.0), r"top must be a fraction in \[0, 1\]"),
    ((10, float("nan"), 1.0), "top must be"),
    ((10, 0.1, 0.5), r"refine must be a number in \[1, 1e6\]"),
    ((10, 0.1, 1.0, 0.0), r"sample_cap must be a fraction in \(0, 1\]"),
    ((10, 0.1, 1.0, 1.5), "sample_cap must be"),
])
def test_bad_settings_raise_clear_errors(args, match):
    q, k, v, k_codes, q_codes = _inputs(4, n=100)
    with Store(2, 2, 16, 100, 6, 40, storage="f32", sketch_tables=10) as store:
        slots = _store_with(store, k, v, k_codes)
        with pytest.raises(ValueError, match="store_query_ranked_np: " + match):
            _engine.store_query_ranked_np(store.handle, slots, q, q_codes, *args)
        with pytest.raises(ValueError, match="values_read|q_codes must have shape"):
            _engine.store_query_ranked_np(store.handle, slots, q, q_codes[:, :, :5], 10, 0.1, 1.0)


def test_a_store_without_the_sketch_refuses_a_ranked_query():
    q, k, v, k_codes, q_codes = _inputs(4, n=100)
    with Store(2, 2, 16, 100, 6, 40, storage="f32") as store:
        slots = _store_with(store, k, v, k_codes)
        with pytest.raises(ValueError, match="sketch_tables = 0 .*create it with sketch_tables=10"):
            _engine.store_query_ranked_np(store.handle, slots, q, q_codes, 10, 0.1, 1.0)
    with pytest.raises(PigjaxError, match=r"sketch_tables must be in \[0, L - 2\] = \[0, 38\] .*got 39"):
        Store(1, 1, 16, 100, 6, 40, sketch_tables=39)
    with pytest.raises(PigjaxError, match="sketch_tables must be >= 0"):
        Store(1, 1, 16, 100, 6, 40, sketch_tables=-1)


def test_sketch_memory_is_counted():
    """50 tables of K = 10 kept as a sketch: + 64 bytes a token (500 bits), and no bucket lists for
    them: - 100 bytes of indices a token and 50 tables' offsets, in the estimate and the allocation."""
    from pigjax.engine import estimate_bytes

    base = estimate_bytes(2, 3, 64, 1000, 10, 150, storage="bf16", appends=False)
    with_sketch = estimate_bytes(2, 3, 64, 1000, 10, 150, storage="bf16", appends=False, sketch_tables=50)
    assert with_sketch - base == 2 * 3 * (1000 * (64 - 2 * 50) - 4 * 50 * (2**10 + 1))
    with Store(1, 1, 16, 1000, 10, 150, sketch_tables=50) as store:
        per_token = store.info()["bytes_per_token"]
        assert per_token["sketch"] == 64.0 and per_token["table_indices"] == 200.0
        assert store.info()["sketch_tables"] == 50


def test_a_sketch_store_refuses_the_plain_query():
    q, k, v, k_codes, q_codes = _inputs(4, n=100)
    with Store(2, 2, 16, 100, 6, 40, storage="f32", sketch_tables=10) as store:
        slots = _store_with(store, k, v, k_codes)
        with pytest.raises(ValueError, match=r"sketch without bucket lists \(sketch_tables = 10\).*ranked query"):
            _engine.store_query_np(store.handle, slots, q, q_codes)


def test_ffi_path_equals_numpy_path_and_reports_bad_settings():
    import jax
    import jax.numpy as jnp
    from pigjax.engine import store as engine_store

    q, k, v, k_codes, q_codes = _inputs(5)
    with Store(2, 2, 16, 600, 6, 40, storage="f32", sketch_tables=15) as store:
        slots = _store_with(store, k, v, k_codes)
        want = _engine.store_query_ranked_np(store.handle, slots, q, q_codes, 15, 0.05, 2.0)
        dep = jnp.full((2,), 600, jnp.int32)
        got = store.query_ranked(jnp.asarray(slots), jnp.asarray(q), jnp.asarray(q_codes), dep, rank_tables=15,
                                 top=0.05, refine=2.0)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)
        with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_lsh_query_ranked: rank_tables must be"):
            jax.block_until_ready(engine_store.query_ranked(store.handle_array, jnp.asarray(slots), jnp.asarray(q),
                                                            jnp.asarray(q_codes), dep, rank_tables=40, top=0.1))
    with pytest.raises(PigjaxError, match="q must be a rank-3 float32"):
        engine_store.query_ranked(jnp.int32(1), jnp.zeros(2, jnp.int32), jnp.zeros((2, 6)), jnp.zeros((2, 6, 40), jnp.int32),
                                  dep, rank_tables=10, top=0.1)
