"""The models' step functions on tokens that do not fit: PigjaxError eagerly, NaN logits under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pigjax
from pigjax import mosaics
from pigjax.models import llama

LLAMA = pigjax.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
MOSAICS = pigjax.MosaicsConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=64)


def _llama():
    params = llama.init_params(LLAMA, 0)
    step = lambda tokens, cache: llama.step(params, LLAMA, tokens, cache)
    return step, pigjax.Dense().init_cache(LLAMA, 1, 8, 0, jnp.float32)


def _mosaics():
    params = mosaics.init_params(MOSAICS, 0)
    step = lambda tokens, state: mosaics.step(params, MOSAICS, tokens, state)
    return step, mosaics.init_state(MOSAICS, 1, 8)


@pytest.mark.parametrize("make", [_llama, _mosaics], ids=["llama", "mosaics"])
@pytest.mark.parametrize("tokens, match", [
    (np.arange(20)[None] % 50, "20 tokens in one step exceed the cache's capacity"),
    (np.array([[1, 2, 60]]), "token id 60 at \\[0, 2\\] is outside the vocabulary"),
    (np.array([[1, -1]]), "token id -1 at \\[0, 1\\] is outside the vocabulary"),
])
def test_eager_step_raises(make, tokens, match):
    step, cache = make()
    with pytest.raises(pigjax.PigjaxError, match=match):
        step(jnp.asarray(tokens, jnp.int32), cache)


@pytest.mark.parametrize("make", [_llama, _mosaics], ids=["llama", "mosaics"])
def test_eager_step_past_the_capacity_raises(make):
    step, cache = make()
    _, cache = step(jnp.ones((1, 6), jnp.int32), cache)
    with pytest.raises(pigjax.PigjaxError, match="row 0 holds 6 tokens; 3 more exceed the cache's capacity"):
        step(jnp.ones((1, 3), jnp.int32), cache)


@pytest.mark.parametrize("make", [_llama, _mosaics], ids=["llama", "mosaics"])
def test_jitted_step_marks_bad_rows_with_nan(make):
    step, cache = make()
    jitted = jax.jit(step)
    ok, _ = jitted(jnp.array([[1, 2, 3]], jnp.int32), cache)
    assert np.isfinite(np.asarray(ok)).all()
    bad, _ = jitted(jnp.array([[1, 60, 3]], jnp.int32), cache)  # an out-of-range id: never a wrapped one
    assert np.isnan(np.asarray(bad)).all()
    _, full = jitted(jnp.ones((1, 3), jnp.int32), cache)
    _, full = jitted(jnp.ones((1, 3), jnp.int32), full)
    over, _ = jitted(jnp.ones((1, 3), jnp.int32), full)  # 6 + 3 > capacity 8
    assert np.isnan(np.asarray(over)).all()
