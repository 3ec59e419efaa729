"""`pigjax.RankedLSH`: MagicPIG's store and tables, with the best-ranked keys read exactly
(docs/algorithm.md §2.9).

The L tables split in two. The first `rank_tables` rank each query head's keys by an estimate
of their scores, |k|·cos(π·D/B), where D of the B = rank_tables·K code bits differ from the
query's (each bit is a random hyperplane, so D/B estimates the angle; the engine keeps these codes
per token as a packed sketch and scans it with popcounts); the ⌈refine·top·n⌉ best are scored
exactly and the ⌈top·n⌉ highest scores are read exactly, with weight 1. The other L − rank_tables tables sample the rest as MagicPIG does (≥ 2 collisions,
weight 1/(u + eps) for that many tables): they are independent of the ranking, so the sampled
part stays an unbiased estimate of everything outside the exact set. MagicPIG's `sample_cap`
bounds the sample outside the exact set (past ⌈sample_cap·n⌉ keys, a uniform subset of that many,
each weighted by the inverse of its chance of being kept; it matters where many keys share the
query's codes, e.g. repeated tokens). Everything else (prefill,
centering, window, dense layers, the engine store) is MagicPIG's.
"""

from __future__ import annotations

import dataclasses
import math

from pigjax.attention.magicpig import EngineRef, MagicPIG
from pigjax.engine import store as engine
from pigjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RankedLSH(MagicPIG):
    """Defaults (docs/algorithm.md §2.9): K = 10 and L = 150 as MagicPIG's K10L150 store, of which 50
    tables rank (a 500-bit sketch per token); 1.8% of each head's middle read exactly (about 3.3%
    read in all on SmolLM2-135M at 4k tokens, docs/results/README.md)."""

    rank_tables: int = 50
    top: float = 0.018
    refine: float = 1.0
    name = "rankedlsh"

    def __post_init__(self):
        super().__post_init__()
        rt = self.rank_tables
        if not isinstance(rt, int) or isinstance(rt, bool) or not 1 <= rt <= self.L - 2:
            raise ConfigError(f"{self.name}: rank_tables must be an int in [1, L - 2] = [1, {self.L - 2}] "
                              f"(at least 2 of the L={self.L} tables must remain for sampling), got {rt!r}")
        if isinstance(self.top, bool) or not isinstance(self.top, (int, float)) or not 0 <= self.top <= 1:
            raise ConfigError(f"{self.name}: top must be a fraction in [0, 1], got {self.top!r}")
        if (isinstance(self.refine, bool) or not isinstance(self.refine, (int, float))
                or not (math.isfinite(self.refine) and 1 <= self.refine <= 1e6)):
            raise ConfigError(f"{self.name}: refine must be a number in [1, 1e6], got {self.refine!r}")

    @property
    def sketch_tables(self) -> int:
        return self.rank_tables

    def engine_query(self, rt: EngineRef, slots, q, dep):
        return engine.query_ranked(rt.handle, slots, q, self._codes(q, rt), dep, rank_tables=self.rank_tables,
                                   top=self.top, refine=self.refine, sample_cap=self.sample_cap, path=self._path(),
                                   heads=rt.heads)

    def stats(self, config, cache_dtype, cache=None, runtime=None) -> dict:
        stats = super().stats(config, cache_dtype, cache, runtime)
        stats.update(rank_tables=self.rank_tables, top=self.top, refine=self.refine)
        return stats
