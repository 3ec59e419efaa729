"""Run by tests/sharding/test_distributed.py under scripts/launch.py: greedy generate on a mesh
spanning the processes; process 0 writes the tokens as JSON to argv[1]."""

import json
import sys

import pigjax.distributed

pigjax.distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import pigjax  # noqa: E402
from pigjax import sharding  # noqa: E402
from pigjax.models import llama  # noqa: E402


def main(out: str, mesh_text: str):
    config = pigjax.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    model = pigjax.Model(config, jax.device_get(llama.init_params(config, 0)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (300, 150, 220)]
    mesh = sharding.parse_mesh(mesh_text)
    result = {"processes": jax.process_count(), "devices": jax.device_count()}
    for name, attention in (("dense", pigjax.Dense()), ("magicpig", pigjax.MagicPIG(K=4, L=20, local=16))):
        gen = pigjax.generate(model, prompts, max_new_tokens=12, attention=attention, mesh=mesh)
        result[name] = gen.tokens
        result[name + "_stats"] = {k: v for k, v in gen.stats.items() if isinstance(v, (int, float, str))}
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "2x2")
