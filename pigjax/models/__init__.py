"""Model definitions (pure Flax modules and step functions)."""
