"""GroupNorm (+ SiLU) over NHWC activations as two Pallas passes, for the bf16 tokenizer.

The tokenizer's ``bfloat16`` precision (the training step's encode, the sampler's decode)
normalises with one-pass statistics::

    mean_g = E[x],  var_g = E[x^2] - E[x]^2        per sample and group, float32
    y      = (x - mean_g) rstd_g scale_c + bias_c  (then SiLU where a conv follows)

XLA reduces these statistics over the pixels with the channels (160, 320, 640 wide: not
powers of two) in the minor dimension, well below the card's bandwidth.

Here the statistics kernel reads ``x [B, N, C]`` (``N = H W``) once: a program walks
``tiles`` tiles of ``rows`` pixels of one sample, each loaded as ``C / w`` unmasked strips
of ``[rows, w]`` (``w`` the largest power of two dividing ``C``, at most 128: 160 channels
are 5 strips of 32), accumulating float32 sums of ``x`` and ``x^2`` per channel, and
writes them as partial sums ``[B, P, C]`` that XLA adds up and folds into the ``[B, G]``
group statistics (tiny arrays). The normalise kernel reads ``x`` once and writes
``silu(x a + b)`` once, with ``a = rstd scale`` and ``b = bias - mean a`` one float32
``[C]`` vector per sample.

The backward is the plain-jnp reference's (``jax.vjp``), recomputed from ``x``: the
kernels serve the frozen tokenizer's encode and decode; the tokenizer's own training
differentiates the same formula.

``reference_group_norm`` is the same formula in jnp. A tile's pixel count is a power of
two dividing ``N``, so every shape tiles (odd ``N`` one pixel per tile, slowly). There is
no TPU kernel.

Dimension letters: B batch, H, W image size, N pixels, C channels, G groups, P programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hmar_jax.pallas.dispatch import Implementation, dispatch
from hmar_jax.pallas.triton_util import compiler_params

STATS_KERNEL_NAME = "hmar_group_norm_stats"
NORMALISE_KERNEL_NAME = "hmar_group_norm_silu"
TILE_ELEMENTS = 4096  # one tile: about [rows, C] float32 values in registers
MAX_ROWS = 32
MAX_TILES = 16  # tiles per program
MAX_STRIP = 128  # columns per load


# --------------------------------------------------------------------------- reference

def channel_statistics(sums: jax.Array, squares: jax.Array, count_per_channel: int,
                       groups: int) -> tuple[jax.Array, jax.Array]:
    """Group mean and variance ``[B, G]`` from per-channel float32 sums of x and x^2 ``[B, C]``
    over ``count_per_channel`` pixels (one pass: ``E[x^2] - E[x]^2``, clamped at 0)."""
    batch, channels = sums.shape
    count = count_per_channel * (channels // groups)
    mean = sums.reshape(batch, groups, -1).sum(-1) / count
    mean_square = squares.reshape(batch, groups, -1).sum(-1) / count
    return mean, jnp.maximum(mean_square - mean * mean, 0.0)


def scale_and_shift(mean, var, scale, bias, *, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` float32 ``[B, C]`` with ``GroupNorm(x) = x a + b``; ``mean``/``var [B, G]``,
    ``scale``/``bias [C]``."""
    per_group = scale.shape[0] // mean.shape[1]
    rstd = jnp.repeat(jax.lax.rsqrt(var + eps), per_group, axis=1)
    a = rstd * scale.astype(jnp.float32)
    return a, bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=1) * a


def reference_group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, groups: int,
                         eps: float, silu: bool) -> jax.Array:
    """``GroupNorm(x)`` (then SiLU) with one-pass float32 statistics, in ``x``'s dtype.

    ``x [B, H, W, C]``, ``scale``/``bias [C]``; ``C`` divisible by ``groups``."""
    batch, height, width, channels = x.shape
    x32 = x.astype(jnp.float32)
    mean, var = channel_statistics(x32.sum((1, 2)), jnp.square(x32).sum((1, 2)),
                                   height * width, groups)
    a, b = scale_and_shift(mean, var, scale, bias, eps=eps)
    y = x32 * a[:, None, None] + b[:, None, None]
    return (jax.nn.silu(y) if silu else y).astype(x.dtype)


# --------------------------------------------------------------------------- kernels

def strip_width(channels: int) -> int:
    """Columns per strip: the largest power of two dividing ``C``, at most ``MAX_STRIP``."""
    return min(MAX_STRIP, channels & -channels)


class _Strips:
    """A tile's ``C`` columns as ``C / width`` strips of ``width`` columns (a power of two
    dividing ``C``: 32 for 160 channels), so every load and store is whole and unmasked."""

    def __init__(self, channels: int):
        self.width = strip_width(channels)
        self.starts = range(0, channels, self.width)

    def load(self, ref, rows: pl.Slice | None = None) -> list[jax.Array]:
        """Float32 ``[rows, width]`` strips of a tile (``[width]`` of a per-sample vector)."""
        if rows is None:
            return [ref[pl.ds(c, self.width)].astype(jnp.float32) for c in self.starts]
        return [ref[rows, pl.ds(c, self.width)].astype(jnp.float32) for c in self.starts]

    def store(self, ref, values: list[jax.Array], rows: pl.Slice | None = None):
        for c, value in zip(self.starts, values):
            if rows is None:
                ref[pl.ds(c, self.width)] = value.astype(ref.dtype)
            else:
                ref[rows, pl.ds(c, self.width)] = value.astype(ref.dtype)


def _stats_kernel(x_ref, sums_ref, squares_ref, *, channels: int, rows: int, tiles: int):
    """Per-channel sums of x and x^2 over one program's ``tiles`` tiles of ``rows`` pixels."""
    strips = _Strips(channels)

    def accumulate(i, carry):
        totals, squares = carry
        xs = strips.load(x_ref, pl.ds(pl.multiple_of(i * rows, rows), rows))
        return ([t + x for t, x in zip(totals, xs)], [q + x * x for q, x in zip(squares, xs)])

    zeros = [jnp.zeros((rows, strips.width), jnp.float32) for _ in strips.starts]
    totals, squares = jax.lax.fori_loop(0, tiles, accumulate, (zeros, zeros))
    strips.store(sums_ref, [jnp.sum(t, axis=0) for t in totals])
    strips.store(squares_ref, [jnp.sum(q, axis=0) for q in squares])


def _normalise_kernel(x_ref, a_ref, b_ref, y_ref, *, channels: int, rows: int, tiles: int,
                      silu: bool):
    """``y = x a + b`` (then SiLU) over one program's ``tiles`` tiles of ``rows`` pixels."""
    strips = _Strips(channels)
    a = [v[None, :] for v in strips.load(a_ref)]
    b = [v[None, :] for v in strips.load(b_ref)]

    def normalise(i, carry):
        block = pl.ds(pl.multiple_of(i * rows, rows), rows)
        ys = [x * a_c + b_c for x, a_c, b_c in zip(strips.load(x_ref, block), a, b)]
        if silu:
            ys = [y / (1.0 + jnp.exp(-y)) for y in ys]
        strips.store(y_ref, ys, block)
        return carry

    jax.lax.fori_loop(0, tiles, normalise, 0)


# --------------------------------------------------------------------------- pallas calls

def tile_rows(pixels: int, channels: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Pixels per tile: ``tile_elements / next_pow2(C)``, between 1 and ``MAX_ROWS``, and a
    power of two dividing ``pixels`` (so every sample is whole tiles)."""
    rows = max(1, min(MAX_ROWS, tile_elements // pl.next_power_of_2(channels)))
    return min(rows, pixels & -pixels)


def tiles_per_program(pixels: int, channels: int, tile_elements: int = TILE_ELEMENTS,
                      max_tiles: int = MAX_TILES) -> int:
    """Tiles per program: the largest count <= ``max_tiles`` dividing a sample's tiles."""
    count = pixels // tile_rows(pixels, channels, tile_elements)
    return next(k for k in range(max_tiles, 0, -1) if count % k == 0)


def _grid(x, tile_elements: int, max_tiles: int):
    batch, pixels, channels = x.shape
    rows = tile_rows(pixels, channels, tile_elements)
    count = tiles_per_program(pixels, channels, tile_elements, max_tiles)
    matrix = pl.BlockSpec((None, rows * count, channels), lambda b, j: (b, j, 0))
    return (batch, pixels // (rows * count)), matrix, rows, count


def channel_sums(x: jax.Array, *, interpret: bool = False, num_warps: int = 4,
                 tile_elements: int = TILE_ELEMENTS,
                 max_tiles: int = MAX_TILES) -> tuple[jax.Array, jax.Array]:
    """Float32 sums of ``x`` and ``x^2`` over the pixels, ``[B, C]`` each, for ``x [B, N, C]``."""
    channels = x.shape[2]
    grid, matrix, rows, count = _grid(x, tile_elements, max_tiles)
    partial = pl.BlockSpec((None, None, channels), lambda b, j: (b, j, 0))
    partial_shape = jax.ShapeDtypeStruct((*grid, channels), jnp.float32)
    kernel = functools.partial(_stats_kernel, channels=channels, rows=rows, tiles=count)
    sums, squares = pl.pallas_call(
        kernel, grid=grid, in_specs=[matrix], out_specs=[partial, partial],
        out_shape=[partial_shape, partial_shape], compiler_params=compiler_params(num_warps),
        interpret=interpret, name=STATS_KERNEL_NAME)(x)
    return sums.sum(1), squares.sum(1)


def normalise(x: jax.Array, a: jax.Array, b: jax.Array, *, silu: bool, interpret: bool = False,
              num_warps: int = 4, tile_elements: int = TILE_ELEMENTS,
              max_tiles: int = MAX_TILES) -> jax.Array:
    """``x a + b`` (then SiLU) in ``x``'s dtype: ``x [B, N, C]``, ``a``/``b`` float32 ``[B, C]``."""
    channels = x.shape[2]
    grid, matrix, rows, count = _grid(x, tile_elements, max_tiles)
    vector = pl.BlockSpec((None, channels), lambda b, j: (b, 0))
    kernel = functools.partial(_normalise_kernel, channels=channels, rows=rows, tiles=count,
                               silu=silu)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=[matrix, vector, vector], out_specs=matrix,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=compiler_params(num_warps),
        interpret=interpret, name=NORMALISE_KERNEL_NAME)(x, a, b)


def group_norm_kernels(x, scale, bias, groups: int, eps: float, silu: bool,
                       interpret: bool = False, **tiling):
    """The two kernels on ``x [B, N, C]`` (``tiling``: ``num_warps``, ``tile_elements``,
    ``max_tiles``), not differentiable; ``group_norm`` is the op."""
    sums, squares = channel_sums(x, interpret=interpret, **tiling)
    mean, var = channel_statistics(sums, squares, x.shape[1], groups)
    a, b = scale_and_shift(mean, var, scale, bias, eps=eps)
    return normalise(x, a, b, silu=silu, interpret=interpret, **tiling)


# --------------------------------------------------------------------------- differentiable op

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group_norm(x, scale, bias, groups, eps, silu, interpret):
    return group_norm_kernels(x, scale, bias, groups, eps, silu, interpret)


def _group_norm_fwd(x, scale, bias, groups, eps, silu, interpret):
    return group_norm_kernels(x, scale, bias, groups, eps, silu, interpret), (x, scale, bias)


def _group_norm_bwd(groups, eps, silu, interpret, residuals, dy):
    def reference(x, scale, bias):  # [B, N, C] as a one-pixel-wide image
        return reference_group_norm(x[:, :, None], scale, bias, groups=groups, eps=eps,
                                    silu=silu)[:, :, 0]

    return jax.vjp(reference, *residuals)[1](dy)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


# --------------------------------------------------------------------------- public API

def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, groups: int, eps: float,
               silu: bool, implementation: Implementation) -> jax.Array:
    """``GroupNorm(x)`` with one-pass float32 statistics (then SiLU), in ``x``'s dtype.

    Args:
      x: ``[B, H, W, C]`` activations, ``C`` divisible by ``groups``.
      scale, bias: ``[C]`` affine parameters.
      groups: number of channel groups.
      eps: added to the variance.
      silu: apply SiLU to the normalised values (the tokenizer's ``silu(norm(x))``).
      implementation: ``"xla"``, ``"gpu"`` or ``"interpret"`` (``hmar_jax.pallas.dispatch``).
    """
    _, height, width, channels = x.shape
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups.")

    def reference(x, scale, bias):
        return reference_group_norm(x, scale, bias, groups=groups, eps=eps, silu=silu)

    def kernel(x, scale, bias, *, implementation):  # on this device's share of the batch
        flat = x.reshape(x.shape[0], height * width, channels)
        return _group_norm(flat, scale, bias, groups, eps, silu,
                           implementation == "interpret").reshape(x.shape)

    return dispatch(implementation, "group_norm", reference, kernel, (x,), (scale, bias))
