"""Language-model training for the Memory Mosaics vs Llama comparison (the paper's recipe, docs/algorithm.md §3,
scaled down to a CPU): AdamW (0.9, 0.95) with warm-up and cosine decay, weight decay on matrices
only, global-norm clipping, dropout; resumable from its work directory.

A run's work directory holds:
    run.json          what defines the run (model, sizes, data, schedule); a resume must match it
    state/<step>/     orbax checkpoints of {params, opt_state, step} plus the metrics so far
    metrics.json      train loss per step, validation losses, tokens/s, parameter counts, final eval
    final_eval.json   the final validation loss and the mean loss at each window position
    loss_curve.png    train and validation loss against tokens seen
    model/            the final model as a pigjax checkpoint (pigjax.load), tokenizer included

Everything a step reads is a function of (seed, step): window order (`pigjax.data.Packer`) and the
dropout key fold_in(key(seed + 1), step). So N steps in one go and N/2 + a resume of N/2 compute
the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pigjax import data as data_lib
from pigjax import distributed, sharding
from pigjax.checkpoint import save as save_model
from pigjax.errors import PigjaxError
from pigjax.model import Model, param_count
from pigjax.models import llama, mosaics
from pigjax.models.llama_config import LlamaConfig, RopeConfig
from pigjax.models.mosaics_config import MosaicsConfig

MODELS = ("mosaics", "mosaics2", "llama")  # Memory Mosaics v1, v2 (docs/algorithm.md §3A), Llama
# TrainConfig fields that may differ between a run and its resumption (they do not change what
# the steps compute), with the values they take in the key of the compiled programs.
_NOT_COMPUTATION = {"workdir": "", "minutes": None, "until_step": None, "save_every": 1, "eval_every": 1,
                    "eval_windows": 1, "final_eval_windows": 0, "progress": False, "data_cache": None,
                    "mesh": None}  # jit compiles per mesh by itself; orbax reshards a resumed state
_RESUMABLE_CHANGES = set(_NOT_COMPUTATION)


class TrainError(PigjaxError):
    """A training run that cannot start or resume as asked."""


def _setting(default, help: str):
    """A TrainConfig field with its help text (scripts/train_mosaics.py makes a flag of each)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = _setting(None, "run directory (checkpoints, metrics, final model); resumes if present")
    model: str = _setting("mosaics", f"architecture to train: one of {MODELS}")
    data: str = _setting("hotpotqa", "'hotpotqa' (Wikipedia paragraphs) or a text file of blank-line separated paragraphs")
    data_cache: str | None = _setting(None, "tokenizer/token cache dir (default checkpoints/data/<source>-bpe<vocab>)")
    vocab_size: int = _setting(8192, "BPE vocabulary size")
    val_fraction: float = _setting(0.015, "fraction of the paragraphs held out for validation")
    seq_len: int = _setting(256, "training window (tokens)")
    batch: int = _setting(16, "windows per step")
    hidden: int = _setting(256, "model width d (the Llama gets the same d)")
    layers: int = _setting(4, "blocks")
    heads: int = _setting(4, "heads per block")
    steps: int | None = _setting(None, "schedule length in steps (or give tokens)")
    tokens: int | None = _setting(None, "schedule length in training tokens: steps = ceil(tokens / (batch * seq_len))")
    minutes: float | None = _setting(None, "stop this invocation after this many minutes (checkpointed, resumable)")
    until_step: int | None = _setting(None, "stop this invocation at this step (checkpointed, resumable)")
    lr: float = _setting(3e-3, "peak learning rate")
    end_lr: float = _setting(1e-4, "learning rate at the end of the cosine")
    warmup: int = _setting(100, "linear warm-up steps")
    weight_decay: float = _setting(0.1, "AdamW weight decay (matrices only)")
    clip: float = _setting(1.0, "global-norm gradient clipping")
    dropout: float = _setting(0.05, "dropout (Mosaics only: pigjax's Llama has none)")
    short_window: int = _setting(256, "mosaics2: pairs the short-term memory sees (h)")
    long_gap_min: int = _setting(64, "mosaics2: the long-term memory's smallest gap m (and m at inference)")
    long_gap_max: int = _setting(256, "mosaics2: the largest m drawn in training")
    seed: int = _setting(0, "initialisation, data order and dropout seed")
    save_every: int = _setting(200, "checkpoint every N steps (and at the end)")
    eval_every: int = _setting(100, "validation loss every N steps")
    eval_windows: int = _setting(64, "validation windows of the periodic evaluation")
    final_eval_windows: int = _setting(0, "validation windows of the final evaluation (0: all)")
    progress: bool = _setting(True, "show a progress bar")
    mesh: str | None = _setting(None, "device mesh DATAxMODEL, e.g. 4x1 (data-parallel) or 2x2, over all processes' "
                                      "devices (scripts/launch.py); default: one device")

    def __post_init__(self):
        if self.model not in MODELS:
            raise TrainError(f"model must be one of {MODELS}, got {self.model!r}")
        if (self.steps is None) == (self.tokens is None):
            raise TrainError("give exactly one of steps and tokens (the length of the schedule)")
        for name in ("seq_len", "batch", "hidden", "layers", "heads", "save_every", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_steps < 1:
            raise TrainError(f"the schedule has {self.num_steps} steps; give more steps or tokens")
        if not 0 <= self.warmup < self.num_steps:
            raise TrainError(f"warmup ({self.warmup}) must lie in [0, steps = {self.num_steps})")

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / self.tokens_per_step)


def mosaics_config(cfg: TrainConfig, vocab_size: int, eos_id: int) -> MosaicsConfig:
    """The Mosaics model of the run: v2 for model 'mosaics2', else v1 (also the size the Llama matches)."""
    v2 = dict(version=2, short_window=cfg.short_window, long_gap_min=cfg.long_gap_min,
              long_gap_max=cfg.long_gap_max) if cfg.model == "mosaics2" else {}
    return MosaicsConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, max_position_embeddings=cfg.seq_len, dropout=cfg.dropout,
                         eos_token_ids=(eos_id,), **v2)


def llama_config_like(config: MosaicsConfig) -> LlamaConfig:
    """A Llama with the Mosaics model's vocabulary, width, depth, heads and context, tied
    embeddings, and the MLP width whose parameter count comes closest to the Mosaics model's
    (both are 12·d² per block at P = 3.5·d: attention 4·d² + MLP 3·d·f, so f ≈ 8·d/3)."""
    def make(f):
        return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=f,
                           num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                           num_key_value_heads=config.num_attention_heads, head_dim=config.head_size,
                           rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                           max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
                           eos_token_ids=config.eos_token_ids)

    def count(f):
        return param_count(llama.param_shapes(make(f)))

    target, base = param_count(mosaics.param_shapes(config)), count(1)
    per_unit = count(2) - base
    return make(max(1, round(1 + (target - base) / per_unit)))


@dataclasses.dataclass(frozen=True)
class Built:
    config: MosaicsConfig | LlamaConfig
    init: Callable  # seed -> params
    forward: Callable  # (params, tokens [B, T], dropout rng or None) -> logits [B, T, V] f32


def build(cfg: TrainConfig, vocab_size: int, eos_id: int) -> Built:
    mc = mosaics_config(cfg, vocab_size, eos_id)
    if cfg.model in ("mosaics", "mosaics2"):
        return Built(mc, lambda seed: mosaics.init_params(mc, seed), partial(mosaics_forward, mc))

    lc = llama_config_like(mc)

    @jax.jit
    def init(seed):
        # flax's defaults (kernels N(0, 1/fan_in), norms 1) with the output projections of each
        # block scaled by 1/sqrt(n_layers), as Mosaics' c_proj. The tied embedding is drawn with
        # std 1/d so that, as in Mosaics (std 1/sqrt(d), logits / sqrt(d)), a token's own logit
        # starts near 1 (it is d·std after the norm) and the others near 0.
        params = llama.init_params(lc, seed)
        params = jax.tree_util.tree_map_with_path(
            lambda path, p: p / math.sqrt(lc.num_hidden_layers)
            if any(getattr(k, "key", None) in ("o_proj", "down_proj") for k in path) else p, params)
        embed = jax.random.normal(jax.random.key(seed + 7919), params["embed"]["embedding"].shape)
        return {**params, "embed": {"embedding": embed / lc.hidden_size}}

    def forward(params, tokens, rng):
        return llama.LlamaModel(lc).apply({"params": params}, tokens).astype(jnp.float32)

    return Built(lc, init, forward)


def mosaics_forward(config: MosaicsConfig, params, tokens, rng):
    """Training (rng given) or evaluation (None) logits; v2 draws its long-term gap m from rng
    (docs/algorithm.md §3A.3), evaluation uses m = long_gap_min."""
    long_gap = None
    if config.version == 2 and rng is not None:
        long_gap = mosaics.draw_long_gap(config, jax.random.fold_in(rng, 1))
    dropout_rng = rng if config.dropout > 0 else None
    return mosaics.apply(params, config, tokens, dropout_rng=dropout_rng, long_gap=long_gap)


def decay_mask(params):
    """Weight decay on matrices only (>= 2-D per layer; stacked layers carry one extra axis)."""
    def is_matrix(path, p):
        stacked = getattr(path[0], "key", None) == "layers"
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def optimizer(cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.num_steps, cfg.end_lr)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw), schedule


def _run_record(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_CHANGES}


def saved_config(workdir) -> TrainConfig:
    """The TrainConfig of the run in `workdir`, read from its run.json (settings it does not record,
    those a resume may change, take their defaults)."""
    run_file = Path(workdir) / "run.json"
    if not run_file.is_file():
        raise TrainError(f"{run_file} does not exist: is {workdir} a training run's --workdir?")
    try:
        saved = json.loads(run_file.read_text())
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"workdir"}
        return TrainConfig(**{k: v for k, v in saved.items() if k in fields}, workdir=str(workdir))
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise TrainError(f"{run_file}: not a run record: {type(e).__name__}: {e}") from None


def _check_run(workdir: Path, cfg: TrainConfig, resuming: bool, write: bool = True):
    run_file = workdir / "run.json"
    record = _run_record(cfg)
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        # (a setting the saved run predates had its default there)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        diff = {k: (saved.get(k), v) for k, v in record.items() if saved.get(k, defaults[k]) != v}
        if diff and resuming:
            raise TrainError(f"{workdir} holds a different run; differing settings (saved, now): {diff}. "
                             "Use another --workdir or the saved settings.")
    if write:  # whole or not at all: another process may be reading it
        tmp = run_file.with_name(f".run.json.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, run_file)


class Evaluator:
    """Validation loss over the first n windows of seq_len tokens of the validation split, and per
    position (training's windows; pigjax.eval.long_context uses longer ones)."""

    def __init__(self, losses: Callable, corpus: data_lib.Corpus, seq_len: int, batch: int, mesh=None):
        self.packer = data_lib.Packer(corpus.val, seq_len, corpus.eos_id, shuffle=False)
        self.batch = batch
        self._losses = losses  # (params, windows [B, T + 1]) -> per-token losses [B, T]
        self.mesh = mesh

    @property
    def num_windows(self) -> int:
        return self.packer.windows_per_epoch

    def losses(self, params, n: int | None = None) -> np.ndarray:
        """Per-token losses [n, seq_len] (float64) of the first n windows (None or 0: all)."""
        n = self.num_windows if not n else min(n, self.num_windows)
        out = np.zeros((n, self.packer.seq_len), np.float64)
        for lo in range(0, n, self.batch):
            ids = [min(g, n - 1) for g in range(lo, lo + self.batch)]  # pad the last batch, then drop it
            windows = np.stack([self.packer.window(g) for g in ids])
            with sharding.use(self.mesh):
                losses = sharding.gather(self._losses(params, *sharding.put_batch(self.mesh, windows)))
            out[lo:lo + self.batch] = losses[: min(self.batch, n - lo)]
        return out

    def __call__(self, params, n: int | None = None) -> tuple[float, np.ndarray, int]:
        """(mean loss, mean loss at each position [seq_len], windows) over the first n windows."""
        losses = self.losses(params, n)
        per_position = losses.mean(axis=0)
        return float(per_position.mean()), per_position, len(losses)


@dataclasses.dataclass(frozen=True)
class Programs:
    built: Built
    optimizer: optax.GradientTransformation
    train_step: Callable  # (state, windows) -> (state, {"loss", "grad_norm", "lr"}); state donated
    eval_losses: Callable  # (params, windows) -> per-token losses


@functools.lru_cache(maxsize=4)
def programs(key: TrainConfig, vocab_size: int, eos_id: int) -> Programs:
    """The jitted programs of a run, shared by runs (and resumptions in one process) that compute
    the same steps; `key` is the TrainConfig with the settings that do not matter normalised."""
    built = build(key, vocab_size, eos_id)
    tx, schedule = optimizer(key)
    # rbg: one RngBitGenerator op per draw, cheaper to compile and run on CPU than threefry.
    dropout_key = jax.random.key(key.seed + 1, impl="rbg")

    @partial(jax.jit, donate_argnums=0)
    def train_step(state, windows):
        step = state["step"]

        def loss_fn(params):
            logits = built.forward(params, windows[:, :-1], jax.random.fold_in(dropout_key, step))
            return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state, "step": step + 1}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}

    @jax.jit
    def eval_losses(params, windows):
        logits = built.forward(params, windows[:, :-1], None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])

    return Programs(built, tx, train_step, eval_losses)


def _plot(metrics: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tps = metrics["tokens_per_step"]
    steps, loss = np.array(metrics["train"]["step"]), np.array(metrics["train"]["loss"])
    ax.plot(steps * tps, loss, lw=0.6, alpha=0.4, label="train (per step)")
    if len(loss) >= 20:
        k = max(len(loss) // 50, 5)
        ax.plot(steps[k - 1:] * tps, np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5,
                label=f"train (mean of {k})")
    if metrics["val"]["step"]:
        ax.plot(np.array(metrics["val"]["step"]) * tps, metrics["val"]["loss"], "o-", ms=3, label="validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{metrics['model']} ({metrics['param_count'] / 1e6:.2f}M parameters)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_data(cfg: TrainConfig, log=print) -> data_lib.Corpus:
    """The corpus; process 0 of a multi-process run trains and caches the tokenizer, the others read it."""
    return distributed.main_first(lambda: data_lib.prepare(cfg.data, cfg.data_cache, vocab_size=cfg.vocab_size,
                                                           val_fraction=cfg.val_fraction, log=log))


def train(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume) the run in cfg.workdir; returns its metrics (also written to metrics.json)."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm


    if not cfg.workdir:
        raise TrainError("workdir is required")
    workdir = Path(cfg.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = prepare_data(cfg, log)
    progs = programs(dataclasses.replace(cfg, **_NOT_COMPUTATION), len(corpus.tokenizer), corpus.eos_id)
    built, tx = progs.built, progs.optimizer
    steps = cfg.num_steps
    mesh = sharding.parse_mesh(cfg.mesh)
    if mesh is not None:
        sharding.check_batch(mesh, cfg.batch, "--batch: a batch")
    main = jax.process_index() == 0  # writes the shared files (the others join orbax's saves)

    manager = ocp.CheckpointManager(
        workdir / "state",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
    )
    start = manager.latest_step() or 0
    # process 0 checks and writes run.json before the others read it
    distributed.main_first(lambda: _check_run(workdir, cfg, resuming=start > 0, write=main))
    params = built.init(cfg.seed)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if mesh is not None:  # optimizer moments take their parameter's layout (same leaf names)
        state = sharding.shard_params(built.config, state, mesh)
    n_params = param_count(params)
    n_embed = int(np.prod(params["embed"]["embedding"].shape))
    metrics = {
        "model": cfg.model, "config": built.config.to_dict(), "train_config": dataclasses.asdict(cfg),
        "param_count": n_params, "param_count_non_embedding": n_params - n_embed,
        "tokens_per_step": cfg.tokens_per_step, "steps": steps, "seq_len": cfg.seq_len,
        "train": {"step": [], "loss": [], "grad_norm": [], "lr": []}, "val": {"step": [], "loss": []},
        "train_seconds": 0.0, "timed_tokens": 0, "tokens_per_second": None, "final": None,
    }
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   metrics=ocp.args.JsonRestore()))
        state, metrics = restored["state"], restored["metrics"]
        log(f"resumed {workdir} at step {start} of {steps}")
    log(f"{cfg.model}: {n_params:,} parameters ({n_params - n_embed:,} without the embedding); "
        f"{steps} steps of {cfg.tokens_per_step} tokens; {len(corpus.train.tokens):,} training tokens")

    packer = data_lib.Packer(corpus.train, cfg.seq_len, corpus.eos_id, seed=cfg.seed)
    evaluate = Evaluator(progs.eval_losses, corpus, cfg.seq_len, cfg.batch, mesh)
    train_step = progs.train_step

    def save(step):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   metrics=ocp.args.JsonSave(metrics)), force=True)
        manager.wait_until_finished()

    def validate(step):
        loss, _, _ = evaluate(state["params"], cfg.eval_windows)
        metrics["val"]["step"].append(step)
        metrics["val"]["loss"].append(loss)
        return loss

    began = time.perf_counter()
    stop = min(steps, cfg.until_step) if cfg.until_step else steps
    bar = tqdm(total=steps, initial=start, unit="step", disable=not (cfg.progress and main), dynamic_ncols=True,
               desc=cfg.model)
    step, first = start, True
    while step < stop:
        if cfg.minutes is not None and time.perf_counter() - began > 60 * cfg.minutes:
            log(f"time budget of {cfg.minutes} min reached at step {step}")
            break
        t0 = time.perf_counter()
        with sharding.use(mesh):
            state, out = train_step(state, *sharding.put_batch(mesh, packer.batch(step, cfg.batch)))
        loss = float(out["loss"])
        if not first:  # the first step of an invocation includes compilation
            metrics["train_seconds"] += time.perf_counter() - t0
            metrics["timed_tokens"] += cfg.tokens_per_step
        first = False
        if not math.isfinite(loss):
            raise TrainError(f"loss is {loss} at step {step}; lower --lr or raise --warmup")
        for k, v in (("step", step), ("loss", loss), ("grad_norm", float(out["grad_norm"])), ("lr", float(out["lr"]))):
            metrics["train"][k].append(v)
        step += 1
        if metrics["train_seconds"] > 0:
            metrics["tokens_per_second"] = metrics["timed_tokens"] / metrics["train_seconds"]
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{metrics['tokens_per_second'] or 0:.0f}"}
        if step % cfg.eval_every == 0 or step == steps:
            postfix["val"] = f"{validate(step):.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if step % cfg.save_every == 0:
            save(step)
    bar.close()
    if step > start and manager.latest_step() != step:
        save(step)

    loss, per_position, n = evaluate(state["params"], cfg.final_eval_windows)
    metrics["final"] = {"step": step, "finished": step == steps, "tokens_seen": step * cfg.tokens_per_step,
                        "val_loss": loss, "val_windows": n, "val_tokens": n * cfg.seq_len,
                        "per_position_loss": per_position.tolist()}
    log(f"step {step}/{steps}: validation loss {loss:.4f} over {n} windows; "
        f"{metrics['tokens_per_second'] or 0:.0f} training tokens/s")
    model = Model(built.config, jax.tree.map(sharding.gather, state["params"]), corpus.tokenizer)
    if main:
        (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (workdir / "final_eval.json").write_text(json.dumps({"model": cfg.model, **metrics["final"]}, indent=1))
        _plot(metrics, workdir / "loss_curve.png")
        save_model(model, workdir / "model", overwrite=True, source=f"pigjax.train {cfg.model} step {step}")
    return metrics
