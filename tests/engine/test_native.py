"""Tests of the native engine bindings (pigjax._engine via pigjax.engine.native)."""

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.engine import native

LEVELS = ["scalar", "avx2", "avx512"]
RANK = {name: i for i, name in enumerate(LEVELS)}


def ref_bits(x, proj, K):
    """float64 reference: (codes int32 [..., L], ambiguous bool [..., L, K]).

    `ambiguous` marks bits whose dot product is within float32 rounding of 0; the
    native kernel (float32, FMA, different order) may legitimately differ there.
    """
    x64, p64 = np.asarray(x, np.float64), np.asarray(proj, np.float64)
    dots = x64 @ p64
    mag = np.abs(x64) @ np.abs(p64)
    L = proj.shape[1] // K
    lead = x.shape[:-1]
    bits = (dots > 0).reshape(lead + (L, K)).astype(np.int64)
    codes = (bits << np.arange(K)).sum(-1).astype(np.int32)
    ambiguous = (np.abs(dots) <= 1e-5 * mag) & (mag > 0)
    return codes, ambiguous.reshape(lead + (L, K))


def assert_codes_match(got, want, ambiguous, K):
    got = np.asarray(got)
    assert got.dtype == np.int32 and got.shape == want.shape
    assert got.min(initial=0) >= 0 and got.max(initial=0) < 2**K
    diff = ((got ^ want)[..., None] >> np.arange(K)) & 1
    bad = diff.astype(bool) & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} bits differ from the float64 reference"


def rand(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.fixture
def restore_simd():
    yield
    native.set_simd_level(native.hardware_simd_level())


jit_codes = jax.jit(native.simhash_codes, static_argnums=2)


@pytest.mark.parametrize("d", [64, 128, 7])
@pytest.mark.parametrize("K", [1, 10, 16])
@pytest.mark.parametrize("L", [1, 3, 150])
def test_matches_numpy_reference(d, K, L):
    rng = np.random.default_rng(1000 * d + 10 * K + L)
    proj = rand(rng, d, K * L)
    for lead in [(1,), (5,), (2, 3), (33,)]:
        x = rand(rng, *lead, d)
        want, amb = ref_bits(x, proj, K)
        assert_codes_match(jit_codes(x, proj, K), want, amb, K)
    # jnp reference agrees too (same contract).
    assert_codes_match(native.simhash_codes_reference(x, proj, K), want, amb, K)


def test_unbatched_and_zero_rows():
    rng = np.random.default_rng(0)
    proj = rand(rng, 16, 40)
    x = rand(rng, 16)
    want, amb = ref_bits(x[None], proj, 10)
    got = native.simhash_codes(x, proj, 10)
    assert got.shape == (4,)
    assert_codes_match(got[None], want, amb, 10)
    # All-zero rows (padding) hash to code 0; an empty batch is fine.
    assert np.all(np.asarray(native.simhash_codes(np.zeros((3, 16), np.float32), proj, 10)) == 0)
    assert native.simhash_codes(np.zeros((0, 16), np.float32), proj, 10).shape == (0, 4)


def test_reference_bit_layout():
    # d = 1: bit j of table l is the sign of proj[0, l*K + j]; LSB first.
    proj = np.array([[1.0, -1.0, 1.0, 1.0, -1.0, -1.0]], np.float32)  # K=3, L=2
    x = np.array([[2.0], [-2.0]], np.float32)
    expected = np.array([[0b101, 0b001], [0b010, 0b110]], np.int32)
    np.testing.assert_array_equal(native.simhash_codes(x, proj, 3), expected)
    np.testing.assert_array_equal(native.simhash_codes_reference(x, proj, 3), expected)


def test_reference_hashes_long_inputs_in_row_chunks(monkeypatch):
    # Above SIMHASH_CHUNK_DOTS the jnp path maps over row chunks (a last partial chunk too):
    # the same codes as one pass and as the C++ kernel.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 50, 16)).astype(np.float32)
    proj = rng.normal(size=(16, 40)).astype(np.float32)
    whole = np.asarray(native.simhash_codes_reference(x, proj, 4))
    monkeypatch.setattr(native, "SIMHASH_CHUNK_DOTS", 7 * 40)  # 7 rows a chunk; 300 rows leave 6
    chunked = native.simhash_codes_reference(x, proj, 4)
    assert "scan" in str(jax.make_jaxpr(native.simhash_codes_reference, static_argnums=2)(x, proj, 4))
    assert chunked.shape == (2, 3, 50, 10)
    np.testing.assert_array_equal(np.asarray(chunked), whole)
    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(native.simhash_codes(x, proj, 4)))


def test_inside_scan():
    rng = np.random.default_rng(1)
    proj = rand(rng, 64, 10 * 150)
    xs = rand(rng, 12, 4, 64)

    @jax.jit
    def run(xs, proj):
        def step(carry, x):
            c = native.simhash_codes(x, proj, 10)
            return carry + c.sum(), c
        return jax.lax.scan(step, jnp.int32(0), xs)

    total, codes = run(xs, proj)
    want, amb = ref_bits(xs, proj, 10)
    assert_codes_match(codes, want, amb, 10)
    assert int(total) == int(np.asarray(codes).sum())


def _ffi_eqns(jaxpr):
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "ffi_call"]


def test_vmap():
    rng = np.random.default_rng(2)
    d, K, L = 32, 10, 7
    f = partial(native.simhash_codes, K=K)
    xs, x1 = rand(rng, 5, 3, d), rand(rng, 3, d)
    ps, p1 = rand(rng, 5, d, K * L), rand(rng, d, K * L)

    # batched x, shared proj: proj goes in as [1, d, M] (never broadcast/copied).
    got = jax.jit(jax.vmap(f, in_axes=(0, None)))(xs, p1)
    want, amb = ref_bits(xs, p1, K)
    assert_codes_match(got, want, amb, K)
    (eqn,) = _ffi_eqns(jax.make_jaxpr(jax.vmap(f, in_axes=(0, None)))(xs, p1))
    assert eqn.invars[1].aval.shape == (1, d, K * L)

    # shared x, batched proj; both batched; nested vmap.
    got = jax.vmap(f, in_axes=(None, 0))(x1, ps)
    for b in range(5):
        want, amb = ref_bits(x1, ps[b], K)
        assert_codes_match(got[b], want, amb, K)
    got = jax.vmap(f)(xs, ps)
    for b in range(5):
        want, amb = ref_bits(xs[b], ps[b], K)
        assert_codes_match(got[b], want, amb, K)
    got = jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))(xs, ps)
    assert got.shape == (5, 5, 3, L)
    for a in range(5):
        for b in range(5):
            want, amb = ref_bits(xs[a], ps[b], K)
            assert_codes_match(got[a, b], want, amb, K)


@pytest.mark.usefixtures("restore_simd")
def test_every_simd_level_gives_same_codes():
    hw = native.hardware_simd_level()
    rng = np.random.default_rng(3)
    proj = rand(rng, 128, 10 * 150)
    x = rand(rng, 37, 128)  # 37 rows: full 4-row blocks plus a tail
    proj2 = rand(rng, 7, 16 * 3)  # 48 columns: masked column tails
    x2 = rand(rng, 6, 7)
    results = {}
    for level in LEVELS:
        effective = native.set_simd_level(level)
        assert effective == LEVELS[min(RANK[level], RANK[hw])]
        assert native.simd_level() == effective
        results[effective] = (np.asarray(jit_codes(x, proj, 10)), np.asarray(jit_codes(x2, proj2, 16)))
    want, amb = ref_bits(x, proj, 10)
    want2, amb2 = ref_bits(x2, proj2, 16)
    for level, (c, c2) in results.items():
        assert_codes_match(c, want, amb, 10)
        assert_codes_match(c2, want2, amb2, 16)
    assert set(results) == set(LEVELS[: RANK[hw] + 1])
    with pytest.raises(ValueError, match="scalar"):
        native.set_simd_level("sse9")


def _run_child(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=os.path.dirname(__file__), timeout=300)


def test_env_overrides():
    code = (
        "import numpy as np, pigjax.engine.native as n\n"
        "rng = np.random.default_rng(4)\n"
        "x = rng.standard_normal((9, 64), dtype=np.float32)\n"
        "p = rng.standard_normal((64, 30), dtype=np.float32)\n"
        "print(n.simd_level(), n.num_threads(), np.asarray(n.simhash_codes(x, p, 10)).tolist())\n"
    )
    r = _run_child(code, PIGJAX_SIMD="scalar", PIGJAX_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    level, threads, codes = r.stdout.split(" ", 2)
    assert level == "scalar" and threads == "3"
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 64), dtype=np.float32)
    p = rng.standard_normal((64, 30), dtype=np.float32)
    want, amb = ref_bits(x, p, 10)
    assert_codes_match(np.array(eval(codes), np.int32), want, amb, 10)

    r = _run_child("import pigjax.engine.native as n; print(n.simd_level(), n.num_threads())",
                   PIGJAX_SIMD="bogus", PIGJAX_NUM_THREADS="-2")
    assert r.returncode == 0, r.stderr
    level, threads = r.stdout.split()
    assert level == native.hardware_simd_level() and int(threads) >= 1
    assert "PIGJAX_SIMD=bogus" in r.stderr and "PIGJAX_NUM_THREADS=-2" in r.stderr


def test_engine_queries():
    assert "pigjax_simhash_codes" in native._engine.registrations()
    assert native.simd_level() in LEVELS
    feats = native.cpu_features()
    assert set(feats) == {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vpopcntdq"}
    assert all(isinstance(v, bool) for v in feats.values())
    hw = native.hardware_simd_level()
    if hw == "avx512":
        assert feats["avx512f"] and feats["avx512bw"] and feats["avx512vl"]
    if hw in ("avx2", "avx512"):
        assert feats["avx2"] and feats["fma"]
    assert isinstance(native.num_threads(), int) and native.num_threads() >= 1


@pytest.mark.parametrize(
    "x_shape,x_dtype,p_shape,p_dtype,K,match",
    [
        ((4, 8), np.float64, (8, 10), np.float32, 5, "x must be float32"),
        ((4, 8), np.float32, (8, 10), np.int32, 5, "proj must be float32"),
        ((4, 8), jnp.bfloat16, (8, 10), np.float32, 5, "x must be float32"),
        ((), np.float32, (8, 10), np.float32, 5, "scalar"),
        ((4, 8), np.float32, (80,), np.float32, 5, r"rank 2\), got shape \(80,\)"),
        ((4, 8), np.float32, (1, 8, 10), np.float32, 5, "rank 2"),
        ((4, 7), np.float32, (8, 10), np.float32, 5, r"last dim \(7\) must equal .* d \(8\)"),
        ((4, 8), np.float32, (8, 10), np.float32, 0, r"K must be in \[1, 16\], got 0"),
        ((4, 8), np.float32, (8, 34), np.float32, 17, r"K must be in \[1, 16\], got 17"),
        ((4, 8), np.float32, (8, 10), np.float32, 3, "10 columns, which is not a multiple of K=3"),
        ((4, 8), np.float32, (8, 10), np.float32, True, "K must be an int"),
        ((4, 8), np.float32, (8, 10), np.float32, 2.5, "K must be a static Python int"),
    ],
)
def test_python_validation(x_shape, x_dtype, p_shape, p_dtype, K, match):
    x = np.ones(x_shape, x_dtype)
    p = np.ones(p_shape, p_dtype)
    with pytest.raises(ValueError, match=match):
        native.simhash_codes(x, p, K)


def test_traced_k_rejected():
    x, p = np.ones((4, 8), np.float32), np.ones((8, 10), np.float32)
    with pytest.raises(ValueError, match="traced K"):
        jax.jit(native.simhash_codes)(x, p, 5)


def _raw_call(x, p, K, out_shape):
    return jax.ffi.ffi_call(
        "pigjax_simhash_codes", jax.ShapeDtypeStruct(out_shape, jnp.int32)
    )(x, p, K=np.int32(K))


@pytest.mark.parametrize(
    "x_shape,p_shape,K,out_shape,match",
    [
        ((4, 8), (80,), 5, (4, 16), r"proj must have shape \[d, K\*L\] \(rank 2\), got rank 1"),
        ((4, 7), (8, 10), 5, (4, 2), r"x's last dim \(7\) must equal proj's row count d \(8\)"),
        ((4, 8), (8, 10), 0, (4, 2), r"K must be in \[1, 16\], got 0"),
        ((4, 8), (8, 34), 17, (4, 2), r"K must be in \[1, 16\], got 17"),
        ((4, 8), (8, 10), 3, (4, 3), "10 columns, which is not a multiple of K=3"),
        ((4, 8), (8, 10), 5, (4, 3), r"output shape \[4, 3\] does not match x \[4, 8\] with L=2"),
        ((4, 8), (8, 10), 5, (5, 2), r"output shape \[5, 2\] does not match"),
        ((3, 4, 8), (2, 8, 10), 5, (3, 4, 2), "does not broadcast"),
    ],
)
def test_handler_validation(x_shape, p_shape, K, out_shape, match):
    """Bypasses Python checks: the C++ handler must return an error, not abort."""
    x = jnp.ones(x_shape, jnp.float32)
    p = jnp.ones(p_shape, jnp.float32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_simhash_codes: .*" + match):
        jax.block_until_ready(_raw_call(x, p, K, out_shape))
    # The process lives on and the target still works.
    good = native.simhash_codes(jnp.ones((2, 8), jnp.float32), jnp.ones((8, 10), jnp.float32), 5)
    np.testing.assert_array_equal(good, np.full((2, 2), 31, np.int32))


def test_handler_rejects_wrong_dtype():
    x = jnp.ones((4, 8), jnp.int32)
    p = jnp.ones((8, 10), jnp.float32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="expected F32"):
        jax.block_until_ready(_raw_call(x, p, 5, (4, 2)))


@pytest.fixture
def restore_threads():
    saved = native._engine.get_num_threads()
    yield
    native._engine.set_num_threads(saved)


@pytest.mark.usefixtures("restore_simd", "restore_threads")
def test_many_rows_threads_match_legacy():
    """Many rows split over threads: the FFI kernel gives the legacy kernel's codes bit for bit
    at every SIMD level, for any thread count, and matches the float64 reference."""
    hw = native.hardware_simd_level()
    rng = np.random.default_rng(5)
    K, L = 10, 150
    proj = rand(rng, 128, K * L)
    x = rand(rng, 4, 1537, 128)  # 6148 rows: many tasks, tails of every tile shape
    proj64 = rand(rng, 64, K * L)
    x64 = rand(rng, 3001, 64)
    want, amb = ref_bits(x, proj, K)
    want64, amb64 = ref_bits(x64, proj64, K)
    for level in LEVELS[: RANK[hw] + 1]:
        assert native.set_simd_level(level) == level
        old = native.simhash_codes_np(x, proj, K, kernel="legacy")
        old64 = native.simhash_codes_np(x64, proj64, K, kernel="legacy")
        assert_codes_match(old, want, amb, K)
        assert_codes_match(old64, want64, amb64, K)
        for threads in (1, 2, 3):
            native._engine.set_num_threads(threads)
            np.testing.assert_array_equal(np.asarray(jit_codes(x, proj, K)), old)
            np.testing.assert_array_equal(native.simhash_codes_np(x, proj, K), old)
            np.testing.assert_array_equal(native.simhash_codes_np(x64, proj64, K), old64)
    # Under vmap with a batched proj (read in place, not packed), still the same codes.
    native.set_simd_level(hw)
    native._engine.set_num_threads(2)
    projs = np.stack([proj, proj[:, ::-1].copy()])
    got = jax.jit(jax.vmap(partial(native.simhash_codes, K=K), in_axes=(None, 0)))(x[0], projs)
    for b in range(2):
        np.testing.assert_array_equal(
            np.asarray(got[b]), native.simhash_codes_np(x[0], projs[b], K, kernel="legacy"))


def test_simhash_codes_np_validation():
    x, p = np.ones((4, 8), np.float32), np.ones((8, 10), np.float32)
    np.testing.assert_array_equal(native.simhash_codes_np(x, p, 5), np.full((4, 2), 31, np.int32))
    with pytest.raises(ValueError, match="kernel must be"):
        native.simhash_codes_np(x, p, 5, kernel="fast")
    with pytest.raises(ValueError, match="not a multiple of K=3"):
        native.simhash_codes_np(x, p, 3)
    with pytest.raises(ValueError, match="rank 2"):
        native.simhash_codes_np(x, p.reshape(1, 8, 10), 5)
    with pytest.raises(ValueError, match=r"last dim \(7\)"):
        native.simhash_codes_np(np.ones((4, 7), np.float32), p, 5)


def test_cuda_handlers_unavailable_off_a_gpu():
    """Off a CUDA GPU the CUDA module is never imported and the store keeps its CPU path."""
    from pigjax.engine import store

    if jax.devices()[0].platform != "cpu":
        pytest.skip("checks the CPU backend")
    assert native.cuda_handlers() is False
    assert "not a CUDA GPU" in native.cuda_unavailable_reason()
    assert store.default_path() == "ffi"
    capsule = native._engine.engine_api()
    assert type(capsule).__name__ == "PyCapsule"
