"""pigjax.eval.long_context: per-position validation loss past the training window, on tiny
randomly initialised run directories (run.json + model/, as pigjax.train leaves them)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import pigjax
from pigjax import data
from pigjax import train as training
from pigjax.errors import PigjaxError
from pigjax.eval import long_context
from pigjax.model import Model

T, FACTOR = 16, 4
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{model name: run directory} for llama, mosaics and mosaics2, trained on windows of T."""
    rng = np.random.default_rng(0)
    words = "the a cat dog bird sees chases likes red big small old and then".split()
    root = tmp_path_factory.mktemp("long_context")
    text = root / "tiny.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(8, 30))) for _ in range(300)) + "\n")
    out = {}
    for name in training.MODELS:
        cfg = training.TrainConfig(
            workdir=str(root / name), model=name, data=str(text), data_cache=str(root / "cache"), vocab_size=300,
            val_fraction=0.1, seq_len=T, batch=4, hidden=32, layers=1, heads=2, steps=2, warmup=0,
            short_window=8, long_gap_min=4, long_gap_max=8)
        corpus = training.prepare_data(cfg, **QUIET)
        (root / name).mkdir()
        built = training.build(cfg, len(corpus.tokenizer), corpus.eos_id)
        pigjax.save(Model(built.config, built.init(0), corpus.tokenizer), root / name / "model")
        (root / name / "run.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", training.MODELS)
def test_per_position_loss_is_the_forward_pass_loss_past_the_window(runs, name):
    result = long_context.evaluate_run(runs[name], FACTOR, batch=3, **QUIET)
    curve = np.asarray(result["per_position_loss"])
    assert result["length"] == len(curve) == FACTOR * T and result["model"] == name

    # directly: the validation windows of 4T tokens, the model's forward with its context raised
    cfg, model, _ = long_context.load_run(runs[name])
    assert model.config.max_position_embeddings == T
    corpus = training.prepare_data(cfg, **QUIET)
    packer = data.Packer(corpus.val, FACTOR * T, corpus.eos_id, shuffle=False)
    windows = np.stack([packer.window(g) for g in range(packer.windows_per_epoch)])
    assert result["windows"] == len(windows) >= 4
    with pytest.raises(PigjaxError, match="longer than the model's context"):
        pigjax.forward(model, windows[:, :-1])
    long = long_context.with_context(model, FACTOR * T)
    logits = np.asarray(pigjax.forward(long, windows[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0].mean(axis=0)
    np.testing.assert_allclose(curve, expected, rtol=2e-5, atol=2e-5)
    assert np.isfinite(curve).all()

    # the summary: ranges of T, "at 1x" = [T/2, T), "at 4x" = [3T, 4T)
    assert list(result["ranges"]) == [f"{k * T}-{(k + 1) * T - 1}" for k in range(FACTOR)]
    for k in range(FACTOR):
        assert result["ranges"][f"{k * T}-{(k + 1) * T - 1}"] == pytest.approx(expected[k * T:(k + 1) * T].mean(),
                                                                                  rel=2e-5)
    assert result["at_1x"] == pytest.approx(expected[T // 2:T].mean(), rel=2e-5)
    assert result["at_4x"] == pytest.approx(expected[3 * T:].mean(), rel=2e-5)
    assert result["ratio"] == pytest.approx(result["at_4x"] / result["at_1x"])
    per_token = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    paired = per_token[:, 3 * T:].mean(1) - per_token[:, T // 2:T].mean(1)
    assert result["difference"] == pytest.approx(result["at_4x"] - result["at_1x"], rel=1e-6, abs=1e-9)
    assert result["difference_se"] == pytest.approx(paired.std(ddof=1) / np.sqrt(len(paired)), rel=1e-3)

    few = long_context.evaluate_run(runs[name], FACTOR, windows=2, batch=3, **QUIET)
    assert few["windows"] == 2


def test_report_writes_table_and_plot(runs, tmp_path):
    out = long_context.report({k: str(runs[k]) for k in ("llama", "mosaics", "mosaics2")}, tmp_path / "lc", FACTOR, windows=3, batch=3,
                              command="python scripts/eval_long_context.py", **QUIET)
    assert set(out["runs"]) == set(training.MODELS) and out["seq_len"] == T
    md = (tmp_path / "lc.md").read_text()
    for name in training.MODELS:
        assert f"| {name} |" in md and f"--model {name} " in md
    assert "at 4x [48, 64)" in md and "--short_window 8" in md
    saved = json.loads((tmp_path / "lc.json").read_text())
    assert len(saved["runs"]["llama"]["per_position_loss"]) == FACTOR * T
    assert (tmp_path / "lc.png").stat().st_size > 1000
    # growth from 1x to 4x against the first run's (llama), window by window
    runs_ = saved["runs"]
    assert list(runs_) == ["llama", "mosaics", "mosaics2"] and "versus_llama" not in runs_["llama"]
    growth = {k: np.subtract(r["per_window"]["at_4x"], r["per_window"]["at_1x"]) for k, r in runs_.items()}
    assert len(growth["llama"]) == 3
    vs = runs_["mosaics2"]["versus_llama"]
    assert vs["difference"] == pytest.approx((growth["mosaics2"] - growth["llama"]).mean())
    assert vs["difference_se"] == pytest.approx((growth["mosaics2"] - growth["llama"]).std(ddof=1) / np.sqrt(3))
    assert f"{vs['difference']:+.4f} ± {vs['difference_se']:.4f}" in md


def test_missing_run_or_model_is_a_clear_error(runs, tmp_path):
    with pytest.raises(long_context.LongContextError, match="run directory .*nowhere does not exist"):
        long_context.evaluate_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PigjaxError, match="run.json does not exist"):
        long_context.evaluate_run(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text((runs["mosaics"] / "run.json").read_text())
    with pytest.raises(long_context.LongContextError, match="model does not exist.*has no final model"):
        long_context.evaluate_run(unfinished)
    with pytest.raises(long_context.LongContextError, match="factor"):
        long_context.evaluate_run(runs["mosaics"], 0)
    assert issubclass(long_context.LongContextError, PigjaxError)
