"""What the two GPU attention kernels (``kernel_gpu``, ``kernel_mosaic_gpu``) share: the
host-side grouping of rows into tiles, and the backward pass's row correction.

Rows with identical attention ranges form one group (one scale of HMAR's layout); a tile
holds one large group's rows, cut to the tile's capacity, or several consecutive small
groups, so a tile's rows visit nearly the same columns.

Dimension letters: B batch, Lq query length, N heads, K head dim.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def row_spans(range_start: np.ndarray, range_end: np.ndarray,
              capacity: Callable[[int], int]) -> list[tuple[int, int]]:
    """``[(first row, end row), ...]`` of each tile, in row order, covering every row.

    Args:
      range_start, range_end: int ``[R]``; row r attends columns ``[start[r], end[r])``.
      capacity: the most rows a tile starting at a given row may hold (a kernel whose
        tiles are loaded from aligned boxes holds fewer when the first row is not aligned).
    """
    range_start, range_end = np.asarray(range_start), np.asarray(range_end)
    changes = np.flatnonzero((np.diff(range_start) != 0) | (np.diff(range_end) != 0)) + 1
    bounds = [0, *changes.tolist(), len(range_start)]
    spans, current = [], None
    for g0, g1 in zip(bounds[:-1], bounds[1:]):  # groups of rows with identical ranges
        if current is not None and g1 - current[0] <= capacity(current[0]):
            current = (current[0], g1)  # pack small consecutive groups
            continue
        if current is not None:
            spans.append(current)
        while g1 - g0 > capacity(g0):
            spans.append((g0, g0 + capacity(g0)))
            g0 += capacity(g0)
        current = (g0, g1)
    if current is not None:
        spans.append(current)
    return spans


def softmax_delta(o: jax.Array, do: jax.Array) -> jax.Array:
    """``sum(o * do, -1)`` as ``[B, N, Lq]`` float32 (the backward's row correction), from
    ``o, do [B, Lq, N, K]``."""
    return jnp.einsum("blnk,blnk->bnl", o.astype(jnp.float32), do.astype(jnp.float32))
