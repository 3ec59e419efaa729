"""pigjax: MagicPIG LSH-sampled attention and Memory Mosaics in JAX/Flax."""

from pigjax.checkpoint import load, save
from pigjax.config import LlamaConfig, RopeConfig
from pigjax.errors import CheckpointError, ConfigError, ConversionError, PigjaxError
from pigjax.model import Model, forward

__all__ = [
    "CheckpointError", "ConfigError", "ConversionError", "LlamaConfig", "Model", "PigjaxError",
    "RopeConfig", "forward", "load", "save",
]
