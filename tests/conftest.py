"""Test-wide settings: float64 on (references and TRL parity run in float64), CPU only."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from hypothesis import HealthCheck, settings  # noqa: E402

# jit compile time dominates on CPU: few examples, no deadline (compiles are slow, not the code).
settings.register_profile(
    "trlax", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("trlax")
