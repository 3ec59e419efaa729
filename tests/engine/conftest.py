"""Fixtures shared by the engine's tests."""

import pytest

from pigjax.engine import native


@pytest.fixture
def restore_engine():
    """Puts the engine's SIMD level and thread count back after a test that changes them."""
    threads = native._engine.get_num_threads()
    yield
    native.set_simd_level(native.hardware_simd_level())
    native._engine.set_num_threads(threads)
