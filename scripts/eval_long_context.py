"""Validation loss past the training window (pigjax.eval.long_context): per-position loss of
finished training runs (scripts/train_mosaics.py work directories) on held-out windows `--factor`
times their training window.

  python scripts/eval_long_context.py --runs llama=checkpoints/runs/llama,mosaics=checkpoints/runs/mosaics,mosaics2=checkpoints/runs/mosaics2

writes docs/results/long_context.{json,md,png}: the per-position curves, the mean loss over
[kT, (k+1)T) for each k, "at 1x" (mean over [T/2, T)), "at <factor>x" (mean over the last T
positions) and their ratio; the runs' training commands and the machine.
"""

import shlex
import sys

from absl import app, flags

_RUNS = flags.DEFINE_list("runs", "llama=checkpoints/runs/llama,mosaics=checkpoints/runs/mosaics,"
                                  "mosaics2=checkpoints/runs/mosaics2", "label=run directory, ...")
_FACTOR = flags.DEFINE_integer("factor", 4, "window length as a multiple of the training window")
_WINDOWS = flags.DEFINE_integer("windows", 0, "validation windows per run (0: all)")
_BATCH = flags.DEFINE_integer("batch", 8, "windows per forward")
_OUT = flags.DEFINE_string("out", "docs/results/long_context", "output path without extension")


def main(argv):
    del argv
    from pigjax.errors import PigjaxError
    from pigjax.eval.long_context import report

    runs = {}
    for item in _RUNS.value:
        label, sep, workdir = item.partition("=")
        if not sep or not label or not workdir:
            print(f"eval_long_context: error: --runs takes label=directory items, got {item!r}", file=sys.stderr)
            return 1
        runs[label] = workdir
    command = "python scripts/eval_long_context.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        out = report(runs, _OUT.value, _FACTOR.value, windows=_WINDOWS.value or None, batch=_BATCH.value,
                     command=command.rstrip())
    except PigjaxError as e:
        print(f"eval_long_context: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {_OUT.value}.png ({len(out['runs'])} runs)")
    return 0


if __name__ == "__main__":
    app.run(main)
