"""Scale bookkeeping for next-scale prediction: the single source of truth.

Everything that depends on the multi-scale token layout is derived here, in plain
numpy, from one tuple ``patch_nums``: token offsets, level ids, the phi
(residual-conv) index of each scale, the block-diagonal (HMAR) and block-causal
(VAR) attention masks, and the per-scale loss weights.

Dimension letters:
  S: number of scales, ``len(patch_nums)``.
  p_k: side of scale k (scale k holds ``p_k * p_k`` tokens, row-major).
  L: tokens over all scales, ``sum(p_k ** 2)`` (680 at 256 px).

Layout: scales are concatenated coarse to fine; scale k occupies token rows
``[starts[k], starts[k + 1])``. The teacher-forcing input has ``L - 1`` rows
because scale 0 (the class token) has no token input; scale k >= 1 reads input rows
``[starts[k] - 1, starts[k + 1] - 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

# Upstream picks each scale's phi by a float64 argmin whose ties (scales 2 and 7 of a
# 10-scale list) float32 would resolve differently. The released checkpoints were
# trained with exactly these tables, so they are fixed here rather than recomputed.
_PHI_TABLES: dict[tuple[int, int], tuple[int, ...]] = {
    (10, 4): (0, 0, 1, 1, 1, 2, 2, 3, 3, 3),
    (14, 4): (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3),
}

MaskKind = Literal["block_diagonal", "block_causal"]
LossWeighting = Literal["uniform", "equal", "lognorm"]


def resolve_patch_nums(spec: int | str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Returns the patch_nums tuple for a resolution preset or an explicit list.

    Args:
      spec: a resolution (256, 512, 1024, or the same as a string), a comma-separated
        string such as ``"1,2,4"``, or a sequence of increasing positive ints.

    Raises:
      ValueError: for an unknown preset or a list that is not strictly increasing.
    """
    if isinstance(spec, str):
        spec = spec.strip()
        spec = int(spec) if spec.isdigit() else tuple(int(p) for p in spec.split(",") if p.strip())
    if isinstance(spec, int):
        if spec not in PATCH_NUMS:
            raise ValueError(
                f"Unknown patch_nums preset {spec}; use one of {sorted(PATCH_NUMS)} "
                "or give the scale sides explicitly, e.g. '1,2,3,4'.")
        return PATCH_NUMS[spec]
    patch_nums = tuple(int(p) for p in spec)
    if not patch_nums or any(p <= 0 for p in patch_nums) or any(
            b <= a for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(
            f"patch_nums must be strictly increasing positive ints, got {patch_nums}.")
    return patch_nums


def phi_indices(num_scales: int, num_phi: int = 4) -> tuple[int, ...]:
    """Index of the residual refinement conv (phi) used by each scale.

    Args:
      num_scales: S.
      num_phi: number of phi convs (``share_quant_resi``); 0 means one per scale and
        1 a single shared conv.

    Returns:
      A tuple of S ints in ``[0, num_phi)`` (``[0, S)`` when num_phi is 0).
    """
    if num_phi == 0:
        return tuple(range(num_scales))
    if num_phi == 1:
        return (0,) * num_scales
    if (num_scales, num_phi) in _PHI_TABLES:
        return _PHI_TABLES[(num_scales, num_phi)]
    # Any other list: the upstream rule, evaluated in float64 like upstream numpy.
    if num_phi == 4:
        ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    else:
        ticks = np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)
    positions = np.arange(num_scales, dtype=np.float64) / max(num_scales - 1, 1)
    return tuple(int(np.argmin(np.abs(ticks - r))) for r in positions)


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
    """Token layout of one patch_nums list. Build with ``ScaleLayout.create``.

    Attributes:
      patch_nums: side p_k of each scale.
      num_phi: number of phi convs shared across scales (``share_quant_resi``).
    """

    patch_nums: tuple[int, ...]
    num_phi: int = 4

    @classmethod
    def create(cls, spec: int | str | tuple[int, ...] | list[int], num_phi: int = 4) -> "ScaleLayout":
        return cls(resolve_patch_nums(spec), num_phi)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def latent_side(self) -> int:
        """P: side of the full latent grid (the last scale)."""
        return self.patch_nums[-1]

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L."""
        return sum(self.tokens_per_scale)

    @functools.cached_property
    def starts(self) -> np.ndarray:
        """int [S + 1]: ``starts[k]`` is the first token of scale k; the last is L."""
        return np.concatenate([[0], np.cumsum(self.tokens_per_scale)]).astype(np.int64)

    def token_slice(self, k: int) -> slice:
        """Rows of scale k in the length-L token sequence (logits, targets)."""
        return slice(int(self.starts[k]), int(self.starts[k + 1]))

    def input_slice(self, k: int) -> slice:
        """Rows of scale k >= 1 in the length-(L - 1) teacher-forcing input."""
        if k < 1:
            raise ValueError("Scale 0 is the class token and has no input rows.")
        return slice(int(self.starts[k]) - 1, int(self.starts[k + 1]) - 1)

    @functools.cached_property
    def level_ids(self) -> np.ndarray:
        """int32 [L]: scale index of every token."""
        return np.repeat(np.arange(self.num_scales, dtype=np.int32), self.tokens_per_scale)

    @functools.cached_property
    def phi(self) -> tuple[int, ...]:
        """phi conv index per scale, see ``phi_indices``."""
        return phi_indices(self.num_scales, self.num_phi)

    def attention_mask(self, kind: MaskKind) -> np.ndarray:
        """bool [L, L]: True where query i may attend key j.

        ``block_diagonal`` (HMAR): same scale only. ``block_causal`` (VAR): own and
        earlier scales.
        """
        q, k = self.level_ids[:, None], self.level_ids[None, :]
        if kind == "block_diagonal":
            return q == k
        if kind == "block_causal":
            return q >= k
        raise ValueError(f"Unknown mask kind {kind!r}; use 'block_diagonal' or 'block_causal'.")

    def key_ranges(self, kind: MaskKind) -> tuple[np.ndarray, np.ndarray]:
        """Per-query legal key range ``[row_start, row_end)``, int32 [L] each.

        The mask of ``attention_mask(kind)`` is exactly ``row_start[i] <= j < row_end[i]``;
        block-sparse kernels use these instead of an [L, L] mask.
        """
        ends = self.starts[1:][self.level_ids].astype(np.int32)
        if kind == "block_diagonal":
            return self.starts[:-1][self.level_ids].astype(np.int32), ends
        if kind == "block_causal":
            return np.zeros_like(ends), ends
        raise ValueError(f"Unknown mask kind {kind!r}; use 'block_diagonal' or 'block_causal'.")

    def query_ranges(self, kind: MaskKind) -> tuple[np.ndarray, np.ndarray]:
        """Per-key range ``[col_start, col_end)`` of the queries that attend key j, int32 [L].

        The transpose of ``key_ranges``: the mask is ``col_start[j] <= i < col_end[j]``.
        """
        starts = self.starts[:-1][self.level_ids].astype(np.int32)
        if kind == "block_diagonal":
            return starts, self.starts[1:][self.level_ids].astype(np.int32)
        if kind == "block_causal":
            return starts, np.full_like(starts, self.seq_len)
        raise ValueError(f"Unknown mask kind {kind!r}; use 'block_diagonal' or 'block_causal'.")

    def scale_weights(self, weighting: LossWeighting) -> np.ndarray:
        """float64 [S]: total loss weight of each scale (see ``token_loss_weights``)."""
        tokens = np.asarray(self.tokens_per_scale, dtype=np.float64)
        if weighting == "uniform":
            return tokens / tokens.sum()
        if weighting == "equal":
            return np.ones(self.num_scales)
        if weighting == "lognorm":
            ratios = np.asarray(self.patch_nums, dtype=np.float64) / self.patch_nums[-1]
            if self.num_scales < 2:
                return np.ones(1)
            z = (ratios[::-1] - ratios.mean()) / ratios.std(ddof=1)
            pdf = np.exp(-0.5 * z * z)  # the normal pdf's constant cancels below
            return pdf / pdf.sum()
        raise ValueError(
            f"Unknown loss weighting {weighting!r}; use 'uniform', 'equal' or 'lognorm'.")

    def token_loss_weights(self, weighting: LossWeighting) -> np.ndarray:
        """float32 [L]: per-token cross-entropy weight.

        ``uniform``: 1/L everywhere (VAR). ``equal``: 1/p_k^2, so every scale sums to 1
        and the total is S. ``lognorm`` (HMAR stage 1): a normal pdf over the reversed
        relative scale sizes, normalised over scales, spread evenly over each scale's
        tokens; sums to 1.
        """
        per_scale = self.scale_weights(weighting) / np.asarray(self.tokens_per_scale)
        return np.repeat(per_scale, self.tokens_per_scale).astype(np.float32)

    def split_tokens(self, tokens):
        """Splits ``[..., L]`` into S arrays ``[..., p_k, p_k]`` (row-major); numpy or jax
        arrays (slicing and reshapes only), the inverse of concatenating the flattened maps.

        Raises:
          ValueError: when the last axis is not L.
        """
        if tokens.shape[-1] != self.seq_len:
            raise ValueError(f"Token rows of length {tokens.shape[-1]} do not match patch_nums "
                             f"{self.patch_nums} (L = {self.seq_len}).")
        return [tokens[..., self.token_slice(k)].reshape(*tokens.shape[:-1], p, p)
                for k, p in enumerate(self.patch_nums)]
