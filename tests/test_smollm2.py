"""The embedded SmolLM2-135M-Instruct: pigjax vs transformers loading the same GGUF."""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits

import pigjax

torch = pytest.importorskip("torch")

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)


@pytest.fixture(scope="module")
def text_tokens(smollm2):
    return np.array([smollm2.tokenizer(TEXT)["input_ids"]])


def test_config_from_gguf(smollm2):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.rope.theta, c.vocab_size, c.max_position_embeddings) == (100000.0, 49152, 8192)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,)


def test_logits_match_transformers(smollm2, smollm2_torch, text_tokens):
    ours = np.asarray(pigjax.forward(smollm2, text_tokens))
    ref = hf_logits(smollm2_torch, text_tokens)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 f32, {text_tokens.shape[1]} tokens: max |logit| {np.abs(ref).max():.2f}, "
          f"max abs err {np.abs(ours - ref).max():.2e}, relative {rel:.2e}")
    assert rel < 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_bfloat16_tolerance(smollm2, text_tokens):
    """bf16 weights and activations (fp32 norms, softmax, RoPE): logits within 3% of the logit
    range and the same greedy token at >= 90% of positions."""
    ref = np.asarray(pigjax.forward(smollm2, text_tokens))
    ours = np.asarray(pigjax.forward(smollm2.astype(jnp.bfloat16), text_tokens))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"SmolLM2 bf16: max abs err / max |logit| {rel:.2e}, argmax agreement {agree:.3f}")
    assert rel < 0.03 and agree >= 0.9


def test_capital_of_france(smollm2):
    ids = smollm2.tokenizer("The capital of France is")["input_ids"]
    logits = pigjax.forward(smollm2, np.array([ids]))
    assert smollm2.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"


def test_tokenizer_round_trip(smollm2):
    tok = smollm2.tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.eos_token_id == 2
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT


def test_generate_equals_transformers(smollm2, smollm2_torch):
    """Greedy continuations of a ragged batch of two chat prompts equal transformers' generate of
    each alone (one batch: each new prompt shape costs a compile of the 30-layer model)."""
    tok = smollm2.tokenizer
    prompts = ["Name the three primary colors.", "Give me a short tip for staying focused."]
    chat = pigjax.generate(smollm2, prompts, max_new_tokens=24, chat=True)

    def hf_greedy(prompt):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        out = smollm2_torch.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    assert chat.tokens == [hf_greedy(p) for p in prompts]
    print("\n", "\n ".join(chat.texts))


def test_text_prompt_errors(smollm2):
    with pytest.raises(pigjax.PigjaxError, match="prompt 0 is empty"):
        pigjax.generate(smollm2, [""], max_new_tokens=4)
    no_template = copy.copy(smollm2.tokenizer)
    no_template.chat_template = None
    with pytest.raises(pigjax.PigjaxError, match="chat template"):
        pigjax.generate(dataclasses.replace(smollm2, tokenizer=no_template), ["hi"], max_new_tokens=4, chat=True)
