"""Sampled (MagicPIG) retrieval over a Memory Mosaics model's contextual memory
(pigjax.models.mosaics_memory): equal to exact retrieval where the sampling reads everything, close
otherwise, through generate and teacher-forced decoding."""

import jax.numpy as jnp
import numpy as np
import pytest

import pigjax
from pigjax import mosaics
from pigjax.eval.perplexity import teacher_forced
from pigjax.models.mosaics_memory import MosaicsSampled


@pytest.fixture(scope="module")
def model():
    config = mosaics.MosaicsConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=256)
    return mosaics.init(config, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 97, (2, 100))


@pytest.fixture(scope="module")
def exact(model, tokens):
    return teacher_forced(model, tokens, 30, return_logits=True)


# K=1, L=400: every pair collides in >= 2 tables (u ~ 1), so the engine's estimate is the exact
# partial softmax; sink 2 + local 4 make the window wrap and pairs go to the engine at every step.
@pytest.mark.parametrize("attention", [
    pigjax.MagicPIG(K=1, L=400, sink=2, local=4, dense_layers=(), storage="f32"),
    MosaicsSampled(pigjax.MagicPIG(K=1, L=400, sink=0, local=1, dense_layers=(0,), storage="f32"), center=True),
    # RankedLSH reading every pair exactly (top = 1), prompt and appended pairs alike.
    pigjax.RankedLSH(K=6, L=20, rank_tables=8, top=1.0, sink=2, local=4, dense_layers=(), storage="f32"),
], ids=["all-layers", "layer1-centered", "ranked-top1"])
def test_every_pair_sampled_equals_exact(model, tokens, exact, attention):
    out = teacher_forced(model, tokens, 30, attention, return_logits=True)
    np.testing.assert_allclose(out["logits"], exact["logits"], atol=2e-4, rtol=0)
    assert out["stats"]["fraction_read"] == pytest.approx(1.0, abs=1e-3)


def test_window_covering_the_context_equals_exact(model, tokens, exact):
    out = teacher_forced(model, tokens, 30, pigjax.MagicPIG(local=100, dense_layers=()), return_logits=True)
    np.testing.assert_allclose(out["logits"], exact["logits"], atol=1e-5, rtol=0)
    assert out["stats"]["fraction_read"] is None  # the engine never held a pair
    assert out["stats"]["fraction_read_sampled_layers"] == 1.0


def test_fraction_read_is_reported_and_quality_close(model, tokens, exact):
    out = teacher_forced(model, tokens, 30, pigjax.MagicPIG(sink=2, local=8, dense_layers=()))
    s = out["stats"]
    assert s["attention"] == "magicpig-memory" and s["dense_layers"] == []
    assert 0.0 < s["fraction_read"] <= 1.0
    assert s["fraction_read"] <= s["fraction_read_sampled_layers"] <= 1.0
    assert s["host_bytes_per_token_per_layer"] > 0
    assert abs(np.mean(out["logp"]) - np.mean(exact["logp"])) < 0.05  # nats per token


def test_generation_past_the_window_with_ragged_rows(model):
    prompts = [[5, 17, 33], list(range(10, 30)), [77, 3, 12, 90, 61, 4, 8] * 6]
    sampled = pigjax.MagicPIG(K=1, L=400, sink=2, local=8, dense_layers=(), storage="f32")
    # temperature 1: the sampled tokens follow the logits closely (a wrong pair would change some)
    exact, approx = pigjax.generate(model, prompts, max_new_tokens=40, temperature=1.0, seed=3,
                                    attention=[pigjax.Dense(), sampled])
    assert exact.stats["attention"] == "exact-memory" and approx.stats["attention"] == "magicpig-memory"
    assert [len(t) for t in approx.tokens] == [40, 40, 40]
    assert approx.tokens == exact.tokens
    assert approx.stats["fraction_read"] == pytest.approx(1.0, abs=1e-3)
    # greedy, K10L150 (default dense layers (0, 1) would leave this 2-layer model nothing to sample)
    gen = pigjax.generate(model, prompts, max_new_tokens=40,
                          attention=pigjax.MagicPIG(sink=2, local=8, dense_layers=()))
    assert [len(t) for t in gen.tokens] == [40, 40, 40] and gen.finish_reasons == ["length"] * 3
    assert 0.0 < gen.stats["fraction_read"] <= 1.0


def test_bad_configurations_fail_clearly(model, tokens):
    with pytest.raises(pigjax.PigjaxError, match="Memory Mosaics models decode with exact retrieval"):
        pigjax.generate(model, [[1, 2, 3]], max_new_tokens=4, attention=pigjax.TopK())
    with pytest.raises(pigjax.PigjaxError, match="out of range"):
        pigjax.generate(model, [[1, 2, 3]], max_new_tokens=4, attention=pigjax.MagicPIG(dense_layers=(5,)))
    backend = MosaicsSampled(pigjax.MagicPIG(dense_layers=()))
    with backend.resources(model.config, 1, 8) as runtime:
        state = backend.init_state(model.config, 1, 8, jnp.float32, runtime.arrays)
        with pytest.raises(pigjax.PigjaxError, match="one token per step"):
            backend.step(model.params, model.config, jnp.ones((1, 2), jnp.int32), state)
    assert pigjax.generate(model, [[1, 2]], max_new_tokens=0, attention=pigjax.MagicPIG()).stats["attention"] \
        == "magicpig-memory"


def check_bf16_decodes_close_to_f32(model, tokens, exact, prompt):
    """The model in bf16, exact and through the engine, decodes within 0.1 nats of f32's `exact`
    (teacher-forced from 30 tokens), and generates from `prompt` through the engine.
    Shared with test_mosaics_v2_memory.py."""
    half = model.astype(jnp.bfloat16)
    for attention in (None, pigjax.MagicPIG(K=1, L=400, sink=2, local=4, dense_layers=())):
        out = teacher_forced(half, tokens, 30, attention)
        assert np.all(np.isfinite(out["logp"]))
        assert np.max(np.abs(out["logp"] - exact["logp"])) < 0.1
    gen = pigjax.generate(half, [prompt], max_new_tokens=12, attention=pigjax.MagicPIG(sink=2, local=4, dense_layers=()))
    assert len(gen.tokens[0]) == 12 and 0.0 < gen.stats["fraction_read"] <= 1.0


def test_bf16_model_decodes_close_to_f32(model, tokens, exact):
    check_bf16_decodes_close_to_f32(model, tokens, exact, [5, 17, 33] * 5)
