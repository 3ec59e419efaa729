"""Prefill and decode throughput of pigjax.generate vs transformers, same weights, same run.

  python scripts/bench_generate.py                       # SmolLM2-135M, batch 1 and 8, prompts 512 and 2048
  python scripts/bench_generate.py --batches 1 --prompt_lens 512 --new_tokens 32
  python scripts/bench_generate.py --dtype bf16          # both sides with bf16 weights

Both sides decode greedily with EOS disabled so every row produces exactly --new_tokens tokens.
pigjax figures exclude compilation (a warm-up call of the same bucket runs first). Prints a table
with pigjax/transformers ratios and writes JSON.
"""

import json
import os
import time

from absl import app, flags, logging

from pigjax import cli

_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes")
_PROMPT_LENS = flags.DEFINE_list("prompt_lens", ["512", "2048"], "prompt lengths in tokens")
_NEW = flags.DEFINE_integer("new_tokens", 64, "tokens generated per row")
_DTYPE = flags.DEFINE_enum("dtype", "f32", ["f32", "bf16"], "parameter dtype of both sides")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "torch threads (JAX uses all cores)")
_OUT = flags.DEFINE_string("out", "docs/results/bench_generate.json", "JSON output")
_DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16"}
cli.ints(_BATCHES)
cli.ints(_PROMPT_LENS)


def machine() -> dict:
    """pigjax's machine description (CPU, cores, SIMD level...) plus torch's version and threads."""
    import torch

    from pigjax.machine import describe

    return {**describe(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def bench_pigjax(model, prompts, new_tokens):
    import pigjax

    pigjax.generate(model, prompts, max_new_tokens=new_tokens)  # compile this bucket
    s = pigjax.generate(model, prompts, max_new_tokens=new_tokens).stats
    assert s["compile_seconds"] == 0.0 and s["decode_tokens"] == len(prompts) * (new_tokens - 1)
    return s["prefill_tokens_per_second"], s["decode_tokens_per_second"]


def bench_transformers(hf, prompts, new_tokens):
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        hf(ids[:, :8])  # warm-up
        start = time.perf_counter()
        out = hf(ids, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - start
    return ids.numel() / prefill, len(prompts) * (new_tokens - 1) / decode


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    import pigjax
    from pigjax import assets

    torch.set_num_threads(_THREADS.value)
    model = pigjax.load(pigjax.default_checkpoint(), tokenizer=False)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))
    if _DTYPE.value == "bf16":
        model = model.astype(jnp.bfloat16)
    gguf = assets.default_gguf_path()
    rng = np.random.default_rng(0)
    cells = [(b, n, rng.integers(100, model.config.vocab_size, (b, n)).tolist())
             for b in map(int, _BATCHES.value) for n in map(int, _PROMPT_LENS.value)]
    # All pigjax cells first, then all transformers cells: on a 2-core machine torch's OpenMP
    # workers keep spinning after each call and took half the cores from the next pigjax call when
    # the two alternated (pigjax's prefill at 512 tokens, batch 1: 114 tok/s interleaved, 261-274
    # alone, on the Xeon).
    ours = [bench_pigjax(model, prompts, _NEW.value) for _, _, prompts in cells]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=getattr(torch, _DTYPE_NAMES[_DTYPE.value])).eval()
    rows = []
    for (b, n, prompts), (pj_prefill, pj_decode) in zip(cells, ours):
        hf_prefill, hf_decode = bench_transformers(hf, prompts, _NEW.value)
        rows.append(dict(batch=b, prompt=n, new_tokens=_NEW.value,
                         pigjax_prefill_tps=pj_prefill, hf_prefill_tps=hf_prefill,
                         prefill_ratio=pj_prefill / hf_prefill,
                         pigjax_decode_tps=pj_decode, hf_decode_tps=hf_decode,
                         decode_ratio=pj_decode / hf_decode))
        r = rows[-1]
        print(f"batch {b:2d} prompt {n:5d}: prefill {pj_prefill:7.1f} vs {hf_prefill:7.1f} tok/s "
              f"({r['prefill_ratio']:.2f}x)  decode {pj_decode:6.1f} vs {hf_decode:6.1f} tok/s "
              f"({r['decode_ratio']:.2f}x)", flush=True)

    print("\n| batch | prompt | prefill pigjax | prefill HF | ratio | decode pigjax | decode HF | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompt']} | {r['pigjax_prefill_tps']:.1f} | {r['hf_prefill_tps']:.1f} | "
              f"{r['prefill_ratio']:.2f}x | {r['pigjax_decode_tps']:.1f} | {r['hf_decode_tps']:.1f} | "
              f"{r['decode_ratio']:.2f}x |")
    result = {"benchmark": "generate", "model": f"SmolLM2-135M-Instruct (Q4_1 dequantized, {_DTYPE.value})",
              "machine": machine(), "rows": rows}
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
