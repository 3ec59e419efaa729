"""The table of model families: everything pigjax needs to know to load, run and decode a family.

Code that must treat Llama and Memory Mosaics differently asks `family_of(config)` (or
`family_named(architecture)` for a checkpoint) instead of testing the config's type.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from pigjax.attention.backend import Backend
from pigjax.attention.dense import Dense
from pigjax.errors import ConfigError, PigjaxError
from pigjax.models import llama, mosaics, mosaics_memory
from pigjax.models.llama_config import LlamaConfig
from pigjax.models.mosaics_config import MosaicsConfig


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # what a checkpoint's pigjax.json records as "architecture"
    config_class: type
    param_shapes: Callable  # (config, dtype) -> tree of ShapeDtypeStruct
    init_params: Callable  # (config, seed) -> params
    logits: Callable  # (params, config, tokens [B, T], lengths [B]) -> [B, T, V] f32, jittable, no cache
    decoder: Callable  # attention (a Backend or None) -> this family's decode back-end (checked)
    decode_params: Callable  # params -> the layout decoding reads (e.g. per-layer weights)
    init_cache: Callable  # (backend, config, batch, capacity, window, dtype, runtime) -> cache
    # (params, config, tokens, cache, num_new, backend, fresh) -> (logits, cache); a family that shares
    # its prefill also takes logits_at ([B] token index: that token's logits only, [B, 1, V]).
    step: Callable
    # One dense prefill serves several back-ends (`Backend.from_prefill`); else each runs its own.
    shares_prefill: bool
    # The engine store receives generated tokens too (capacity: prompt + new), else the prompt only.
    engine_grows: bool

    def engine_capacity(self, prompt: int, total: int) -> int:
        return total if self.engine_grows else prompt


def _llama_logits(params, config, tokens, lengths):
    b, t = tokens.shape
    cache = Dense().init_cache(config, b, t, 0, jax.tree.leaves(params)[0].dtype)
    return llama.step(params, config, tokens, cache, lengths, fresh=True)[0]


def _llama_decoder(attention):
    backend = Dense() if attention is None else attention
    if not isinstance(backend, Backend):
        raise PigjaxError(f"attention: expected a back-end (e.g. pigjax.Dense()), got {attention!r}")
    return backend


LLAMA = Family(
    name=LlamaConfig.architecture, config_class=LlamaConfig,
    param_shapes=llama.param_shapes, init_params=llama.init_params,
    logits=_llama_logits, decoder=_llama_decoder, decode_params=llama.unstack_layers,
    init_cache=lambda backend, config, b, capacity, window, dtype, runtime:
        backend.init_cache(config, b, capacity, window, dtype, runtime),
    step=llama.step, shares_prefill=True, engine_grows=False,
)

MOSAICS = Family(
    name=MosaicsConfig.architecture, config_class=MosaicsConfig,
    param_shapes=mosaics.param_shapes, init_params=mosaics.init_params,
    logits=lambda params, config, tokens, lengths: mosaics.apply(params, config, tokens),  # causal: padding is harmless
    decoder=mosaics_memory.for_attention, decode_params=lambda params: params,
    init_cache=lambda backend, config, b, capacity, window, dtype, runtime:
        backend.init_state(config, b, capacity, dtype, runtime),
    step=lambda params, config, tokens, cache, num_new, backend, fresh=False:
        backend.step(params, config, tokens, cache, num_new, fresh),
    shares_prefill=False, engine_grows=True,
)

FAMILIES = (LLAMA, MOSAICS)


def family_of(config) -> Family:
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family
    raise ConfigError(f"no model family for a config of type {type(config).__name__}")


def family_named(architecture: str) -> Family | None:
    return next((f for f in FAMILIES if f.name == architecture), None)
