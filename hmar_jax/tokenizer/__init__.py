"""The frozen multi-scale residual VQ tokenizer (VAR's VQ-VAE) and its PyTorch-exact
resampling.

Dimension letters: B batch, H, W image size, S scales, p side of a scale, P latent side,
Cv latent channels, V codebook size.
"""

from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig

__all__ = ["VQVAE", "VQVAEConfig"]
