"""The MQAR generator (pigjax.eval.mqar): layout, targets, errors, and the scoring helpers."""

import jax.numpy as jnp
import numpy as np
import pytest

from pigjax.errors import PigjaxError
from pigjax.eval import mqar


def test_batch_layout_and_targets():
    rng = np.random.default_rng(0)
    tokens, targets = mqar.make_batch(rng, 16, 64, 8, 40)
    assert tokens.shape == targets.shape == (16, 64) and tokens.dtype == np.int32
    for row, target in zip(tokens, targets):
        keys, values = row[0:16:2], row[1:16:2]
        assert len(set(keys)) == 8 and np.all((keys >= 1) & (keys < 20)) and np.all((values >= 20) & (values < 40))
        answer = dict(zip(keys, values))
        where = np.flatnonzero(target >= 0)
        assert len(where) == 8 and np.all(where >= 16)  # every key queried once, after the pairs
        assert sorted(row[where]) == sorted(keys)
        for p in where:
            assert target[p] == answer[row[p]] == row[p + 1]  # the query key is followed by its value
        rest = np.setdiff1d(np.arange(16, 64), np.concatenate([where, where + 1]))
        assert np.all(row[rest] == 0)  # filler
    again = mqar.make_batch(np.random.default_rng(0), 16, 64, 8, 40)
    assert np.array_equal(again[0], tokens)


@pytest.mark.parametrize("args", [(64, 17, 100), (64, 0, 100), (64, 8, 16)])
def test_bad_sizes(args):
    with pytest.raises(PigjaxError, match="MQAR needs"):
        mqar.make_batch(np.random.default_rng(0), 2, *args)


def test_loss_and_accuracy_count_only_queries():
    targets = jnp.array([[-1, 3, -1, 1]])
    logits = jnp.zeros((1, 4, 5)).at[0, 1, 3].set(10.0).at[0, 3, 2].set(10.0).at[0, 0, 4].set(10.0)
    right, total = mqar.correct(logits, targets)
    assert (int(right), int(total)) == (1, 2)
    loss = float(mqar.masked_loss(logits, targets))
    assert 5.0 < loss < 6.0  # one right (~0) and one wrong (~10) answer, averaged over the 2 queries


def test_eval_mqar_script_end_to_end(tmp_path):
    """scripts/eval_mqar.py at a toy size: trains v2 two steps, scores it, and decodes it through
    the engine; writes the JSON, markdown and PNG report."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "mqar"
    cmd = [sys.executable, str(root / "scripts" / "eval_mqar.py"), "--models", "mosaics2", "--hidden", "16",
           "--layers", "1", "--heads", "2", "--vocab", "32", "--train_len", "16", "--pairs", "2", "--batch", "2",
           "--steps", "2", "--warmup", "1", "--short_window", "4", "--long_gap_min", "2", "--long_gap_max", "4",
           "--eval_lengths", "16", "--eval_pairs", "2", "--eval_sequences", "4", "--engine", "4x20,4x20r8t0.1s0.05",
           "--engine_sequences", "2", "--engine_max_len", "16", "--out", str(out)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out.parent / "mqar.json").read_text())
    assert 0.0 <= results["models"]["mosaics2"]["accuracy"]["16"]["2"] <= 1.0
    cell = results["engine"]["cells"]["16/2"]
    ranked = "RankedLSH K4L20 rank 8 top 0.1 cap 0.05"
    assert set(cell) == {"exact", "K4L20", "K4L20 read", ranked, ranked + " read"}
    assert "| 16 | 2 |" in (out.parent / "mqar.md").read_text() and (out.parent / "mqar.png").stat().st_size > 1000
