"""The one table from Hugging Face tensor names to pigjax parameters.

Every source format (safetensors, .bin, GGUF) is first presented as HF-named tensors; this module
checks their shapes against the config and lays them out as the Flax tree: Linen kernels are
[in, out] (HF stores [out, in]); attention projections keep a heads axis; layers are stacked on
axis 0 (nn.scan).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from pigjax.models.llama_config import LlamaConfig
from pigjax.errors import ConversionError

# pigjax path inside params["layers"] -> (HF name after "model.layers.{i}.", HF shape, HF -> pigjax)
_LAYER_TABLE: dict[str, tuple[str, Callable, Callable]] = {
    "attn/q_proj/kernel": (
        "self_attn.q_proj.weight",
        lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size),
        lambda w, c: w.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim),
    ),
    "attn/k_proj/kernel": (
        "self_attn.k_proj.weight",
        lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
        lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim),
    ),
    "attn/v_proj/kernel": (
        "self_attn.v_proj.weight",
        lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size),
        lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim),
    ),
    "attn/o_proj/kernel": (
        "self_attn.o_proj.weight",
        lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim),
        lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size),
    ),
    "mlp/gate_proj/kernel": ("mlp.gate_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), lambda w, c: w.T),
    "mlp/up_proj/kernel": ("mlp.up_proj.weight", lambda c: (c.intermediate_size, c.hidden_size), lambda w, c: w.T),
    "mlp/down_proj/kernel": ("mlp.down_proj.weight", lambda c: (c.hidden_size, c.intermediate_size), lambda w, c: w.T),
    "input_norm/weight": ("input_layernorm.weight", lambda c: (c.hidden_size,), lambda w, c: w),
    "post_attn_norm/weight": ("post_attention_layernorm.weight", lambda c: (c.hidden_size,), lambda w, c: w),
}
_TOP_TABLE: dict[str, tuple[str, Callable, Callable]] = {
    "embed/embedding": ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size), lambda w, c: w),
    "norm/weight": ("model.norm.weight", lambda c: (c.hidden_size,), lambda w, c: w),
    "lm_head/kernel": ("lm_head.weight", lambda c: (c.vocab_size, c.hidden_size), lambda w, c: w.T),
}
# Buffers some checkpoints carry that hold nothing the model needs.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class TensorSource(Mapping):
    """HF name -> numpy array, read lazily; `where(name)` names the file and `describe(name)` the
    tensor (with its name in the source file when that differs, e.g. GGUF's) for error messages."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], files: dict[str, str],
                 source_names: dict[str, str] | None = None):
        self._loaders, self._files, self._source_names = loaders, files, source_names or {}

    def __contains__(self, name):
        return name in self._loaders

    def __getitem__(self, name):
        if name not in self._loaders:
            raise KeyError(name)
        try:
            return np.asarray(self._loaders[name]())
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{self.where(name)}: cannot read tensor {name!r}: {e}") from None

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self):
        return len(self._loaders)

    def where(self, name) -> str:
        return self._files.get(name, "<source>")

    def describe(self, name) -> str:
        original = self._source_names.get(name, name)
        return f"tensor {original!r}" + (f" ({name})" if original != name else "")


def _check_finite(w: np.ndarray, name: str, tensors: TensorSource):
    """Weights must be finite: a NaN norm or an infinite quantisation scale corrupts every output."""
    finite = np.isfinite(w)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        kinds = ", ".join(k for k, test in (("NaN", np.isnan), ("inf", np.isinf)) if test(w).any())
        raise ConversionError(
            f"{tensors.where(name)}: {tensors.describe(name)} has {len(bad)} non-finite value(s) ({kinds}), "
            f"first at index {list(first)}: the source is corrupt (a NaN weight or an infinite quantisation scale)"
        )


def _set(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def hf_to_params(tensors: TensorSource, config: LlamaConfig, dtype=np.float32, progress: bool = True) -> dict:
    """Build the pigjax parameter tree from HF-named tensors, checking names and shapes."""
    top = dict(_TOP_TABLE)
    if config.tie_word_embeddings:
        top.pop("lm_head/kernel")
    expected = {hf: (path, shape, fn, None) for path, (hf, shape, fn) in top.items()}
    for i in range(config.num_hidden_layers):
        for path, (hf, shape, fn) in _LAYER_TABLE.items():
            expected[f"model.layers.{i}.{hf}"] = (path, shape, fn, i)

    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ConversionError(
            f"{len(missing)} tensor(s) missing from the source, e.g. {missing[:3]} "
            "(truncated shard list or a different architecture?)"
        )
    unexpected = [n for n in tensors if n not in expected and not _IGNORED.match(n)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise ConversionError(
            f"{tensors.where(unexpected[0])}: unexpected tensor(s) {unexpected[:3]} "
            "(unsupported architecture: pigjax implements bias-free Llama)"
        )

    params: dict = {}
    stacked: dict[str, list] = {path: [None] * config.num_hidden_layers for path in _LAYER_TABLE}
    for name in tqdm(expected, desc="converting", unit="tensor", disable=not progress, leave=False):
        path, shape_fn, fn, layer = expected[name]
        w = tensors[name]
        if w.shape != shape_fn(config):
            raise ConversionError(
                f"{tensors.where(name)}: {tensors.describe(name)} has shape {w.shape}, "
                f"but the config implies {shape_fn(config)}"
            )
        w = w.astype(np.float32, copy=False)
        _check_finite(w, name, tensors)
        w = np.ascontiguousarray(fn(w, config)).astype(dtype)
        if layer is None:
            _set(params, path, w)
        else:
            stacked[path][layer] = w
    for path, per_layer in stacked.items():
        _set(params, "layers/" + path, np.stack(per_layer))
    return params
