"""pigjax: MagicPIG LSH-sampled attention and Memory Mosaics in JAX/Flax (see docs/architecture.md)."""

from pigjax.attention import Backend, Dense, MagicPIG, Oracle, Quest, RankedLSH, TopK
from pigjax.checkpoint import load, save
from pigjax.convert import default_checkpoint
from pigjax.errors import CheckpointError, ConfigError, ConversionError, PigjaxError
from pigjax.generate import Generation, generate
from pigjax.inference import forward
from pigjax.model import Model
from pigjax.models import mosaics
from pigjax.models.llama_config import LlamaConfig, RopeConfig
from pigjax.models.mosaics_config import MosaicsConfig

__all__ = [
    "Backend", "CheckpointError", "ConfigError", "ConversionError", "Dense", "Generation", "LlamaConfig", "MagicPIG",
    "Model", "MosaicsConfig", "Oracle", "PigjaxError", "Quest", "RankedLSH", "RopeConfig", "TopK", "default_checkpoint", "forward",
    "generate", "load", "mosaics", "save",
]
