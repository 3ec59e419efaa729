"""Exceptions that name the file (or object) and the problem, so bad input never fails obscurely."""


class PigjaxError(ValueError):
    """Base class: every pigjax input error is also a ValueError."""


class ConfigError(PigjaxError):
    """A model configuration pigjax cannot represent (unsupported architecture, bad sizes)."""


class ConversionError(PigjaxError):
    """A source checkpoint (HF directory, .safetensors, .bin, .gguf) is missing, corrupt or mismatched."""


class CheckpointError(PigjaxError):
    """A pigjax (orbax) checkpoint is missing, incomplete or corrupt."""
