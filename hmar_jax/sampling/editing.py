"""Zero-shot editing targets: what the sampler keeps of a source image.

An edit regenerates a region of a source image and keeps the rest. This module turns the
region into what the sampler loop needs (``EditTarget``: the source's tokens and per-scale
keep masks, its latent and pixel keep masks) and builds rectangular regions
(``box_mask``). The loop itself is the sampler's (``sampler.generate`` with ``edit=``);
nothing here imports it.

Dimension letters: B batch, H, W image size, S scales, p side of a scale, P latent side,
Cv latent channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hmar_jax.tokenizer import resample
from hmar_jax.tokenizer.model import VQVAE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EditTarget:
    """Tokens to teacher-force while sampling (zero-shot editing).

    Attributes:
      tokens: per scale k, int32 ``[B, p_k^2]``: the source image's tokens.
      keep: per scale k, bool ``[B, p_k^2]``: True where the source token is kept; the
        sampler only writes where it is False.
      source_latent: ``[B, P, P, Cv]``, the source's cumulative reconstruction f_hat.
      latent_keep: bool ``[B, P, P, 1]``: where the final f_hat is the source's. Coarse
        scales spread every regenerated token over a wide area (bicubic up-sampling), so
        without this the kept region would drift from the source's reconstruction.
      pixel_keep: bool ``[B, H, W, 1]``: where the returned image is the source's
        reconstruction (the decoder's self-attention otherwise lets an edit shift
        far-away pixels slightly).
    """

    tokens: tuple[jax.Array, ...]
    keep: tuple[jax.Array, ...]
    source_latent: jax.Array
    latent_keep: jax.Array
    pixel_keep: jax.Array


def scale_keep_masks(regenerate: jax.Array, patch_nums: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Pixel mask -> per-scale keep masks, following VAR's zero-shot editing demo.

    The keep mask (not ``regenerate``) is area-averaged to the latent side P and
    thresholded at 0.5, then resized to each scale with bilinear interpolation
    (align_corners=False) and thresholded at 0.5; scales of at most 3 tokens keep
    everything.

    Args:
      regenerate: bool ``[B, H, W]``, True where new content is generated.
      patch_nums: the scale sides.

    Returns:
      per scale k, bool ``[B, p_k^2]``.
    """
    latent = latent_keep_mask(regenerate, patch_nums[-1]).astype(jnp.float32)
    masks = []
    for side in patch_nums:
        scaled = resample.resize(latent, side, "bilinear")[..., 0] > 0.5  # [B, p, p]
        if side * side <= 3:
            scaled = jnp.ones_like(scaled)
        masks.append(scaled.reshape(scaled.shape[0], side * side))
    return tuple(masks)


def latent_keep_mask(regenerate: jax.Array, latent_side: int) -> jax.Array:
    """bool ``[B, P, P, 1]``: latent cells whose pixels are mostly kept (area average > 0.5)."""
    keep = (~regenerate).astype(jnp.float32)[..., None]  # [B, H, W, 1]
    return resample.resize(keep, latent_side, "area") > 0.5


def edit_target(vae: VQVAE, images: jax.Array, regenerate: jax.Array) -> EditTarget:
    """Encodes the source images and builds the per-scale keep masks.

    Args:
      vae: the model's tokenizer.
      images: ``[B, H, W, 3]`` in [0, 1] at the tokenizer's resolution.
      regenerate: bool ``[B, H, W]``, True where new content is generated (inpainting:
        the hole; outpainting: everything outside the kept region).
    """
    side = vae.config.image_size
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
        raise ValueError(f"Edit images must be [B, {side}, {side}, 3] in [0, 1] for this tokenizer, "
                         f"got shape {tuple(images.shape)}; resize or crop them first.")
    if regenerate.shape != images.shape[:3]:
        raise ValueError(f"The edit mask must be [B, H, W] = {tuple(images.shape[:3])}, got "
                         f"{tuple(regenerate.shape)}; give one mask pixel per image pixel.")
    indices = vae.encode_to_indices(images * 2.0 - 1.0)
    tokens = tuple(idx.reshape(idx.shape[0], -1) for idx in indices)
    regenerate = regenerate.astype(bool)
    return EditTarget(tokens, scale_keep_masks(regenerate, vae.config.patch_nums),
                      vae.indices_to_fhat(indices),
                      latent_keep_mask(regenerate, vae.config.patch_nums[-1]), ~regenerate[..., None])


def box_mask(image_size: int, box: tuple[float, float, float, float], *, inpaint: bool,
             batch: int = 1) -> jax.Array:
    """bool ``[batch, H, W]`` regenerate mask from a box ``(y0, x0, y1, x1)`` in [0, 1].

    ``inpaint=True`` regenerates the box; ``False`` (outpainting) keeps the box and
    regenerates the rest. The fractions are rounded to pixel edges; a box that rounds to
    no pixel is refused, since it would edit nothing (inpainting) or keep nothing
    (outpainting) while looking like a valid request.
    """
    y0, x0, y1, x1 = box
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f"Box {box} must be (y0, x0, y1, x1) with 0 <= y0 < y1 <= 1 and "
                         "0 <= x0 < x1 <= 1.")
    top, left, bottom, right = (round(v * image_size) for v in (y0, x0, y1, x1))
    if top >= bottom or left >= right:
        raise ValueError(f"Box {box} covers no pixel of the {image_size}x{image_size} image (rows "
                         f"{top}:{bottom}, columns {left}:{right}); make each side at least "
                         f"1/{image_size} of the image.")
    rows = jnp.arange(image_size)[:, None]
    cols = jnp.arange(image_size)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mask = inside if inpaint else ~inside
    return jnp.broadcast_to(mask, (batch, image_size, image_size))
