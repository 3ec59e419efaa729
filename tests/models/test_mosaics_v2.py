"""Memory Mosaics v2 (pigjax.models.mosaics_v2, docs/algorithm.md §3A) against the PyTorch
reference (tests/torch_mosaics.py), its two forms against each other, the gated average, the
configuration and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_mosaics
from test_mosaics import randomized, torch_one_thread  # noqa: F401 (a fixture)

import pigjax
from pigjax import ConfigError, mosaics
from pigjax.models.mosaics_v2 import GATED_CHUNK, gated_average

APPLY = jax.jit(mosaics.apply, static_argnums=1)
STEP = jax.jit(mosaics.step, static_argnums=1, donate_argnums=3)
CAPACITY = 48


def v2(**kw):
    return mosaics.MosaicsConfig(**{**dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          max_position_embeddings=64, version=2), **kw})


CONFIGS = {  # (config, sequence length): windows and gaps small enough that every rule shows
    "d32_h2_l2": (v2(short_window=6, long_gap_min=3, long_gap_max=9), 20),
    "d48_h3_l1": (v2(vocab_size=83, hidden_size=48, num_hidden_layers=1, num_attention_heads=3, short_window=11,
                     long_gap_min=5, long_gap_max=20, ffn_size=40, layer_norm_eps=1e-6), 2 * GATED_CHUNK + 9),
}


def randomized_v2(params, seed):
    """`randomized`, and v2's own per-head scalars moved off their initial values too."""
    params = randomized(params, seed)
    rng = np.random.default_rng(seed + 1)

    def move(keypath, p):
        name = jax.tree_util.keystr(keypath)
        if "bandwidth" in name:
            return jnp.asarray(rng.uniform(-1.0, 1.0, p.shape), jnp.float32)
        return p

    return jax.tree_util.tree_map_with_path(move, params)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, length = CONFIGS[request.param]
    params = randomized_v2(mosaics.init_params(config, seed=1), seed=2)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, length))
    return request.param, config, params, tokens


def loss_and_logits(params, config, tokens, targets, long_gap):
    logits = mosaics.apply(params, config, tokens, long_gap=long_gap)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean(), logits


@pytest.mark.parametrize("gap", ["min", "drawn"])
def test_logits_and_gradients_match_torch(case, gap):
    """float32 JAX against the float64 reference, at inference's m and at a training-time m
    (traced in JAX, as training draws it)."""
    name, config, params, tokens = case
    long_gap = config.long_gap_min if gap == "min" else (config.long_gap_min + config.long_gap_max) // 2
    targets = np.random.default_rng(4).integers(0, config.vocab_size, tokens.shape)
    grad_fn = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True), static_argnums=1)
    (_, ours), ours_g = grad_fn(params, config, jnp.asarray(tokens), jnp.asarray(targets), jnp.int32(long_gap))
    ref_model = torch_mosaics.from_jax(params, config)
    logits = ref_model(torch.as_tensor(tokens, dtype=torch.long), long_gap)
    ref = logits.detach().numpy()
    err = np.abs(np.asarray(ours) - ref).max()
    print(f"{name} m={long_gap}: max |logit| {np.abs(ref).max():.2f}, logits max abs err {err:.2e}")
    assert np.abs(ref).std() > 0.5 and np.abs(ref).max() > 3
    assert err < 1e-5
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(targets, dtype=torch.long).reshape(-1)).backward()
    ref_g = torch_mosaics.grads_as_jax(ref_model, params, config)
    worst = 0.0
    for (path, g), r in zip(jax.tree.leaves_with_path(ours_g), jax.tree.leaves(ref_g)):
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)  # every parameter takes part
        rel = np.abs(np.asarray(g) - r).max() / np.abs(r).max()
        worst = max(worst, rel)
        assert rel < 1e-4, f"{jax.tree_util.keystr(path)}: relative gradient error {rel:.2e}"
    print(f"{name} m={long_gap}: gradients max relative err {worst:.2e}")


def test_recurrent_equals_parallel(case):
    name, config, params, tokens = case
    parallel = np.asarray(APPLY(params, config, tokens))
    t = tokens.shape[1]
    for chunks in ([1] * t, [7, 1, 1, 1, t - 10]):
        state, out, start = mosaics.init_state(config, 2, capacity=CAPACITY), [], 0
        for size in chunks:
            logits, state = STEP(params, config, tokens[:, start:start + size], state)
            out.append(np.asarray(logits))
            start += size
        assert state.capacity == CAPACITY and np.all(np.asarray(state.count) == t)
        err = np.abs(np.concatenate(out, axis=1) - parallel).max()
        print(f"{name}: chunks {chunks[:5]}: max abs err {err:.2e}")
        assert err < 1e-5


def test_recurrent_ragged_rows_with_padding(case):
    _, config, params, tokens = case
    parallel = np.asarray(APPLY(params, config, tokens))
    first = np.array([9, 3])
    padded = np.where(np.arange(9)[None] < first[:, None], tokens[:, :9], 5)
    logits, state = STEP(params, config, padded, mosaics.init_state(config, 2, CAPACITY), jnp.asarray(first))
    np.testing.assert_allclose(np.asarray(logits)[0], parallel[0, :9], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1, :3], parallel[1, :3], atol=1e-5)
    logits, state = STEP(params, config, tokens[[0, 1], [9, 3]][:, None], state)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], parallel[[0, 1], [9, 3]], atol=1e-5)


def test_causal_and_long_gap_matters(case):
    _, config, params, tokens = case
    edited = tokens.copy()
    cut = tokens.shape[1] // 2
    edited[:, cut:] = (edited[:, cut:] + 1) % config.vocab_size
    a, b = np.asarray(APPLY(params, config, tokens)), np.asarray(APPLY(params, config, edited))
    np.testing.assert_allclose(a[:, :cut], b[:, :cut], atol=1e-6)
    assert np.abs(a[:, cut:] - b[:, cut:]).max() > 1e-2
    # a larger m hides pairs from the long-term memory: positions T < m + 1 ... change only later
    far = np.asarray(mosaics.apply(params, config, tokens, long_gap=config.long_gap_max))
    np.testing.assert_allclose(far[:, :config.long_gap_min], a[:, :config.long_gap_min], atol=1e-6)
    assert np.abs(far - a).max() > 1e-3


def test_gated_average_against_the_recursion():
    rng = np.random.default_rng(0)
    t = 2 * GATED_CHUNK + 5
    x = rng.standard_normal((2, 3, t, 4)).astype(np.float32)
    log_keep = -np.abs(rng.standard_normal((2, 3, t)) * 3).astype(np.float32)
    log_keep[0, 0] = 0.0  # no decay at all
    log_keep[1, 1, 10] = -80.0  # a near-total reset
    log_gain = rng.standard_normal((2, 3, t)).astype(np.float32)
    init = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ours = np.asarray(jax.jit(gated_average)(x, log_keep, log_gain, init))
    state, ref = init.astype(np.float64), []
    for i in range(t):
        state = np.exp(log_gain[:, :, i, None].astype(np.float64)) * x[:, :, i] + \
            np.exp(log_keep[:, :, i, None].astype(np.float64)) * state
        ref.append(state)
    np.testing.assert_allclose(ours, np.stack(ref, axis=2), rtol=1e-5, atol=1e-4)
    grads = jax.grad(lambda *a: gated_average(*a).sum(), argnums=(0, 1, 2))(x, log_keep, log_gain, init)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_save_load_round_trip(tmp_path):
    config, _ = CONFIGS["d48_h3_l1"]
    model = mosaics.init(config, seed=4)
    path = pigjax.save(model, tmp_path / "v2")
    meta = pigjax.checkpoint.read_meta(path)
    assert meta["config"]["version"] == 2 and meta["config"]["short_window"] == 11
    loaded = pigjax.load(path)
    assert loaded.config == config
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 30))
    np.testing.assert_array_equal(np.asarray(pigjax.forward(loaded, tokens)), np.asarray(pigjax.forward(model, tokens)))
    gen = pigjax.generate(loaded, [[1, 2, 3]], max_new_tokens=8)
    logits = np.asarray(pigjax.forward(model, np.array([[1, 2, 3] + gen.tokens[0]])))
    assert logits[0, 2:-1].argmax(-1).tolist() == gen.tokens[0]  # greedy decoding = parallel argmax


def test_v1_config_dict_has_no_v2_fields():
    config = mosaics.MosaicsConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert config.version == 1 and "version" not in config.to_dict() and "ffn_size" not in config.to_dict()
    two = v2()
    assert two.pmem_size is None and two.ffn_size == 64 and (two.long_gap_min, two.long_gap_max) == (64, 256)
    assert mosaics.MosaicsConfig.from_dict(two.to_dict()) == two


@pytest.mark.parametrize("kwargs, message", [
    (dict(version=3), r"version must be 1 or 2, got 3"),
    (dict(version=2, pmem_size=10), r"fields \['pmem_size'\] do not apply to version 2"),
    (dict(short_window=10), r"fields \['short_window'\] do not apply to version 1"),
    (dict(version=2, short_window=0), r"short_window must be a positive integer, got 0"),
    (dict(version=2, long_gap_min=0), r"long_gap_min must be a positive integer"),
    (dict(version=2, long_gap_min=80, long_gap_max=70), r"long_gap_min \(80\) must not exceed long_gap_max \(70\)"),
    (dict(version=2, ffn_size=2.5), r"ffn_size must be a positive integer, got 2.5"),
])
def test_bad_config(kwargs, message):
    base = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match=message):
        mosaics.MosaicsConfig(**{**base, **kwargs})


def test_long_gap_is_v2_only():
    config = mosaics.MosaicsConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ConfigError, match="long_gap applies to Memory Mosaics v2 only"):
        mosaics.apply(mosaics.init_params(config), config, jnp.zeros((1, 3), jnp.int32), long_gap=3)
