"""The engine's fused causal prefill-attention kernel (ffi/src/prefill_attention.*), the CPU path of
`pigjax.attention.dense.attend` for a fresh prefill: against a float64 NumPy reference at every SIMD
level and thread count, reading no slot past the prompt, equal to XLA's blocks, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.attention import dense
from pigjax.engine import native

LEVELS = ["scalar", "avx2", "avx512"]


def reference(q, k, v):
    """float64 causal attention of q [B, T, Hq, d] (query t at position t) over k, v [B, Hkv, S, d]."""
    b, t, hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros((b, t, hq, d))
    for r in range(b):
        for h in range(hq):
            kh = np.asarray(k[r, h // g, :t], np.float64)
            s = np.asarray(q[r, :, h], np.float64) @ kh.T / np.sqrt(d)
            s[np.triu_indices(t, 1)] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[r, :, h] = p @ np.asarray(v[r, h // g, :t], np.float64) / p.sum(axis=1, keepdims=True)
    return out


def inputs(rng, b, t, hq, hkv, s, d, dtype):
    q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, hkv, s, d)) * 1.5, dtype)
    v = jnp.asarray(rng.normal(size=(b, hkv, s, d)), dtype)
    return q, k, v


SHAPES = [  # b, T, Hq, Hkv, S, d: tiles of 32 positions and keys, partial last tiles, GQA groups,
    (2, 70, 9, 3, 80, 64),  # and d filling AVX-512 (64, 128), AVX2 (32) or neither (20)
    (1, 33, 4, 4, 33, 128),
    (1, 100, 12, 1, 128, 32),
    (2, 5, 8, 2, 9, 20),
    (1, 1, 2, 1, 4, 64),
]


@pytest.mark.usefixtures("restore_engine")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_at_every_level_and_thread_count(shape, dtype):
    q, k, v = inputs(np.random.default_rng(sum(shape)), *shape, dtype)
    want = reference(np.asarray(q), np.asarray(k.astype(jnp.float32)), np.asarray(v.astype(jnp.float32)))
    hw = LEVELS.index(native.hardware_simd_level())
    for level in LEVELS[: hw + 1]:
        native.set_simd_level(level)
        first = None
        for threads in (1, 3):
            native._engine.set_num_threads(threads)
            got = np.asarray(jax.jit(native.prefill_attention)(q, k, v))
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
            if first is None:
                first = got
            else:  # each tile is one task: results do not depend on the thread count
                np.testing.assert_array_equal(got, first)


def test_slots_past_the_prompt_are_never_read():
    rng = np.random.default_rng(1)
    q, k, v = inputs(rng, 2, 300, 6, 2, 512, 64, jnp.float32)
    want = native.prefill_attention(q, k, v)
    past = jnp.arange(512)[None, None, :, None] >= 300
    poisoned = native.prefill_attention(q, jnp.where(past, jnp.nan, k), jnp.where(past, jnp.inf, v))
    np.testing.assert_array_equal(poisoned, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_uses_it_for_a_fresh_prefill_and_equals_the_xla_blocks(dtype):
    rng = np.random.default_rng(2)
    q, k, v = inputs(rng, 2, 600, 9, 3, 640, 64, dtype)  # three of XLA's 256-position blocks
    positions = jnp.broadcast_to(jnp.arange(600, dtype=jnp.int32), (2, 600))
    fresh = jax.jit(lambda q, k, v, p: dense.attend(q, k, v, p, fresh=True))
    assert native.PREFILL_ATTENTION_TARGET in fresh.lower(q, k, v, positions).as_text()
    got = fresh(q, k, v, positions)
    want = jax.jit(dense._attend_block)(q, k, v, positions)  # XLA's form over the whole cache
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_attend_is_differentiable_with_the_xla_forms_gradient():
    """Training differentiates the prefill: the kernel's custom VJP is the XLA form's."""
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, 2, 90, 6, 2, 96, 32, jnp.float32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(90, dtype=jnp.int32), (2, 90))

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

    got = loss(lambda q, k, v: dense.attend(q, k, v, positions, fresh=True))(q, k, v)
    want = loss(lambda q, k, v: dense._attend_block(q, k, v, positions))(q, k, v)
    for g, x in zip(got, want):
        np.testing.assert_allclose(g, x, atol=2e-5, rtol=0)
    assert float(jnp.abs(got[1]).max()) > 0


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, match",
    [
        ((2, 3, 4, 8), (2, 4, 8), (2, 4, 8), r"k must be \[B, Hkv, S, d\], got \[2, 4, 8\]"),
        ((2, 3, 4), (2, 2, 5, 8), (2, 2, 5, 8), r"q must be \[B, T, Hq, d\], got \[2, 3, 4\]"),
        ((2, 3, 4, 8), (2, 2, 5, 8), (2, 2, 6, 8), r"v must have k's shape \[2, 2, 5, 8\], got \[2, 2, 6, 8\]"),
        ((2, 3, 4, 8), (3, 2, 5, 8), (3, 2, 5, 8), r"k \[3, 2, 5, 8\] does not match q \[2, 3, 4, 8\]"),
        ((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8), r"query heads \(4\) must be a multiple of KV heads \(3\)"),
        ((2, 6, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8), r"the cache's 5 slots cannot hold the 6 prefill positions"),
    ],
)
def test_handler_rejects_bad_shapes(q_shape, k_shape, v_shape, match):
    """Past the Python wrapper: the C++ handler returns an error, the process lives on."""
    call = jax.ffi.ffi_call(native.PREFILL_ATTENTION_TARGET, jax.ShapeDtypeStruct(q_shape, jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_prefill_attention: " + match):
        jax.block_until_ready(call(jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)))


def test_handler_and_wrapper_reject_bad_dtypes():
    q, k = jnp.ones((2, 3, 4, 8)), jnp.ones((2, 2, 5, 8))
    call = jax.ffi.ffi_call(native.PREFILL_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="k and v must have one dtype"):
        jax.block_until_ready(call(q, k, k.astype(jnp.bfloat16)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="k and v must be f32 or bf16"):
        jax.block_until_ready(call(q, k.astype(jnp.float16), k.astype(jnp.float16)))
    with pytest.raises(ValueError, match="q must be float32"):
        native.prefill_attention(q.astype(jnp.bfloat16), k, k)
    with pytest.raises(ValueError, match="must both be float32 or both bfloat16, got float32 and bfloat16"):
        native.prefill_attention(q, k, k.astype(jnp.bfloat16))
    np.testing.assert_allclose(native.prefill_attention(q, k, k), np.ones((2, 3, 4, 8)), rtol=1e-6)
