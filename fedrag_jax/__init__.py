"""fedrag-jax."""
