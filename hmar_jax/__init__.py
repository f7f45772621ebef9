"""hmar_jax: HMAR (Hierarchical Masked Auto-Regressive image generation) in JAX/Flax."""

__version__ = "0.1.0"
