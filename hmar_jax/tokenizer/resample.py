"""PyTorch-exact latent resampling as precomputed separable matrices.

The tokenizer moves latents between scales with ``F.interpolate(mode='area')``
(down) and ``F.interpolate(mode='bicubic', align_corners=False)`` (up). Neither is
what ``jax.image.resize`` computes (its cubic kernel uses A = -0.5 and it
antialiases when shrinking), so each (input side n, output side m) pair gets an
``[m, n]`` matrix built here in float64 and applied separably:
``Y = M_h @ X @ M_w^T``.

Dimension letters: B batch, C channels, n input side, m output side.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient


def area_matrix(n: int, m: int) -> np.ndarray:
    """float64 [m, n]: adaptive average pooling from n to m samples.

    Output i averages inputs ``[floor(i n / m), ceil((i + 1) n / m))``; windows may
    overlap and differ in width. ``m == n`` gives the identity.
    """
    matrix = np.zeros((m, n))
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of the taps at floor(x) - 1 .. floor(x) + 2 for fraction t = x - floor(x)."""
    a = BICUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n: int, m: int) -> np.ndarray:
    """float64 [m, n]: bicubic resampling from n to m samples, align_corners=False.

    Half-pixel source coordinates ``x = (i + 0.5) n / m - 0.5`` (not clamped), taps
    clamped to ``[0, n - 1]``, no antialiasing. Rows sum to 1; entries may be
    negative or exceed 1. ``m == n`` gives the identity.
    """
    matrix = np.zeros((m, n))
    scale = n / m
    for i in range(m):
        x = (i + 0.5) * scale - 0.5
        base = int(np.floor(x))
        for offset, w in zip(range(-1, 3), _cubic_weights(x - base)):
            matrix[i, min(max(base + offset, 0), n - 1)] += w
    return matrix


def bilinear_matrix(n: int, m: int) -> np.ndarray:
    """float64 [m, n]: bilinear resampling from n to m samples, align_corners=False.

    PyTorch's convention: source ``x = (i + 0.5) n / m - 0.5`` clamped at 0, taps
    ``floor(x)`` and ``min(floor(x) + 1, n - 1)``. Used for editing masks (VAR's demo).
    """
    matrix = np.zeros((m, n))
    for i in range(m):
        x = max((i + 0.5) * n / m - 0.5, 0.0)
        base = int(np.floor(x))
        frac = x - base
        matrix[i, min(base, n - 1)] += 1.0 - frac
        matrix[i, min(base + 1, n - 1)] += frac
    return matrix


_BUILDERS = {"area": area_matrix, "bicubic": bicubic_matrix, "bilinear": bilinear_matrix}


@functools.lru_cache(maxsize=None)
def _matrix(kind: str, n: int, m: int) -> np.ndarray:
    return _BUILDERS[kind](n, m).astype(np.float32)


def resize(x: jax.Array, side: int, kind: str) -> jax.Array:
    """Resizes a square latent ``[B, n, n, C]`` to ``[B, side, side, C]``.

    Args:
      x: NHWC latent with equal height and width.
      side: output side m.
      kind: ``"area"`` (down-sampling), ``"bicubic"`` (up-sampling) or ``"bilinear"``.

    Returns:
      ``[B, side, side, C]`` in x's dtype. Same-size calls return x unchanged,
      which is exactly what PyTorch computes.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"Unknown resampling {kind!r}; use one of {sorted(_BUILDERS)}.")
    n = x.shape[1]
    if x.shape[2] != n:
        raise ValueError(f"Expected a square latent [B, n, n, C], got shape {x.shape}.")
    if side == n:
        return x
    matrix = jnp.asarray(_matrix(kind, n, side), dtype=x.dtype)
    return jnp.einsum("mh,bhwc,nw->bmnc", matrix, x, matrix,
                      precision=jax.lax.Precision.HIGHEST)
