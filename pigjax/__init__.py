"""pigjax: MagicPIG LSH-sampled attention and Memory Mosaics in JAX/Flax."""

from pigjax.attention import Dense
from pigjax.checkpoint import load, save
from pigjax.config import LlamaConfig, RopeConfig
from pigjax.errors import CheckpointError, ConfigError, ConversionError, PigjaxError
from pigjax.generate import Generation, generate
from pigjax.model import Model, forward

__all__ = [
    "CheckpointError", "ConfigError", "ConversionError", "Dense", "Generation", "LlamaConfig", "Model",
    "PigjaxError", "RopeConfig", "forward", "generate", "load", "save",
]
