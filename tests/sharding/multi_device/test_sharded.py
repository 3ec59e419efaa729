"""Sharded forward / generate / load on 4 CPU devices equal one device (run by test_multi_device.py).

Four devices reach every layout (data only, model only, both; heads split or replicated) at half
the threads of eight, which on 2 cores costs a quarter less time."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import pigjax
from pigjax import mosaics, sharding
from pigjax.engine.grid import StoreGrid
from pigjax.models import llama

def tiny(hq, hkv, layers=2, head_dim=8):
    config = pigjax.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=hq, num_key_value_heads=hkv, head_dim=head_dim,
                                max_position_embeddings=1024)
    return pigjax.Model(config, llama.init_params(config, 0))


def mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"))


def test_four_devices():
    assert jax.device_count() == 4


# GQA ratios 1, 2, 3. Heads split over "model" when both counts divide it, else attention is
# replicated: each ratio runs on a mesh of each kind (every compile costs seconds).
@pytest.mark.parametrize("hq,hkv,meshes", [(8, 8, ((1, 4), (4, 1))), (4, 2, ((1, 4), (2, 2))),
                                           (6, 2, ((1, 4), (2, 2)))])
def test_forward_equals_one_device(hq, hkv, meshes):
    model = tiny(hq, hkv)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (4, 12))
    lengths = np.array([12, 5, 1, 9])
    ref = np.asarray(pigjax.forward(model, tokens, lengths))
    for shape in meshes:
        out = pigjax.forward(model, tokens, lengths, mesh=mesh(*shape))
        assert out.sharding.spec == (P("data") if shape[0] > 1 else P())
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0, err_msg=str(shape))


def test_param_layout():
    m = mesh(1, 4)
    split = sharding.shard_params(tiny(8, 4).config, tiny(8, 4).params, m)
    assert split["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, None, "model", None)
    assert split["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "model", None)
    # 6 query / 2 KV heads do not divide a model axis of 4: attention replicated, the MLP split
    odd = sharding.shard_params(tiny(6, 2).config, tiny(6, 2).params, m)
    assert odd["layers"]["attn"]["k_proj"]["kernel"].sharding.is_fully_replicated
    assert odd["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, None, "model")


PROMPTS = [np.random.default_rng(1).integers(0, 97, n).tolist() for n in (300, 150, 220)]  # ragged, 3 rows


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 3)], ids=["split", "replicated"])
def test_generate_equals_one_device(hq, hkv):
    """Greedy tokens of a ragged batch on a (2, 2) mesh; heads split over "model" (4/2) or
    replicated (3 KV heads). Rows over "data" are the same code with or without a model axis
    (forward checks (4, 1))."""
    model = tiny(hq, hkv, layers=4, head_dim=16)
    backends = [pigjax.Dense(), pigjax.MagicPIG(K=4, L=20, local=16),
                pigjax.RankedLSH(K=4, L=20, rank_tables=8, top=0.05, local=16)]
    refs = pigjax.generate(model, PROMPTS, max_new_tokens=12, attention=backends)
    gens = pigjax.generate(model, PROMPTS, max_new_tokens=12, attention=backends, mesh=mesh(2, 2))
    for gen, ref in zip(gens, refs):
        assert gen.tokens == ref.tokens, ref.stats["attention"]
        assert gen.stats["fraction_read"] == pytest.approx(ref.stats["fraction_read"])


def test_baselines_equal_one_device():
    model = tiny(4, 2, layers=4, head_dim=16)
    backends = [pigjax.TopK(0.1), pigjax.Quest(0.1), pigjax.Oracle(0.1)]
    refs = pigjax.generate(model, PROMPTS, max_new_tokens=8, attention=backends)
    gens = pigjax.generate(model, PROMPTS, max_new_tokens=8, attention=backends, mesh=mesh(2, 2))
    assert [g.tokens for g in gens] == [r.tokens for r in refs]


def mosaics_model():
    config = pigjax.MosaicsConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  max_position_embeddings=512)
    return mosaics.init(config, seed=0)


def test_mosaics_forward_equals_one_device():
    model = mosaics_model()
    tokens = np.random.default_rng(0).integers(0, 97, (4, 20))
    np.testing.assert_allclose(np.asarray(pigjax.forward(model, tokens, mesh=mesh(2, 2))),
                               np.asarray(pigjax.forward(model, tokens)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", [pigjax.Dense(), pigjax.MagicPIG(K=4, L=20, local=16)], ids=["exact", "sampled"])
def test_mosaics_generate_equals_one_device(attention):
    model = mosaics_model()
    prompts = [p[:150] for p in PROMPTS]
    ref = pigjax.generate(model, prompts, max_new_tokens=10, attention=attention)
    gen = pigjax.generate(model, prompts, max_new_tokens=10, attention=attention, mesh=mesh(2, 2))
    assert gen.tokens == ref.tokens


def test_engine_store_per_device():
    """Each device's rows and heads live in its own store; jitted code gets a [data, model] grid."""
    model = tiny(4, 2, layers=4, head_dim=16)
    backend = pigjax.MagicPIG(K=4, L=20)
    with sharding.use(mesh(2, 2)):
        with backend.resources(model.config, 4, 256) as runtime:
            grid = runtime.store
            assert isinstance(grid, StoreGrid) and len(grid.stores) == 4 and grid.heads == "model"
            handles = runtime.arrays.handle
            assert handles.shape == (2, 2) and handles.sharding.spec == P("data", "model")
            assert len({int(np.asarray(s.data)[0, 0]) for s in handles.addressable_shards}) == 4
            # 2 sparse layers x 2 local rows per store, 1 of the 2 KV heads
            info = grid.stores[(0, 0)].info()
            assert len(info["middle_counts"]) == 4


def test_load_into_mesh(tmp_path):
    model = tiny(8, 4)
    pigjax.save(model, tmp_path / "ck")
    m = mesh(1, 4)
    loaded = pigjax.load(tmp_path / "ck", mesh=m)
    kernel = loaded.params["layers"]["attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "model", None)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.params["layers"]["attn"]["q_proj"]["kernel"]))
    tokens = np.random.default_rng(0).integers(0, 97, (2, 9))
    np.testing.assert_allclose(np.asarray(pigjax.forward(loaded, tokens, mesh=m)),
                               np.asarray(pigjax.forward(model, tokens)), atol=1e-5, rtol=0)


def test_bad_meshes():
    model = tiny(4, 2)
    tokens = np.zeros((3, 4), np.int32)
    with pytest.raises(pigjax.ConfigError, match="does not divide over the mesh's 'data' axis of size 2"):
        pigjax.forward(model, tokens, mesh=mesh(2, 2))
    with pytest.raises(pigjax.ConfigError, match="axes must be named"):
        pigjax.forward(model, tokens, mesh=jax.make_mesh((2, 2), ("batch", "model")))
    with pytest.raises(pigjax.ConfigError, match="jax.sharding.Mesh"):
        pigjax.generate(model, [[1, 2]], max_new_tokens=2, mesh="2x2")
    with pytest.raises(pigjax.ConfigError, match="needs 6 devices; there are 4"):
        sharding.make_mesh(3, 2)
    assert sharding.make_mesh(3, 1).devices.size == 3  # one process: the first 3
    with pytest.raises(pigjax.ConfigError, match="DATAxMODEL"):
        sharding.parse_mesh("2by2")
    assert sharding.parse_mesh("2x2").shape == {"data": 2, "model": 2}


def test_training_on_meshes_equals_one_device(tmp_path):
    """Data- and model-parallel training steps give the losses of one device."""
    from pigjax import train as training

    rng = np.random.default_rng(0)
    words = "the cat dog bird sees chases likes a red big small old".split()
    text = tmp_path / "tiny.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(8, 30))) for _ in range(200)) + "\n")
    losses = {}
    for model in ("mosaics", "llama"):
        for mesh_text in (None, "2x2"):  # rows over 2, heads / MLP over 2
            cfg = training.TrainConfig(workdir=str(tmp_path / f"{model}-{mesh_text}"), data=str(text),
                                       data_cache=str(tmp_path / "cache"), vocab_size=300, val_fraction=0.1, seq_len=32, batch=8,
                                       hidden=32, layers=2, heads=2, steps=6, warmup=2, save_every=1000,
                                       eval_every=1000, eval_windows=4, final_eval_windows=8, progress=False,
                                       dropout=0.0, mesh=mesh_text)
            losses[model, mesh_text] = training.train(cfg, log=lambda *a: None)["train"]["loss"]
        np.testing.assert_allclose(losses[model, "2x2"], losses[model, None], rtol=1e-5, atol=0)
    with pytest.raises(pigjax.ConfigError, match="--batch: a batch of 6 rows does not divide"):
        training.train(dataclasses.replace(cfg, batch=6, mesh="4x1", workdir=str(tmp_path / "bad")))
