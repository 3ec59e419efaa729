"""pigjax.mosaics against the PyTorch reference (tests/torch_mosaics.py), its two forms against each
other, causality, checkpoints and configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_mosaics

import pigjax
from pigjax import mosaics
from pigjax import CheckpointError, ConfigError

# Shared jitted forms (config static), so tests reuse compiled programs; every state has capacity 32
# and is donated to the step (updated in place, as a decoding loop would).
APPLY = jax.jit(mosaics.apply, static_argnums=1)
STEP = jax.jit(mosaics.step, static_argnums=1, donate_argnums=3)
CAPACITY = 32

CONFIGS = {
    "d64_h4_l2": (mosaics.MosaicsConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=64), 17),
    "d96_h3_l3": (mosaics.MosaicsConfig(vocab_size=131, hidden_size=96, num_hidden_layers=3, num_attention_heads=3,
                                        pmem_size=50, max_position_embeddings=64, layer_norm_eps=1e-6), 23),
}


def randomized(params, seed):
    """Fresh parameters with the per-head scalars and norms moved off their (shared) initial values,
    so that a mixed-up head, layer or parameter shows in the comparison."""
    rng = np.random.default_rng(seed)

    def move(keypath, p):
        name, p = jax.tree_util.keystr(keypath), np.asarray(p)
        if name.endswith("['decay']"):
            return p * rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
        if name.endswith("['key_scale']"):
            return rng.uniform(0.05, 0.2, p.shape)  # b = 10c below the clamp at 5: scores stay O(10)
        if name.endswith("['value_scale']") or name.endswith("['out_scale']"):
            return rng.uniform(-0.1, 0.05, p.shape)
        if name.endswith("['peek']"):
            return rng.uniform(-0.3, 1.3, p.shape)
        if name.endswith("['embedding']"):  # std 1 instead of 1/sqrt(d): logits O(1..10), not O(0.1)
            return rng.standard_normal(p.shape)
        if name.endswith("['scale']"):  # LayerNorm
            return 1 + 0.2 * rng.standard_normal(p.shape)
        return p

    return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), jax.tree_util.tree_map_with_path(move, params))


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """The reference's many tiny ops: with two threads, torch spin-waits against XLA's threads
    (3.5 s instead of 20 ms for a forward and backward here). Restored for other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, length = CONFIGS[request.param]
    params = randomized(mosaics.init_params(config, seed=1), seed=2)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, length))
    return request.param, config, params, tokens


def loss_and_logits(params, config, tokens, targets):
    logits = mosaics.apply(params, config, tokens)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean(), logits


def test_logits_and_gradients_match_torch(case):
    """float32 JAX against the float64 reference: logits, and the gradient of the mean
    cross-entropy with respect to every parameter."""
    name, config, params, tokens = case
    targets = np.random.default_rng(4).integers(0, config.vocab_size, tokens.shape)
    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
    (_, ours), ours_g = grad_fn(params, config, jnp.asarray(tokens), jnp.asarray(targets))
    ref_model = torch_mosaics.from_jax(params, config)
    logits = ref_model(torch.as_tensor(tokens, dtype=torch.long))
    ref = logits.detach().numpy()
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name}: max |logit| {np.abs(ref).max():.2f}, logits max abs err {err:.2e}")
    assert np.abs(ref).std() > 0.5 and np.abs(ref).max() > 3  # O(1..10) logits, not near-zero ones
    assert err < 1e-5

    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(targets, dtype=torch.long).reshape(-1)).backward()
    ref_g = torch_mosaics.grads_as_jax(ref_model, params, config)
    worst = 0.0
    for (path, g), r in zip(jax.tree.leaves_with_path(ours_g), jax.tree.leaves(ref_g)):
        rel = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
        worst = max(worst, rel)
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)  # every parameter takes part
        assert rel < 1e-4, f"{jax.tree_util.keystr(path)}: relative gradient error {rel:.2e}"
    print(f"{name}: gradients max relative err {worst:.2e}")


def recurrent_logits(params, config, tokens, chunks):
    """Logits of the recurrent form fed in chunks of the given sizes (summing to T)."""
    state = mosaics.init_state(config, tokens.shape[0], capacity=CAPACITY)
    out, start = [], 0
    for size in chunks:
        logits, state = STEP(params, config, tokens[:, start:start + size], state)
        out.append(logits)
        start += size
    assert start == tokens.shape[1] and np.all(np.asarray(state.count) == start) and state.capacity == CAPACITY
    return np.concatenate(out, axis=1)


def test_recurrent_equals_parallel(case):
    name, config, params, tokens = case
    parallel = np.asarray(APPLY(params, config, tokens))
    t = tokens.shape[1]
    for chunks in ([1] * t, [7, 1, 1, 1, 7] + [1] * (t - 17)):
        err = np.abs(recurrent_logits(params, config, tokens, chunks) - parallel).max()
        print(f"{name}: chunks {chunks[:6]}...: max abs err {err:.2e}")
        assert err < 1e-5


def test_recurrent_ragged_rows_with_padding(case):
    """Rows advance by their own num_new; padding tokens leave no trace in the state."""
    _, config, params, tokens = case
    parallel = np.asarray(APPLY(params, config, tokens))
    state = mosaics.init_state(config, 2, capacity=CAPACITY)
    first = np.array([7, 2])  # row 1: 2 real tokens, then 5 of padding
    padded = np.where(np.arange(7)[None] < first[:, None], tokens[:, :7], 5)
    logits, state = STEP(params, config, padded, state, jnp.asarray(first))
    np.testing.assert_allclose(np.asarray(logits)[0], parallel[0, :7], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1, :2], parallel[1, :2], atol=1e-5)
    # then one token per row at each row's own position; row 0 idles (num_new 0) at first
    logits, state = STEP(params, config, tokens[[0, 1], [7, 2]][:, None], state, jnp.asarray([0, 1]))
    np.testing.assert_allclose(np.asarray(logits)[1, 0], parallel[1, 2], atol=1e-5)
    logits, state = STEP(params, config, tokens[[0, 1], [7, 3]][:, None], state)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], parallel[[0, 1], [7, 3]], atol=1e-5)
    assert np.asarray(state.count).tolist() == [8, 4]


def test_causal(case):
    """Editing tokens >= cut leaves the logits before cut unchanged (y_T only reads pairs t < T,
    and pair t peeks at x_{t+1} <= x_T); position 0 sees no pair at all."""
    _, config, params, tokens = case
    edited = tokens.copy()
    cut = tokens.shape[1] // 2
    edited[:, cut:] = (edited[:, cut:] + 1 + np.arange(tokens.shape[1] - cut)) % config.vocab_size
    a, b = np.asarray(APPLY(params, config, tokens)), np.asarray(APPLY(params, config, edited))
    np.testing.assert_allclose(a[:, :cut], b[:, :cut], atol=1e-6)
    assert np.abs(a[:, cut:] - b[:, cut:]).max() > 1e-2  # the edit does change what comes after it
    # recurrent: a 7-token prefix, then one 7-token chunk in which tokens >= cut are edited
    state = STEP(params, config, tokens[:, :7], mosaics.init_state(config, 2, CAPACITY))[1]
    ra, rb = (np.asarray(STEP(params, config, x[:, 7:14], jax.tree.map(jnp.copy, state))[0]) for x in (tokens, edited))
    np.testing.assert_allclose(ra[:, :cut - 7], rb[:, :cut - 7], atol=1e-6)
    assert np.abs(ra[:, cut - 7:] - rb[:, cut - 7:]).max() > 1e-2


def test_forward_save_load_round_trip(tmp_path):
    config, _ = CONFIGS["d96_h3_l3"]
    model = mosaics.init(config, seed=4)
    assert isinstance(model, pigjax.Model) and model.config is config
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    logits = np.asarray(pigjax.forward(model, tokens, lengths=[9, 4]))
    assert np.all(logits[1, 4:] == 0) and np.abs(logits[1, :4]).max() > 0
    np.testing.assert_allclose(logits[1, :4], np.asarray(APPLY(model.params, config, tokens[1:, :4]))[0],
                               atol=1e-6)
    path = pigjax.save(model, tmp_path / "mosaics")
    meta = pigjax.checkpoint.read_meta(path)
    assert meta["architecture"] == "memory_mosaics" and meta["config"]["model_type"] == "memory_mosaics"
    loaded = pigjax.load(path)
    assert isinstance(loaded.config, mosaics.MosaicsConfig) and loaded.config == config
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(pigjax.forward(loaded, tokens, lengths=[9, 4])), logits)
    with pytest.raises(pigjax.PigjaxError, match="longer than the model's context"):
        pigjax.forward(model, np.zeros((1, config.max_position_embeddings + 1), np.int32))


def test_checkpoint_with_mismatched_config_is_refused(tmp_path):
    import json

    config, _ = CONFIGS["d64_h4_l2"]
    path = pigjax.save(mosaics.init(config), tmp_path / "m")
    meta = json.loads((path / "pigjax.json").read_text())
    meta["config"]["pmem_size"] = 100
    (path / "pigjax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        pigjax.load(path)
    meta["config"]["model_type"] = "llama"
    (path / "pigjax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bad config.*not a Memory Mosaics config"):
        pigjax.load(path)
    meta["architecture"] = "gpt2"
    (path / "pigjax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        pigjax.load(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=65), r"hidden_size \(65\) must be divisible by num_attention_heads \(4\)"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer, got 0"),
    (dict(num_hidden_layers=-2), r"num_hidden_layers must be a positive integer, got -2"),
    (dict(num_attention_heads=0), r"num_attention_heads must be a positive integer"),
    (dict(pmem_size=0), r"pmem_size must be a positive integer, got 0"),
    (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer"),
    (dict(hidden_size=64.0), r"hidden_size must be a positive integer, got 64.0"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    (dict(layer_norm_eps=0.0), r"layer_norm_eps must be positive"),
    (dict(eos_token_ids=(100,)), r"eos_token_ids \[100\] lie outside the vocabulary \[0, 50\)"),
])
def test_bad_config(kwargs, message):
    base = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match=message):
        mosaics.MosaicsConfig(**{**base, **kwargs})


def test_config_dict_round_trip():
    config = mosaics.MosaicsConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   eos_token_ids=[3])
    assert config.pmem_size == 224 and config.eos_token_ids == (3,) and hash(config) is not None
    assert mosaics.MosaicsConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown MosaicsConfig fields \['rope'\]"):
        mosaics.MosaicsConfig.from_dict({**config.to_dict(), "rope": {}})


def test_leaky_average_across_chunks():
    """The chunked parallel leaky average (several chunks, a padded last one, a starting state)
    against the recursion k̄_t = x_t + e^{-β} k̄_{t-1}, including huge and zero decay rates."""
    from pigjax.models.mosaics import LEAKY_CHUNK, leaky_average

    rng = np.random.default_rng(0)
    t = 2 * LEAKY_CHUNK + 13
    x = rng.standard_normal((2, 4, t, 3)).astype(np.float32)
    beta = np.array([0.0, 0.05, 2.0, 80.0], np.float32)
    init = rng.standard_normal((2, 4, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(leaky_average)(x, beta, init))
    state, ref = init.astype(np.float64), []
    for i in range(t):
        state = x[:, :, i] + np.exp(-beta.astype(np.float64))[:, None] * state
        ref.append(state)
    ref = np.stack(ref, axis=2)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
