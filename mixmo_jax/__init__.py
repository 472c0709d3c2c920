"""mixmo_jax: MixMo multi-input multi-output networks in JAX/Flax."""

__version__ = "0.1.0"
