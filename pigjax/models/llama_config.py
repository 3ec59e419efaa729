"""Llama-family configuration: a frozen (hashable) dataclass, so it can be a jit static argument.

Built from a Hugging Face `config.json` dict. Both RoPE spellings are accepted: transformers 4's
`rope_scaling` (+ top-level `rope_theta`) and transformers 5's `rope_parameters` (theta inside).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from pigjax.errors import ConfigError

# Keys whose presence (with a truthy value) means an architecture this port does not implement.
_UNSUPPORTED_KEYS = {
    "sliding_window": "sliding-window attention",
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers",
    "attention_bias": "biases in the attention projections",
    "mlp_bias": "biases in the MLP",
    "qk_norm": "query/key normalisation",
}
_SUPPORTED_MODEL_TYPES = ("llama",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `default`, or `llama3` frequency scaling (docs/algorithm.md §4)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("default", "llama3"):
            raise ConfigError(
                f"unsupported rope_type {self.rope_type!r}: pigjax implements 'default' and 'llama3'"
            )
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}")
        if self.rope_type == "llama3" and not (self.high_freq_factor > self.low_freq_factor > 0):
            raise ConfigError(
                "llama3 rope needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "llama3":
            return cls(
                theta=float(theta),
                rope_type="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        return cls(theta=float(theta), rope_type=rope_type)

    def to_hf(self) -> dict:
        """transformers 5 form (`rope_parameters`); transformers 4 reads `rope_scaling` + `rope_theta`."""
        params: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "llama3":
            params.update(
                factor=self.factor,
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        legacy = None if self.rope_type == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
        return {"rope_parameters": params, "rope_scaling": legacy, "rope_theta": self.theta}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    architecture = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """From a HF `config.json` dict; raises ConfigError naming what is unsupported or missing."""
        model_type = hf.get("model_type")
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); pigjax supports {_SUPPORTED_MODEL_TYPES}"
            )
        for key, what in _UNSUPPORTED_KEYS.items():
            if hf.get(key):
                raise ConfigError(f"unsupported architecture: {key}={hf[key]!r} ({what})")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported architecture: hidden_act={act!r} (Llama uses 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if hf.get(key) is None:
                raise ConfigError(f"config is missing required key {key!r}")
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or (hidden // heads)
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(hf),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config is missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config has a value of the wrong type: {e}") from None

    def to_hf_config(self) -> dict:
        eos = list(self.eos_token_ids)
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            **self.rope.to_hf(),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def rope_inv_freq(rope: RopeConfig, head_dim: int):
    """Per-pair inverse frequencies (float32), with llama3 scaling where configured (docs/algorithm.md §4).

    Computed in float32 like transformers does, so angles agree to the last ulp at long positions.
    """
    import numpy as np

    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    l0 = rope.original_max_position_embeddings
    low_wavelen = l0 / rope.low_freq_factor    # longer than this: divide by factor
    high_wavelen = l0 / rope.high_freq_factor  # shorter than this: keep
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (l0 / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)
