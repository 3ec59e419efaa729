"""pigjax.generate: equality with transformers, decode == forward, sampling, finishing rules."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import make_hf_llama

import pigjax
from pigjax.convert import convert
from pigjax.sampling import Sampler

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = tmp_path_factory.mktemp("gen") / "hf"
    hf = make_hf_llama(src, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, init_range=0.3, seed=1)
    return hf, pigjax.load(convert(src, tmp_path_factory.mktemp("gen") / "ckpt", progress=False))


PROMPTS = [[5, 17, 33], [9] * 11 + [40, 41, 42], [77, 3, 12, 90, 61, 4, 8]]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_tiny_ragged_batch_equals_transformers(tiny):
    hf, model = tiny
    gen = pigjax.generate(model, PROMPTS, max_new_tokens=32)
    for prompt, ours in zip(PROMPTS, gen.tokens):
        assert ours == hf_greedy(hf, prompt, 32)
    assert gen.texts is None and len(gen.finish_reasons) == 3


def test_greedy_tokens_are_forward_argmax(tiny):
    _, model = tiny
    gen = pigjax.generate(model, PROMPTS, max_new_tokens=20)
    for prompt, new in zip(PROMPTS, gen.tokens):
        full = np.array([prompt + new])
        logits = np.asarray(pigjax.forward(model, full))
        predicted = logits[0, len(prompt) - 1: -1].argmax(-1)
        assert predicted.tolist() == new


def test_step_logits_at_equals_those_rows_of_all_logits(tiny):
    """The prefill's `logits_at` (each row's last prompt token only) gives the same logits as the
    full [B, T, V] at those tokens, and the same cache."""
    from pigjax.models import llama

    _, model = tiny
    tokens = jax.numpy.asarray([[5, 17, 33, 0, 0], [77, 3, 12, 90, 61]], jax.numpy.int32)
    lengths = jax.numpy.asarray([3, 5], jax.numpy.int32)
    cache = pigjax.Dense().init_cache(model.config, 2, 5, 0, jax.numpy.float32)
    full, c_full = llama.step(model.params, model.config, tokens, cache, lengths, fresh=True)
    last, c_last = llama.step(model.params, model.config, tokens, cache, lengths, fresh=True, logits_at=lengths - 1)
    assert last.shape == (2, 1, model.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(last[:, 0]), np.asarray(full[np.arange(2), np.asarray(lengths) - 1]))
    for a, b in zip(jax.tree.leaves(c_full), jax.tree.leaves(c_last)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_sample_and_top_k_1_is_greedy(tiny):
    _, model = tiny
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = pigjax.generate(model, PROMPTS, seed=3, **kw).tokens
    assert a == pigjax.generate(model, PROMPTS, seed=3, **kw).tokens
    assert a != pigjax.generate(model, PROMPTS, seed=4, **kw).tokens
    greedy = pigjax.generate(model, PROMPTS, max_new_tokens=16).tokens
    assert pigjax.generate(model, PROMPTS, top_k=1, seed=9, **kw).tokens == greedy


def filtered_softmax(logits, temperature, top_p):
    """Independent NumPy statement of temperature + top-p (smallest prefix with mass >= p)."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[np.concatenate([[0], np.nonzero(np.cumsum(p[order]) < top_p)[0] + 1])]] = True
    q = np.where(keep, p, 0)
    return q / q.sum()


def test_top_p_frequencies(tiny):
    _, model = tiny
    logits = np.asarray(pigjax.forward(model, np.array([PROMPTS[0]])))[0, -1]
    sampler = Sampler(temperature=1.0, top_p=0.8)
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(sampler(np.broadcast_to(logits, (n, logits.size)), keys))
    freq = np.bincount(draws, minlength=logits.size) / n
    expected = filtered_softmax(logits.astype(np.float64), 1.0, 0.8)
    assert 2 <= (expected > 0).sum() < logits.size  # the nucleus is neither trivial nor everything
    assert freq[expected == 0].sum() == 0
    assert np.abs(freq - expected).max() < 4 * np.sqrt(expected.max() / n) + 1e-3


def test_per_row_eos_and_stop(tiny):
    _, model = tiny
    greedy = pigjax.generate(model, PROMPTS, max_new_tokens=12).tokens
    eos = greedy[0][5]
    assert eos not in greedy[0][:5]
    with_eos = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=(eos,)))
    gen = pigjax.generate(with_eos, PROMPTS, max_new_tokens=12)
    assert gen.tokens[0] == greedy[0][:6] and gen.finish_reasons[0] == "eos"
    for r in (1, 2):  # the other rows run on unless they meet the same token
        stop_at = greedy[r].index(eos) + 1 if eos in greedy[r] else 12
        assert gen.tokens[r] == greedy[r][:stop_at]
    stop = pigjax.generate(model, PROMPTS, max_new_tokens=12, stop=[greedy[1][3:5]])
    assert stop.tokens[1] == greedy[1][:5] and stop.finish_reasons[1] == "stop"
    assert stop.finish_reasons[0] == "length" or greedy[1][3:5] == greedy[0][3:5]


def test_max_new_tokens_0_and_1(tiny):
    _, model = tiny
    zero = pigjax.generate(model, PROMPTS, max_new_tokens=0)
    assert zero.tokens == [[], [], []] and zero.finish_reasons == ["length"] * 3
    one = pigjax.generate(model, PROMPTS, max_new_tokens=1)
    greedy = pigjax.generate(model, PROMPTS, max_new_tokens=5).tokens
    assert one.tokens == [g[:1] for g in greedy] and set(one.finish_reasons) <= {"length", "eos"}


def test_streaming_delivers_every_token(tiny):
    _, model = tiny
    got = {0: [], 1: [], 2: []}
    gen = pigjax.generate(model, PROMPTS, max_new_tokens=30, stream=lambda r, t: got[r].extend(t))
    assert [got[r] for r in range(3)] == gen.tokens
    assert gen.tokens == pigjax.generate(model, PROMPTS, max_new_tokens=30).tokens


def test_deferred_backend_sees_earlier_generations(tiny):
    """An attention-list entry may be a function of the Generations before it (one shared prefill)."""
    _, model = tiny
    seen = []

    def pick(gens):
        seen.append([g.tokens for g in gens])
        return pigjax.TopK(fraction=1.0)

    dense, topk = pigjax.generate(model, PROMPTS, max_new_tokens=6, attention=[pigjax.Dense(), pick])
    assert seen == [[dense.tokens]] and topk.tokens == dense.tokens
    with pytest.raises(pigjax.PigjaxError, match="expected a back-end.*'dense'"):
        pigjax.generate(model, PROMPTS, max_new_tokens=6, attention=[pigjax.Dense(), "dense"])
    with pytest.raises(pigjax.PigjaxError, match="expected a back-end.*None"):
        pigjax.generate(model, PROMPTS, max_new_tokens=6, attention=[pigjax.Dense(), lambda gens: None])
    zero = pigjax.generate(model, PROMPTS, max_new_tokens=0, attention=[pigjax.Dense(), pick])
    assert len(zero) == 2 and zero[1].stats["attention"] == "topk"


def test_bad_input(tiny):
    _, model = tiny
    with pytest.raises(pigjax.PigjaxError, match="prompt 1 is empty"):
        pigjax.generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(pigjax.PigjaxError, match="non-empty list"):
        pigjax.generate(model, [], max_new_tokens=4)
    with pytest.raises(pigjax.PigjaxError, match="longer than the model's context"):
        pigjax.generate(model, [[1] * 600], max_new_tokens=4)
    with pytest.raises(pigjax.PigjaxError, match="plus max_new_tokens exceeds"):
        pigjax.generate(model, [[1] * 505], max_new_tokens=10)
    with pytest.raises(pigjax.PigjaxError, match="outside the vocabulary"):
        pigjax.generate(model, [[1, 500]], max_new_tokens=4)
    with pytest.raises(pigjax.PigjaxError, match="need a tokenizer"):
        pigjax.generate(model, ["text"], max_new_tokens=4)
    with pytest.raises(pigjax.PigjaxError, match="top_p"):
        pigjax.generate(model, [[1]], max_new_tokens=4, temperature=1.0, top_p=1.5)
    with pytest.raises(pigjax.PigjaxError, match="seed must be an integer"):
        pigjax.generate(model, [[1]], max_new_tokens=4, seed=2**70)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(temperature=1.0, top_k=2.5), "top_k"), (dict(temperature=1.0, top_k=True), "top_k"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_p=float("nan")), "top_p"),
])
def test_bad_sampling_settings(tiny, kwargs, match):
    """temperature=nan used to return token 0s and empty text; top_k=2.5 a raw traceback."""
    with pytest.raises(pigjax.PigjaxError, match=match):
        pigjax.generate(tiny[1], [[1, 2]], max_new_tokens=4, **kwargs)


def test_no_recompilation_within_a_bucket(tiny):
    _, model = tiny
    compiles = []

    def listener(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    pigjax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=10, temperature=0.5, seed=1)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        gen = pigjax.generate(model, [[7, 8, 9, 10], [11]], max_new_tokens=12, temperature=0.5, seed=2)
        assert gen.stats["compile_seconds"] == 0.0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert compiles == [] and pigjax.generate(model, [[1] * 40], max_new_tokens=3).stats["compile_seconds"] > 0
