"""Attention back-ends, all following the `Backend` contract (pigjax.attention.backend):
`Dense` (exact), `MagicPIG` (LSH sampling in the C++ engine), `RankedLSH` (MagicPIG's tables with
the best-ranked keys read exactly), and the model-side baselines
`TopK`, `Quest` and `Oracle`; `lsh_attention` is MagicPIG's estimator in one call, for analysis."""

from pigjax.attention.backend import Backend
from pigjax.attention.baselines import Oracle, Quest, TopK
from pigjax.attention.dense import Dense
from pigjax.attention.lsh_estimator import lsh_attention
from pigjax.attention.magicpig import MagicPIG
from pigjax.attention.ranked import RankedLSH

__all__ = ["Backend", "Dense", "MagicPIG", "Oracle", "Quest", "RankedLSH", "TopK", "lsh_attention"]
