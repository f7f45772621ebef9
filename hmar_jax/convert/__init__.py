"""PyTorch checkpoint -> Orbax conversion (torch-free).

``python -m hmar_jax.convert vqvae --src vae_ch160v4096z32.pth --out DIR``
"""
