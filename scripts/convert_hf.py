"""Convert a Hugging Face directory or a GGUF file into a pigjax checkpoint.

  python scripts/convert_hf.py --src default                      # embedded SmolLM2-135M-Instruct
  python scripts/convert_hf.py --src /path/to/hf_dir --out checkpoints/my-llama
  python scripts/convert_hf.py --src model.gguf --dtype bfloat16

The destination is checked before converting; --overwrite replaces only a pigjax checkpoint
(pigjax.json, params/, tokenizer/), atomically (docs/design.md, "Conversion and checkpoints").
"""

import sys

from absl import app, flags, logging

import pigjax
from pigjax.convert import convert

FLAGS = flags.DEFINE_string("src", None, "'default', a HF model directory, or a .gguf file", required=True)
_OUT = flags.DEFINE_string("out", None, "output directory (default: checkpoints/<name>/)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype to store")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "replace an existing pigjax checkpoint (never another directory, a file or the source)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    import ml_dtypes
    import numpy as np

    dtype = np.float32 if _DTYPE.value == "float32" else ml_dtypes.bfloat16
    try:
        path = convert(FLAGS.value, _OUT.value, dtype=dtype, overwrite=_OVERWRITE.value)
    except pigjax.PigjaxError as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the source became unreadable mid-way: say so without a traceback
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
