"""Memory Mosaics configuration: a frozen (hashable) dataclass, so it can be a jit static argument."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pigjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MosaicsConfig:
    """Sizes of a Memory Mosaics v1 network (docs/algorithm.md §3).

    `pmem_size` is P, the number of key/value rows of each head's persistent memory; None means
    int(3.5 * hidden_size), which gives a block GPT-2's 12·d² parameters. There is no positional
    encoding, so `max_position_embeddings` is only the context the model was trained on (the
    training window) and the default capacity of a decoding state.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    pmem_size: int | None = None
    max_position_embeddings: int = 512
    dropout: float = 0.05
    layer_norm_eps: float = 1e-5
    eos_token_ids: tuple[int, ...] = ()

    model_type = "memory_mosaics"
    architecture = "memory_mosaics"  # what pigjax.json records (pigjax.checkpoint)

    def __post_init__(self):
        if self.pmem_size is None:
            object.__setattr__(self, "pmem_size", int(3.5 * self.hidden_size) if isinstance(self.hidden_size, int) else None)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "pmem_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MosaicsConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"MosaicsConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MosaicsConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"MosaicsConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        bad = [e for e in self.eos_token_ids if not 0 <= e < self.vocab_size]
        if bad:
            raise ConfigError(f"MosaicsConfig.eos_token_ids {bad} lie outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MosaicsConfig":
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"model_type {model_type!r} is not a Memory Mosaics config ({cls.model_type!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown MosaicsConfig fields {unknown}")
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
