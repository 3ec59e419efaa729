"""The command-line tools, run as a user would (subprocesses), on a tiny converted model."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_llama

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = tmp_path_factory.mktemp("cli") / "hf"
    make_hf_llama(src)
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    result = run("scripts/convert_hf.py", f"--src={src}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert (out / "pigjax.json").is_file() and f"wrote {out}" in result.stdout
    return src, out


def test_convert_refuses_existing_and_bad_sources(converted, tmp_path):
    src, out = converted
    again = run("scripts/convert_hf.py", f"--src={src}", f"--out={out}")
    assert again.returncode == 1 and "already exists" in again.stderr
    missing = run("scripts/convert_hf.py", f"--src={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_generate_cli_needs_a_tokenizer_for_text(converted):
    _, out = converted
    result = run("scripts/generate.py", f"--checkpoint={out}", "--prompt=hello", "--max_new_tokens=4")
    assert result.returncode == 1 and "need a tokenizer" in result.stderr


def test_generate_cli_default_model(smollm2_dir):
    """One run (each costs a model load and a compile): a batch of two prompts, MagicPIG by default."""
    result = run("scripts/generate.py", f"--checkpoint={smollm2_dir}", "--prompt=The capital of France is",
                 "--prompt=Red, green,", "--max_new_tokens=4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- ") == 2 and "\n Paris" in out.split("--- 'The capital of France is'")[1].split("--- ")[0]
    assert "prompts | 2" in out and "decode tok/s" in out and "attention | magicpig" in out


def test_decode_quality_merge(tmp_path):
    """eval_decode_quality.py --merge: one table from runs with the same settings; others refused."""
    import json

    def part(names, tokens=8192):
        row = {"perplexity": 10.0, "fraction_read": 0.5, "seconds": 1.0, "cache_bytes_per_token_per_layer": 1,
               "host_bytes_per_token_per_layer": 0}
        return {"machine": {"cpu": "x", "cores": 2}, "model": "m", "text": "t",
                "perplexity": {"tokens": tokens, "prefill": 2048, "backends": {n: dict(row) for n in names}},
                "attention_error": {"prefill": 4032, "steps": 8,
                                    "backends": {n: {"relative_l2": [0.0, 0.1], "fraction_read": 0.5} for n in names}}}

    paths = []
    for i, (names, tokens) in enumerate([(["dense"], 8192), (["topk", "quest"], 8192), (["topk"], 4096)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(part(names, tokens)))
    out = tmp_path / "merged"
    result = run("scripts/eval_decode_quality.py", f"--merge={paths[0]},{paths[1]}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert list(merged["perplexity"]["backends"]) == ["dense", "topk", "quest"]
    assert "| quest | 0.5000 | 10.000 | +0.00% |" in (tmp_path / "merged.md").read_text()
    bad = run("scripts/eval_decode_quality.py", f"--merge={paths[0]},{paths[2]}", f"--out={out}")
    assert bad.returncode != 0 and "other perplexity settings" in bad.stderr
    for names, message in (("dense,flash", "unknown attention back-end 'flash'"),
                           ("rankedlsh,topk:rankedlsh_5pct", "add rankedlsh_5pct to the list")):
        bad = run("scripts/eval_decode_quality.py", f"--attention={names}", f"--out={out}")
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr


def test_eval_coverage_rejects_bad_configs_and_tokenizerless_checkpoints(converted):
    _, out = converted
    bad = run("scripts/eval_coverage.py", f"--checkpoint={out}", "--configs=10y150")
    assert bad.returncode == 1 and "KxL" in bad.stderr
    result = run("scripts/eval_coverage.py", f"--checkpoint={out}", "--configs=4x8")
    assert result.returncode == 1 and "tokenizer" in result.stderr


def test_plot_frontier_joins_the_runs(tmp_path):
    """The frontier's points come from the runs given: RULER averages over the cells where dense
    scores >= 20 (a back-end without all of them is left out); attention error over the sparse
    (non-zero) layers."""
    import json

    def cell(attention, task, score, fraction):
        return {"attention": attention, "task": task, "context": 2048, "score": score, "fraction_read": fraction}

    (tmp_path / "r1.json").write_text(json.dumps({"cells": [
        cell("dense", "a", 100.0, None), cell("dense", "b", 10.0, None), cell("dense", "c", 50.0, None),
        cell("topk", "a", 90.0, 0.03), cell("topk", "b", 0.0, 0.03), cell("topk", "c", 40.0, 0.03)]}))
    (tmp_path / "r2.json").write_text(json.dumps({"cells": [
        cell("rankedlsh", "a", 80.0, 0.02), cell("rankedlsh", "c", 30.0, 0.04), cell("rankedlsh_5pct", "a", 100.0, 0.05)]}))
    err = {"attention_error": {"backends": {"rankedlsh": {"relative_l2": [0.0, 0.1, 0.3], "fraction_read": 0.03}}}}
    (tmp_path / "e.json").write_text(json.dumps(err))
    (tmp_path / "c.json").write_text(json.dumps({"rows": [
        {"config": "10x150", "fraction": 0.03, "lsh": 0.3, "topk": 0.7, "oracle": 0.5}]}))
    (tmp_path / "p.json").write_text(json.dumps({"perplexity": {"backends": {
        "dense": {"fraction_read": None, "perplexity": 10.0}, "rankedlsh": {"fraction_read": 0.03, "perplexity": 10.1}}}}))
    out = tmp_path / "f.png"
    result = run("scripts/plot_frontier.py", f"--errors={tmp_path / 'e.json'}", f"--coverage={tmp_path / 'c.json'}",
                 f"--ruler={tmp_path / 'r1.json'},{tmp_path / 'r2.json'}", f"--perplexity={tmp_path / 'p.json'}",
                 f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    panels = list(json.loads((tmp_path / "f.json").read_text()).values())
    assert panels[0]["points"]["rankedlsh"] == [0.03, pytest.approx(0.2)]
    assert panels[1]["points"]["magicpig_k10l150"] == [0.03, 0.3] and panels[1]["points"]["topk@magicpig_k10l150"][1] == 0.7
    ruler = panels[2]  # cells a and c (dense >= 20); rankedlsh_5pct lacks c, so it is left out, not averaged over a
    assert ruler["dense"] == 75.0 and ruler["points"]["topk"] == [0.03, 65.0]
    assert ruler["points"]["rankedlsh"] == [pytest.approx(0.03), 55.0] and "rankedlsh_5pct" not in ruler["points"]
    assert "rankedlsh_5pct has 1 of the 2 cells; left out" in result.stdout
    assert panels[3]["dense"] == 10.0 and panels[3]["points"] == {"rankedlsh": [0.03, 10.1]}


def test_bench_sharding_rejects_bad_backends_before_starting_workers():
    for names, message in (("dense,flash", "unknown attention back-end 'flash'"), ("dense,topk", "without a fraction")):
        bad = run("scripts/bench_sharding.py", f"--attention={names}")
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr


def test_benchmarks_reject_bad_flags_while_parsing_them(tmp_path):
    """pigjax.cli's checks: a bad list entry stops the script with absl's one-line flag error."""
    for args, message in ((("scripts/bench_decode.py", "--contexts=8192,abc"), "integers >= 1024"),
                          (("scripts/bench_decode.py", "--batch=0"), "--batch=0"),
                          (("scripts/bench_attention.py", "--shapes=foo"), "takes some of: llama8b, smollm2"),
                          (("scripts/bench_dense_decode.py", "--cases=4y8"), "BATCHxSLOTS"),
                          (("scripts/bench_projections.py", "--batches=4,0"), "integers >= 1"),
                          (("scripts/bench_prefill_attention.py", "--lengths=2048,abc"), "integers >= 1"),
                          (("scripts/bench_capped_memory.py", "--batches=dense:x"), "dense:N / magicpig:N"),
                          (("scripts/bench_projections.py", "--dtypes=float16"), "takes some of: float32, bfloat16"),
                          (("scripts/eval_mosaics_decode.py", f"--run={tmp_path / 'none.json'}"), "train_mosaics.py")):
        bad = run(*args)
        assert bad.returncode == 1 and "FATAL Flags parsing error" in bad.stderr and message in bad.stderr, args
        assert "Traceback" not in bad.stderr
    bad = run("scripts/bench_decode.py", "--K=0")  # checked by MagicPIG itself, before the model load
    assert bad.returncode == 1 and "K must be" in bad.stderr and "Traceback" not in bad.stderr
