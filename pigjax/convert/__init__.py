"""Convert Hugging Face directories and GGUF files into pigjax (orbax) checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pigjax import assets
from pigjax.checkpoint import META_FILE, check_destination, recover_missing, save
from pigjax.convert.gguf_file import read_gguf, read_gguf_tokenizer
from pigjax.convert.hf_dir import read_config, read_tensors, read_tokenizer
from pigjax.convert.hf_names import hf_to_params
from pigjax.errors import ConversionError
from pigjax.model import Model

__all__ = ["convert", "convert_to_model", "default_checkpoint"]


def _source(src) -> tuple[Path, str]:
    """`src` ('default', a HF directory or a .gguf file) -> (its path, suggested checkpoint name);
    ConversionError if it does not exist."""
    if str(src) == "default":
        return assets.default_gguf_path(), assets.DEFAULT_MODEL_NAME
    path = Path(src)
    if not path.exists():
        raise ConversionError(f"source {path} does not exist")
    return path, path.stem if path.suffix == ".gguf" else path.name


def convert_to_model(src, *, dtype=np.float32, progress: bool = True) -> tuple[Model, str]:
    """Read `src` ('default', a HF directory or a .gguf file) -> (Model, suggested checkpoint name).

    Raises ConversionError naming the tensor if a converted weight holds NaN or infinity."""
    path, name = _source(src)
    if path.is_dir():
        _, config = read_config(path)
        tensors, tokenizer = read_tensors(path), read_tokenizer(path)
    elif path.suffix == ".gguf":
        _, config, tensors = read_gguf(path)
        tokenizer = read_gguf_tokenizer(path)
    else:
        raise ConversionError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    params = hf_to_params(tensors, config, dtype=dtype, progress=progress)
    return Model(config, params, tokenizer), name


def convert(src, out=None, *, dtype=np.float32, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert `src` and write a checkpoint to `out` (default: checkpoints/<name>/); returns its path.

    The destination is checked before converting (`pigjax.checkpoint.check_destination`): it must
    be writable, and `overwrite` replaces only an existing pigjax checkpoint, never the source."""
    path, name = _source(src)
    out = Path(out) if out is not None else assets.checkpoints_dir() / name
    check_destination(out, overwrite=overwrite, protect=[path])
    model, _ = convert_to_model(src, dtype=dtype, progress=progress)
    return save(model, out, overwrite=overwrite, source=str(src), protect=[path])


def default_checkpoint(convert_if_missing: bool = True) -> Path:
    """Path of the converted embedded default model, converting it on first use."""
    path = assets.checkpoints_dir() / assets.DEFAULT_MODEL_NAME
    recover_missing(path)  # a conversion killed while replacing it left a whole copy aside
    if not (path / META_FILE).is_file() and convert_if_missing:
        convert("default", path)
    return path
