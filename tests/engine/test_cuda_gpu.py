"""The CUDA store handlers (pigjax._engine_cuda) on a real GPU: run by scripts/device_check.sh, which
builds the module (-DPIGJAX_CUDA=ON); skipped where JAX's default device is not a CUDA GPU or the
module is missing. (Their host logic is tested on the CPU by test_cuda_handlers.py.) Names avoid
"ffi": device_check.sh's default selection deselects the CPU FFI tests with -k "not ffi"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.attention import lsh_attention
from pigjax.engine import Store, native
from pigjax.engine import store as engine_store

if not native.cuda_handlers():
    pytest.skip(f"CUDA handlers unavailable: {native.cuda_unavailable_reason()}", allow_module_level=True)

CUDA = "cuda-ffi"


def _data(seed, b=2, hkv=2, hq=6, n=300, d=32, K=6, L=40, T=8):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    codes = lambda *s: jnp.asarray(rng.integers(0, 2**K, size=s, dtype=np.int32))  # noqa: E731
    return dict(keys=f(b, hkv, n, d), values=f(b, hkv, n, d), codes=codes(b, hkv, n, L),
                lengths=jnp.asarray(rng.integers(n // 2, n + 1, size=b), jnp.int32),
                q=f(b, hq, d), q_codes=codes(b, hq, L), ak=f(b, hkv, T, d), av=f(b, hkv, T, d),
                ac=codes(b, hkv, T, L), counts=jnp.asarray(rng.integers(0, T + 1, size=b), jnp.int32))


def _run(path, x, storage):
    slots = jnp.arange(2, dtype=jnp.int32)[::-1]
    with Store(3, 2, 32, 316, 6, 40, storage=storage, path=path) as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=2, local=5)
        first = s.query(slots, x["q"], x["q_codes"], middle)
        totals = s.append(slots, x["ak"], x["av"], x["ac"], x["counts"], middle)
        second = s.query(slots, x["q"], x["q_codes"], totals)
        return jax.tree.map(np.asarray, (middle, first, totals, second))


def test_default_path_on_a_gpu_is_the_cuda_handler():
    assert engine_store.default_path() == CUDA


@pytest.mark.parametrize("path", [CUDA, "cuda-async"])
@pytest.mark.parametrize("storage", ["f32", "bf16"])
def test_cuda_handler_equals_callback_bit_for_bit(storage, path):
    x = _data(0)
    want = _run("callback", x, storage)
    got = _run(path, x, storage)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(g, w)
    assert want[1][2].sum() > 0


@pytest.mark.parametrize("path", [CUDA, "cuda-async"])
def test_lsh_attention_cuda_equals_callback(path):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 6, 32)).astype(np.float32)
    k = (rng.normal(size=(2, 2, 500, 32)) + 2.0).astype(np.float32)
    v = rng.normal(size=(2, 2, 500, 32)).astype(np.float32)
    proj = rng.normal(size=(32, 240)).astype(np.float32)
    a = lsh_attention(q, k, v, proj, K=6, L=40, path="callback")
    b = lsh_attention(q, k, v, proj, K=6, L=40, path=path)
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0]))
    np.testing.assert_array_equal(np.asarray(b[1]), np.asarray(a[1]))


@pytest.mark.parametrize("path", [CUDA, "cuda-async"])
def test_calls_run_every_scan_step_in_order(path):
    d, n = 8, 100
    codes = jnp.zeros((1, 1, n, 4), jnp.int32)
    q_codes = jnp.zeros((1, 1, 4), jnp.int32)
    slots = jnp.zeros((1,), jnp.int32)
    keys = jnp.zeros((1, 1, n, d), jnp.float32)
    with Store(1, 1, d, n, 2, 4, storage="f32", path=path) as store:
        @jax.jit
        def run(q):
            def step(carry, t):
                values = jnp.full((1, 1, n, d), t, jnp.float32)
                counts = store.prefill(slots, keys, values, codes, jnp.full((1,), n, jnp.int32), sink=0, local=1)
                out, _, sampled = store.query(slots, q, q_codes, counts)
                return carry + 1, (out[0, 0, 0], sampled[0, 0])
            return jax.lax.scan(step, 0, jnp.arange(5, dtype=jnp.float32))[1]

        # read inside the block: the store must outlive the program's queued (cuda-async) calls
        outs, sampled = jax.block_until_ready(run(jnp.ones((1, 1, d), jnp.float32)))
    assert np.allclose(np.asarray(outs), np.arange(5)) and np.all(np.asarray(sampled) == n - 1)


@pytest.mark.parametrize("path", [CUDA, "cuda-async", "callback"])
def test_close_waits_for_the_programs_that_use_the_store(path):
    # The jitted call returns before the GPU ran its engine calls; close() must let them run
    # before it frees the store (cuda-async failed this on an H200 before close waited).
    d, n = 8, 100
    codes, q_codes = jnp.zeros((1, 1, n, 4), jnp.int32), jnp.zeros((1, 1, 4), jnp.int32)
    slots, keys = jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, n, d), jnp.float32)
    with Store(1, 1, d, n, 2, 4, storage="f32", path=path) as store:
        @jax.jit
        def run(q):
            def step(carry, t):
                counts = store.prefill(slots, keys, jnp.full((1, 1, n, d), t, jnp.float32), codes,
                                       jnp.full((1,), n, jnp.int32), sink=0, local=1)
                return carry, store.query(slots, q, q_codes, counts)[0][0, 0, 0]
            return jax.lax.scan(step, 0, jnp.arange(50, dtype=jnp.float32))[1]

        outs = run(jnp.ones((1, 1, d), jnp.float32))
    np.testing.assert_array_equal(np.asarray(outs), np.arange(50, dtype=np.float32))


def test_bad_input_raises_and_later_calls_work():
    x = _data(2)
    slots = jnp.arange(2, dtype=jnp.int32)
    s = Store(3, 2, 32, 200, 6, 40, storage="f32", path=CUDA)
    full = jnp.full((2,), 300, jnp.int32)
    with pytest.raises(Exception, match="pigjax_cuda_lsh_prefill: row 0: middle count 299 .* capacity 200"):
        jax.block_until_ready(s.prefill(slots, x["keys"], x["values"], x["codes"], full, sink=0, local=1))
    with pytest.raises(Exception, match=r"pigjax_cuda_lsh_prefill: slots\[1\] = 5 is out of range"):
        jax.block_until_ready(s.prefill(jnp.asarray([0, 5], jnp.int32), x["keys"], x["values"], x["codes"],
                                        full // 2, sink=0, local=1))
    middle = s.prefill(slots, x["keys"], x["values"], x["codes"], full // 2, sink=0, local=1)
    with pytest.raises(Exception, match="pigjax_cuda_lsh_query: the number of query heads"):
        jax.block_until_ready(s.query(slots, x["q"][:, :5], x["q_codes"][:, :5], middle))
    out = s.query(slots, x["q"], x["q_codes"], middle)
    assert np.isfinite(np.asarray(out[0])).all()
    s.close()
    with pytest.raises(Exception, match="pigjax_cuda_lsh_query: .*handle"):
        jax.block_until_ready(s.query(slots, x["q"], x["q_codes"], middle))
    with Store(1, 2, 32, 200, 6, 40, storage="f32", path=CUDA) as s2:  # the process lives on
        m = s2.prefill(slots[:1], x["keys"][:1], x["values"][:1], x["codes"][:1], full[:1] // 2, sink=0, local=1)
        assert np.isfinite(np.asarray(s2.query(slots[:1], x["q"][:1], x["q_codes"][:1], m)[0])).all()


def test_async_errors_are_deferred_and_later_calls_work():
    """cuda-async on the GPU: an engine error found when the stream runs the host function gives
    NaN / -1 results and is raised by the Store; the stream and the process carry on."""
    x = _data(2)
    slots = jnp.arange(2, dtype=jnp.int32)
    with Store(3, 2, 32, 316, 6, 40, storage="f32", path="cuda-async") as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
        with pytest.raises(Exception, match=r"pigjax_cuda_async_lsh_query: q_codes\[0, 0, \d+\] = -1 is outside"):
            s.query(slots, x["q"], x["q_codes"] - 1, middle)
        bad = jax.jit(lambda h, q: engine_store.query(h, slots, q, x["q_codes"] - 1, middle, path="cuda-async"))
        out, lse, sampled = jax.tree.map(np.asarray, bad(s.handle_array, x["q"]))
        assert np.isnan(out).all() and (sampled == -1).all()
        with pytest.raises(Exception, match="pigjax_cuda_async_lsh_query"):
            s.check()
        out = s.query(slots, x["q"], x["q_codes"], middle)
        assert np.isfinite(np.asarray(out[0])).all()


@pytest.mark.parametrize("path", [CUDA, "cuda-async"])
def test_ranked_query_equals_callback_bit_for_bit(path):
    x = _data(7)
    slots = jnp.arange(2, dtype=jnp.int32)

    def ranked(p):
        with Store(2, 2, 32, 316, 6, 40, storage="bf16", path=p, sketch_tables=10) as s:
            middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=2, local=5)
            return jax.tree.map(np.asarray, s.query_ranked(slots, x["q"], x["q_codes"], middle, rank_tables=10,
                                                           top=0.05, refine=2.0))

    want, got = ranked("callback"), ranked(path)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    assert want[3].sum() > 0


def test_async_prefill_program_ends_before_its_tables_are_built():
    """cuda-async: the prefill's program finishes while its table build is held on the engine's
    background thread; the next query waits for the build and equals the callback path's."""
    x = _data(5)
    slots = jnp.arange(2, dtype=jnp.int32)
    with Store(2, 2, 32, 316, 6, 40, storage="bf16", path="callback") as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=2, local=5)
        want = jax.tree.map(np.asarray, (middle, s.query(slots, x["q"], x["q_codes"], middle)))
    prefill = jax.jit(lambda h, k: engine_store.prefill(h, slots, k, x["values"], x["codes"], x["lengths"],
                                                         sink=2, local=5, path="cuda-async"))
    with Store(2, 2, 32, 316, 6, 40, storage="bf16", path="cuda-async") as s:
        jax.block_until_ready(prefill(s.handle_array, x["keys"]))  # compile
        assert native._engine.store_wait_builds(s.handle)
        native._engine.hold_background(True)
        try:
            middle = jax.block_until_ready(prefill(s.handle_array, x["keys"]))
            assert native._engine.store_pending_builds(s.handle) == 1
        finally:
            native._engine.hold_background(False)
        got = jax.tree.map(np.asarray, (middle, s.query(slots, x["q"], x["q_codes"], middle)))
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(g, w)
