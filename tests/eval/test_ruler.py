"""RULER sample construction and scoring (pigjax.eval), long_text, and scripts/eval_ruler.py."""

import collections
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_llama

import pigjax
from pigjax import assets
from pigjax.eval import harness, long_text, ruler

ROOT = Path(__file__).resolve().parents[2]
NEEDLE = re.compile(r"One of the special magic numbers for (.+?) is: (\d{7})\.")


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer: from the converted default checkpoint if present, else from the GGUF."""
    converted = pigjax.default_checkpoint(convert_if_missing=False) / "tokenizer"
    if converted.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(converted))
    from pigjax.convert import read_gguf_tokenizer

    return read_gguf_tokenizer(assets.default_gguf_path())


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_fit_the_context(tok, task):
    ctx = 2048
    budget = ctx - ruler.TASK_SPECS[task].tokens_to_generate
    for fmt in ("chat", "base"):
        for i in range(2):
            s = ruler.make_sample(tok, task, ctx, i, format=fmt)
            assert s.prompt_ids == tok(s.prompt, add_special_tokens=False)["input_ids"]
            assert s.length <= budget, (fmt, i, s.length, budget)
            assert s.length >= 0.85 * budget, (fmt, i, s.length, budget)
            assert s.tokens_to_generate == ruler.TASK_SPECS[task].tokens_to_generate
            assert (s.task, s.context, s.index, s.format) == (task, ctx, i, fmt)


def test_prompt_formats(tok):
    chat = ruler.make_sample(tok, "niah_single_1", 1024, 0, format="chat")
    base = ruler.make_sample(tok, "niah_single_1", 1024, 0, format="base")
    head = tok.apply_chat_template([{"role": "user", "content": chat.input}], add_generation_prompt=True, tokenize=False)
    assert chat.prompt == head + chat.answer_prefix
    assert chat.prompt.startswith("<|im_start|>system") and chat.prompt.endswith("<|im_start|>assistant\n" + chat.answer_prefix)
    assert chat.answer_prefix.endswith("mentioned in the provided text is")
    # Base completion: RULER's input with its answer prefix (leading space kept).
    assert base.prompt == base.input + base.answer_prefix and base.answer_prefix.startswith(" The special magic number")
    assert base.input.startswith("A special magic number is hidden within the following text.")


@pytest.mark.parametrize("task", ruler.TASKS)
def test_deterministic_and_distinct(tok, task):
    a = ruler.make_sample(tok, task, 1024, 3, seed=7)
    b = ruler.make_sample(tok, task, 1024, 3, seed=7)
    assert a == b
    c = ruler.make_sample(tok, task, 1024, 4, seed=7)
    d = ruler.make_sample(tok, task, 1024, 3, seed=8)
    for other in (c, d):
        assert other.prompt != a.prompt and other.outputs != a.outputs


def _essay_or_noise_needles(sample):
    found = NEEDLE.findall(sample.input)
    question = sample.input.rsplit("\n", 1)[-1]
    return found, question


def test_niah_needles(tok):
    for task, n_needles in (("niah_single_1", 1), ("niah_single_2", 1), ("niah_multikey_1", 4)):
        for i in range(3):
            s = ruler.make_sample(tok, task, 2048, i)
            found, question = _essay_or_noise_needles(s)
            assert len(found) == n_needles and len({k for k, _ in found}) == n_needles
            (value,) = s.outputs
            key = next(k for k, v in found if v == value)
            assert question == f"What is the special magic number for {key} mentioned in the provided text?"
            assert s.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    noise = ruler.make_sample(tok, "niah_single_1", 2048, 0)
    assert noise.input.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.") \
        == noise.haystack
    essay = ruler.make_sample(tok, "niah_single_2", 2048, 0)
    assert "palliative care nurse" in essay.input  # the essays, from their start (as RULER)


def test_vt_chain(tok):
    for i in range(3):
        s = ruler.make_sample(tok, "vt", 2048, i)
        names = s.outputs
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        question_part = s.input.rsplit("\n\n\n\n", 1)[-1]  # after the one-shot example
        value = re.search(rf"VAR {names[0]} = (\d{{5}})", question_part).group(1)
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a} " in question_part
        assert question_part.endswith(f"Question: Find all variables that are assigned the value {value} in the text above.")
        assert f"5 variables are assgined the value {value}, they are: " in s.answer_prefix
        example = s.input.rsplit("\n\n\n\n", 1)[0]
        assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)


@pytest.mark.parametrize("ctx,repeats", [(2048, 6), (4096, 30)])
def test_cwe_counts(tok, ctx, repeats):
    s = ruler.make_sample(tok, "cwe", ctx, 0)
    real = s.input.rsplit("\nBelow is a numbered list of words.", 1)[-1]
    listed = real.split("\n")[1]  # the template's second line is the numbered list
    counts = collections.Counter(re.split(r"(?:^| )\d+\. ", listed)[1:])
    assert len(s.outputs) == 10 and {counts[w] for w in s.outputs} == {repeats}
    assert all(c == (1 if ctx < 4096 else 3) for w, c in counts.items() if w not in s.outputs)
    assert len(counts) == s.haystack


def test_fwe_counts(tok):
    s = ruler.make_sample(tok, "fwe", 2048, 1)
    coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
    ranked = [w for w, _ in collections.Counter(coded).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == s.outputs


def test_sentence_split():
    text = "It works. Does it? Yes! e.g. this stays. The end.Next \"Quote\" here."
    assert ruler.split_sentences(text) == ["It works.", "Does it?", "Yes! e.g. this stays.", "The end.Next \"Quote\" here."]


def test_errors(tok):
    with pytest.raises(pigjax.PigjaxError, match="unknown RULER task"):
        ruler.make_sample(tok, "qa_1", 1024, 0)
    with pytest.raises(pigjax.PigjaxError, match="does not fit"):
        ruler.make_sample(tok, "vt", 256, 0)  # its one-shot example alone is ~470 tokens
    with pytest.raises(pigjax.PigjaxError, match="format"):
        ruler.make_sample(tok, "cwe", 1024, 0, format="instruct")


# ------------------------------------------------------------------------------ scoring


def test_scoring_matches_hand_computed():
    preds = ["The numbers are 123 and 456.", "I don't know", "only 456"]
    refs = [["123", "456"], ["789"], ["123", "456"]]
    assert ruler.string_match_all(preds, refs) == round((100 + 0 + 50) / 3, 2) == 50.0
    assert ruler.string_match_all_per_sample(preds, refs) == [100.0, 0.0, 50.0]
    assert ruler.string_match_part(preds, refs) == round((100 + 0 + 100) / 3, 2) == 66.67
    assert ruler.string_match_all(["x"], [["y"]]) == 0.0
    assert ruler.string_match_all(["ABC-def"], [["abc-DEF"]]) == 100.0  # case-insensitive
    assert ruler.string_match_all(["1. apple 2. Pear 3. plum"], [["apple", "pear", "fig", "kiwi"]]) == 50.0


def test_postprocess_and_score():
    assert ruler.postprocess("  a\tb\x01c \n") == "a\nb\nc"
    assert ruler.postprocess(None) == ""
    cell, per = ruler.score("vt", [" AAAAA BBBBB\x00", "nothing"], [["aaaaa", "bbbbb", "CCCCC", "DDDDD"], ["EEEEE"]])
    assert per == [50.0, 0.0] and cell == 25.0
    with pytest.raises(pigjax.PigjaxError):
        ruler.score("vt", ["a"], [["a"], ["b"]])


# ------------------------------------------------------------------------------ long text


def test_long_text(tok):
    a = long_text(tok, 3000, seed=0)
    assert a.dtype == np.int32 and a.shape == (3000,)
    assert np.array_equal(a, long_text(tok, 3000, seed=0))
    assert not np.array_equal(a[:200], long_text(tok, 3000, seed=1)[:200])
    assert np.array_equal(long_text(tok, 500, seed=0), a[:500])
    assert "\n\n" in tok.decode(a)


# ------------------------------------------------------------------------------ back-ends, script


def test_backend_names(monkeypatch):
    assert isinstance(harness.make_backend("dense"), pigjax.Dense)
    monkeypatch.delattr(pigjax, "TopK", raising=False)
    with pytest.raises(pigjax.PigjaxError, match="'topk' is not available"):
        harness.make_backend("topk", 0.1)
    with pytest.raises(pigjax.PigjaxError, match="unknown attention back-end"):
        harness.check_backends(["dense", "flash"], "auto")
    monkeypatch.setattr(pigjax, "TopK", lambda fraction: ("topk", fraction), raising=False)
    with pytest.raises(pigjax.PigjaxError, match="MagicPIG"):
        harness.check_backends(["dense", "topk"], "auto")
    harness.check_backends(["dense", "topk"], 0.1)
    assert harness.make_backend("topk", 0.1) == ("topk", 0.1)
    assert harness.make_backend("topk:rankedlsh_5pct", 0.1) == ("topk", 0.1)
    harness.check_backends(["rankedlsh_2pct", "topk:rankedlsh_2pct"], "auto")
    for names, fraction, message in [
            (["rankedlsh_2pct", "topk:rankedlsh_5pct"], "auto", "add rankedlsh_5pct to the list"),
            (["rankedlsh_2pct", "topk:rankedlsh_2pct"], 0.1, "contradicts"),
            (["dense", "topk:dense"], "auto", "reference must be a MagicPIG or RankedLSH"),
            (["rankedlsh", "dense:rankedlsh"], "auto", "take a ':reference'"),
            (["rankedlsh", "topk", "topk"], "auto", "listed twice")]:
        with pytest.raises(pigjax.PigjaxError, match=message):
            harness.check_backends(names, fraction)


def test_run_at_fractions_gives_each_fraction_backend_its_reference(monkeypatch):
    """Engine back-ends run first; topk takes the default reference's measured fraction,
    topk:<name> that back-end's, and a given fraction overrides both."""
    monkeypatch.setattr(pigjax, "RankedLSH", lambda top: ("ranked", top), raising=False)
    monkeypatch.setattr(pigjax, "TopK", lambda fraction: ("topk", fraction), raising=False)
    measured = {0.006: 0.02, 0.035: 0.05}
    order = []

    def run_one(name, backend):
        order.append(name)
        return {"fraction_read": measured[backend[1]] if backend[0] == "ranked" else backend[1]}

    names = ["topk:rankedlsh_5pct", "rankedlsh_2pct", "topk", "rankedlsh_5pct"]
    got = harness.run_at_fractions(names, run_one)
    assert order == ["rankedlsh_2pct", "rankedlsh_5pct", "topk:rankedlsh_5pct", "topk"]
    assert got["topk"]["fraction_read"] == 0.02 and got["topk:rankedlsh_5pct"]["fraction_read"] == 0.05
    assert harness.run_at_fractions(["rankedlsh_2pct", "topk"], run_one, 0.1)["topk"]["fraction_read"] == 0.1


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, tok):
    """A tiny random Llama that uses SmolLM2's tokenizer (so RULER prompts can be built)."""
    from pigjax.convert import convert

    src = tmp_path_factory.mktemp("ruler") / "hf"
    make_hf_llama(src, vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    tok.save_pretrained(str(src))
    return convert(src, tmp_path_factory.mktemp("ruler") / "ckpt", progress=False)


@pytest.mark.slow
def test_script_end_to_end(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "ruler"
    result = subprocess.run(
        [sys.executable, "scripts/eval_ruler.py", f"--checkpoint={tiny_with_tokenizer}", "--tasks=niah_single_1,fwe",
         "--contexts=512", "--samples=2", "--batch=2", "--attention=dense", f"--out={out}", "--noprogress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "ruler.json").read_text())
    assert [(c["attention"], c["task"], c["context"]) for c in data["cells"]] == [
        ("dense", "niah_single_1", 512), ("dense", "fwe", 512)]
    for cell in data["cells"]:
        assert len(cell["predictions"]) == 2 and cell["fraction_read"] == 1.0 and 0 <= cell["score"] <= 100
        assert cell["calls"][0]["rows"] and "decode_tokens_per_second" in cell["calls"][0]
    md = (out / "ruler.md").read_text()
    assert "| niah_single_1 | 512 |" in md and "average" in md and "| dense |" in result.stdout
    missing = [n for n, (cls, _) in harness.BACKENDS.items() if not hasattr(pigjax, cls)]
    if missing:  # a back-end the package does not have yet fails early and clearly
        bad = subprocess.run([sys.executable, "scripts/eval_ruler.py", f"--checkpoint={tiny_with_tokenizer}",
                              f"--attention=dense,{missing[0]}", "--fraction=0.1", f"--out={tmp_path / 'x'}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 1 and "is not available" in bad.stderr


@pytest.mark.slow
def test_auto_fraction_follows_magicpig(tiny_with_tokenizer, monkeypatch, tmp_path):
    """topk runs after the MagicPIG back-end, at the fraction that it measured on the same cell."""

    @dataclasses.dataclass(frozen=True)
    class FakePig(pigjax.Dense):
        def stats(self, *args, **kwargs):
            return {**super().stats(*args, **kwargs), "attention": "fakepig", "fraction_read": 0.25}

    @dataclasses.dataclass(frozen=True)
    class FakeTopK(pigjax.Dense):
        fraction: float = 1.0

    monkeypatch.setattr(pigjax, "MagicPIG", lambda K, L: FakePig(), raising=False)
    monkeypatch.setattr(pigjax, "TopK", FakeTopK, raising=False)
    model = pigjax.load(tiny_with_tokenizer)
    res = harness.run_ruler(model, tasks=["niah_single_1"], contexts=[512], samples=1, attention=["topk", "magicpig_k8l75"],
                            fraction="auto", out_dir=tmp_path, progress=False, log=lambda s: None)
    cells = {c["attention"]: c for c in res["cells"]}
    assert [c["attention"] for c in res["cells"]] == ["magicpig_k8l75", "topk"]
    assert cells["magicpig_k8l75"]["fraction_read"] == 0.25
    assert cells["topk"]["fraction_used"] == 0.25 and "fraction=0.25" in cells["topk"]["backend"]
    assert (tmp_path / "ruler.md").read_text().count("0.2500") >= 2


@pytest.mark.slow
def test_explicit_references_give_each_topk_its_budget(tiny_with_tokenizer, monkeypatch, tmp_path):
    """topk:<engine back-end> runs at that back-end's measured fraction, so one run (one prefill a
    batch) compares two budgets each with TopK at its own fraction."""

    def engine(fraction_read):
        @dataclasses.dataclass(frozen=True)
        class FakeEngine(pigjax.Dense):
            def stats(self, *args, **kwargs):
                return {**super().stats(*args, **kwargs), "fraction_read": fraction_read}
        return FakeEngine()

    @dataclasses.dataclass(frozen=True)
    class FakeTopK(pigjax.Dense):
        fraction: float = 1.0

    monkeypatch.setattr(pigjax, "RankedLSH", lambda top: engine({0.006: 0.02, 0.035: 0.05}[top]), raising=False)
    monkeypatch.setattr(pigjax, "TopK", FakeTopK, raising=False)
    calls = []
    real = pigjax.generate
    monkeypatch.setattr(pigjax, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = pigjax.load(tiny_with_tokenizer)
    names = ["topk:rankedlsh_5pct", "rankedlsh_2pct", "topk:rankedlsh_2pct", "rankedlsh_5pct"]
    res = harness.run_ruler(model, tasks=["niah_single_1"], contexts=[512], samples=2, batch=2, attention=names,
                            out_dir=tmp_path, progress=False, log=lambda s: None)
    assert len(calls) == 1  # one prefill for the four
    cells = {c["attention"]: c for c in res["cells"]}
    assert [c["attention"] for c in res["cells"]] == ["rankedlsh_2pct", "rankedlsh_5pct", "topk:rankedlsh_5pct",
                                                      "topk:rankedlsh_2pct"]
    assert cells["topk:rankedlsh_2pct"]["fraction_used"] == 0.02 and "fraction=0.02" in cells["topk:rankedlsh_2pct"]["backend"]
    assert cells["topk:rankedlsh_5pct"]["fraction_used"] == 0.05 and "fraction=0.05" in cells["topk:rankedlsh_5pct"]["backend"]
    assert "| topk:rankedlsh_2pct | 0.0200 |" in (tmp_path / "ruler.md").read_text()


@pytest.mark.slow
def test_resume_keeps_complete_cells(tiny_with_tokenizer, monkeypatch, tmp_path):
    model = pigjax.load(tiny_with_tokenizer)
    run = dict(contexts=[512], samples=2, batch=2, attention=["dense"], out_dir=tmp_path, progress=False,
               log=lambda s: None)
    first = harness.run_ruler(model, tasks=["niah_single_1"], **run)
    calls = []
    real = pigjax.generate
    monkeypatch.setattr(pigjax, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = harness.run_ruler(model, tasks=["niah_single_1", "fwe"], resume=True, **run)
    assert len(calls) == 1  # fwe's one batch; niah_single_1 was kept
    assert both["cells"][0] == json.loads(json.dumps(first["cells"][0]))
    assert [c["task"] for c in both["cells"]] == ["niah_single_1", "fwe"]
    assert "resumed_from" in both["config"]
    with pytest.raises(pigjax.PigjaxError, match="cannot resume"):
        harness.run_ruler(model, tasks=["fwe"], resume=True, **{**run, "samples": 3})


def _ruler_json(path, cells):
    """A ruler.json holding `cells`: (back-end, task, context, per-prompt scores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cells": [
        {"attention": n, "task": t, "context": c, "score": sum(s) / len(s), "fraction_read": 0.03,
         "predictions": [{"index": i, "score": x} for i, x in enumerate(s)]} for n, t, c, s in cells]}))
    return path


def test_load_cells_merges_runs_and_keeps_remeasured_ones_apart(tmp_path):
    a = _ruler_json(tmp_path / "base" / "ruler.json", [
        ("dense", "vt", 2048, [100, 0, 100]), ("topk", "vt", 2048, [100, 100, 0]), ("x", "vt", 2048, [0, 0, 100])])
    b = _ruler_json(tmp_path / "more" / "ruler.json", [
        ("topk", "vt", 2048, [0, 0, 0]), ("x", "fwe", 4096, [100, 100, 100])])
    by = harness.load_cells([a, b])
    assert sorted(by) == ["dense", "topk", "topk@more", "x"]
    assert sorted(by["x"]) == [("fwe", 4096), ("vt", 2048)]  # another cell: merged
    assert by["topk@more"][("vt", 2048)]["score"] == 0  # the same cell again: kept apart
    out = subprocess.run([sys.executable, "scripts/ruler_agreement.py", f"--ruler={a},{b}"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.stdout.splitlines()[2:]}
    # topk vs dense (100, 0, 100): gains prompt 1, loses prompt 2; x loses prompt 0 on the shared cell
    assert rows["topk"][1:5] == ["1", "3", "1.0", "1.0"] and rows["x"][1:5] == ["1", "3", "0.0", "1.0"]
    assert rows["topk@more"][1:5] == ["1", "3", "0.0", "2.0"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(pigjax.PigjaxError, match="cannot read RULER results .*bad.json"):
        harness.load_cells([a, tmp_path / "bad.json"])
    out = subprocess.run([sys.executable, "scripts/ruler_agreement.py", f"--ruler={a},{tmp_path / 'missing.json'}"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 1 and "cannot read RULER results" in out.stderr and "Traceback" not in out.stderr
