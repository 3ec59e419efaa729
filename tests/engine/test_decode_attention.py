"""The engine's dense decode-attention kernel (ffi/src/decode_attention.*), the CPU path of
`pigjax.attention.dense.attend` at T = 1: against a float64 NumPy reference, at every SIMD level
and thread count, reading nothing past a row's length, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.attention import dense
from pigjax.engine import native

LEVELS = ["scalar", "avx2", "avx512"]


def reference(q, k, v, lengths):
    """float64 softmax attention of q [B, Hq, d] over the first lengths[b] slots of k, v."""
    b, hq, d = q.shape
    g = hq // k.shape[1]
    out, lse = np.zeros((b, hq, d)), np.full((b, hq), -np.inf)
    for r in range(b):
        for h in range(hq):
            n = lengths[r]
            if n == 0:
                continue
            kh = np.asarray(k[r, h // g, :n], np.float64)
            s = kh @ np.asarray(q[r, h], np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[r, h] = p @ np.asarray(v[r, h // g, :n], np.float64) / p.sum()
            lse[r, h] = s.max() + np.log(p.sum())
    return out, lse


def inputs(rng, b, hq, hkv, s, d, dtype, lengths):
    q = rng.normal(size=(b, hq, d)).astype(np.float32)
    k = jnp.asarray(rng.normal(size=(b, hkv, s, d)) * 1.5, dtype)
    v = jnp.asarray(rng.normal(size=(b, hkv, s, d)), dtype)
    return jnp.asarray(q), k, v, jnp.asarray(lengths, jnp.int32)


SHAPES = [  # b, Hq, Hkv, S, d, lengths: blocks of 256 slots, a head chunk of 8, row tails
    (3, 9, 3, 700, 64, [700, 1, 513]),
    (2, 12, 1, 300, 128, [256, 0]),
    (1, 4, 4, 9, 20, [9]),
    (2, 8, 2, 1030, 16, [1029, 257]),
]


@pytest.mark.usefixtures("restore_engine")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_at_every_level_and_thread_count(shape, dtype):
    b, hq, hkv, s, d, lengths = shape
    q, k, v, n = inputs(np.random.default_rng(sum(shape[:5])), b, hq, hkv, s, d, dtype, lengths)
    want, want_lse = reference(np.asarray(q), np.asarray(k.astype(jnp.float32)), np.asarray(v.astype(jnp.float32)),
                               lengths)
    hw = LEVELS.index(native.hardware_simd_level())
    first = None
    for level in LEVELS[: hw + 1]:
        native.set_simd_level(level)
        for threads in (1, 3):
            native._engine.set_num_threads(threads)
            got, lse = (np.asarray(x) for x in jax.jit(native.decode_attention, static_argnames="with_lse")(
                q, k, v, n, with_lse=True))
            # bf16 rows at the avx512 level score with bf16 x (bf16 hi + lo) query products.
            np.testing.assert_allclose(got, want, atol=2e-5 if dtype == jnp.float32 else 1e-4, rtol=0)
            np.testing.assert_allclose(lse, want_lse, atol=2e-5 if dtype == jnp.float32 else 1e-4, rtol=1e-6)
            if threads == 1:
                first = got
            else:  # the split over threads is fixed by the shapes: results do not depend on it
                np.testing.assert_array_equal(got, first)


def test_slots_past_a_rows_length_are_never_read():
    rng = np.random.default_rng(1)
    q, k, v, n = inputs(rng, 2, 6, 2, 600, 64, jnp.float32, [300, 517])
    want = native.decode_attention(q, k, v, n)
    past = jnp.arange(600)[None, None, :, None] >= n[:, None, None, None]
    poisoned = native.decode_attention(q, jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v), n)
    np.testing.assert_array_equal(poisoned, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_uses_it_and_equals_the_xla_form(dtype):
    """`dense.attend` of one query per row (positions past the capacity see every slot)."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 1, 9, 64)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 400, 64)), dtype)
    v = jnp.asarray(rng.normal(size=(3, 3, 400, 64)), dtype)
    positions = jnp.asarray([[0], [257], [450]], jnp.int32)
    lowered = jax.jit(dense.attend).lower(q, k, v, positions).as_text()
    assert native.DECODE_ATTENTION_TARGET in lowered
    got = jax.jit(dense.attend)(q, k, v, positions)
    want = jax.jit(dense._attend_block)(q, k, v, positions)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _results(q_shape):
    """The target's results: out [B, Hq, d] and lse [B, Hq]."""
    return jax.ShapeDtypeStruct(q_shape, jnp.float32), jax.ShapeDtypeStruct(q_shape[:2], jnp.float32)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, n_shape, match",
    [
        ((2, 4, 8), (2, 4, 8), (2, 4, 8), (2,), r"k must be \[B, Hkv, S, d\], got \[2, 4, 8\]"),
        ((2, 4, 8), (2, 2, 5, 8), (2, 2, 6, 8), (2,), r"v must have k's shape \[2, 2, 5, 8\], got \[2, 2, 6, 8\]"),
        ((2, 4, 8), (3, 2, 5, 8), (3, 2, 5, 8), (2,), r"k \[3, 2, 5, 8\] does not match q \[2, 4, 8\]"),
        ((2, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8), (2,), r"query heads \(4\) must be a multiple of KV heads \(3\)"),
        ((2, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8), (3,), r"lengths must be \[B\] = \[2\], got \[3\]"),
    ],
)
def test_handler_rejects_bad_shapes(q_shape, k_shape, v_shape, n_shape, match):
    """Past the Python wrapper: the C++ handler returns an error, the process lives on."""
    call = jax.ffi.ffi_call(native.DECODE_ATTENTION_TARGET, _results(q_shape))
    args = (jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape), jnp.ones(n_shape, jnp.int32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_decode_attention: " + match):
        jax.block_until_ready(call(*args))


def test_handler_rejects_bad_lengths_and_dtypes():
    q, k = jnp.ones((2, 4, 8)), jnp.ones((2, 2, 5, 8))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"lengths\[1\] = 6 is outside \[0, 5\]"):
        jax.block_until_ready(native.decode_attention(q, k, k, jnp.asarray([5, 6], jnp.int32)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"lengths\[0\] = -1"):
        jax.block_until_ready(native.decode_attention(q, k, k, jnp.asarray([-1, 2], jnp.int32)))
    call = jax.ffi.ffi_call(native.DECODE_ATTENTION_TARGET, _results(q.shape))
    n = jnp.asarray([1, 2], jnp.int32)
    bad_lse = jax.ffi.ffi_call(native.DECODE_ATTENTION_TARGET, (_results(q.shape)[0], jax.ShapeDtypeStruct((2, 3), jnp.float32)))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"lse must be \[B, Hq\] = \[2, 4\]"):
        jax.block_until_ready(bad_lse(q, k, k, n))
    with pytest.raises(jax.errors.JaxRuntimeError, match="k and v must have one dtype"):
        jax.block_until_ready(call(q, k, k.astype(jnp.bfloat16), n))
    with pytest.raises(jax.errors.JaxRuntimeError, match="k and v must be f32 or bf16"):
        jax.block_until_ready(call(q, k.astype(jnp.float16), k.astype(jnp.float16), n))
    # ... and the Python wrapper says so before the call.
    with pytest.raises(ValueError, match="q must be float32"):
        native.decode_attention(q.astype(jnp.bfloat16), k, k, n)
    with pytest.raises(ValueError, match="must both be float32 or both bfloat16, got float32 and bfloat16"):
        native.decode_attention(q, k, k.astype(jnp.bfloat16), n)
    with pytest.raises(ValueError, match="lengths must be int32"):
        native.decode_attention(q, k, k, n.astype(jnp.int16))
    good = native.decode_attention(q, k, k, n)
    np.testing.assert_allclose(good, np.ones((2, 4, 8)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_magicpig_window_softmax_equals_partial_softmax(dtype):
    """MagicPIG's exact window (slots 0..filled of each row) through the engine gives the partial
    softmax (out, lse) the jnp form gives, which the step merges with the sampled middle."""
    from pigjax.attention import magicpig, softmax

    rng = np.random.default_rng(3)
    q, k, v, _ = inputs(rng, 3, 9, 3, 40, 64, dtype, [0, 0, 0])
    filled = jnp.asarray([0, 17, 39], jnp.int32)
    out, lse = jax.jit(magicpig.window_softmax)(q, k, v, filled)
    assert native.DECODE_ATTENTION_TARGET in jax.jit(magicpig.window_softmax).lower(q, k, v, filled).as_text()
    seen = (jnp.arange(40)[None, :] <= filled[:, None])[:, None, None]
    want_out, want_lse = softmax.partial_softmax(q, k, v, seen)
    tol = 2e-5 if dtype == jnp.float32 else 1e-4
    np.testing.assert_allclose(out, want_out, atol=tol, rtol=0)
    np.testing.assert_allclose(lse, want_lse, atol=tol, rtol=1e-6)
