"""`Model`: a model's config, parameters and tokenizer (a leaf module: it imports no model code)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """Config (static: a LlamaConfig or MosaicsConfig), params (a plain pytree of arrays) and the
    tokenizer (None if none was saved). `pigjax.families.family_of(model.config)` says how to run it."""

    config: Any
    params: Any
    tokenizer: Any = None

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def astype(self, dtype) -> "Model":
        """The same model with every parameter cast to `dtype` (e.g. jnp.bfloat16)."""
        params = jax.tree.map(lambda p: jnp.asarray(p, dtype), self.params)
        return dataclasses.replace(self, params=params)


def param_count(params) -> int:
    """Number of parameters in a tree of arrays (or of ShapeDtypeStructs)."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
