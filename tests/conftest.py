"""Test configuration: float64 references, no silent rank promotion, warnings as errors."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
