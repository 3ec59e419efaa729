"""Memory Mosaics v2's long-term memory read by the engine (pigjax.models.mosaics_memory,
docs/algorithm.md §3A.4): equal to exact retrieval where the sampling reads everything, close with
a large budget, through teacher-forced decoding and generate; the fraction read is reported."""

import numpy as np
import pytest
from test_mosaics_memory import check_bf16_decodes_close_to_f32

import pigjax
from pigjax import mosaics
from pigjax.eval.perplexity import teacher_forced


@pytest.fixture(scope="module")
def model():
    config = mosaics.MosaicsConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=256, version=2, short_window=16, long_gap_min=8,
                                   long_gap_max=24)
    return mosaics.init(config, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 97, (2, 100))


@pytest.fixture(scope="module")
def exact(model, tokens):
    return teacher_forced(model, tokens, 30, return_logits=True)


def test_every_pair_sampled_equals_exact(model, tokens, exact):
    """K=1, L=400: every pair collides (u ~ 1); sink 2 + local 4 + gap 8: pairs go to the engine at every step."""
    out = teacher_forced(model, tokens, 30, pigjax.MagicPIG(K=1, L=400, sink=2, local=4, dense_layers=(),
                                                            storage="f32"), return_logits=True)
    np.testing.assert_allclose(out["logits"], exact["logits"], atol=2e-4, rtol=0)
    assert out["stats"]["attention"] == "magicpig-memory"
    assert out["stats"]["fraction_read"] == pytest.approx(1.0, abs=1e-3)


def test_window_covering_the_context_equals_exact(model, tokens, exact):
    out = teacher_forced(model, tokens, 30, pigjax.MagicPIG(local=100, dense_layers=()), return_logits=True)
    np.testing.assert_allclose(out["logits"], exact["logits"], atol=1e-5, rtol=0)
    assert out["stats"]["fraction_read"] is None  # the engine never held a pair


@pytest.mark.parametrize("K, L, max_dlogp", [(4, 200, 1e-3), (10, 150, 5e-3)])
def test_large_budget_is_close_and_fraction_read_reported(model, tokens, exact, K, L, max_dlogp):
    """Fewer bits per table read fewer pairs; the log-likelihood stays close to exact retrieval."""
    out = teacher_forced(model, tokens, 30, pigjax.MagicPIG(K=K, L=L, sink=2, local=4, dense_layers=()))
    s = out["stats"]
    print(f"K{K}L{L}: fraction of long-term engine pairs read {s['fraction_read']:.3f}, "
          f"mean log p - exact {np.mean(out['logp']) - np.mean(exact['logp']):.2e}")
    assert 0.0 < s["fraction_read"] <= s["fraction_read_sampled_layers"] <= 1.0
    assert abs(np.mean(out["logp"]) - np.mean(exact["logp"])) < max_dlogp
    assert s["cache_bytes_per_token_per_layer"] == 0  # every layer sampled: nothing grows on the model side
    assert s["short_term_bytes_per_layer"] == 2 * 64 * 4 * 16  # the short-term ring: h = 16 f32 pairs


def test_generate_with_ragged_rows(model):
    prompts = [[5, 17, 33], list(range(10, 40)), [77, 3, 12, 90, 61, 4, 8] * 6]
    sampled = pigjax.MagicPIG(K=1, L=400, sink=2, local=4, dense_layers=(), storage="f32")
    exact, approx = pigjax.generate(model, prompts, max_new_tokens=30, temperature=1.0, seed=3,
                                    attention=[pigjax.Dense(), sampled])
    assert exact.stats["attention"] == "exact-memory" and approx.tokens == exact.tokens
    assert approx.stats["fraction_read"] == pytest.approx(1.0, abs=1e-3)
    gen = pigjax.generate(model, prompts, max_new_tokens=30, attention=pigjax.MagicPIG(sink=2, local=4))
    assert [len(t) for t in gen.tokens] == [30, 30, 30] and gen.stats["dense_layers"] == [0, 1]


def test_short_term_memory_is_a_ring_of_h_pairs(model, tokens, exact):
    """The recurrent state's short-term buffers hold h pairs whatever the capacity (the long-term
    ones hold the capacity); decoding past several windows still equals the parallel form (the
    `exact` fixture decodes 100 tokens with h = 16)."""
    state = mosaics.init_state(model.config, 2, capacity=200)
    assert state.layers.short.keys.shape[3] == 16 and state.layers.long.keys.shape[3] == 200
    assert state.capacity == 200
    parallel = np.asarray(mosaics.apply(model.params, model.config, np.asarray(tokens)))
    np.testing.assert_allclose(exact["logits"], parallel[:, 29:-1], atol=2e-5)


def test_bf16_model_decodes_close_to_f32(model, tokens, exact):
    check_bf16_decodes_close_to_f32(model, tokens, exact, [5, 17, 33] * 10)
