"""The engine's few-row matmul (ffi/src/small_matmul.*), the CPU path of a decode step's projections
(`pigjax.models.projection`): against float64 NumPy at every SIMD level and thread count, both
weight layouts, f32 and bf16 weights; its errors; and a Llama decode step that uses it equals the
same step with XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pigjax
from pigjax.engine import native
from pigjax.models import llama, projection

LEVELS = ["scalar", "avx2", "avx512"]


@pytest.mark.usefixtures("restore_engine")
@pytest.mark.parametrize("w_nk", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m, k, n", [(1, 576, 192), (4, 70, 130), (5, 33, 1), (16, 128, 200)])
def test_matches_float64_at_every_level_and_thread_count(m, k, n, dtype, w_nk):
    rng = np.random.default_rng(m * k + n)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n, k) if w_nk else (k, n)), dtype)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    want = np.asarray(x, np.float64) @ (w64.T if w_nk else w64)
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(w64.T if w_nk else w64)
    hw = LEVELS.index(native.hardware_simd_level())
    run = jax.jit(lambda x, w: native.small_matmul(x, w, w_nk=w_nk))
    for level in LEVELS[: hw + 1]:
        native.set_simd_level(level)
        first = None
        for threads in (1, 3):
            native._engine.set_num_threads(threads)
            got = np.asarray(run(x, w))
            assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-6), level
            if first is None:
                first = got
            else:  # each output is one FMA chain over k in order: the thread count does not matter
                np.testing.assert_array_equal(got, first)


def test_wrapper_rejects_bad_arguments():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match=r"x must be a float32 \[M, K\] array, got bfloat16"):
        native.small_matmul(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match=r"w must be a float32 or bfloat16 2-d array, got int32"):
        native.small_matmul(x, w.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"disagree on K"):
        native.small_matmul(x, w, w_nk=True)


@pytest.mark.parametrize("x_shape, w_shape, out_shape, w_nk, match", [
    ((4, 8), (9, 3), (4, 3), False, r"x \[4, 8\] and w \[9, 3\] disagree on K \(8 vs 9, w is \[K, N\]\)"),
    ((4, 8), (3, 8), (4, 8), True, r"out must be \[4, 3\], got \[4, 8\]"),
    ((4, 8, 1), (8, 3), (4, 3), False, r"x must be \[M, K\], got \[4, 8, 1\]"),
])
def test_handler_rejects_bad_shapes(x_shape, w_shape, out_shape, w_nk, match):
    """Past the Python wrapper: the C++ handler returns an error, the process lives on."""
    call = jax.ffi.ffi_call(native.SMALL_MATMUL_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_small_matmul: " + match):
        jax.block_until_ready(call(jnp.ones(x_shape), jnp.ones(w_shape), w_nk=w_nk))


def test_handler_rejects_other_weight_dtypes():
    call = jax.ffi.ffi_call(native.SMALL_MATMUL_TARGET, jax.ShapeDtypeStruct((4, 3), jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match="pigjax_small_matmul: w must be f32 or bf16"):
        jax.block_until_ready(call(jnp.ones((4, 8)), jnp.ones((8, 3), jnp.float16), w_nk=False))


CONFIG = pigjax.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


@pytest.mark.parametrize("tied, dtype", [(True, jnp.float32), (False, jnp.float32), (True, jnp.bfloat16)])
def test_decode_step_uses_it_and_equals_xla(monkeypatch, tied, dtype):
    """A prefill (21 rows: XLA's dot) then a decode step (3 rows: the engine); the decode step's
    logits equal those with PIGJAX_DECODE_PROJECTIONS=xla, and only the decode step calls it. A
    bf16 model's activations stay bf16 (the kernel rounds its f32 sums once, XLA's dot too)."""
    import dataclasses

    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    params = llama.unstack_layers(jax.tree.map(lambda p: p.astype(dtype), llama.init_params(config, 1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (3, 7)), jnp.int32)
    cache = pigjax.Dense().init_cache(config, 3, 16, 0, dtype)

    def run(mode):
        monkeypatch.setenv("PIGJAX_DECODE_PROJECTIONS", mode)
        prefill = jax.jit(lambda p, t, c: llama.step(p, config, t, c, fresh=True))
        decode = jax.jit(lambda p, t, c: llama.step(p, config, t, c))
        _, c = prefill(params, tokens, cache)
        texts = [f.lower(params, t, c0).as_text() for f, t, c0 in ((prefill, tokens, cache), (decode, tokens[:, :1], c))]
        return decode(params, tokens[:, :1], c)[0], texts

    got, (prefill_text, decode_text) = run("engine")
    want, (_, xla_text) = run("xla")
    calls = decode_text.count(native.SMALL_MATMUL_TARGET)
    assert calls == 7 * config.num_hidden_layers + 1  # q, k, v, o, gate, up, down per layer; the logits
    assert native.SMALL_MATMUL_TARGET not in prefill_text and native.SMALL_MATMUL_TARGET not in xla_text
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_it_applies_only_to_few_rows_on_the_cpu_without_a_mesh(monkeypatch):
    assert projection.native_applies(projection.MAX_ROWS)
    assert not projection.native_applies(projection.MAX_ROWS + 1)
    monkeypatch.setenv("PIGJAX_DECODE_PROJECTIONS", "xla")
    assert not projection.native_applies(1)
