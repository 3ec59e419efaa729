"""pigjax checkpoints: a directory with `pigjax.json` (format, architecture, config, dtype and a
checksum of every array), `params/` (orbax) and, when the model has one, `tokenizer/`
(transformers' save_pretrained files).

Writes are atomic (`pigjax.atomic`): a directory that has `pigjax.json` is always a whole
checkpoint, and a replace killed at any point leaves the old or the new checkpoint whole (restored
by the next save or load). `save(..., overwrite=True)` replaces only what is recognisably a pigjax
checkpoint (`not_a_checkpoint`), never another directory, a file, or a source being read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from pigjax import atomic, sharding
from pigjax.checksums import checksums
from pigjax.checksums import verify as verify_checksums
from pigjax.errors import CheckpointError
from pigjax.families import FAMILIES, family_named
from pigjax.model import Model
from pigjax.orbax_quiet import OrbaxCall

FORMAT_VERSION = 1
META_FILE = "pigjax.json"
# The entries a checkpoint directory may hold: name -> must be a directory. pigjax.json is required.
CHECKPOINT_ENTRIES = {META_FILE: False, "params": True, "tokenizer": True}


# --- what may be written where ---------------------------------------------------------------------

def not_a_checkpoint(path) -> str | None:
    """None if the existing directory `path` is recognisably a pigjax checkpoint (and so may be
    replaced by `save(..., overwrite=True)`), else the reason it is not.

    A checkpoint directory holds the file pigjax.json, optionally the directories params/ and
    tokenizer/, and nothing else. Its content (pigjax.json may even be corrupt) is not examined:
    the layout alone says the directory is pigjax's to replace."""
    path = Path(path)
    try:
        entries = {e.name: e for e in os.scandir(path)}
    except OSError as e:
        return f"cannot list it ({e.strerror or e})"
    if META_FILE not in entries:
        return f"it has no {META_FILE}"
    unexpected = sorted(n for n in entries if n not in CHECKPOINT_ENTRIES)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        return f"it also holds {shown}"
    for name, entry in entries.items():
        is_dir = entry.is_dir(follow_symlinks=False)
        if is_dir != CHECKPOINT_ENTRIES[name] or entry.is_symlink():
            return f"{name} is not a {'directory' if CHECKPOINT_ENTRIES[name] else 'regular file'}"
    return None


def check_destination(path, *, overwrite: bool = False, protect=()) -> Path:
    """Raise CheckpointError unless `save(model, path, overwrite=...)` can write `path`; returns it
    absolute. Run before expensive work (conversion) so that it fails first.

    `path` may be missing (its parent directories are created), an empty directory (with
    overwrite), or a pigjax checkpoint (with overwrite). It may not be a file, another directory,
    one of the `protect` paths (e.g. the source being converted), or a directory containing one.
    Its nearest existing ancestor must be writable."""
    path = Path(path).absolute()
    _recover(path, clean=False)
    for p in protect:
        p = Path(p).absolute().resolve()
        target = path.resolve()
        if target == p or target in p.parents:
            raise CheckpointError(
                f"refusing to write {path}: it {'is' if target == p else 'contains'} the source being read "
                f"({p}); choose another output directory"
            )
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"cannot write {path}: it is a broken symbolic link")
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"cannot write a checkpoint to {path}: it is a file, not a directory")
        if not overwrite:
            raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
        why = not_a_checkpoint(path)
        if why is not None and not _is_empty_dir(path):
            raise CheckpointError(
                f"refusing to overwrite {path}: it is not a pigjax checkpoint ({why}); overwrite only "
                f"replaces an empty directory or one holding {META_FILE} and optionally params/ and tokenizer/"
            )
    try:
        atomic.probe_writable(path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {_os_reason(e)}") from None
    return path


def _is_empty_dir(path: Path) -> bool:
    try:
        return not os.listdir(path)
    except OSError:
        return False


def _os_reason(e: OSError) -> str:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{where}{e.strerror}" if e.strerror else str(e)


def recover_missing(path) -> None:
    """If checkpoint `path` is missing after a killed `save`, put the whole copy it left back."""
    path = Path(path).absolute()
    if not path.exists():
        _recover(path, clean=False)


def _recover(path: Path, *, clean: bool) -> None:
    """Restore `path` from a killed writer's whole copy if it is missing (pigjax.atomic)."""
    try:
        atomic.recover(path, clean=clean)
    except OSError as e:
        copy = atomic.restorable(path)
        where = f"{copy.path}: move it back (mv '{copy.path}' '{path}')" if copy else "(gone now)"
        raise CheckpointError(
            f"{path} is missing after an interrupted save, and restoring the whole copy it left failed "
            f"({_os_reason(e)}); the copy is in {where}"
        ) from None


# --- checksums ---------------------------------------------------------------------------------------

# --- save / load -------------------------------------------------------------------------------------

def save(model: Model, path, *, overwrite: bool = False, source: str | None = None, protect=()) -> Path:
    """Write `model` to directory `path` atomically; returns the absolute path.

    With `overwrite`, an existing pigjax checkpoint (see `not_a_checkpoint`) or empty directory is
    replaced; anything else raises CheckpointError, as do `path` containing one of the `protect`
    paths and an unwritable destination (`check_destination`). `source` is recorded in pigjax.json.
    In a multi-process run, the process that calls it writes the whole checkpoint alone."""
    import orbax.checkpoint as ocp

    path = check_destination(path, overwrite=overwrite, protect=protect)
    try:
        with atomic.atomic_directory(path) as tmp:
            params = jax.tree.map(sharding.gather, model.params)
            with OrbaxCall():  # this process alone (orbax would wait for the others at its barriers)
                alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                           active_processes={jax.process_index()})
                checkpointer = ocp.StandardCheckpointer(multiprocessing_options=alone)
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
                "checksums": checksums(params),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {_os_reason(e)}") from None
    return path


def read_meta(path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist{_in_progress(path)}")
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a pigjax checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is corrupt: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {meta_file}: {_os_reason(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is corrupt: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    if family_named(meta.get("architecture")) is None:
        raise CheckpointError(f"{meta_file}: unsupported architecture {meta.get('architecture')!r} "
                              f"(pigjax reads {sorted(f.name for f in FAMILIES)})")
    _param_dtype(meta, meta_file)
    return meta


def _in_progress(path: Path) -> str:
    live = [l for l in atomic.leftovers(path) if l.kind != "trash" and not l.writer_gone]
    return f" (a save of it by pid {live[0].pid} is in progress)" if live else ""


def _param_dtype(meta: dict, meta_file: Path) -> np.dtype:
    import jax.numpy as jnp

    name = meta.get("dtype", "float32")
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointError(f"{meta_file}: dtype {name!r} is not a floating-point dtype "
                              "(e.g. 'float32', 'bfloat16')")
    return dtype


def load(path, *, dtype=None, tokenizer: bool = True, verify: bool = True, mesh=None) -> Model:
    """Load a checkpoint written by `save` (or `pigjax.convert`); `dtype` casts the parameters.

    `mesh` (axes "data" and "model", `pigjax.sharding`): each array is restored straight into its
    sharded layout (every process reads only its own shards' bytes).

    `verify` checks every array against its checksum in pigjax.json (CheckpointError naming the
    array on a mismatch); verify=False skips it. Checkpoints without checksums (older pigjax) load
    with a warning. A checkpoint missing after a killed `save` is first restored (pigjax.atomic)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    recover_missing(path)
    meta = read_meta(path)
    family = family_named(meta["architecture"])
    try:
        config = family.config_class.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / META_FILE}: bad config: {e}") from None
    target = family.param_shapes(config, _param_dtype(meta, path / META_FILE))
    if mesh is not None:
        mesh = sharding.check_mesh(mesh)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target,
                              sharding.param_shardings(config, target, mesh))
    try:
        with OrbaxCall():
            params = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax/tensorstore raise many types; name the checkpoint and the cause
        raise CheckpointError(f"cannot restore parameters from {path / 'params'}: {type(e).__name__}: {e}") from None
    _check_matches(params, target, path)
    if verify:
        verify_checksums(params, meta, path, META_FILE)
    if mesh is None:  # orbax gives NumPy arrays: every jitted call would copy them in again (~0.2 s a call)
        leaves, tree = jax.tree.flatten(params)
        del params  # the list holds the only references now: each NumPy leaf is freed once copied
        _put_each(leaves)
        params = jax.tree.unflatten(tree, leaves)
    model = Model(config, params, _load_tokenizer(path / "tokenizer") if tokenizer else None)
    return model.astype(dtype) if dtype is not None else model  # astype keeps each array's sharding


def _put_each(leaves: list):
    """Replaces each array of `leaves` by its copy on the default device, one at a time (the peak
    is the parameters plus one leaf, not twice the parameters)."""
    for i in range(len(leaves)):
        source = leaves[i]
        leaves[i] = jax.block_until_ready(jax.device_put(source))  # done before its source can go


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
