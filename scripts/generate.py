"""Greedy continuation of a prompt with a pigjax checkpoint (default: the embedded SmolLM2).

  python scripts/generate.py --prompt "The capital of France is" --max_new_tokens 20
"""

import sys
import time

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint dir (default: embedded SmolLM2, converted on first use)")
_PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pigjax
    from pigjax import assets
    from pigjax.models import llama

    try:
        model = pigjax.load(_CHECKPOINT.value or assets.default_checkpoint())
    except pigjax.PigjaxError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    cfg, tok = model.config, model.tokenizer
    ids = tok(_PROMPT.value)["input_ids"]
    step = jax.jit(llama.step, static_argnums=1, donate_argnums=3)
    cache = llama.init_cache(cfg, 1, len(ids) + _MAX_NEW.value, model.dtype)
    start = time.perf_counter()
    logits, cache = step(model.params, cfg, jnp.asarray([ids]), cache)
    new = []
    print(_PROMPT.value, end="", flush=True)
    for _ in range(_MAX_NEW.value):
        token = int(np.asarray(logits[0, -1]).argmax())
        if token in cfg.eos_token_ids:
            break
        new.append(token)
        print(tok.decode(new)[len(tok.decode(new[:-1])):], end="", flush=True)
        logits, cache = step(model.params, cfg, jnp.asarray([[token]]), cache)
    seconds = time.perf_counter() - start
    print(f"\n[{len(new)} tokens in {seconds:.2f}s including compilation]")
    return 0


if __name__ == "__main__":
    app.run(main)
