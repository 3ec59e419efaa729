"""Memory Mosaics configuration: a frozen (hashable) dataclass, so it can be a jit static argument."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pigjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MosaicsConfig:
    """Sizes of a Memory Mosaics network: v1 (docs/algorithm.md §3, the default) or v2 (§3A).

    v1: `pmem_size` is P, the number of key/value rows of each head's persistent memory; None means
    int(3.5 * hidden_size), which gives a block GPT-2's 12·d² parameters. There is no positional
    encoding, so `max_position_embeddings` is only the context the model was trained on (the
    training window) and the default capacity of a decoding state.

    v2 (`version=2`): `short_window` is h, the pairs the short-term memory sees; the long-term
    memory sees pairs at least m steps old, m drawn from [long_gap_min, long_gap_max] in training
    and long_gap_min otherwise; `ffn_size` is the SwiGLU width of the persistent memory (None:
    2 * hidden_size). These fields are None in a v1 config, and `pmem_size` is None in a v2 one.
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
    version: int = 1
    short_window: int | None = None
    long_gap_min: int | None = None
    long_gap_max: int | None = None
    ffn_size: int | None = None

    model_type = "memory_mosaics"
    architecture = "memory_mosaics"  # what pigjax.json records (pigjax.checkpoint)

    def __post_init__(self):
        self._fill_version_defaults()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings") + self._version_fields():
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
        if self.version == 2 and self.long_gap_min > self.long_gap_max:
            raise ConfigError(f"MosaicsConfig.long_gap_min ({self.long_gap_min}) must not exceed "
                              f"long_gap_max ({self.long_gap_max})")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        bad = [e for e in self.eos_token_ids if not 0 <= e < self.vocab_size]
        if bad:
            raise ConfigError(f"MosaicsConfig.eos_token_ids {bad} lie outside the vocabulary [0, {self.vocab_size})")

    def _version_fields(self) -> tuple[str, ...]:
        return _V1_FIELDS if self.version == 1 else _V2_FIELDS

    def _fill_version_defaults(self):
        if self.version not in (1, 2) or isinstance(self.version, bool):
            raise ConfigError(f"MosaicsConfig.version must be 1 or 2, got {self.version!r}")
        other = _V2_FIELDS if self.version == 1 else _V1_FIELDS
        given = [name for name in other if getattr(self, name) is not None]
        if given:
            raise ConfigError(f"MosaicsConfig fields {given} do not apply to version {self.version}")
        d = self.hidden_size if isinstance(self.hidden_size, int) else None
        defaults = ({"pmem_size": None if d is None else int(3.5 * d)} if self.version == 1 else
                    {"short_window": 256, "long_gap_min": 64, "long_gap_max": 256,
                     "ffn_size": None if d is None else 2 * d})
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        """The fields (v1: without the v2 ones, so a v1 config reads as before v2 existed)."""
        d = {"model_type": self.model_type, **dataclasses.asdict(self)}
        if self.version == 1:
            for name in ("version",) + _V2_FIELDS:
                d.pop(name)
        return d

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


_V1_FIELDS = ("pmem_size",)
_V2_FIELDS = ("short_window", "long_gap_min", "long_gap_max", "ffn_size")
