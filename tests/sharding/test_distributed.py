"""Two processes on localhost (jax.distributed, 2 CPU devices each): generate equals one process;
data-parallel training killed mid-run resumes from its orbax checkpoint on the same loss curve."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import pigjax
from pigjax.models import llama

ROOT = Path(__file__).parents[2]
LAUNCH = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--processes", "2", "--local_devices", "2", "--"]


def run(cmd, timeout=600):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_generate_two_processes_equals_one(tmp_path):
    out = tmp_path / "tokens.json"
    run(LAUNCH + [str(ROOT / "tests" / "sharding" / "worker_generate.py"), str(out), "2x2"])
    got = json.loads(out.read_text())
    assert got["processes"] == 2 and got["devices"] == 4
    # the same model and prompts as the worker, on this process's one device
    config = pigjax.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = pigjax.Model(config, llama.init_params(config, 0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (300, 150, 220)]
    dense, magicpig = pigjax.generate(model, prompts, max_new_tokens=12,
                                      attention=[pigjax.Dense(), pigjax.MagicPIG(K=4, L=20, local=16)])
    assert got["dense"] == dense.tokens
    assert got["magicpig"] == magicpig.tokens
    assert got["magicpig_stats"]["fraction_read"] == pytest.approx(magicpig.stats["fraction_read"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat dog bird sees chases likes a red big small old".split()
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, rng.integers(8, 30))) for _ in range(300)) + "\n")
    return path


TRAIN = dict(vocab_size=300, seq_len=32, batch=8, hidden=32, layers=2, heads=2, steps=40, warmup=4, save_every=8,
             eval_every=1000, eval_windows=4, final_eval_windows=8, dropout=0.0)


def train_cmd(workdir, corpus, cache):
    return [str(ROOT / "scripts" / "train_mosaics.py"), f"--workdir={workdir}", f"--data={corpus}",
            f"--data_cache={cache}", *(f"--{k}={v}" for k, v in TRAIN.items()), "--noprogress", "--mesh=4x1"]


def test_train_two_processes_kill_and_resume(tmp_path, corpus):
    from pigjax import train as training

    cache = tmp_path / "cache"
    # The uninterrupted reference runs here, on one device: data parallelism over 2 processes
    # must give the same losses (and a launch costs two more model compiles).
    cfg = training.TrainConfig(**TRAIN, workdir=str(tmp_path / "whole"), data=str(corpus), data_cache=str(cache),
                               progress=False)
    whole = training.train(cfg, log=lambda *a: None)

    # The same run, both processes SIGKILLed once a few checkpoints exist, then resumed.
    workdir = tmp_path / "killed"
    procs = []
    for i in range(2):
        env = dict(os.environ, PIGJAX_COORDINATOR="localhost:%d" % (23456 + os.getpid() % 1000),
                   PIGJAX_NUM_PROCESSES="2", PIGJAX_PROCESS_ID=str(i), PIGJAX_LOCAL_DEVICES="2")
        procs.append(subprocess.Popen([sys.executable] + train_cmd(workdir, corpus, cache), cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 300
    while not (workdir / "state" / "8").is_dir():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the kill"
        time.sleep(0.02)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not (workdir / "metrics.json").exists(), "the run finished before the kill"
    proc = run(LAUNCH + train_cmd(workdir, corpus, cache))
    assert "resumed" in proc.stdout + proc.stderr
    resumed = json.loads((workdir / "metrics.json").read_text())
    assert resumed["train"]["step"] == whole["train"]["step"] == list(range(40))
    np.testing.assert_allclose(resumed["train"]["loss"], whole["train"]["loss"], rtol=1e-5, atol=0)
    assert resumed["final"]["val_loss"] == pytest.approx(whole["final"]["val_loss"], rel=1e-5)
    model = pigjax.load(workdir / "model")  # written by process 0 alone
    assert jax.tree.leaves(model.params)[0].shape[0] == 300
