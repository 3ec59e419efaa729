"""Read a local Hugging Face model directory: config.json, tensors (safetensors or pytorch .bin,
sharded or not) and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path


from pigjax.models.llama_config import LlamaConfig
from pigjax.convert.hf_names import TensorSource
from pigjax.errors import ConfigError, ConversionError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def read_config(src: Path) -> tuple[dict, LlamaConfig]:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing: a Hugging Face model directory needs config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return hf, LlamaConfig.from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _shard_files(src: Path, single: str, index: str) -> list[Path] | None:
    if (src / index).is_file():
        try:
            weight_map = json.loads((src / index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise ConversionError(f"{src / index} is corrupt: {e}") from None
        files = [src / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"shard {f} listed in {src / index} is missing")
        return files
    if (src / single).is_file():
        return [src / single]
    return None


def _safetensors_source(files: list[Path]) -> TensorSource:
    from safetensors import safe_open

    loaders, where = {}, {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="numpy")
            names = list(handle.keys())
        except Exception as e:  # SafetensorError for bad headers and truncated data
            raise ConversionError(f"{f} is truncated or corrupt: {e}") from None
        for name in names:
            loaders[name] = (lambda h, n: lambda: h.get_tensor(n))(handle, name)
            where[name] = str(f)
    return TensorSource(loaders, where)


def _torch_bin_source(files: list[Path]) -> TensorSource:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{files[0]} is a PyTorch .bin checkpoint; reading it needs torch (pip install torch==2.13.0)"
        ) from None
    loaders, where = {}, {}
    for f in files:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ConversionError(f"{f} is truncated or corrupt: {e}") from None
        for name, t in state.items():
            loaders[name] = (lambda t: lambda: t.detach().float().numpy())(t)
            where[name] = str(f)
    return TensorSource(loaders, where)


def read_tensors(src: Path) -> TensorSource:
    files = _shard_files(src, "model.safetensors", "model.safetensors.index.json")
    if files is not None:
        return _safetensors_source(files)
    files = _shard_files(src, "pytorch_model.bin", "pytorch_model.bin.index.json")
    if files is not None:
        return _torch_bin_source(files)
    raise ConversionError(
        f"no weights in {src}: expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def read_tokenizer(src: Path):
    if not any((src / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise ConversionError(f"cannot load the tokenizer files in {src}: {e}") from None
