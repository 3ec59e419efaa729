"""Memory Mosaics v1 (Zhang et al., ICLR 2025; SPEC §3): networks of associative memories.

    import pigjax
    from pigjax import mosaics

    model = mosaics.init(mosaics.MosaicsConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                                               num_attention_heads=4))
    logits = pigjax.forward(model, tokens)                        # parallel form
    state = mosaics.init_state(model.config, batch=1, capacity=1024)
    logits, state = mosaics.step(model.params, model.config, tokens, state)   # recurrent form
"""

from pigjax.mosaics.config import MosaicsConfig
from pigjax.mosaics.model import (
    LayerState, MosaicsModel, State, apply, init, init_params, init_state, param_count, param_shapes, step,
)

__all__ = [
    "LayerState", "MosaicsConfig", "MosaicsModel", "State", "apply", "init", "init_params", "init_state",
    "param_count", "param_shapes", "step",
]
