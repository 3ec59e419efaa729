"""The C++ engine from JAX: `native` loads `pigjax._engine` and registers its XLA FFI targets;
`store` holds the `Store` handle and the jittable prefill / append / query calls."""

from pigjax.engine.store import Store, estimate_bytes, memory_limit

__all__ = ["Store", "estimate_bytes", "memory_limit"]
