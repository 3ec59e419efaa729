"""The C++ LSH store against the NumPy reference, its statistics, its FFI calls, and bad input."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax import PigjaxError
from pigjax.attention import lsh_attention, lsh_estimator as estimator
from pigjax.engine import Store
from pigjax.attention import reference as ref
from pigjax.engine import store as engine_store


def make_inputs(seed, b=2, hq=6, hkv=2, n=700, d=32, K=6, L=40, offset=3.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    # A shared offset in every key (as real keys have) makes centering matter.
    k = (rng.normal(size=(b, hkv, n, d)) + offset * rng.normal(size=(1, 1, 1, d))).astype(np.float32)
    v = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    proj = rng.normal(size=(d, K * L)).astype(np.float32)
    return q, k, v, proj


def _unbiased_setup(rng, trials, n, d, K, L):
    """Centered keys k [n, d], values v, a query q, scores s, sampling probabilities u, and the
    codes of k [trials, 1, n, L] and q [trials, 1, L] under `trials` independent projections."""
    k = rng.normal(size=(n, d))
    k -= k.mean(0)
    v = rng.normal(size=(n, d))
    q = rng.normal(size=d) * 0.5
    s = k @ q / np.sqrt(d)
    u = ref.sampling_probability(k @ q / (np.linalg.norm(k, axis=1) * np.linalg.norm(q)), K, L)
    projs = rng.normal(size=(trials, d, K * L))
    k_codes = np.stack([ref.simhash_codes(k, p, K) for p in projs])[:, None]
    q_codes = np.stack([ref.simhash_codes(q[None], p, K) for p in projs])
    return k, v, q, s, u, k_codes, q_codes


def _check_unbiased(out, lse, sampled, s, u, v, eps, count_sample=True):
    """Over the trials (rows), the sampled softmax's denominator, numerator and (with
    count_sample) |S| match their expectations (sum of e^s·u/(u+eps), of that times v, and of u)
    within 4 standard errors. -> (expected denominator, its standard error, u/(u+eps))."""
    trials = out.shape[0]
    denom = np.where(np.isfinite(np.asarray(lse)), np.exp(np.asarray(lse, np.float64)), 0.0)[:, 0]
    numer = denom[:, None] * np.asarray(out, np.float64)[:, 0]
    keep = u / (u + eps)
    exp_denom, exp_numer = (np.exp(s) * keep).sum(), (np.exp(s) * keep) @ v
    se = denom.std() / np.sqrt(trials)
    assert abs(denom.mean() - exp_denom) < 4 * se, (denom.mean(), exp_denom, se)
    se_n = numer.std(0) / np.sqrt(trials)
    assert np.all(np.abs(numer.mean(0) - exp_numer) < 4 * se_n + 1e-9)
    counts_s = np.asarray(sampled, np.float64)[:, 0]
    if count_sample:
        assert abs(counts_s.mean() - u.sum()) < 4 * counts_s.std() / np.sqrt(trials)
    return exp_denom, se, keep


@pytest.mark.parametrize("storage, tol", [("f32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (6, 2), (9, 3)])
def test_lsh_attention_matches_reference(storage, tol, hq, hkv):
    K, L, sink, local = 6, 40, 4, 64
    q, k, v, proj = make_inputs(hq, hq=hq, hkv=hkv, K=K, L=L)
    lengths = np.array([700, 333], np.int32)  # ragged rows
    out, sampled = lsh_attention(q, k, v, proj, K=K, L=L, sink=sink, local=local, lengths=lengths, storage=storage)
    # The reference is fed the engine path's centered keys and codes (float32 SimHash can flip a
    # bit whose dot product is within rounding of 0; that is tested in test_native).
    kc, k_codes, q_codes = (np.asarray(a) for a in estimator._prepare(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(lengths), jnp.asarray(proj), K=K, sink=sink, local=local))
    for r in range(2):
        exact, middle = ref.split(int(lengths[r]), sink, local)
        mu = k[r][:, middle].astype(np.float64).mean(1, keepdims=True)
        np.testing.assert_allclose(kc[r], k[r] - mu, atol=1e-5)
        o_g, lse_g = ref.exact_attention(q[r], kc[r], v[r], exact)
        o_s, lse_s, count, _ = ref.sampled_attention(q[r], kc[r][:, middle], v[r][:, middle],
                                                     k_codes[r][:, middle], q_codes[r], K, L)
        expected = ref.merge(o_g, lse_g, o_s, lse_s)
        assert np.array_equal(np.asarray(sampled[r]), count)
        assert 0 < count.min() and count.max() < len(middle)  # a real sample, neither empty nor all
        rel = np.abs(np.asarray(out[r]) - expected).max() / np.abs(expected).max()
        assert rel < tol, rel


def test_callback_path_equals_ffi_path():
    """The io_callback path (what a GPU default device uses) runs the same engine code."""
    q, k, v, proj = make_inputs(5)
    a = lsh_attention(q, k, v, proj, K=6, L=40, path="ffi")
    b = lsh_attention(q, k, v, proj, K=6, L=40, path="callback")
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_reference_end_to_end_close_to_engine():
    q, k, v, proj = make_inputs(7)
    out, sampled = lsh_attention(q, k, v, proj, K=6, L=40, storage="f32")
    r_out, r_sampled = ref.lsh_attention(q, k, v, proj, 6, 40)
    assert np.abs(np.asarray(sampled) - r_sampled).max() <= 2  # float32 vs float64 hashing
    assert np.abs(np.asarray(out) - r_out).max() < 1e-2


def test_short_sequences_and_empty_sample():
    q, k, v, proj = make_inputs(3, n=60)
    out, sampled = lsh_attention(q, k, v, proj, K=6, L=40, sink=4, local=64)  # n <= sink + local
    assert np.all(np.asarray(sampled) == 0)
    dense = ref.exact_attention  # every key is exact: the result is dense attention
    for r in range(2):
        expected, _ = dense(q[r], k[r], v[r], np.arange(60))
        np.testing.assert_allclose(np.asarray(out[r]), expected, rtol=1e-4, atol=1e-5)
    # Key codes avoid 63 and the query's codes are all 63: nothing collides, S is empty.
    q, k, v, proj = make_inputs(4, b=1, hq=2, hkv=2, n=200)
    codes = np.random.default_rng(0).integers(0, 63, (1, 2, 200, 40)).astype(np.int32)
    with Store(1, 2, 32, 200, 6, 40, storage="f32") as store:
        slots = jnp.zeros((1,), jnp.int32)
        counts = store.prefill(slots, jnp.asarray(k), jnp.asarray(v), jnp.asarray(codes),
                               jnp.asarray([200], jnp.int32), sink=0, local=1)
        out, lse, sampled = store.query(slots, jnp.asarray(q), jnp.full((1, 2, 40), 63, jnp.int32), counts)
    assert int(counts[0]) == 199
    assert np.all(np.asarray(sampled) == 0) and np.all(np.isneginf(np.asarray(lse)))
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("L", [255, 256, 257, 510])
def test_collision_counts_past_a_byte(L):
    """The query counts a token's collisions in a byte, clamped to 2 every 254 tables: colliding in
    every table (a count that would wrap to 0 or 1), or in the first and the last, samples the token;
    one table does not."""
    n, d = 40, 8
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.normal(size=(1, 1, n, d)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(1, 2, d)), jnp.float32)
    with Store(1, 1, d, n, 4, L, storage="f32") as store:
        slots = jnp.zeros((1,), jnp.int32)
        counts = store.prefill(slots, k, v, jnp.full((1, 1, n, L), 5, jnp.int32), jnp.asarray([n], jnp.int32),
                               sink=0, local=0)
        every = jnp.full((1, 2, L), 5, jnp.int32)
        ends = jnp.full((1, 2, L), 6, jnp.int32).at[:, :, 0].set(5).at[:, :, L - 1].set(5)
        last = jnp.full((1, 2, L), 6, jnp.int32).at[:, :, L - 1].set(5)
        sampled = [np.asarray(store.query(slots, q, codes, counts)[2]) for codes in (every, ends, last)]
    assert int(counts[0]) == n
    assert np.all(sampled[0] == n) and np.all(sampled[1] == n) and np.all(sampled[2] == 0), sampled


@pytest.mark.parametrize("cap", [1.0, 0.03])
def test_importance_weights_are_unbiased(cap):
    """Over many independent projections, E[Σ_S e^s w] and E[Σ_S e^s w v] match the exact sums
    (up to the eps of w = 1/(u+eps)), and E|S| = Σ u. With a binding sample cap (12 of the ~30
    sampled keys read), the same sums stay unbiased through the 1/a weight, and dropping it is
    visibly biased."""
    rng = np.random.default_rng(0)
    trials, n, d, K, L, eps = 600, 400, 16, 3, 8, 1e-4
    k, v, q, s, u, k_codes, q_codes = _unbiased_setup(rng, trials, n, d, K, L)
    with Store(trials, 1, d, n, K, L, eps, storage="f32") as store:
        slots = jnp.arange(trials, dtype=jnp.int32)
        counts = store.prefill(slots, jnp.asarray(np.broadcast_to(k, (trials, 1, n, d)), jnp.float32),
                               jnp.asarray(np.broadcast_to(v, (trials, 1, n, d)), jnp.float32),
                               jnp.asarray(k_codes), jnp.full((trials,), n, jnp.int32), sink=0, local=1)
        out, lse, sampled = store.query(slots, jnp.asarray(np.broadcast_to(q, (trials, 1, d)), jnp.float32),
                                        jnp.asarray(q_codes), counts, sample_cap=cap)
    # local=1 keeps the last token exact: it is not in the store.
    s, u, v = s[:-1], u[:-1], v[:-1]
    exp_denom, se, keep = _check_unbiased(out, lse, sampled, s, u, v, eps, count_sample=cap == 1.0)
    # The test can fail: ignoring the weights (w = 1) is visibly biased.
    assert abs((np.exp(s) * u).sum() - exp_denom) > 8 * se
    if cap < 1:
        full = ((k_codes[:, 0, :-1] == q_codes[:, :, None, :][:, 0]).sum(-1) >= 2).sum(-1)  # |S| per trial
        thinned = full > 12
        assert thinned.mean() > 0.5 and np.all(np.asarray(sampled)[thinned, 0] == 12)
        denom = np.exp(np.asarray(lse, np.float64))[:, 0]
        no_thin_weight = np.where(thinned, denom * 12 / np.maximum(full, 1), denom)
        assert abs(no_thin_weight.mean() - exp_denom) > 8 * se


def test_ffi_calls_run_every_scan_step():
    d, n = 8, 100
    codes = jnp.zeros((1, 1, n, 4), jnp.int32)  # every key collides in every table
    q_codes = jnp.zeros((1, 1, 4), jnp.int32)
    slots = jnp.zeros((1,), jnp.int32)
    keys = jnp.zeros((1, 1, n, d), jnp.float32)
    with Store(1, 1, d, n, 2, 4, storage="f32") as store:
        @jax.jit
        def run(q):
            def step(carry, t):
                values = jnp.full((1, 1, n, d), t, jnp.float32)  # new contents every step
                counts = store.prefill(slots, keys, values, codes, jnp.full((1,), n, jnp.int32), sink=0, local=1)
                out, _, sampled = store.query(slots, q, q_codes, counts)
                return carry + 1, (out[0, 0, 0], sampled[0, 0])
            return jax.lax.scan(step, 0, jnp.arange(5, dtype=jnp.float32))[1]

        outs, sampled = run(jnp.ones((1, 1, d), jnp.float32))
    assert np.allclose(np.asarray(outs), np.arange(5)) and np.all(np.asarray(sampled) == n - 1)


def _query_once(store, q, k, v, k_codes, q_codes):
    slots = jnp.zeros((1,), jnp.int32)
    counts = store.prefill(slots, k, v, k_codes, jnp.asarray([k.shape[2]], jnp.int32), sink=0, local=1)
    return np.asarray(store.query(slots, q, q_codes, counts)[0])


def test_two_stores_alternately_and_in_two_threads():
    rng = np.random.default_rng(1)
    data = []  # (q, k, v, k_codes, q_codes) per store
    for _ in range(2):
        k, v, q = rng.normal(size=(1, 2, 300, 16)), rng.normal(size=(1, 2, 300, 16)), rng.normal(size=(1, 4, 16))
        proj = rng.normal(size=(16, 4 * 10))
        data.append(tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v)) +
                    (jnp.asarray(ref.simhash_codes(k, proj, 4)), jnp.asarray(ref.simhash_codes(q, proj, 4))))
    with Store(1, 2, 16, 300, 4, 10, storage="f32") as a, Store(1, 2, 16, 300, 4, 10, storage="f32") as b:
        alone = [_query_once(s, *x) for s, x in ((a, data[0]), (b, data[1]))]
        slots = jnp.zeros((1,), jnp.int32)
        # Alternate: fill both, then query each; neither sees the other's rows.
        ca = a.prefill(slots, data[0][1], data[0][2], data[0][3], jnp.asarray([300], jnp.int32), sink=0, local=1)
        cb = b.prefill(slots, data[1][1], data[1][2], data[1][3], jnp.asarray([300], jnp.int32), sink=0, local=1)
        np.testing.assert_array_equal(np.asarray(a.query(slots, data[0][0], data[0][4], ca)[0]), alone[0])
        np.testing.assert_array_equal(np.asarray(b.query(slots, data[1][0], data[1][4], cb)[0]), alone[1])
        errors = []

        def worker(store, x, expected):
            try:
                for _ in range(20):
                    np.testing.assert_array_equal(_query_once(store, *x), expected)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s, x, e)) for s, x, e in
                   ((a, data[0], alone[0]), (b, data[1], alone[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


@pytest.mark.parametrize("path", ["ffi", "callback"])
def test_bad_input_raises_clear_errors(path):
    """Each engine error is raised with its own message, and later calls still work (on a GPU a
    raising host callback poisons or crashes JAX's runtime: the callback path must not raise)."""
    with pytest.raises(PigjaxError, match="K"):
        Store(1, 1, 8, 10, 17, 4)
    with pytest.raises(PigjaxError, match="L"):
        Store(1, 1, 8, 10, 4, 1)
    with pytest.raises(PigjaxError, match="storage"):
        Store(1, 1, 8, 10, 4, 4, storage="f16")
    q, k, v, proj = make_inputs(0, n=100)
    with pytest.raises(PigjaxError, match=r"proj must be \[d, K·L\]"):
        lsh_attention(q, k, v, proj[:, :-1], K=6, L=40)
    with pytest.raises(PigjaxError, match="K <= 16"):
        lsh_attention(q, k, v, np.zeros((32, 17 * 40), np.float32), K=17, L=40)
    with pytest.raises(PigjaxError, match="L >= 2"):
        lsh_attention(q, k, v, proj[:, :6], K=6, L=1)
    with pytest.raises(PigjaxError, match="q .* does not fit"):
        lsh_attention(q[:, :5], k, v, proj, K=6, L=40)

    store = Store(2, 2, 32, 50, 6, 40, storage="f32", path=path)
    slots = jnp.zeros((2,), jnp.int32)
    kk, vv = jnp.asarray(k), jnp.asarray(v)
    codes = jnp.zeros((2, 2, 100, 40), jnp.int32)
    lengths = jnp.full((2,), 100, jnp.int32)
    with pytest.raises(PigjaxError, match="keys must be a rank-4 float32"):
        store.prefill(slots, kk.astype(jnp.float16), vv, codes, lengths, sink=0, local=1)
    with pytest.raises(PigjaxError, match="codes must be a rank-4 int32"):
        store.prefill(slots, kk, vv, codes[0], lengths, sink=0, local=1)
    engine_errors = [
        (lambda: store.prefill(slots, kk, vv, codes, lengths, sink=0, local=1), "capacity"),
        (lambda: store.prefill(jnp.asarray([0, 5], jnp.int32), kk[:, :, :40], vv[:, :, :40], codes[:, :, :40],
                               jnp.full((2,), 40, jnp.int32), sink=0, local=1), "slot"),
        (lambda: store.prefill(slots + jnp.asarray([0, 1]), kk[:, :1, :40], vv[:, :1, :40], codes[:, :1, :40],
                               jnp.full((2,), 40, jnp.int32), sink=0, local=1), "kv|head"),
        (lambda: store.prefill(slots + jnp.asarray([0, 1]), kk[:, :, :40], vv[:, :, :40], codes[:, :, :40] + 64,
                               jnp.full((2,), 40, jnp.int32), sink=0, local=1), "code"),
    ]
    for call, message in engine_errors:
        with pytest.raises(Exception, match=f"(?i){message}"):
            jax.block_until_ready(call())
    store.close()
    with pytest.raises(Exception, match="(?i)handle"):
        jax.block_until_ready(store.prefill(slots + jnp.asarray([0, 1]), kk[:, :, :40], vv[:, :, :40],
                                            codes[:, :, :40], jnp.full((2,), 40, jnp.int32), sink=0, local=1))
    # The process lives on and a new store works.
    out, sampled = lsh_attention(q, k, v, proj, K=6, L=40, path=path)
    assert np.isfinite(np.asarray(out)).all()


def test_callback_errors_inside_jit_surface_at_close():
    """A jitted callback-path call that fails returns NaN / -1 and its Store raises the engine's
    message when checked (here: at close)."""
    q, k, v, proj = make_inputs(0, n=100)
    store = Store(2, 2, 32, 50, 6, 40, storage="f32", path="callback")
    call = jax.jit(lambda h, k_, v_: engine_store.prefill(h, jnp.zeros((2,), jnp.int32), k_, v_,
                                                          jnp.zeros((2, 2, 100, 40), jnp.int32),
                                                          jnp.full((2,), 100, jnp.int32), sink=0, local=1,
                                                          path="callback"))
    counts = np.asarray(call(store.handle_array, jnp.asarray(k), jnp.asarray(v)))
    assert (counts == -1).all()
    with pytest.raises(PigjaxError, match="capacity"):
        store.close()
    store.check()  # reported once


# ---- append mode (beyond the paper): tokens added after the prefill are sampled like the middle ----

def _append_setup(seed, b=2, hq=6, hkv=2, n=300, d=32, K=6, L=40):
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(d, K * L))
    k = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    return rng, proj, q, k, v, ref.simhash_codes(k, proj, K), ref.simhash_codes(q, proj, K)


@pytest.mark.parametrize("path", ["ffi", "callback"])
def test_append_matches_reference_over_concatenation(path):
    K, L, d, hkv, hq = 6, 40, 32, 2, 6
    rng, proj, q, k, v, k_codes, q_codes = _append_setup(11, K=K, L=L)
    lengths = np.array([300, 170], np.int32)  # ragged middles (sink = local = 0)
    chunks = []  # (keys, values, codes, counts) per append call; ragged counts per row
    for t, counts in ((50, [50, 17]), (30, [9, 30])):
        ka = rng.normal(size=(2, hkv, t, d)).astype(np.float32)
        va = rng.normal(size=(2, hkv, t, d)).astype(np.float32)
        ca = ref.simhash_codes(ka, proj, K)
        ca[1, :, counts[1]:] = -7  # codes past a row's count are never read
        chunks.append((ka, va, ca, np.array(counts, np.int32)))
    with Store(3, hkv, d, 400, K, L, storage="f32", path=path) as store:
        slots = jnp.asarray([2, 0], jnp.int32)
        dep = store.prefill(slots, jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_codes), jnp.asarray(lengths),
                            sink=0, local=0)
        for ka, va, ca, counts in chunks:
            dep = store.append(slots, jnp.asarray(ka), jnp.asarray(va), jnp.asarray(ca), jnp.asarray(counts), dep)
        out, lse, sampled = store.query(slots, jnp.asarray(q), jnp.asarray(q_codes), dep)
        info = store.info()
    np.testing.assert_array_equal(np.asarray(dep), lengths + 59 + np.array([0, -12]))
    assert info["appended_counts"] == [47, 0, 59] and info["middle_counts"] == [170, 0, 300]
    assert info["bytes_per_appended_token"] == 2 * 4 * d + 4 + 4 * L
    for r in range(2):
        parts = [(k[r][:, :lengths[r]], v[r][:, :lengths[r]], k_codes[r][:, :lengths[r]])]
        parts += [(ka[r][:, :c[r]], va[r][:, :c[r]], ca[r][:, :c[r]]) for ka, va, ca, c in chunks]
        kk, vv, cc = (np.concatenate(x, axis=1) for x in zip(*parts))
        o_s, lse_s, count, mask = ref.sampled_attention(q[r], kk, vv, cc, q_codes[r], K, L)
        assert mask[:, lengths[r]:].any(), "some appended token should be sampled"
        np.testing.assert_array_equal(np.asarray(sampled[r]), count)
        rel = np.abs(np.asarray(out[r]) - o_s).max() / np.abs(o_s).max()
        assert rel < 1e-5, rel
        np.testing.assert_allclose(np.asarray(lse[r]), lse_s, rtol=1e-5, atol=1e-5)


def test_append_estimator_stays_unbiased():
    """As test_importance_weights_are_unbiased, with 250 keys prefilled and 150 appended."""
    rng = np.random.default_rng(3)
    trials, n, n0, d, K, L, eps = 600, 400, 250, 16, 3, 8, 1e-4
    k, v, q, s, u, k_codes, q_codes = _unbiased_setup(rng, trials, n, d, K, L)
    kb = np.broadcast_to(k, (trials, 1, n, d)).astype(np.float32)
    vb = np.broadcast_to(v, (trials, 1, n, d)).astype(np.float32)
    with Store(trials, 1, d, n, K, L, eps, storage="f32") as store:
        slots = jnp.arange(trials, dtype=jnp.int32)
        dep = store.prefill(slots, jnp.asarray(kb[:, :, :n0]), jnp.asarray(vb[:, :, :n0]),
                            jnp.asarray(k_codes[:, :, :n0]), jnp.full((trials,), n0, jnp.int32), sink=0, local=0)
        dep = store.append(slots, jnp.asarray(kb[:, :, n0:]), jnp.asarray(vb[:, :, n0:]),
                           jnp.asarray(k_codes[:, :, n0:]), jnp.full((trials,), n - n0, jnp.int32), dep)
        out, lse, sampled = store.query(slots, jnp.asarray(np.broadcast_to(q, (trials, 1, d)), jnp.float32),
                                        jnp.asarray(q_codes), dep)
    assert np.all(np.asarray(dep) == n)
    exp_denom, se, keep = _check_unbiased(out, lse, sampled, s, u, v, eps)
    # Dropping the appended tokens (the paper's store) would be visibly biased.
    assert abs((np.exp(s[:n0]) * keep[:n0]).sum() - exp_denom) > 8 * se


def test_append_bad_input_raises_clear_errors():
    K, L, d = 6, 40, 32
    rng, proj, q, k, v, k_codes, q_codes = _append_setup(5, hq=2, hkv=1, n=40, K=K, L=L)
    store = Store(3, 1, d, 50, K, L, storage="f32")
    slots = jnp.asarray([0, 1], jnp.int32)
    kk, vv, cc = jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_codes)
    dep = store.prefill(slots, kk, vv, cc, jnp.asarray([40, 40], jnp.int32), sink=0, local=0)
    ka, va, ca = kk[:, :, :8], vv[:, :, :8], cc[:, :, :8]
    with pytest.raises(PigjaxError, match="counts must be a rank-1 int32"):
        store.append(slots, ka, va, ca, jnp.full((2,), 8, jnp.float32), dep)
    with pytest.raises(PigjaxError, match="keys must be a rank-4 float32"):
        store.append(slots, ka[0], va, ca, jnp.full((2,), 8, jnp.int32), dep)
    engine_errors = [
        (lambda: store.append(slots, ka, va, ca, jnp.asarray([8, 11], jnp.int32), dep), r"counts\[1\] = 11 is outside"),
        (lambda: store.append(slots, ka, va, ca, jnp.asarray([-1, 0], jnp.int32), dep), "outside"),
        (lambda: store.append(slots, ka, va, ca.at[1, 0, 3, 7].set(64), jnp.full((2,), 8, jnp.int32), dep),
         r"codes\[1, 0, 3, 7\] = 64 is outside"),
        (lambda: store.append(jnp.asarray([0, 2], jnp.int32), ka, va, ca, jnp.full((2,), 8, jnp.int32), dep),
         "prefill the slot first"),
        (lambda: store.append(jnp.asarray([0, 0], jnp.int32), ka, va, ca, jnp.full((2,), 8, jnp.int32), dep), "more than once"),
        (lambda: store.append(slots, kk[:, :, :11], vv[:, :, :11], cc[:, :, :11], jnp.asarray([8, 11], jnp.int32), dep),
         "exceeds the store capacity 50"),
        (lambda: store.append(slots, ka, va, ca[:, :, :, :5], jnp.full((2,), 8, jnp.int32), dep), "codes must have shape"),
    ]
    for call, message in engine_errors:
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call())
    assert store.info()["appended_counts"] == [0, 0, 0]  # failed appends change nothing
    # A bad code past a row's count is never read; appending up to the capacity works.
    totals = store.append(slots, kk[:, :, :10], vv[:, :, :10], cc[:, :, :10].at[0, 0, 9, 0].set(-3),
                          jnp.asarray([9, 10], jnp.int32), dep)
    np.testing.assert_array_equal(np.asarray(totals), [49, 50])
    with pytest.raises(Exception, match="capacity"):
        jax.block_until_ready(store.append(slots, ka, va, ca, jnp.asarray([0, 1], jnp.int32), totals))
    assert store.info()["appended_counts"] == [9, 10, 0]
    store.close()
    with pytest.raises(Exception, match="(?i)handle"):
        jax.block_until_ready(store.append(slots, ka, va, ca, jnp.full((2,), 8, jnp.int32), dep))


def test_prefill_again_clears_appended_tokens():
    K, L, d, hkv = 6, 40, 32, 2
    rng, proj, q, k, v, k_codes, q_codes = _append_setup(8, b=1, K=K, L=L)
    with Store(1, hkv, d, 400, K, L, storage="f32") as store:
        slots = jnp.zeros((1,), jnp.int32)
        lengths = jnp.asarray([120], jnp.int32)
        dep = store.prefill(slots, jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_codes), lengths, sink=0, local=0)
        dep = store.append(slots, jnp.asarray(k[:, :, 120:]), jnp.asarray(v[:, :, 120:]),
                           jnp.asarray(k_codes[:, :, 120:]), jnp.asarray([180], jnp.int32), dep)
        assert int(dep[0]) == 300 and store.info()["appended_counts"] == [180]
        dep = store.prefill(slots, jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_codes), lengths, sink=0, local=0)
        assert int(dep[0]) == 120 and store.info()["appended_counts"] == [0]
        out, lse, sampled = store.query(slots, jnp.asarray(q), jnp.asarray(q_codes), dep)
        o_s, lse_s, count, _ = ref.sampled_attention(q[0], k[0][:, :120], v[0][:, :120], k_codes[0][:, :120],
                                                     q_codes[0], K, L)
        np.testing.assert_array_equal(np.asarray(sampled[0]), count)
        np.testing.assert_allclose(np.asarray(out[0]), o_s, rtol=1e-5, atol=1e-5)
        # Appending after the new prefill starts from an empty buffer again.
        dep = store.append(slots, jnp.asarray(k[:, :, 120:]), jnp.asarray(v[:, :, 120:]),
                           jnp.asarray(k_codes[:, :, 120:]), jnp.asarray([5], jnp.int32), dep)
        assert int(dep[0]) == 125 and store.info()["appended_counts"] == [5]


@pytest.mark.parametrize("split", [0, 1, 2])
@pytest.mark.parametrize("storage, cap", [("f32", 1.0), ("bf16", 1.0), ("f32", 0.01)])
def test_query_split_within_kv_head_matches_reference(split, storage, cap):
    """Batch-1 parallelism: one task per KV head (0), each (row, KV head)'s candidates split over
    threads and merged by log-sum-exp (1), or tasks per part of a KV head's query heads (2); with
    and without a binding sample cap (30 of 3000 keys)."""
    from pigjax.engine import native
    K, L, d, hkv, hq = 6, 40, 32, 3, 9
    rng, proj, q, k, v, k_codes, q_codes = _append_setup(21, b=1, hq=hq, hkv=hkv, n=3000, d=d, K=K, L=L)
    eng = native._engine
    old = eng.get_query_split()
    eng.set_query_split(split)
    try:
        with Store(1, hkv, d, 3000, K, L, storage=storage) as store:
            slots = jnp.zeros((1,), jnp.int32)
            dep = store.prefill(slots, jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_codes),
                                jnp.asarray([2600], jnp.int32), sink=0, local=0)
            dep = store.append(slots, jnp.asarray(k[:, :, 2600:]), jnp.asarray(v[:, :, 2600:]),
                               jnp.asarray(k_codes[:, :, 2600:]), jnp.asarray([400], jnp.int32), dep)
            out, lse, sampled = store.query(slots, jnp.asarray(q), jnp.asarray(q_codes), dep, sample_cap=cap)
    finally:
        eng.set_query_split(old)
    kr = k[0] if storage == "f32" else np.asarray(jnp.asarray(k[0]).astype(jnp.bfloat16).astype(jnp.float32))
    vr = v[0] if storage == "f32" else np.asarray(jnp.asarray(v[0]).astype(jnp.bfloat16).astype(jnp.float32))
    o_s, lse_s, count, _ = ref.sampled_attention(q[0], kr, vr, k_codes[0], q_codes[0], K, L, sample_cap=cap)
    np.testing.assert_array_equal(np.asarray(sampled[0]), count)
    assert count.min() > 0
    if cap < 1:
        uncapped = ref.sampled_attention(q[0], kr, vr, k_codes[0], q_codes[0], K, L)[2]
        assert np.all(count == 30) and np.all(uncapped > 30)
    rel = np.abs(np.asarray(out[0]) - o_s).max() / np.abs(o_s).max()
    assert rel < (1e-5 if storage == "f32" else 1e-4), rel
    np.testing.assert_allclose(np.asarray(lse[0]), lse_s, rtol=1e-5, atol=1e-5)


def test_query_split_rejects_unknown_mode():
    from pigjax.engine import native
    old = native._engine.get_query_split()
    for bad in (-2, 3):
        with pytest.raises(ValueError, match="mode must be -1, 0, 1 or 2"):
            native._engine.set_query_split(bad)
    assert native._engine.get_query_split() == old
