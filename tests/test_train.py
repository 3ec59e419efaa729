"""Training data (split, tokenizer cache, packer) and training runs (loss goes down, kill-and-resume
equals one go, Llama baseline, comparison report) on a tiny synthetic corpus."""

import json

import jax
import numpy as np
import pytest

import pigjax
from pigjax import data
from pigjax import train as training
from pigjax.eval.lm_compare import compare
from pigjax.model import param_count


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """~300 paragraphs of a small random grammar: learnable, so a few steps lower the loss."""
    rng = np.random.default_rng(0)
    nouns = "cat dog bird fish horse mouse lion tiger wolf bear".split()
    adjs = "red big small old young green happy sad".split()
    verbs = "sees chases likes follows finds meets".split()
    paragraphs = []
    for _ in range(300):
        sentences = [f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}."
                     for _ in range(rng.integers(2, 6))]
        paragraphs.append(" ".join(sentences))
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def config(workdir, text_file, cache_dir, **kw):
    base = dict(workdir=str(workdir), data=str(text_file), data_cache=str(cache_dir), vocab_size=300, val_fraction=0.1,
                seq_len=32, batch=4, hidden=32, layers=1, heads=2, steps=40, warmup=4, lr=3e-2, end_lr=1e-3,
                dropout=0.05, save_every=1000, eval_every=20, eval_windows=4, final_eval_windows=8, progress=False)
    return training.TrainConfig(**{**base, **kw})


def test_packer_windows():
    paragraphs = [np.array(p, np.int32) for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]
    offsets = np.cumsum([0] + [len(p) for p in paragraphs])
    tok = data.Tokenized(np.concatenate(paragraphs), offsets)
    # in order: stream 1 2 3 E 4 5 E 6 7 8 9 E (E = 0); windows of 3 + 1 tokens with stride 3
    val = data.Packer(tok, 3, eos_id=0, shuffle=False)
    assert val.windows_per_epoch == 3
    assert [val.window(g).tolist() for g in range(3)] == [[1, 2, 3, 0], [0, 4, 5, 0], [0, 6, 7, 8]]
    # shuffled: each epoch is some order of whole paragraphs, visited in some order of windows;
    # a batch is a function of (seed, step) alone, so a resumed run reads the same windows
    a, b = data.Packer(tok, 3, 0, seed=5), data.Packer(tok, 3, 0, seed=5)
    assert np.array_equal(a.batch(7, 2), np.stack([b.window(14), b.window(15)]))
    assert np.array_equal(data.Packer(tok, 3, 0, seed=5).batch(7, 2), a.batch(7, 2))
    for epoch in range(4):
        windows = [a.window(epoch * 3 + j) for j in range(3)]
        stream, _ = a._epoch(epoch)
        assert sorted(stream.tolist()) == sorted([0, 0, 0] + list(range(1, 10)))
        starts = sorted(w.tolist() for w in windows)
        assert starts == sorted(stream[s:s + 4].tolist() for s in (0, 3, 6))
    orders = {tuple(tuple(a.window(e * 3 + j).tolist()) for j in range(3)) for e in range(6)}
    assert len(orders) > 1  # epochs differ
    with pytest.raises(data.DataError, match="do not fill one window"):
        data.Packer(tok, 12, 0)


def test_prepare_splits_trains_and_caches(text_file, cache_dir):
    logs = []
    corpus = data.prepare(str(text_file), cache_dir, vocab_size=300, val_fraction=0.1, log=logs.append)
    paragraphs = data.text_file_paragraphs(text_file)
    train, val = data.split(paragraphs, 0.1)
    assert corpus.train.num_paragraphs == len(train) and corpus.val.num_paragraphs == len(val)
    assert 0.03 < len(val) / len(paragraphs) < 0.2 and not set(train) & set(val)
    tok = corpus.tokenizer
    assert tok.eos_token == data.EOS and corpus.eos_id == tok.convert_tokens_to_ids(data.EOS)
    assert tok.decode(corpus.val.paragraph(0)) == val[0]
    assert corpus.eos_id not in corpus.train.tokens  # EOS only comes from the packer
    assert len(logs) == 2  # trained once ...
    again = data.prepare(str(text_file), cache_dir, vocab_size=300, val_fraction=0.1, log=logs.append)
    assert len(logs) == 2 and np.array_equal(again.train.tokens, corpus.train.tokens)  # ... then read back
    assert again.tokenizer.decode(again.val.paragraph(0)) == val[0]
    with pytest.raises(data.DataError, match="does not exist"):
        data.prepare(str(text_file) + ".missing", cache_dir)


QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def mosaics_run(text_file, cache_dir, tmp_path_factory):
    """One 40-step Mosaics run; runs of the same settings in this process reuse its compiled steps."""
    workdir = tmp_path_factory.mktemp("runs") / "mosaics"
    return workdir, training.train(config(workdir, text_file, cache_dir), **QUIET)


def test_training_lowers_the_loss_and_writes_everything(mosaics_run):
    run, metrics = mosaics_run
    loss = metrics["train"]["loss"]
    assert len(loss) == 40 and metrics["final"]["finished"]
    first, last = np.mean(loss[:3]), np.mean(loss[-3:])
    print(f"train loss {first:.3f} -> {last:.3f}; validation {metrics['final']['val_loss']:.3f}")
    assert last < 0.7 * first
    assert metrics["final"]["val_loss"] < 0.7 * first
    assert len(metrics["final"]["per_position_loss"]) == 32 and metrics["tokens_per_second"] > 0
    assert json.loads((run / "final_eval.json").read_text())["val_windows"] == 8
    assert (run / "loss_curve.png").stat().st_size > 1000
    model = pigjax.load(run / "model")
    assert isinstance(model.config, pigjax.MosaicsConfig) and model.tokenizer is not None
    ids = model.tokenizer("The red cat sees the")["input_ids"]
    assert np.isfinite(np.asarray(pigjax.forward(model, np.array([ids])))).all()


def test_kill_and_resume_equals_one_go(text_file, cache_dir, tmp_path):
    """Steps 0-7 of the 40-step schedule in one go, and as 0-3 then a resumed 4-7."""
    one_go = training.train(config(tmp_path / "a", text_file, cache_dir, until_step=8, eval_every=4), **QUIET)
    half = training.train(config(tmp_path / "b", text_file, cache_dir, until_step=4, eval_every=4), **QUIET)
    assert half["final"]["step"] == 4 and not half["final"]["finished"]
    resumed = training.train(config(tmp_path / "b", text_file, cache_dir, until_step=8, eval_every=4), **QUIET)
    assert resumed["train"]["step"] == list(range(8)) and resumed["val"]["step"] == [4, 8]
    np.testing.assert_allclose(resumed["train"]["loss"], one_go["train"]["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed["val"]["loss"], one_go["val"]["loss"], rtol=0, atol=1e-6)
    a, b = pigjax.load(tmp_path / "a" / "model"), pigjax.load(tmp_path / "b" / "model")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    with pytest.raises(training.TrainError, match="holds a different run.*'lr'"):
        training.train(config(tmp_path / "b", text_file, cache_dir, lr=1e-3), **QUIET)


def test_llama_baseline_and_comparison(text_file, cache_dir, tmp_path, mosaics_run):
    cfg = config(tmp_path / "llama", text_file, cache_dir, model="llama")
    mosaics_cfg = training.mosaics_config(cfg, 300, 0)
    llama_cfg = training.llama_config_like(mosaics_cfg)
    from pigjax.models import llama
    from pigjax.models import mosaics

    n_m = param_count(mosaics.param_shapes(mosaics_cfg))
    n_l = param_count(llama.param_shapes(llama_cfg))
    assert abs(n_l - n_m) / n_m < 0.01 and llama_cfg.hidden_size == 32 and llama_cfg.tie_word_embeddings
    metrics = training.train(cfg, **QUIET)
    loss = metrics["train"]["loss"]
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:3])
    assert isinstance(pigjax.load(tmp_path / "llama" / "model").config, pigjax.LlamaConfig)
    mosaics_dir, mosaics_metrics = mosaics_run
    summary = compare({"mosaics": mosaics_dir, "llama": tmp_path / "llama"}, tmp_path / "out" / "cmp")
    assert summary["mosaics"]["val_loss"] == mosaics_metrics["final"]["val_loss"]
    assert summary["llama"]["val_loss_ratio_to_mosaics"] == pytest.approx(
        metrics["final"]["val_loss"] / mosaics_metrics["final"]["val_loss"])
    assert len(summary["llama"]["per_position_loss"]) == 32
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"cmp.{ext}").stat().st_size > 100
    assert "| validation loss |" in (tmp_path / "out" / "cmp.md").read_text()


def test_mosaics_v2_trains(text_file, cache_dir, tmp_path):
    """pigjax.train with model 'mosaics2' (Memory Mosaics v2, m drawn per step): the loss goes down,
    the saved model is a v2 config, and its size is close to v1's (docs/algorithm.md §3A.3)."""
    cfg = config(tmp_path / "v2", text_file, cache_dir, model="mosaics2", short_window=8, long_gap_min=4,
                 long_gap_max=16)
    metrics = training.train(cfg, **QUIET)
    loss = metrics["train"]["loss"]
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:3]) and metrics["final"]["finished"]
    model = pigjax.load(tmp_path / "v2" / "model")
    assert model.config.version == 2 and (model.config.short_window, model.config.long_gap_max) == (8, 16)
    from pigjax.models import mosaics

    v1 = param_count(mosaics.param_shapes(training.mosaics_config(config(tmp_path, text_file, cache_dir), 300, 0)))
    assert abs(metrics["param_count"] - v1) / v1 < 0.05


def test_run_record_is_replaced_whole(tmp_path):
    """In a multi-process run the others read run.json while process 0 rewrites it: a reader sees
    a whole file, old or new, never a truncated one (a torn read failed a 2-process resume)."""
    import threading

    cfg = training.TrainConfig(workdir=str(tmp_path), data="x.txt", steps=10, warmup=2)
    training._check_run(tmp_path, cfg, resuming=False)
    stop, torn = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "run.json").read_text())
            except json.JSONDecodeError:
                torn.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(500):
        training._check_run(tmp_path, cfg, resuming=True)
    stop.set()
    reader.join()
    assert not torn, f"{len(torn)} torn reads"
    assert not [p.name for p in tmp_path.iterdir() if p.name != "run.json"]  # no temporary left
