"""Train Memory Mosaics (or a Llama of the same size) on Wikipedia paragraphs, resumably.

The Mosaics vs Llama comparison (d 256, 4 layers, 4 heads, 5.2M parameters each, 750 steps of
16 x 256 tokens; each about 20-30 minutes on 2 cores), then the report:

  python scripts/train_mosaics.py --model mosaics --workdir checkpoints/runs/mosaics --tokens 3072000 --lr 1e-2 --dropout 0
  python scripts/train_mosaics.py --model llama   --workdir checkpoints/runs/llama   --tokens 3072000 --lr 3e-3
  python scripts/compare_mosaics_llama.py --mosaics checkpoints/runs/mosaics --llama checkpoints/runs/llama

Several processes (jax.distributed) train one model data-parallel on a mesh over all their devices,
with orbax checkpoints written by all of them:

  python scripts/launch.py --processes 2 --local_devices 2 -- scripts/train_mosaics.py --mesh 4x1 ...

Running the same command again resumes from the last checkpoint (every --save_every steps, and
when --minutes or --until_step stops a run early). The learning rates are the better of two
probed per model (Mosaics divides its logits by sqrt(d) and wants a larger step); dropout is off
because pigjax's Llama has none and neither model sees a whole epoch. `--sizes_only` prints both
parameter counts.

The first run trains the BPE tokenizer and tokenizes the data once (checkpoints/data/). Each run
writes metrics.json, final_eval.json (per-position loss), loss_curve.png and model/ (a pigjax
checkpoint) into --workdir; see pigjax/train.py.
"""

import dataclasses
import sys

from absl import app, flags, logging

from pigjax.train import TrainConfig

_DEFINE = {"str": flags.DEFINE_string, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool}
# One flag per TrainConfig field, with its default and help text (the config is the one source).
_SETTINGS = {f.name: _DEFINE[f.type.split(" ")[0]](f.name, f.default, f.metadata["help"])
             for f in dataclasses.fields(TrainConfig)}
_SIZES_ONLY = flags.DEFINE_bool("sizes_only", False, "print the Mosaics and matching Llama sizes, then exit")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import pigjax.distributed
    from pigjax import train as training

    pigjax.distributed.initialize()  # a process of scripts/launch.py (else nothing)

    try:
        if _SIZES_ONLY.value:
            from pigjax.model import param_count
            from pigjax.models import mosaics
            from pigjax.models import llama

            value = {name: flag.value for name, flag in _SETTINGS.items()}
            cfg = training.TrainConfig(**{**value, "workdir": "-", "steps": 1, "tokens": None, "warmup": 0})
            mc = training.mosaics_config(cfg, cfg.vocab_size, 0)
            lc = training.llama_config_like(mc)
            n_m = param_count(mosaics.param_shapes(mc))
            n_l = param_count(llama.param_shapes(lc))
            emb = mc.vocab_size * mc.hidden_size
            print(f"mosaics: {n_m:,} parameters ({n_m - emb:,} without the embedding): d {mc.hidden_size}, "
                  f"{mc.num_hidden_layers} layers, {mc.num_attention_heads} heads, P {mc.pmem_size}")
            print(f"llama:   {n_l:,} parameters ({n_l - emb:,} without the embedding): d {lc.hidden_size}, "
                  f"{lc.num_hidden_layers} layers, {lc.num_attention_heads} heads, MLP {lc.intermediate_size}")
            return 0
        cfg = training.TrainConfig(**{name: flag.value for name, flag in _SETTINGS.items()})
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
