"""What the decode benchmarks share (no flags, so that each script keeps its own): a model of
SmolLM2-135M's shapes with random weights, and the jitted greedy decode loop they time."""

from functools import partial

# SmolLM2-135M's shapes (its checkpoint's pigjax.json), for --weights random.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    tie_word_embeddings=True)


def random_model():
    import jax
    import jax.numpy as jnp

    import pigjax
    from pigjax.models.llama_config import LlamaConfig, RopeConfig
    from pigjax.models import llama

    config = LlamaConfig(**SMOLLM2_135M, rope=RopeConfig(theta=100000.0))
    params = llama.LlamaModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return pigjax.Model(config, params)


def decode_loop(config, backend):
    import jax
    import jax.numpy as jnp

    from pigjax.models import llama

    @partial(jax.jit, donate_argnums=1)
    def run(params, cache, tok, steps):  # steps is traced: one program for warm-up and timing
        def body(_, carry):
            cache, tok = carry
            logits, cache = llama.step(params, config, tok[:, None], cache, None, backend)
            return cache, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

        return jax.lax.fori_loop(0, steps, body, (cache, tok))

    return run
