"""Shared fixtures: tiny random HF Llamas converted by the real converter, and the embedded SmolLM2."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# The suite checks what programs compute, and most of its time is XLA compiling small programs once:
# with LLVM's code generation at O0 (XLA's default is 2) it runs about a third faster on 2 cores.
# Subprocesses inherit the flag. XLA_FLAGS=--xla_backend_optimization_level=2 runs it at the default.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# sharding/multi_device/ needs 4 CPU devices, fixed when JAX starts: sharding/test_multi_device.py
# runs it in its own pytest process (PIGJAX_MULTI_DEVICE=1).
collect_ignore = [] if os.environ.get("PIGJAX_MULTI_DEVICE") == "1" else ["sharding/multi_device"]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_hf_llama(path, *, seed=0, init_range=0.1, config_json_overrides=None, **config_kwargs):
    """A random transformers LlamaForCausalLM saved with save_pretrained under `path`.

    `config_json_overrides` rewrites keys of the saved config.json (e.g. to the transformers 4
    `rope_scaling` spelling) after saving, to test how the converter reads other spellings.
    """
    torch.manual_seed(seed)
    defaults = dict(vocab_size=101, hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                    num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=512,
                    initializer_range=init_range, rms_norm_eps=1e-5)
    config = transformers.LlamaConfig(**{**defaults, **config_kwargs})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if config_json_overrides:
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        for k, v in config_json_overrides.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        json.dump(cfg, open(cfg_path, "w"))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GQA Llama as a Hugging Face directory (conversion and checkpoint tests)."""
    path = tmp_path_factory.mktemp("src") / "tiny"
    make_hf_llama(path, num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    return path


def hf_logits(model, tokens, lengths=None):
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    mask = None
    if lengths is not None:
        mask = (torch.arange(tokens.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).long()
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=mask).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct, converted once per test run: pytest-xdist workers share
    the run's base folder, and the first to ask converts under a lock while the others wait."""
    import fcntl

    from pigjax.checkpoint import META_FILE
    from pigjax.convert import convert

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base is <run>/popen-gwN
    path = root / "smollm2-converted"
    with open(root / "smollm2-converted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / META_FILE).is_file():
            convert("default", path, progress=False)
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import pigjax

    return pigjax.load(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_torch():
    """transformers' own loading of the same GGUF (dequantized to float32)."""
    from pigjax import assets

    gguf = assets.default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


# The longest files start first (`./run.sh test` hands whole files to two pytest-xdist workers in
# collection order, --no-loadscope-reorder): started last, the 4-device suite (one test, so xdist's
# default order put it last) left the other worker idle for its ~3 minutes.
LONGEST_FIRST = ("sharding/test_multi_device.py", "sharding/test_distributed.py", "test_smollm2.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def restore_engine():
    """Puts the engine's SIMD level and thread count back after a test that changes them."""
    from pigjax.engine import native

    threads = native._engine.get_num_threads()
    yield
    native.set_simd_level(native.hardware_simd_level())
    native._engine.set_num_threads(threads)
