"""pigjax checkpoints: a directory with `pigjax.json` (format, architecture, config), `params/`
(orbax) and, when the model has one, `tokenizer/` (transformers' save_pretrained files).

Writes are atomic (`pigjax.atomic`), so a directory that has `pigjax.json` is always a whole checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from pigjax.atomic import atomic_directory
from pigjax.errors import CheckpointError
from pigjax.families import FAMILIES, family_named
from pigjax.model import Model

FORMAT_VERSION = 1
META_FILE = "pigjax.json"


def save(model: Model, path, *, overwrite: bool = False, source: str | None = None) -> Path:
    """Write `model` to directory `path` atomically; returns the absolute path."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
    with atomic_directory(path) as tmp:
        params = jax.tree.map(np.asarray, model.params)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", params)
        checkpointer.wait_until_finished()
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "format_version": FORMAT_VERSION,
            "architecture": model.config.architecture,
            "dtype": str(model.dtype),
            "config": model.config.to_dict(),
            "source": source,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def read_meta(path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a pigjax checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    if family_named(meta.get("architecture")) is None:
        raise CheckpointError(f"{meta_file}: unsupported architecture {meta.get('architecture')!r} "
                              f"(pigjax reads {sorted(f.name for f in FAMILIES)})")
    return meta


def load(path, *, dtype=None, tokenizer: bool = True) -> Model:
    """Load a checkpoint written by `save` (or `pigjax.convert`); `dtype` casts the parameters."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_meta(path)
    family = family_named(meta["architecture"])
    try:
        config = family.config_class.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE}: bad config: {e}") from None
    target = family.param_shapes(config, np.dtype(meta.get("dtype", "float32")))
    try:
        params = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax/tensorstore raise many types; name the checkpoint and the cause
        raise CheckpointError(f"cannot restore parameters from {path / 'params'}: {type(e).__name__}: {e}") from None
    _check_matches(params, target, path)
    model = Model(config, params, _load_tokenizer(path / "tokenizer") if tokenizer else None)
    return model.astype(dtype) if dtype is not None else model


def _check_matches(params, target, path: Path):
    """orbax restores a mismatched shape silently; a config that disagrees with the arrays is corrupt."""
    got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), params)
    want = jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), target)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        bad = [f"{jax.tree_util.keystr(k)}: {g} != {w}"
               for (k, g), w in zip(jax.tree.leaves_with_path(got, is_leaf=lambda x: isinstance(x, tuple)),
                                    jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))) if g != w]
        raise CheckpointError(
            f"cannot restore parameters from {path / 'params'}: arrays do not match the config in "
            f"{META_FILE} ({'; '.join(bad[:3]) or 'different tree'})"
        )


def _load_tokenizer(path: Path):
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from None
