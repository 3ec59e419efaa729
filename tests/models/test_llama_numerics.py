"""pigjax Llama vs transformers on tiny random models, through the real conversion path."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, make_hf_llama

import pigjax
from pigjax.convert import convert
from pigjax.models import llama

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    # GQA 1, untied, odd sizes (hidden 36 = 3 heads x 12), default rope (Llama 2 style).
    "mha_untied_odd": dict(rope_theta=10000.0),
    # GQA 2, tied embeddings, explicit head_dim unrelated to hidden/heads, eps 1e-6.
    "gqa2_tied_headdim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                              tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_size=32),
    # GQA 3, llama3 rope (transformers 5 `rope_parameters`), positions past original_max (16).
    "gqa3_llama3_tf5": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                            rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}),
    # Same model family written in the transformers 4 spelling (`rope_scaling` + `rope_theta`).
    "gqa3_llama3_tf4": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, num_hidden_layers=3,
                            rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE},
                            _json={"rope_parameters": None, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kwargs = dict(CASES[request.param])
    overrides = kwargs.pop("_json", None)
    src = tmp_path_factory.mktemp(request.param) / "hf"
    hf = make_hf_llama(src, config_json_overrides=overrides, **kwargs)
    ckpt = convert(src, tmp_path_factory.mktemp(request.param) / "pigjax", progress=False)
    return request.param, hf, pigjax.load(ckpt)


@pytest.mark.parametrize("length", [1, 7, 100, 300])
def test_logits_match_transformers(pair, length):
    name, hf, model = pair
    tokens = np.random.default_rng(length).integers(0, model.config.vocab_size, (2, length))
    ours = np.asarray(pigjax.forward(model, tokens))
    ref = hf_logits(hf, tokens)
    err = np.abs(ours - ref).max()
    print(f"{name} T={length}: max |logit| {np.abs(ref).max():.3f}, max abs err {err:.2e}")
    assert np.abs(ref).std() > 0.1  # the comparison is not between near-zero logits
    assert err < 1e-5


def test_right_padded_batch(pair):
    name, hf, model = pair
    lengths = np.array([5, 40, 23])
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 40))
    tokens[np.arange(40)[None] >= lengths[:, None]] = 0
    ours = np.asarray(pigjax.forward(model, tokens, lengths))
    ref = hf_logits(hf, tokens, lengths)
    valid = np.arange(40)[None] < lengths[:, None]
    err = np.abs(ours - ref)[valid].max()
    print(f"{name} padded: max abs err {err:.2e}")
    assert err < 1e-5
    assert np.all(ours[~valid] == 0)


def test_prefill_then_decode_equals_forward(pair):
    """Ragged prefill into a cache, then one-token steps at per-row positions, equals forward."""
    _, _, model = pair
    rng = np.random.default_rng(2)
    total, prompt_lens = 30, np.array([4, 11])
    tokens = rng.integers(0, model.config.vocab_size, (2, total)).astype(np.int32)
    full = np.asarray(pigjax.forward(model, tokens))

    cache = pigjax.Dense().init_cache(model.config, 2, total + 4, 0, jnp.float32)
    padded = np.where(np.arange(12)[None] < prompt_lens[:, None], tokens[:, :12], 0)
    logits, cache = llama.step(model.params, model.config, jnp.asarray(padded), cache, jnp.asarray(prompt_lens))
    for b in range(2):
        np.testing.assert_allclose(logits[b, : prompt_lens[b]], full[b, : prompt_lens[b]], atol=1e-5)
    pos = prompt_lens.copy()
    for _ in range(total - prompt_lens.max()):
        step_tokens = tokens[np.arange(2), pos][:, None]
        logits, cache = llama.step(model.params, model.config, jnp.asarray(step_tokens), cache)
        np.testing.assert_allclose(logits[:, 0], full[np.arange(2), pos], atol=1e-5)
        pos += 1
    assert np.array_equal(np.asarray(cache.lengths), pos)


def test_bfloat16_close_to_float32(pair):
    name, _, model = pair
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 50))
    ref = np.asarray(pigjax.forward(model, tokens))
    ours = np.asarray(pigjax.forward(model.astype(jnp.bfloat16), tokens))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{name} bf16: max abs err / max |logit| = {rel:.2e}")
    assert rel < 0.05


def test_both_rope_spellings_give_one_config():
    from pigjax import LlamaConfig

    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    tf4 = LlamaConfig.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE})
    tf5 = LlamaConfig.from_hf_config({**base, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE}})
    assert tf4 == tf5 and tf4.rope.rope_type == "llama3" and tf4.rope.theta == 5e5
    assert LlamaConfig.from_hf_config(tf4.to_hf_config()) == tf4


def test_llama3_rope_changes_frequencies():
    """Guards the llama3 cases above: they only test scaling if scaling moves the frequencies."""
    from pigjax.models.llama_config import RopeConfig, rope_inv_freq

    scaled = rope_inv_freq(RopeConfig(theta=5e5, **{k: v for k, v in LLAMA3_ROPE.items()}), 64)
    plain = rope_inv_freq(RopeConfig(theta=5e5), 64)
    assert scaled[-1] == pytest.approx(plain[-1] / 8) and plain[0] / 8 < scaled[0] < plain[0]
    assert (scaled != plain).mean() > 0.9
