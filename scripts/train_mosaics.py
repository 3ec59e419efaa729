"""Train Memory Mosaics (or a Llama of the same size) on Wikipedia paragraphs, resumably.

The Mosaics vs Llama comparison (d 256, 4 layers, 4 heads, 5.2M parameters each, 750 steps of
16 x 256 tokens; each about 20-30 minutes on 2 cores), then the report:

  python scripts/train_mosaics.py --model mosaics --workdir checkpoints/runs/mosaics --tokens 3072000 --lr 1e-2 --dropout 0
  python scripts/train_mosaics.py --model llama   --workdir checkpoints/runs/llama   --tokens 3072000 --lr 3e-3
  python scripts/compare_mosaics_llama.py --mosaics checkpoints/runs/mosaics --llama checkpoints/runs/llama

Running the same command again resumes from the last checkpoint (every --save_every steps, and
when --minutes or --until_step stops a run early). The learning rates are the better of two
probed per model (Mosaics divides its logits by sqrt(d) and wants a larger step); dropout is off
because pigjax's Llama has none and neither model sees a whole epoch. `--sizes_only` prints both
parameter counts.

The first run trains the BPE tokenizer and tokenizes the data once (checkpoints/data/). Each run
writes metrics.json, final_eval.json (per-position loss), loss_curve.png and model/ (a pigjax
checkpoint) into --workdir; see pigjax/mosaics/train.py.
"""

import sys

from absl import app, flags, logging

_MODEL = flags.DEFINE_enum("model", "mosaics", ["mosaics", "llama"], "architecture to train")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, final model); resumes if present")
_DATA = flags.DEFINE_string("data", "hotpotqa", "'hotpotqa' (Wikipedia paragraphs) or a text file of paragraphs")
_DATA_CACHE = flags.DEFINE_string("data_cache", None, "tokenizer/token cache dir (default checkpoints/data/...)")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "BPE vocabulary size")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "training window (tokens)")
_BATCH = flags.DEFINE_integer("batch", 16, "windows per step")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "model width d (the Llama gets the same d)")
_LAYERS = flags.DEFINE_integer("layers", 4, "blocks")
_HEADS = flags.DEFINE_integer("heads", 4, "heads per block")
_STEPS = flags.DEFINE_integer("steps", None, "schedule length in steps (or give --tokens)")
_TOKENS = flags.DEFINE_integer("tokens", None, "schedule length in training tokens (or give --steps)")
_MINUTES = flags.DEFINE_float("minutes", None, "stop this invocation after this many minutes (resumable)")
_UNTIL = flags.DEFINE_integer("until_step", None, "stop this invocation at this step (resumable)")
_LR = flags.DEFINE_float("lr", 3e-3, "peak learning rate")
_END_LR = flags.DEFINE_float("end_lr", 1e-4, "learning rate at the end of the cosine")
_WARMUP = flags.DEFINE_integer("warmup", 100, "linear warm-up steps")
_WD = flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only)")
_CLIP = flags.DEFINE_float("clip", 1.0, "global-norm gradient clipping")
_DROPOUT = flags.DEFINE_float("dropout", 0.05, "dropout (Mosaics; pigjax's Llama has none)")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation, data order and dropout seed")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 200, "checkpoint every N steps (and at the end)")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "validation loss every N steps")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 64, "validation windows of the periodic evaluation")
_FINAL_WINDOWS = flags.DEFINE_integer("final_eval_windows", 0, "validation windows of the final evaluation (0: all)")
_SIZES_ONLY = flags.DEFINE_bool("sizes_only", False, "print the Mosaics and matching Llama sizes, then exit")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from pigjax.mosaics import train as training

    try:
        if _SIZES_ONLY.value:
            from pigjax.mosaics import model as mosaics
            from pigjax.models import llama

            cfg = training.TrainConfig(workdir="-", hidden=_HIDDEN.value, layers=_LAYERS.value, heads=_HEADS.value,
                                       seq_len=_SEQ_LEN.value, steps=1, warmup=0)
            mc = training.mosaics_config(cfg, _VOCAB.value, 0)
            lc = training.llama_config_like(mc)
            n_m = training.param_count(mosaics.param_shapes(mc))
            n_l = training.param_count(llama.param_shapes(lc))
            emb = mc.vocab_size * mc.hidden_size
            print(f"mosaics: {n_m:,} parameters ({n_m - emb:,} without the embedding): d {mc.hidden_size}, "
                  f"{mc.num_hidden_layers} layers, {mc.num_attention_heads} heads, P {mc.pmem_size}")
            print(f"llama:   {n_l:,} parameters ({n_l - emb:,} without the embedding): d {lc.hidden_size}, "
                  f"{lc.num_hidden_layers} layers, {lc.num_attention_heads} heads, MLP {lc.intermediate_size}")
            return 0
        if not _WORKDIR.value:
            raise training.TrainError("--workdir is required")
        cfg = training.TrainConfig(
            workdir=_WORKDIR.value, model=_MODEL.value, data=_DATA.value, data_cache=_DATA_CACHE.value,
            vocab_size=_VOCAB.value, seq_len=_SEQ_LEN.value, batch=_BATCH.value, hidden=_HIDDEN.value,
            layers=_LAYERS.value, heads=_HEADS.value, steps=_STEPS.value, tokens=_TOKENS.value,
            minutes=_MINUTES.value, until_step=_UNTIL.value, lr=_LR.value, end_lr=_END_LR.value,
            warmup=_WARMUP.value, weight_decay=_WD.value, clip=_CLIP.value, dropout=_DROPOUT.value,
            seed=_SEED.value, save_every=_SAVE_EVERY.value, eval_every=_EVAL_EVERY.value,
            eval_windows=_EVAL_WINDOWS.value, final_eval_windows=_FINAL_WINDOWS.value, progress=_PROGRESS.value,
        )
        metrics = training.train(cfg)
    except Exception as e:
        from pigjax.errors import PigjaxError

        if not isinstance(e, PigjaxError):
            raise
        print(f"train_mosaics: error: {e}", file=sys.stderr)
        return 1
    final = metrics["final"]
    print(f"wrote {cfg.workdir}: validation loss {final['val_loss']:.4f} at step {final['step']}/{metrics['steps']}, "
          f"{metrics['tokens_per_second'] or 0:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    app.run(main)
