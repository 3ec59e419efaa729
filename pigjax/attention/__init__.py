"""Attention back-ends. `dense` is exact attention over the model-side KV cache."""

from pigjax.attention.dense import attend

__all__ = ["attend"]
