"""MagicPIG: LSH-sampled attention with the tables and long KV cache in the C++ engine (SPEC §2)."""

from pigjax.magicpig.backend import MagicPIG
from pigjax.magicpig.estimator import center, exact_part, lsh_attention, merge
from pigjax.magicpig.store import Store

__all__ = ["MagicPIG", "Store", "center", "exact_part", "lsh_attention", "merge"]
