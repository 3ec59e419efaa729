"""Generate text with a pigjax checkpoint (default: the embedded SmolLM2-135M-Instruct).

  python scripts/generate.py --prompt "The capital of France is"
  python scripts/generate.py --chat --prompt "Give me three tips for sleeping well." --max_new_tokens 128
  python scripts/generate.py --prompt_file prompts.txt --temperature 0.7 --top_p 0.9   # one prompt a line

  python scripts/launch.py --processes 2 --local_devices 2 -- scripts/generate.py --mesh 2x2   # 2 processes

A single prompt streams its text; a batch shows a progress bar. Ends with a throughput table.
"""

import os
import sys

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "checkpoint dir (default: embedded SmolLM2, converted on first use)")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt text (repeatable)")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "file with one prompt per line")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", None, "keep the k most likely tokens")
_TOP_P = flags.DEFINE_float("top_p", None, "keep the smallest set of tokens with this probability mass")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_STOP = flags.DEFINE_multi_string("stop", None, "stop sequence (repeatable)")
_ATTENTION = flags.DEFINE_enum("attention", "magicpig_k10l150",
                                ["dense", "magicpig_k10l150", "magicpig_k10l170", "magicpig_k8l75", "rankedlsh",
                                 "rankedlsh_2pct", "rankedlsh_5pct", "topk", "quest", "oracle"],
                                "attention back-end (pigjax.eval.harness.BACKENDS)")
_FRACTION = flags.DEFINE_float("fraction", 0.02, "fraction of middle keys for topk/quest/oracle")
_DEMO_CONTEXT = flags.DEFINE_integer("demo_context", 4096, "without --prompt: tokens of the needle-in-a-haystack "
                                     "demo prompt (RULER niah_single_2: a number hidden in essays)")
_CHAT = flags.DEFINE_bool("chat", False, "apply the tokenizer's chat template")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_MESH = flags.DEFINE_string("mesh", None, "device mesh DATAxMODEL (e.g. 2x2) over all processes' devices "
                            "(scripts/launch.py runs several); default: one device")


def _prompts() -> list[str]:
    prompts = list(_PROMPT.value or [])
    if _PROMPT_FILE.value:
        with open(_PROMPT_FILE.value) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts


def _demo(model):
    """A long prompt where sampled attention matters: find a number hidden in ~4k tokens of essays."""
    from pigjax.eval import ruler

    sample = ruler.make_sample(model.tokenizer, "niah_single_2", _DEMO_CONTEXT.value, 0)
    question = sample.input[sample.input.rfind("What"):].strip() if "What" in sample.input else sample.input[-200:]
    print(f"[demo] {sample.length}-token prompt (RULER niah_single_2): essays with a hidden number; the question:\n"
          f"{question}\n[demo] expected: {sample.outputs}\n{sample.answer_prefix.strip()}", end="", flush=True)
    return sample.prompt_ids


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
    import pigjax.distributed

    if pigjax.distributed.initialize() and not pigjax.distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # process 0 prints for the run
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import pigjax
    from pigjax import sharding

    prompts = _prompts()
    try:
        mesh = sharding.parse_mesh(_MESH.value)
        checkpoint = _CHECKPOINT.value or pigjax.distributed.main_first(pigjax.default_checkpoint)
        model = pigjax.load(checkpoint,
                            dtype=jnp.bfloat16 if _DTYPE.value == "bfloat16" else None, mesh=mesh)
        from pigjax.eval.harness import make_backend, takes_fraction

        attention = make_backend(_ATTENTION.value, _FRACTION.value if takes_fraction(_ATTENTION.value) else None)
        demo = not prompts
        if demo:
            prompts = [_demo(model)]
        kwargs = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                      top_p=_TOP_P.value, seed=_SEED.value, stop=_STOP.value, attention=attention, chat=_CHAT.value,
                      mesh=mesh)
        if len(prompts) == 1:
            shown = []
            if not demo:
                print(prompts[0], end="", flush=True)

            def stream(row, tokens):  # print the text that the new tokens complete
                before = model.tokenizer.decode(shown, skip_special_tokens=True)
                shown.extend(tokens)
                print(model.tokenizer.decode(shown, skip_special_tokens=True)[len(before):], end="", flush=True)

            gen = pigjax.generate(model, prompts, stream=stream, **kwargs)
            print()
        else:
            bar = tqdm(total=len(prompts) * _MAX_NEW.value, unit="tok", desc="generating")
            gen = pigjax.generate(model, prompts, stream=lambda row, tokens: bar.update(len(tokens)), **kwargs)
            bar.close()
            for prompt, text, reason in zip(prompts, gen.texts, gen.finish_reasons):
                print(f"--- {prompt!r} [{reason}]\n{text}")
    except pigjax.PigjaxError as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 1
    s = gen.stats
    rows = [("prompts", len(prompts)), ("new tokens", sum(map(len, gen.tokens))),
            ("prefill tok/s", f"{s['prefill_tokens_per_second']:.1f}"),
            ("decode tok/s", f"{s['decode_tokens_per_second']:.1f}"),
            ("compile s", f"{s['compile_seconds']:.2f}"), ("attention", s["attention"])]
    if s.get("fraction_read") is not None:
        rows.append(("keys read", f"{100 * s['fraction_read']:.2f}% of the middle (sparse layers)"))
    rows.append(("cache B/tok/lyr", f"model side {s['cache_bytes_per_token_per_layer']:.0f}, "
                                    f"host {s['host_bytes_per_token_per_layer']:.0f}"))
    print("\n".join(f"{k:>14} | {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    app.run(main)
