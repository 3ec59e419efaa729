"""native.write_rows (a step's K/V rows into a cache buffer, in place) against the XLA scatter it
replaces for bf16 decode caches, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.engine import native


def _scatter(buf, rows, starts):
    b, t = rows.shape[:2]
    slots = starts[:, None] + jnp.arange(t)[None, :]
    return buf.at[jnp.arange(b)[:, None], :, slots].set(rows, mode="drop")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int8])
@pytest.mark.parametrize("t", [1, 3])
def test_equals_scatter_with_dropped_slots(dtype, t):
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.normal(size=(4, 3, 10, 5)) * 10).astype(dtype)
    rows = jnp.asarray(rng.normal(size=(4, t, 3, 5)) * 10).astype(dtype)
    starts = jnp.asarray([0, 4, 9, 12], jnp.int32)  # row 2 partly past the end, row 3 wholly
    got = jax.jit(native.write_rows)(buf, rows, starts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_scatter(buf, rows, starts)))
    # Slots below 0 are dropped too (jnp's scatter would wrap them around from the end).
    negative = np.asarray([-1, -5, 2, 0], np.int32)
    want = np.array(buf)
    for b in range(4):
        for i in range(t):
            if 0 <= negative[b] + i < 10:
                want[b, :, negative[b] + i] = np.asarray(rows)[b, i]
    np.testing.assert_array_equal(np.asarray(native.write_rows(buf, rows, jnp.asarray(negative))), want)


def test_writes_a_loop_carried_buffer_in_place():
    """In a fori_loop (as decoding carries its cache) every step's row lands, nothing else moves."""
    buf = jnp.zeros((2, 2, 16, 4), jnp.bfloat16)

    def body(i, b):
        rows = jnp.full((2, 1, 2, 4), i + 1, jnp.bfloat16)
        return native.write_rows(b, rows, jnp.asarray([i, 2 * i], jnp.int32))

    out = np.asarray(jax.jit(lambda b: jax.lax.fori_loop(0, 10, body, b), donate_argnums=0)(buf), np.float32)
    for i in range(10):
        assert np.all(out[0, :, i] == i + 1)
        if 2 * i < 16:
            assert np.all(out[1, :, 2 * i] == i + 1)
    assert np.all(out[0, :, 10:] == 0) and np.all(out[1, :, 1::2] == 0)


def test_bad_input_raises():
    buf = jnp.zeros((2, 3, 8, 4), jnp.bfloat16)
    rows = jnp.zeros((2, 1, 3, 4), jnp.bfloat16)
    starts = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="one dtype"):
        native.write_rows(buf, rows.astype(jnp.float32), starts)
    with pytest.raises(ValueError, match="do not fit"):
        native.write_rows(buf, jnp.zeros((2, 1, 2, 4), jnp.bfloat16), starts)
    with pytest.raises(ValueError, match="starts must be int32"):
        native.write_rows(buf, rows, starts.astype(jnp.int64) if jax.config.x64_enabled else starts[:1])


def test_bf16_decode_steps_equal_xla_scatter(monkeypatch):
    """A bf16 model's decode steps write their cache through the engine (and a f32 model's through
    XLA); three steps give the same logits and cache bits as with XLA's scatter."""
    import pigjax
    from pigjax.attention import backend
    from pigjax.models import llama

    config = pigjax.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    params = llama.unstack_layers(jax.tree.map(lambda p: p.astype(jnp.bfloat16), llama.init_params(config, 1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (3, 7)), jnp.int32)
    lengths = jnp.asarray([7, 4, 6], jnp.int32)

    def run(native_writes):
        monkeypatch.setattr(backend, "native_cpu", lambda: native_writes)
        cache = pigjax.Dense().init_cache(config, 3, 16, 0, jnp.bfloat16)
        _, cache = jax.jit(lambda p, t, c: llama.step(p, config, t, c, lengths, fresh=True))(params, tokens, cache)
        decode = jax.jit(lambda p, t, c: llama.step(p, config, t, c))
        logits = []
        for i in range(3):
            out, cache = decode(params, tokens[:, i:i + 1], cache)
            logits.append(out)
        text = decode.lower(params, tokens[:, :1], cache).as_text()
        return logits, cache, text

    got, got_cache, text = run(True)
    want, want_cache, xla_text = run(False)
    assert text.count(native.WRITE_ROWS_TARGET) == 2 * config.num_hidden_layers
    assert native.WRITE_ROWS_TARGET not in xla_text
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
