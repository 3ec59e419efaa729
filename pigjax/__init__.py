"""pigjax: MagicPIG LSH-sampled attention and Memory Mosaics in JAX/Flax."""

from pigjax import mosaics
from pigjax.attention import Dense, Oracle, Quest, TopK
from pigjax.checkpoint import load, save
from pigjax.config import LlamaConfig, RopeConfig
from pigjax.errors import CheckpointError, ConfigError, ConversionError, PigjaxError
from pigjax.generate import Generation, generate
from pigjax.magicpig import MagicPIG
from pigjax.model import Model, forward
from pigjax.mosaics import MosaicsConfig

__all__ = [
    "CheckpointError", "ConfigError", "ConversionError", "Dense", "Generation", "LlamaConfig", "MagicPIG", "Model",
    "MosaicsConfig", "Oracle", "PigjaxError", "Quest", "TopK", "RopeConfig", "forward", "generate", "load", "mosaics", "save",
]
