"""Read a llama.cpp GGUF file as HF-named float32 tensors plus a HF-style config dict.

Quantized tensors are dequantized with the `gguf` package. llama.cpp stores the rows of Q and K in
an interleaved RoPE order; `_unpermute` restores transformers' split-halves order (docs/algorithm.md §5).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pigjax.models.llama_config import LlamaConfig
from pigjax.convert.hf_names import TensorSource
from pigjax.errors import ConfigError, ConversionError

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _hf_name(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return name  # unknown: hf_to_params reports it as unexpected


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: Path):
    """-> (hf config dict, LlamaConfig, TensorSource of HF-named float32 tensors)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConversionError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: unsupported architecture {arch!r} (pigjax converts GGUF 'llama' models)")
    if _field(reader, f"{arch}.expert_count"):
        raise ConfigError(f"{path}: unsupported architecture (mixture of experts)")
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ConfigError(f"{path}: unsupported rope scaling {_field(reader, f'{arch}.rope.scaling.type')!r}")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConfigError(
            f"{path}: llama3 rope scaling stored as rope_freqs.weight is not supported for GGUF; "
            "convert the Hugging Face directory instead"
        )

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    hf = {
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    config = LlamaConfig.from_hf_config(hf)

    def load(t):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        return w

    loaders = {_hf_name(name): (lambda t: lambda: load(t))(t) for name, t in tensors.items()}
    return hf, config, TensorSource(loaders, {n: str(path) for n in loaders},
                                    {_hf_name(name): name for name in tensors})


def read_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ConversionError(f"cannot build the tokenizer stored in {path}: {e}") from None
