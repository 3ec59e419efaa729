"""Writing checkpoints never loses data: overwrite replaces only pigjax checkpoints (never the source
being converted), the destination is checked before converting, a replace killed at any point
leaves the old or the new checkpoint whole (and the next save/load recovers it), and killed
writers' leftovers are cleaned."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

import pigjax
from pigjax import CheckpointError, atomic
from pigjax.convert import convert, convert_to_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_a(hf_dir):
    return convert_to_model(hf_dir, progress=False)[0]


@pytest.fixture(scope="module")
def model_b(model_a):
    return pigjax.Model(model_a.config, jax.tree.map(lambda a: np.asarray(a) + 1, model_a.params))


def same(model, other) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(other.params)))


def hidden_siblings(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}."))


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


# --- what overwrite may replace ----------------------------------------------------------------------

def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, model_a):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    before = snapshot(user)
    with pytest.raises(CheckpointError, match=r"refusing to overwrite .*mine: it is not a pigjax checkpoint "
                                              r"\(it has no pigjax.json\)"):
        pigjax.save(model_a, user, overwrite=True)
    assert snapshot(user) == before and hidden_siblings(user) == []

    # A checkpoint the user added files to is not pigjax's alone any more.
    ckpt = pigjax.save(model_a, tmp_path / "ckpt")
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"not a pigjax checkpoint \(it also holds notes.txt\)"):
        pigjax.save(model_a, ckpt, overwrite=True)
    assert (ckpt / "notes.txt").read_text() == "mine"
    os.remove(ckpt / "notes.txt")
    (ckpt / "params").rename(ckpt / "moved")
    (ckpt / "params").write_text("a file")
    with pytest.raises(CheckpointError, match=r"it also holds moved"):
        pigjax.save(model_a, ckpt, overwrite=True)


def test_overwrite_replaces_checkpoints_and_empty_directories(tmp_path, model_a, model_b):
    path = pigjax.save(model_a, tmp_path / "ckpt")
    assert same(pigjax.load(pigjax.save(model_b, path, overwrite=True)), model_b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        pigjax.save(model_a, tmp_path / "empty")
    assert same(pigjax.load(pigjax.save(model_a, tmp_path / "empty", overwrite=True)), model_a)
    assert hidden_siblings(path) == [] and hidden_siblings(tmp_path / "empty") == []


def test_a_file_is_never_a_destination(tmp_path, model_a):
    f = tmp_path / "file"
    f.write_text("data")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="it is a file, not a directory"):
            pigjax.save(model_a, f, overwrite=overwrite)
    with pytest.raises(CheckpointError, match=r"cannot write .*file/ckpt: .*(not a directory|Not a directory)"):
        pigjax.save(model_a, f / "ckpt")
    assert f.read_text() == "data"


def test_conversion_never_replaces_its_source(tmp_path, hf_dir):
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    before = snapshot(src)
    with pytest.raises(CheckpointError, match=r"refusing to write .*hf: it is the source being read"):
        convert(src, src, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match=r"refusing to write .*: it contains the source being read"):
        convert(src, tmp_path, overwrite=True, progress=False)
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(CheckpointError, match="is the source being read"):
        convert(src, link, overwrite=True, progress=False)
    assert snapshot(src) == before


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write into: mode 0555, plus the immutable attribute when running as root
    (root ignores modes); skipped where neither works."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("running as root without chattr: cannot make a read-only directory")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_read_only_destination_fails_before_converting(readonly_dir, hf_dir, monkeypatch):
    import pigjax.convert as conv

    def never(*args, **kwargs):
        raise AssertionError("converted before checking the destination")

    monkeypatch.setattr(conv, "convert_to_model", never)
    with pytest.raises(CheckpointError, match=r"cannot write .*ro/ckpt: .*(Permission denied|not permitted)"):
        conv.convert(hf_dir, readonly_dir / "ckpt", progress=False)
    with pytest.raises(CheckpointError, match=r"cannot write .*ro/a/b: .*(Permission denied|not permitted)"):
        conv.convert(hf_dir, readonly_dir / "a" / "b", progress=False)
    assert os.listdir(readonly_dir) == []


def run_cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "scripts/convert_hf.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


def test_convert_hf_cli_refuses_without_tracebacks(tmp_path, hf_dir, readonly_dir):
    """The issue's cases through the script: each is one line on stderr, exit status 1, nothing lost."""
    user = tmp_path / "notes"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    (tmp_path / "file").write_text("data")
    cases = {
        "not a checkpoint": ([f"--src={src}", f"--out={user}", "--overwrite"], "not a pigjax checkpoint"),
        "source": ([f"--src={src}", f"--out={src}", "--overwrite"], "is the source being read"),
        "parent of source": ([f"--src={src}", f"--out={tmp_path}", "--overwrite"], "contains the source"),
        "file": ([f"--src={src}", f"--out={tmp_path / 'file'}"], "it is a file, not a directory"),
        "read-only": ([f"--src={src}", f"--out={readonly_dir / 'ckpt'}"], "cannot write"),
    }
    before = snapshot(tmp_path / "notes"), snapshot(src)
    for case, (args, message) in cases.items():
        result = run_cli(*args)
        assert result.returncode == 1, (case, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (case, result.stderr)
    assert (snapshot(tmp_path / "notes"), snapshot(src)) == before
    assert (tmp_path / "file").read_text() == "data"


# --- atomic replace: kills at every step -------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import pigjax
    from pigjax import atomic, checkpoint

    path, new_model, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = pigjax.load(new_model)
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    rename, rmtree = os.rename, shutil.rmtree

    def step(src, dst):  # which step of pigjax.atomic a rename is, or None for anyone else's
        src, dst = Path(src).name, Path(dst).name
        for name, kind in (("complete", ".new-"), ("aside", ".old-"), ("trash", ".trash-")):
            if kind in dst:
                return name
        return "install" if dst == path.name and ".new-" in src else None

    def killing_rename(src, dst):
        name = step(src, dst)
        if point == f"before-{name}":
            kill()
        rename(src, dst)
        if point == f"after-{name}":
            kill()

    def killing_rmtree(p, *args, **kwargs):
        if point == "mid-remove" and ".trash-" in Path(p).name:
            files = sorted(f for f in Path(p).rglob("*") if f.is_file())
            for f in files[: len(files) // 2]:
                f.unlink()
            kill()
        return rmtree(p, *args, **kwargs)

    def killing_checksums(params, *args):
        if point == "mid-write":  # orbax has written params/, pigjax.json not yet
            kill()
        return real_checksums(params, *args)

    real_checksums = checkpoint.checksums
    atomic.os.rename, atomic.shutil.rmtree, checkpoint.checksums = killing_rename, killing_rmtree, killing_checksums
    pigjax.save(model, path, overwrite=True)
    print("not killed")
""")

# kill point -> which checkpoint `path` holds once recovered
KILL_POINTS = {
    "mid-write": "old",        # partial copy is garbage
    "after-complete": "old",   # the new copy is whole but the replace never started
    "after-aside": "new",      # path missing: the whole new copy is restored
    "after-install": "new",    # old copy aside: garbage
    "after-trash": "new",
    "mid-remove": "new",       # the old copy half deleted, under a name that is never restored
}


@pytest.fixture(scope="module")
def saved_b(tmp_path_factory, model_b):
    return pigjax.save(model_b, tmp_path_factory.mktemp("b") / "ckpt_b")


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_replace_killed_at_any_point_leaves_a_whole_checkpoint(tmp_path, model_a, model_b, saved_b, point):
    path = pigjax.save(model_a, tmp_path / "ckpt")
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), str(saved_b), point],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert hidden_siblings(path), "the kill should have left something behind"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = pigjax.load(path)
    assert same(loaded, model_a if KILL_POINTS[point] == "old" else model_b)
    restored = [w for w in caught if "interrupted write" in str(w.message)]
    assert bool(restored) == (point in ("after-aside", "before-install")), [str(w.message) for w in caught]

    # The next save cleans every leftover of the killed writer.
    pigjax.save(model_a, path, overwrite=True)
    assert hidden_siblings(path) == [] and same(pigjax.load(path), model_a)


def test_save_restores_a_killed_replace_before_deciding(tmp_path, model_a, model_b):
    """Target missing, the old copy aside (the writer died before the new one was complete): a
    save without overwrite restores it and then refuses, as if the replace had never started."""
    path = pigjax.save(model_a, tmp_path / "ckpt")
    dead = dead_pid()
    os.rename(path, path.parent / f".ckpt.old-{dead}-{atomic._HOST}-0001")
    (path.parent / f".ckpt.partial-{dead}-{atomic._HOST}-0002").mkdir()
    with pytest.warns(UserWarning, match="restored the previous copy"):
        with pytest.raises(CheckpointError, match="already exists"):
            pigjax.save(model_b, path)
    assert same(pigjax.load(path), model_a)
    pigjax.save(model_b, path, overwrite=True)
    assert hidden_siblings(path) == [] and same(pigjax.load(path), model_b)


def test_failed_step_rolls_back(tmp_path, model_a, model_b, monkeypatch):
    """An exception (not a kill) while installing the new copy puts the old one back and leaves nothing."""
    path = pigjax.save(model_a, tmp_path / "ckpt")
    rename = os.rename

    def failing(src, dst):
        if Path(dst) == path and ".new-" in Path(src).name:
            raise OSError(16, "Device or resource busy")
        rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(CheckpointError, match="cannot write .*Device or resource busy"):
        pigjax.save(model_b, path, overwrite=True)
    monkeypatch.undo()
    assert same(pigjax.load(path), model_a) and hidden_siblings(path) == []


# --- stale leftovers -----------------------------------------------------------------------------------

def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_leftovers_of_dead_writers_are_cleaned(tmp_path, model_a):
    path = pigjax.save(model_a, tmp_path / "ckpt")
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead, host = dead_pid(), atomic._HOST
        names = {
            "dead partial": f".ckpt.partial-{dead}-{host}-abcd1234",
            "dead new": f".ckpt.new-{dead}-{host}-0001",
            "dead trash": f".ckpt.trash-{dead}-{host}-0002",
            "live partial": f".ckpt.partial-{live.pid}-{host}-0003",
            "other host": f".ckpt.partial-{dead}-{host}x-0004",
            "other name": f".ckpt2.partial-{dead}-{host}-0005",
            "legacy": ".ckpt.partial-k3j_9x2a",
        }
        for name in names.values():
            (tmp_path / name / "params").mkdir(parents=True)
        with pytest.warns(UserWarning, match=r"ckpt.partial-k3j_9x2a: left by an interrupted write of an older"):
            pigjax.save(model_a, path, overwrite=True)
        left = {n for n in os.listdir(tmp_path) if n != "ckpt"}
        assert left == {names[k] for k in ("live partial", "other host", "other name", "legacy")}
    finally:
        live.kill()
        live.wait()


def test_load_says_when_a_save_is_in_progress(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f".ckpt.partial-{live.pid}-{atomic._HOST}-0001").mkdir()
        with pytest.raises(CheckpointError, match=f"does not exist \\(a save of it by pid {live.pid} is in progress"):
            pigjax.load(tmp_path / "ckpt")
    finally:
        live.kill()
        live.wait()
