"""RankedLSH in the decode path (docs/algorithm.md §2.9): full budget equals dense, zero top equals
MagicPIG over the sampling tables, reads counted apart, bad configs refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pigjax
from pigjax import LlamaConfig
from pigjax.eval.perplexity import teacher_forced
from pigjax.models import llama


@pytest.fixture(scope="module")
def tiny():
    """The random 4-layer GQA Llama of test_backends (4 query / 2 KV heads of 16)."""
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    params = llama.LlamaModel(config).init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 2.0 if p.ndim > 1 else p, params)
    return pigjax.Model(config, params)


def _tokens(n, rows=2, seed=0):
    return np.random.default_rng(seed).integers(0, 97, (rows, n)).astype(np.int32)


def test_full_budget_equals_dense(tiny):
    toks = _tokens(300)
    dense = teacher_forced(tiny, toks, 200, return_logits=True)
    out = teacher_forced(tiny, toks, 200, pigjax.RankedLSH(K=8, L=40, rank_tables=20, top=1.0, storage="f32"),
                         return_logits=True)
    np.testing.assert_allclose(out["logits"], dense["logits"], atol=1e-5 * np.abs(dense["logits"]).max())
    stats = out["stats"]
    assert stats["fraction_read"] == pytest.approx(1.0)
    assert stats["fraction_keys_read"] == stats["fraction_read"]
    assert stats["fraction_values_read"] == pytest.approx(1.0)


def test_zero_top_is_magicpig_on_the_sampling_tables(tiny):
    """top = 0: RankedLSH with tables [r, L) of a projection is MagicPIG with those tables alone."""
    K, L, r = 6, 30, 10
    ranked = pigjax.RankedLSH(K=K, L=L, rank_tables=r, top=0.0, storage="f32", seed=5)

    class Tail(pigjax.MagicPIG):  # MagicPIG whose projection is the ranked one's sampling columns
        def projection(self, head_dim):
            return ranked.projection(head_dim)[:, r * K:]

    toks = _tokens(260)
    a = teacher_forced(tiny, toks, 200, ranked, return_logits=True)
    b = teacher_forced(tiny, toks, 200, Tail(K=K, L=L - r, storage="f32"), return_logits=True)
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5 * np.abs(b["logits"]).max())
    assert a["stats"]["fraction_read"] == pytest.approx(b["stats"]["fraction_read"])
    assert a["stats"]["fraction_values_read"] == pytest.approx(a["stats"]["fraction_read"])


def test_reads_keys_and_values_apart(tiny):
    """refine > 1 scores more keys than it reads values: keys read >= values read >= top."""
    toks = _tokens(400)
    dense = teacher_forced(tiny, toks, 300)
    out = teacher_forced(tiny, toks, 300, pigjax.RankedLSH(K=8, L=60, rank_tables=20, top=0.05, refine=3.0))
    s = out["stats"]
    assert s["fraction_keys_read"] == s["fraction_read"]
    assert 0.05 <= s["fraction_values_read"] < s["fraction_keys_read"] < 0.6
    assert s["fraction_keys_read"] >= 0.15  # the 3 x 5% scored
    assert abs(np.mean(out["logp"]) - np.mean(dense["logp"])) < 0.5


def test_generate_and_memory_mosaics_accept_it(tiny):
    prompt = _tokens(200, 1)[0].tolist()
    gen = pigjax.generate(tiny, [prompt], max_new_tokens=6, attention=pigjax.RankedLSH(K=6, L=30, rank_tables=10))
    assert gen.stats["attention"] == "rankedlsh" and len(gen.tokens[0]) == 6
    from pigjax.models.mosaics_memory import MosaicsSampled, for_attention
    assert isinstance(for_attention(pigjax.RankedLSH()), MosaicsSampled)


@pytest.mark.parametrize("kwargs, match", [
    (dict(L=150, rank_tables=149), r"rank_tables must be an int in \[1, L - 2\] = \[1, 148\]"),
    (dict(rank_tables=0), "rank_tables"),
    (dict(top=1.5), r"top must be a fraction in \[0, 1\]"),
    (dict(top=-0.1), "top must"),
    (dict(refine=0.5), r"refine must be a number in \[1, 1e6\]"),
    (dict(refine=float("nan")), "refine"),
    (dict(sample_cap=0.0), r"sample_cap must be a fraction in \(0, 1\]"),
    (dict(sample_cap=True), "sample_cap"),
    (dict(K=0), "rankedlsh: K must"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(pigjax.ConfigError, match=match):
        pigjax.RankedLSH(**kwargs)


def test_coverage_of_ranked_sets(tiny):
    """Coverage's RankedLSH estimate: reading everything covers everything; at a small top its
    fraction of keys read is close to what the back-end reads on the same q, k."""
    from pigjax.eval.attention_error import layer_errors
    from pigjax.eval.coverage import coverage

    toks = _tokens(240, rows=1, seed=4)
    small = pigjax.RankedLSH(K=6, L=40, rank_tables=15, top=0.05)
    full = pigjax.RankedLSH(K=6, L=40, rank_tables=15, top=1.0)
    sparse = small.sparse_layers(tiny.config.num_hidden_layers)
    got = coverage(tiny, toks[0], 200, configs=[], sink=4, local=64, sparse_layers=sparse,
                   ranked=[("small", small), ("full", full)], draws=8)
    assert all(x["lsh"] == pytest.approx(1.0) and x["fraction"] == pytest.approx(1.0) for x in got["full"])
    read = layer_errors(tiny, toks, 200, {"small": small})["small"]["fraction_read"]
    assert np.mean([x["fraction"] for x in got["small"]]) == pytest.approx(read, rel=0.15)
    assert all(0 < x["lsh"] < 1 and 0 < x["top1_u"] <= 1 for x in got["small"])
