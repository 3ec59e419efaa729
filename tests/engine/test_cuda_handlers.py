"""The CUDA store handlers (ffi/src/cuda_handlers.cc) on the CPU: the same source compiled against a
fake CUDA runtime (ffi/tests/fake_cuda: device memory is host memory, copies run at the stream's
synchronization) into the test-only module pigjax._engine_cuda_fake, registered for the CPU platform
as pigjax_test_cuda_lsh_*. The "cuda-ffi" path then runs the handler's full host logic (staging,
copies, one synchronization per call, the engine through engine_api.h, error paths), and its
results must equal the CPU "ffi" path's bit for bit. The module is (re)built here by
scripts/test_cuda_handlers.sh (BUILD_ONLY=1, CMake -DPIGJAX_CUDA_FAKE=ON, build/cuda-test).
On a GPU, the device script runs the real module (scripts/device_check.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax import PigjaxError
from pigjax.attention import lsh_attention
from pigjax.engine import Store, native
from pigjax.engine import store as engine_store

def _build_fake():
    """(Re)build the fake-runtime module (a no-op when up to date): the normal build leaves it out.
    PIGJAX_FAKE_CUDA_PREBUILT=1 (the sanitized run of scripts/test_cuda_handlers.sh, from a copy of
    the tree with its own modules) only loads it."""
    if os.environ.get("PIGJAX_FAKE_CUDA_PREBUILT") == "1":
        return native.load_fake_cuda_handlers()
    root = Path(__file__).parents[2]
    env = dict(os.environ, PYTHON=sys.executable, BUILD_ONLY="1", CUDA="OFF")
    proc = subprocess.run(["bash", str(root / "scripts" / "test_cuda_handlers.sh")], cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return native.load_fake_cuda_handlers()


@pytest.fixture(scope="module")
def fake():
    """Built when a test of this file first runs (not at collection: each pytest-xdist worker collects
    every file, and only the one that runs this file should build)."""
    return _build_fake()


@pytest.fixture(autouse=True)
def fake_cuda_path(monkeypatch, fake):
    """Route the "cuda-ffi" and "cuda-async" paths to the fake-runtime targets (registered for the CPU)."""
    monkeypatch.setitem(engine_store._FFI_TARGETS, "cuda-ffi", "pigjax_test_cuda_lsh")
    monkeypatch.setitem(engine_store._FFI_TARGETS, "cuda-async", "pigjax_test_cuda_async_lsh")
    monkeypatch.setattr(native, "cuda_handlers", lambda: True)
    fake.fail_after(-1)
    yield
    fake.fail_after(-1)


def _data(seed, b=2, hkv=2, hq=6, n=300, d=32, K=6, L=40, T=8):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    codes = lambda *s: jnp.asarray(rng.integers(0, 2**K, size=s, dtype=np.int32))  # noqa: E731
    return dict(keys=f(b, hkv, n, d), values=f(b, hkv, n, d), codes=codes(b, hkv, n, L),
                lengths=jnp.asarray(rng.integers(n // 2, n + 1, size=b), jnp.int32),
                q=f(b, hq, d), q_codes=codes(b, hq, L), ak=f(b, hkv, T, d), av=f(b, hkv, T, d),
                ac=codes(b, hkv, T, L), counts=jnp.asarray(rng.integers(0, T + 1, size=b), jnp.int32))


def _run(path, x, storage, b=2, hkv=2, d=32, n=300, K=6, L=40):
    slots = jnp.arange(b, dtype=jnp.int32)[::-1]
    with Store(b + 1, hkv, d, n + 16, K, L, storage=storage, path=path) as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=2, local=5)
        first = s.query(slots, x["q"], x["q_codes"], middle)
        totals = s.append(slots, x["ak"], x["av"], x["ac"], x["counts"], middle)
        second = s.query(slots, x["q"], x["q_codes"], totals)
        return jax.tree.map(np.asarray, (middle, first, totals, second))


@pytest.mark.parametrize("path", ["cuda-ffi", "cuda-async"])
@pytest.mark.parametrize("storage", ["f32", "bf16"])
def test_cuda_handlers_equal_cpu_ffi_bit_for_bit(storage, path):
    x = _data(0)
    want = _run("ffi", x, storage)
    got = _run(path, x, storage)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_array_equal(g, w)
    assert want[1][2].sum() > 0  # something was sampled


@pytest.mark.parametrize("path", ["cuda-ffi", "cuda-async"])
def test_lsh_attention_cuda_path_equals_callback_path(path):
    """End to end (SimHash codes in jnp on both paths, as on a GPU)."""
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 6, 32)).astype(np.float32)
    k = (rng.normal(size=(2, 2, 500, 32)) + 2.0).astype(np.float32)
    v = rng.normal(size=(2, 2, 500, 32)).astype(np.float32)
    proj = rng.normal(size=(32, 240)).astype(np.float32)
    a = lsh_attention(q, k, v, proj, K=6, L=40, path="callback")
    b = lsh_attention(q, k, v, proj, K=6, L=40, path=path)
    np.testing.assert_array_equal(np.asarray(b[1]), np.asarray(a[1]))
    np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a[0]))


def test_one_synchronization_and_exact_copies_per_call(fake):
    """A query copies handle, slots, q and q_codes to the host, synchronizes once and copies out,
    lse and sampled back (dep is never copied); a jitted loop of queries makes one round trip each."""
    b, hq, d, L = 2, 6, 32, 40
    x = _data(1)
    with Store(b, 2, d, 400, 6, L, storage="f32", path="cuda-ffi") as s:
        slots = jnp.arange(b, dtype=jnp.int32)
        middle = jax.block_until_ready(
            s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1))

        @jax.jit
        def steps(q):
            def body(carry, _):
                out, lse, sampled = engine_store.query(s.handle_array, slots, q + carry, x["q_codes"], middle,
                                                       path="cuda-ffi")
                return carry + 1.0, sampled
            return jax.lax.scan(body, 0.0, None, length=5)[1]

        jax.block_until_ready(steps(x["q"]))  # compile and warm up
        fake.reset_counters()
        jax.block_until_ready(steps(x["q"]))
        c = fake.counters()
    assert c["stream_syncs"] == 5
    assert c["d2h_copies"] == 5 * 4 and c["h2d_copies"] == 5 * 3
    assert c["d2h_bytes"] == 5 * (4 + 4 * b + 4 * b * hq * d + 4 * b * hq * L)
    assert c["h2d_bytes"] == 5 * (4 * b * hq * d + 4 * b * hq + 4 * b * hq)
    # Staging is per host thread: the 5 queries reuse one buffer (at most one allocation, should
    # XLA run this program on a thread that has not staged a call yet).
    assert c["host_allocs"] <= 1
    assert fake.staging_bytes() >= 2 * 4 * b * 2 * 300 * d  # it holds the prefill's keys and values


def _expect(call, message):
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(call())


def test_bad_input_same_errors_as_cpu_path():
    """Each engine error names the CUDA target with the CPU path's message; later calls work."""
    x = _data(2)
    b = 2
    s = Store(3, 2, 32, 200, 6, 40, storage="f32", path="cuda-ffi")
    slots = jnp.arange(b, dtype=jnp.int32)
    k, v, c = x["keys"], x["values"], x["codes"]
    full = jnp.full((b,), 300, jnp.int32)
    _expect(lambda: s.prefill(slots, k, v, c, full, sink=0, local=1),
            r"pigjax_test_cuda_lsh_prefill: row 0: middle count 299 .* exceeds the store capacity 200")
    _expect(lambda: s.prefill(jnp.asarray([0, 5], jnp.int32), k, v, c, x["lengths"] // 2, sink=0, local=1),
            r"pigjax_test_cuda_lsh_prefill: slots\[1\] = 5 is out of range \[0, 3\)")
    _expect(lambda: s.prefill(slots, k[:, :1], v[:, :1], c[:, :1], x["lengths"] // 2, sink=0, local=1),
            r"pigjax_test_cuda_lsh_prefill: keys must have shape \[B=2, Hkv=2, n, d=32\], got \[2, 1, 300, 32\]")
    _expect(lambda: s.prefill(slots, k, v, c.at[1, 1, 7, 3].set(64), full // 2, sink=0, local=1),
            r"codes\[1, 1, 7, 3\] = 64 is outside \[0, 2\^K=64\)")
    assert s.info()["prefilled"] == [False, False, False]  # failed calls changed nothing
    middle = s.prefill(slots, k, v, c, full // 2, sink=0, local=1)
    _expect(lambda: s.query(slots, x["q"][:, :5], x["q_codes"][:, :5], middle),
            r"pigjax_test_cuda_lsh_query: the number of query heads \(5\) must be a positive multiple")
    _expect(lambda: s.query(slots, x["q"], x["q_codes"] - 1, middle), r"q_codes\[0, 0, \d+\] = -1 is outside")
    _expect(lambda: s.append(slots, x["ak"], x["av"], x["ac"], jnp.asarray([8, 9], jnp.int32), middle),
            r"pigjax_test_cuda_lsh_append: counts\[1\] = 9 is outside \[0, T=8\]")
    out = s.query(slots, x["q"], x["q_codes"], middle)
    assert np.isfinite(np.asarray(out[0])).all()
    s.close()
    _expect(lambda: s.query(slots, x["q"], x["q_codes"], middle), r"pigjax_test_cuda_lsh_query: .*handle")


# Runtime calls of a query after a successful call (staging large enough, its event pending):
# cuda-ffi: 0 cudaEventSynchronize, 1-4 cudaMemcpyAsync D2H, 5 cudaStreamSynchronize, 6-8 H2D,
# 9 cudaEventRecord; cuda-async: 0 cudaEventQuery (its pool's buffer), 1-4 D2H, 5 cudaLaunchHostFunc,
# 6-8 H2D, 9 cudaEventRecord.
@pytest.mark.parametrize("path, target, n, what", [
    *[("cuda-ffi", "pigjax_test_cuda_lsh_query", n, what)
      for n, what in [(0, "cudaEventSynchronize"), (2, r"cudaMemcpyAsync \(device to host\)"),
                      (5, "cudaStreamSynchronize"), (7, r"cudaMemcpyAsync \(host to device\)"), (9, "cudaEventRecord")]],
    *[("cuda-async", "pigjax_test_cuda_async_lsh_query", n, what)
      for n, what in [(0, "cudaEventQuery"), (2, r"cudaMemcpyAsync \(device to host\)"),
                      (5, "cudaLaunchHostFunc"), (7, r"cudaMemcpyAsync \(host to device\)"), (9, "cudaEventRecord")]]])
def test_cuda_runtime_failure_is_internal_error_and_recovers(path, target, n, what, fake):
    x = _data(4)
    slots = jnp.arange(2, dtype=jnp.int32)
    with Store(2, 2, 32, 400, 6, 40, storage="f32", path=path) as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
        want = jax.tree.map(np.asarray, s.query(slots, x["q"], x["q_codes"], middle))
        fake.fail_after(n, 719)
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=f"INTERNAL: .*{target}: {what} failed: unspecified launch"):
            jax.block_until_ready(engine_store.query(s.handle_array, slots, x["q"], x["q_codes"], middle, path=path))
        got = jax.tree.map(np.asarray, s.query(slots, x["q"], x["q_codes"], middle))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_staging_grows_for_a_larger_call(fake):
    x = _data(5, n=64)
    y = _data(6, n=2000)
    slots = jnp.arange(2, dtype=jnp.int32)
    with Store(2, 2, 32, 2000, 6, 40, storage="f32", path="cuda-ffi") as s:
        s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
        fake.reset_counters()
        middle = s.prefill(slots, y["keys"], y["values"], y["codes"], y["lengths"], sink=0, local=1)
        got = jax.tree.map(np.asarray, s.query(slots, y["q"], y["q_codes"], middle))
        assert fake.counters()["host_allocs"] >= 1
    with Store(2, 2, 32, 2000, 6, 40, storage="f32", path="ffi") as s:
        middle = s.prefill(slots, y["keys"], y["values"], y["codes"], y["lengths"], sink=0, local=1)
        want = jax.tree.map(np.asarray, s.query(slots, y["q"], y["q_codes"], middle))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_unavailable_cuda_path_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "cuda_handlers", lambda: False)
    monkeypatch.setattr(native, "cuda_unavailable_reason", lambda: "no GPU here")
    with pytest.raises(PigjaxError, match="path 'cuda-ffi' is not available: no GPU here"):
        Store(1, 1, 8, 10, 4, 4, path="cuda-ffi")
    with pytest.raises(PigjaxError, match="path must be"):
        Store(1, 1, 8, 10, 4, 4, path="cuda")


def _jitted_queries(s, slots, x, middle, path, steps=5):
    @jax.jit
    def run(q):
        def body(carry, _):
            out, lse, sampled = engine_store.query(s.handle_array, slots, q + carry, x["q_codes"], middle, path=path)
            return carry + 1.0, (out, sampled)
        return jax.lax.scan(body, 0.0, None, length=steps)[1]
    return run


def test_async_query_never_synchronizes(fake):
    """cuda-async: a query enqueues its copies, one host function (the engine) and the copies back,
    and returns: no stream synchronization on the calling thread, the same bytes as cuda-ffi, and
    its staging buffers are reused once their copies completed."""
    b, hq, d, L = 2, 6, 32, 40
    x = _data(1)
    with Store(b, 2, d, 400, 6, L, storage="f32", path="cuda-async") as s:
        slots = jnp.arange(b, dtype=jnp.int32)
        middle = jax.block_until_ready(
            s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1))
        run = _jitted_queries(s, slots, x, middle, "cuda-async")
        jax.block_until_ready(run(x["q"]))  # compile and warm up
        fake.reset_counters()
        got = jax.tree.map(np.asarray, run(x["q"]))
        c = fake.counters()
        s.check()
    assert c["stream_syncs"] == 0 and c["event_syncs"] == 0
    assert c["host_funcs"] == 5 and c["event_records"] == 5
    assert c["d2h_copies"] == 5 * 4 and c["h2d_copies"] == 5 * 3
    assert c["d2h_bytes"] == 5 * (4 + 4 * b + 4 * b * hq * d + 4 * b * hq * L)
    assert c["host_allocs"] <= 1
    with Store(b, 2, d, 400, 6, L, storage="f32", path="ffi") as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
        want = jax.tree.map(np.asarray, _jitted_queries(s, slots, x, middle, "ffi")(x["q"]))
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_async_errors_are_deferred_to_the_store():
    """cuda-async: an engine error found on the stream gives NaN / -1 results and is raised by the
    Store (eager calls at once, jitted callers at check() / close() or raise_callback_error), with
    the engine's message naming the async target; later calls work. A handle of the wrong rank is
    known before the data arrive: JAX raises it at once."""
    x = _data(2)
    b = 2
    slots = jnp.arange(b, dtype=jnp.int32)
    s = Store(3, 2, 32, 400, 6, 40, storage="f32", path="cuda-async")
    middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
    with pytest.raises(PigjaxError, match=r"pigjax_test_cuda_async_lsh_query: q_codes\[0, 0, \d+\] = -1 is outside"):
        s.query(slots, x["q"], x["q_codes"] - 1, middle)
    with pytest.raises(PigjaxError, match=r"pigjax_test_cuda_async_lsh_append: counts\[1\] = 9 is outside \[0, T=8\]"):
        s.append(slots, x["ak"], x["av"], x["ac"], jnp.asarray([8, 9], jnp.int32), middle)

    bad = jax.jit(lambda h, q: engine_store.query(h, slots, q, x["q_codes"] - 1, middle, path="cuda-async"))
    out, lse, sampled = jax.tree.map(np.asarray, bad(s.handle_array, x["q"]))
    assert np.isnan(out).all() and np.isnan(lse).all() and (sampled == -1).all()
    with pytest.raises(PigjaxError, match="pigjax_test_cuda_async_lsh_query: q_codes"):
        engine_store.raise_callback_error(s.handle)
    engine_store.raise_callback_error(s.handle)  # taken: nothing left

    out = s.query(slots, x["q"], x["q_codes"], middle)
    assert np.isfinite(np.asarray(out[0])).all()
    with pytest.raises(Exception, match="handle must be a rank-0 int32 array, got rank 1"):
        jax.block_until_ready(engine_store._query(jnp.zeros((1,), jnp.int32), slots, x["q"], x["q_codes"], middle,
                                                  sample_cap=1.0, path="cuda-async"))
    handle = s.handle
    s.close()
    with pytest.raises(PigjaxError, match=r"pigjax_test_cuda_async_lsh_query: .*handle"):
        s.query(slots, x["q"], x["q_codes"], middle)
    engine_store.raise_callback_error(handle)


def _ranked(path, x, storage, b=2, hkv=2, d=32, n=300, K=6, L=40, lr=10):
    slots = jnp.arange(b, dtype=jnp.int32)[::-1]
    with Store(b + 1, hkv, d, n + 16, K, L, storage=storage, path=path, sketch_tables=lr) as s:
        middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=2, local=5)
        first = s.query_ranked(slots, x["q"], x["q_codes"], middle, rank_tables=lr, top=0.05, refine=2.0)
        totals = s.append(slots, x["ak"], x["av"], x["ac"], x["counts"], middle)
        second = s.query_ranked(slots, x["q"], x["q_codes"], totals, rank_tables=lr, top=0.05, sample_cap=0.02)
        return jax.tree.map(np.asarray, (first, second))


@pytest.mark.parametrize("path", ["cuda-ffi", "cuda-async"])
@pytest.mark.parametrize("storage", ["f32", "bf16"])
def test_ranked_query_equals_cpu_ffi_bit_for_bit(storage, path):
    x = _data(7)
    want = _ranked("ffi", x, storage)
    got = _ranked(path, x, storage)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_array_equal(g, w)
    assert want[0][2].sum() > 0 and want[0][3].sum() > 0  # keys and values were read


def test_ranked_query_errors_on_both_cuda_paths():
    x = _data(8)
    slots = jnp.arange(2, dtype=jnp.int32)
    for path, target in (("cuda-ffi", "pigjax_test_cuda_lsh_query_ranked"),
                         ("cuda-async", "pigjax_test_cuda_async_lsh_query_ranked")):
        with Store(2, 2, 32, 400, 6, 40, storage="f32", path=path, sketch_tables=10) as s:
            middle = s.prefill(slots, x["keys"], x["values"], x["codes"], x["lengths"], sink=0, local=1)
            _expect(lambda: s.query_ranked(slots, x["q"], x["q_codes"], middle, rank_tables=12, top=0.1),
                    f"{target}: rank_tables must equal the store's sketch_tables = 10")
            out = s.query_ranked(slots, x["q"], x["q_codes"], middle, rank_tables=10, top=0.1)
            assert np.isfinite(np.asarray(out[0])).all()


def _jitted_prefill(s, slots, x, path, lengths=None):
    lengths = x["lengths"] if lengths is None else lengths
    run = jax.jit(lambda h, k: engine_store.prefill(h, slots, k, x["values"], x["codes"], lengths, sink=2, local=5,
                                                     path=path))
    return jax.block_until_ready(run(s.handle_array, x["keys"]))


def test_async_prefill_returns_before_its_tables_are_built(fake):
    """cuda-async: the prefill's host function validates, writes the middle counts and queues the
    table build on the engine's background thread, so the program finishes while the build is held;
    a later call on the store waits for the build inside the engine and gets the same answer as the
    CPU path. The build's staging buffer is kept until the build is done, then reused."""
    x = _data(7)
    slots = jnp.arange(2, dtype=jnp.int32)
    with Store(2, 2, 32, 400, 6, 40, storage="bf16", path="ffi") as s:
        want_middle = np.asarray(_jitted_prefill(s, slots, x, "ffi"))
        want = jax.tree.map(np.asarray, s.query(slots, x["q"], x["q_codes"], jnp.asarray(want_middle)))
    with Store(2, 2, 32, 400, 6, 40, storage="bf16", path="cuda-async") as s:
        _jitted_prefill(s, slots, x, "cuda-async")  # compile
        assert native._engine.store_wait_builds(s.handle)
        fake.reset_counters()
        native._engine.hold_background(True)
        try:
            middle = np.asarray(_jitted_prefill(s, slots, x, "cuda-async"))
            assert native._engine.store_pending_builds(s.handle) == 1
        finally:
            native._engine.hold_background(False)
        got = jax.tree.map(np.asarray, s.query(slots, x["q"], x["q_codes"], jnp.asarray(middle)))
        assert native._engine.store_pending_builds(s.handle) == 0
        c = fake.counters()
        assert c["stream_syncs"] == 0 and c["host_funcs"] >= 1
        assert c["host_allocs"] <= 1  # the second prefill reused the first one's buffer
    np.testing.assert_array_equal(middle, want_middle)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_async_prefill_errors_are_deferred_and_free_the_buffer():
    """An invalid prefill on cuda-async: -1 counts, no build queued, the error raised by the Store
    (eagerly at once, for jitted callers by raise_callback_error) naming the async target; more
    prefills than staging buffers (PIGJAX_CUDA_PREFILL_BUFFERS, 2) then still run."""
    x = _data(8)
    slots = jnp.arange(2, dtype=jnp.int32)
    s = Store(3, 2, 32, 200, 6, 40, storage="f32", path="cuda-async")
    full = jnp.full((2,), 300, jnp.int32)
    with pytest.raises(PigjaxError, match=r"pigjax_test_cuda_async_lsh_prefill: row 0: middle count 293 .* exceeds"):
        s.prefill(slots, x["keys"], x["values"], x["codes"], full, sink=2, local=5)
    counts = np.asarray(_jitted_prefill(s, slots, x, "cuda-async", lengths=full))
    assert (counts == -1).all() and native._engine.store_pending_builds(s.handle) == 0
    with pytest.raises(PigjaxError, match="pigjax_test_cuda_async_lsh_prefill: row 0: middle count"):
        engine_store.raise_callback_error(s.handle)
    assert s.info()["prefilled"] == [False, False, False]
    for _ in range(4):
        middle = _jitted_prefill(s, slots, x, "cuda-async", lengths=full // 2)
    out = s.query(slots, x["q"], x["q_codes"], middle)
    assert np.isfinite(np.asarray(out[0])).all() and s.info()["prefilled"] == [True, True, False]
    s.close()


@pytest.mark.parametrize("path", ["cuda-ffi", "cuda-async"])
def test_generate_with_magicpig_on_cuda_paths_equals_cpu_path(path, fake):
    """pigjax.generate end to end (the tables built at the fork, background-built on cuda-async,
    then decode steps that query them): the same tokens as the CPU path, and the cache is complete
    when generate reports its build time."""
    import pigjax
    from pigjax import LlamaConfig
    from pigjax.models import llama

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    params = llama.LlamaModel(config).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    model = pigjax.Model(config, jax.tree.map(lambda p: p * 2.0 if p.ndim > 1 else p, params))
    prompts = np.random.default_rng(0).integers(0, 97, (2, 300)).tolist()
    want = pigjax.generate(model, prompts, max_new_tokens=12, attention=pigjax.MagicPIG(K=6, L=30, path="ffi"))
    fake.reset_counters()
    got = pigjax.generate(model, prompts, max_new_tokens=12, attention=pigjax.MagicPIG(K=6, L=30, path=path))
    c = fake.counters()
    assert c["d2h_copies"] > 0 and (c["host_funcs"] > 0) == (path == "cuda-async")
    assert got.tokens == want.tokens
    assert got.stats["fraction_read"] == want.stats["fraction_read"] > 0


def test_bad_prefill_buffers_variable_is_a_clear_error():
    """PIGJAX_CUDA_PREFILL_BUFFERS outside [1, 64] fails the async prefill with a message naming it
    (in a child process: the pool is sized once per thread)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from pigjax.engine import native, store
native.load_fake_cuda_handlers()
store._FFI_TARGETS["cuda-async"] = "pigjax_test_cuda_async_lsh"
native.cuda_handlers = lambda: True
s = store.Store(1, 1, 8, 40, 4, 4, storage="f32", path="cuda-async")
try:
    s.prefill(jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 40, 8)), jnp.zeros((1, 1, 40, 8)),
              jnp.zeros((1, 1, 40, 4), jnp.int32), jnp.full((1,), 40, jnp.int32), sink=0, local=1)
except Exception as e:
    print("ERROR:", e)
"""
    env = dict(os.environ, PIGJAX_CUDA_PREFILL_BUFFERS="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "PIGJAX_CUDA_PREFILL_BUFFERS must be an integer in [1, 64], got '0'" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-2000:]
