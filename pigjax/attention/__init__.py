"""Attention back-ends: `Dense` (exact), and the model-side sparse baselines TopK, Quest, Oracle.
MagicPIG lives in `pigjax.magicpig` (it needs the C++ engine)."""

from pigjax.attention.dense import Dense, attend
from pigjax.attention.sparse import Oracle, Quest, TopK

__all__ = ["Dense", "Oracle", "Quest", "TopK", "attend"]
