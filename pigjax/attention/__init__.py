"""Attention back-ends. `Dense` is exact attention over the model-side KV cache."""

from pigjax.attention.dense import Dense, attend

__all__ = ["Dense", "attend"]
