"""Conversion formats, orbax round trip, and every bad-input case raising its clear error."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_llama

import pigjax
from pigjax import assets
from pigjax.convert import convert, convert_to_model
from pigjax import CheckpointError, ConfigError, ConversionError, PigjaxError


@pytest.fixture(scope="module")
def reference(hf_dir):
    return convert_to_model(hf_dir, progress=False)[0]


def copy_of(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_bin"])
def test_other_layouts_give_same_params(tmp_path, reference, layout):
    src = tmp_path / layout
    hf = make_hf_llama(tmp_path / "again", num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    if layout == "sharded_safetensors":
        hf.save_pretrained(src, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").is_file()
    else:
        import torch  # transformers 5 only writes safetensors; write the legacy file by hand

        hf.save_pretrained(src)
        os.remove(src / "model.safetensors")
        torch.save(hf.state_dict(), src / "pytorch_model.bin")
    assert_same_params(convert_to_model(src, progress=False)[0].params, reference.params)


def test_orbax_round_trip(tmp_path, reference):
    path = pigjax.save(reference, tmp_path / "ckpt")
    loaded = pigjax.load(path)
    assert loaded.config == reference.config and loaded.tokenizer is None
    assert_same_params(loaded.params, reference.params)
    bf16 = pigjax.load(pigjax.save(reference.astype(jnp.bfloat16), tmp_path / "bf16"))
    assert_same_params(bf16.params, reference.astype(jnp.bfloat16).params)
    with pytest.raises(CheckpointError, match="already exists"):
        pigjax.save(reference, path)


def test_failed_conversion_leaves_nothing(tmp_path, hf_dir):
    src = copy_of(hf_dir, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(ConversionError, match=r"model.safetensors.*shape \(50, 32\).*\(64, 32\)"):
        convert(src, out, progress=False)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


BAD_SOURCES = {
    "missing": (lambda d: d / "nope", ConversionError, "does not exist"),
    "no_config": (lambda d: (os.remove(d / "config.json"), d)[1], ConversionError, "config.json is missing"),
    "bad_json": (lambda d: ((d / "config.json").write_text("{not json"), d)[1], ConversionError, "not valid JSON"),
    "sliding_window": (lambda d: (_edit_config(d, sliding_window=4096), d)[1], ConfigError, "sliding_window"),
    "moe": (lambda d: (_edit_config(d, num_local_experts=8), d)[1], ConfigError, "mixture-of-experts"),
    "mistral": (lambda d: (_edit_config(d, model_type="mistral"), d)[1], ConfigError, "model_type='mistral'"),
    "rope_yarn": (lambda d: (_edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0}), d)[1],
                  ConfigError, "rope_type 'yarn'"),
    "missing_key": (lambda d: (_edit_config(d, hidden_size=None), d)[1], ConfigError, "hidden_size"),
    "no_weights": (lambda d: (os.remove(d / "model.safetensors"), d)[1], ConversionError, "no weights"),
    "truncated": (lambda d: (_truncate(d / "model.safetensors"), d)[1], ConversionError,
                  "model.safetensors is truncated or corrupt"),
    "garbage": (lambda d: ((d / "model.safetensors").write_bytes(b"\x01" * 64), d)[1], ConversionError,
                "truncated or corrupt"),
    "wrong_layers": (lambda d: (_edit_config(d, num_hidden_layers=3), d)[1], ConversionError,
                     "missing from the source"),
    "not_a_model": (lambda d: d / "config.json", ConversionError, "expected a Hugging Face model directory"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_sources(tmp_path, hf_dir, case):
    make, error, message = BAD_SOURCES[case]
    src = make(copy_of(hf_dir, tmp_path))
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_gguf(tmp_path):
    import gguf

    truncated = tmp_path / "cut.gguf"
    with open(assets.default_gguf_path(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ConversionError, match="cut.gguf is not a readable GGUF"):
        convert(truncated, tmp_path / "a", progress=False)

    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="gpt2.gguf: unsupported architecture 'gpt2'"):
        convert(other, tmp_path / "b", progress=False)


def test_bad_checkpoints(tmp_path, reference):
    with pytest.raises(CheckpointError, match="does not exist"):
        pigjax.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="pigjax.json is missing"):
        pigjax.load(tmp_path / "empty")
    path = pigjax.save(reference, tmp_path / "ckpt")
    (path / "pigjax.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="pigjax.json is corrupt"):
        pigjax.load(path)
    path = pigjax.save(reference, tmp_path / "ckpt", overwrite=True)
    shutil.rmtree(path / "params")
    with pytest.raises(CheckpointError, match="cannot restore parameters"):
        pigjax.load(path)
    path = pigjax.save(reference, tmp_path / "ckpt", overwrite=True)
    meta = json.loads((path / "pigjax.json").read_text())
    meta["config"]["hidden_size"] = 64
    (path / "pigjax.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot restore parameters"):
        pigjax.load(path)


@pytest.mark.parametrize(
    "tokens, lengths, message",
    [
        (np.zeros(5, np.int32), None, "2-D integer"),
        (np.zeros((1, 5), np.float32), None, "2-D integer"),
        (np.zeros((1, 0), np.int32), None, "non-empty"),
        (np.full((1, 3), 101), None, "token id 101 at \\[0, 0\\] is outside the vocabulary"),
        (np.zeros((2, 3), np.int32), [1], "2 integers"),
        (np.zeros((2, 3), np.int32), [1, 4], "lengths must lie in \\[1, 3\\]"),
        (np.zeros((1, 513), np.int32), None, "longer than the model's context \\(512\\)"),
    ],
)
def test_forward_bad_input(reference, tokens, lengths, message):
    with pytest.raises(PigjaxError, match=message):
        pigjax.forward(reference, tokens, lengths)
