"""pigjax.generate on a Memory Mosaics model: the recurrent form decodes what the parallel form predicts."""

import numpy as np
import pytest

import pigjax
from pigjax import mosaics


@pytest.fixture(scope="module")
def model():
    config = mosaics.MosaicsConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=256)
    return mosaics.init(config, seed=1)


def test_greedy_tokens_are_forward_argmax(model):
    prompts = [[5, 17, 33], [9] * 11 + [40, 41, 42], [77, 3, 12, 90, 61, 4, 8]]
    gen = pigjax.generate(model, prompts, max_new_tokens=20)
    assert gen.stats["attention"] == "exact-memory"
    for prompt, new in zip(prompts, gen.tokens):
        assert len(new) == 20
        logits = np.asarray(pigjax.forward(model, np.array([prompt + new])))
        assert logits[0, len(prompt) - 1: -1].argmax(-1).tolist() == new
