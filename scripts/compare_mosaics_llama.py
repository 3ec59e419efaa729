"""Compare a Memory Mosaics run with a Llama run (work directories of scripts/train_mosaics.py).

  python scripts/compare_mosaics_llama.py --mosaics checkpoints/runs/mosaics --llama checkpoints/runs/llama

writes docs/results/mosaics_vs_llama.{json,md,png}: validation losses and their ratio, loss
curves, and per-position validation loss (the paper's Fig. 8).
"""

import sys

from absl import app, flags

_MOSAICS = flags.DEFINE_string("mosaics", "checkpoints/runs/mosaics", "Memory Mosaics run directory")
_LLAMA = flags.DEFINE_string("llama", "checkpoints/runs/llama", "Llama run directory")
_OUT = flags.DEFINE_string("out", "docs/results/mosaics_vs_llama", "output path without extension")


def main(argv):
    del argv
    from pigjax.errors import PigjaxError
    from pigjax.eval.lm_compare import compare

    try:
        summary = compare({"mosaics": _MOSAICS.value, "llama": _LLAMA.value}, _OUT.value)
    except PigjaxError as e:
        print(f"compare_mosaics_llama: error: {e}", file=sys.stderr)
        return 1
    print(open(_OUT.value + ".md").read())
    print(f"wrote {_OUT.value}.json, .md, .png ({len(summary)} runs)")
    return 0


if __name__ == "__main__":
    app.run(main)
