"""Image grids as PNG files.

Dimension letters: N images, H/W image side.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float ``[N, H, W, 3]`` in [0, 1] -> uint8 with torchvision's ``save_image`` rounding."""
    return np.clip(np.floor(np.asarray(images, np.float32) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def grid_image(rows: list[np.ndarray], upscale: int = 1, padding: int = 1) -> np.ndarray:
    """uint8 ``[rows (h + pad), n (w + pad), 3]`` grid with one row per entry of ``rows``.

    Args:
      rows: each ``[N, H, W, 3]``, uint8 or float in [-1, 1]; all rows share H and W
        (shorter rows are left white).
      upscale: nearest-neighbour magnification (small images stay readable).
      padding: white pixels between cells (before magnification).
    """
    cells = [r if r.dtype == np.uint8 else to_uint8((np.asarray(r, np.float32) + 1.0) / 2.0)
             for r in rows]
    n = max(len(c) for c in cells)
    h, w = cells[0].shape[1:3]
    grid = np.full((len(cells) * (h + padding) + padding, n * (w + padding) + padding, 3), 255,
                   np.uint8)
    for i, row in enumerate(cells):
        for j, image in enumerate(row):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            grid[top:top + h, left:left + w] = image
    return grid.repeat(upscale, axis=0).repeat(upscale, axis=1)


def save_grid(path: str | pathlib.Path, rows: list[np.ndarray], upscale: int = 1,
              padding: int = 1) -> pathlib.Path:
    """Writes ``grid_image(rows, upscale, padding)`` as a PNG; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(rows, upscale, padding)).save(path, format="PNG")
    return path
