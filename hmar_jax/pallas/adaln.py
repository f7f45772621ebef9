"""AdaLN's LayerNorm + modulation, with the residual add before it, as one Pallas pass.

Every block computes, twice::

    x' = x + branch * gate                     float32 residual stream, [B, L, C]
    h  = LN(x') (1 + scale) + shift            cast to the matmul dtype, [B, L, C]

with ``gate``, ``scale``, ``shift`` one ``[B, C]`` vector per sample (the AdaLN
modulation; ``gate`` also carries the per-sample drop-path factor). The first LN of a
block has no add (``layer_norm_modulate``), the second follows the attention's residual
add (``add_layer_norm_modulate``). XLA computes these as several fusions that each read
the residual stream again.

The kernels here read every input once and write every output once: a program holds a
tile of ``[rows, next_pow2(C)]`` float32 values of one sample in registers (masked past
``C``), so the statistics, the normalisation and the residual add need no second pass.
The backward recomputes the normalised values from the saved per-row mean and reciprocal
std and returns, besides ``dx`` (and ``dbranch``), the per-sample sums over rows of the
modulation gradients as per-program partial sums that XLA adds up. Statistics and
gradients are float32. The backward groups up to ``MAX_SUB_BLOCKS`` tiles per program:
fewer partial sums, while more tiles per program leave too few programs to fill the GPU.

The references (``reference_*``) are the plain jnp the model computes with ``"xla"``.
Shapes the kernels do not tile (``L`` not a multiple of the tile's rows, ``C < 16``) take
the reference. There is no TPU kernel.

``adaln_mosaic_gpu`` holds the same forward and backward for Pallas's Mosaic GPU backend
(implementations ``"mosaic_gpu"`` and ``"mosaic_interpret"``); both kernel families go
through the one ``custom_vjp`` per op here, the implementation a static argument. Its rule
for the shapes it takes differs (``adaln_mosaic_gpu.supports``: ``C`` a multiple of 128,
``L`` of 4); the others take the reference there too.

Dimension letters: B batch, L tokens, C width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hmar_jax.pallas import adaln_mosaic_gpu
from hmar_jax.pallas.dispatch import WITH_MOSAIC, Implementation, dispatch
from hmar_jax.pallas.triton_util import compiler_params

FORWARD_KERNEL_NAME = "hmar_adaln_fwd"  # for remat policies that keep its outputs
TILE_ELEMENTS = 4096  # a program's tile: [rows, next_pow2(C)] float32 values in registers
MAX_ROWS = 8
MAX_SUB_BLOCKS = 5  # backward: tiles per program; more leave too few programs to fill the GPU
MIN_WIDTH = 16


# --------------------------------------------------------------------------- reference

def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32. ``[..., C]``."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def reference_layer_norm_modulate(x, scale, shift, *, eps: float, out_dtype) -> jax.Array:
    """``LN(x) (1 + scale) + shift``: ``x [B, L, C]``, ``scale``/``shift [B, C]``."""
    return (layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]).astype(out_dtype)


def reference_add_layer_norm_modulate(x, branch, gate, scale, shift, *, eps: float, out_dtype):
    """``(x', LN(x') (1 + scale) + shift)`` with ``x' = x + branch gate``."""
    x = x + (branch * gate[:, None]).astype(x.dtype)
    return x, reference_layer_norm_modulate(x, scale, shift, eps=eps, out_dtype=out_dtype)


# --------------------------------------------------------------------------- kernels

class _Tile:
    """Loads and stores of ``[rows, block_cols]`` tiles, ``block_cols = next_pow2(width)``;
    the columns past ``width`` read as 0 and are not written."""

    def __init__(self, width: int):
        self.width = width
        self.block_cols = pl.next_power_of_2(width)
        self.cols = jnp.arange(self.block_cols)
        self.valid = self.cols < width

    def load(self, ref, rows: pl.Slice | None = None):
        if rows is None:  # a [B]-indexed vector ref: [width]
            return plgpu.load(ref.at[pl.ds(0, self.block_cols)], mask=self.valid,
                              other=0.0).astype(jnp.float32)
        return plgpu.load(ref.at[rows, pl.ds(0, self.block_cols)], mask=self.valid[None, :],
                          other=0.0).astype(jnp.float32)

    def store(self, ref, value, rows: pl.Slice | None = None):
        if rows is None:
            plgpu.store(ref.at[pl.ds(0, self.block_cols)], value.astype(ref.dtype),
                        mask=self.valid)
        else:
            plgpu.store(ref.at[rows, pl.ds(0, self.block_cols)], value.astype(ref.dtype),
                        mask=self.valid[None, :])


def _normalise(x, tile: _Tile, eps: float):
    """``(x - mean) rstd`` per row of a float32 tile (0 in the padding columns), mean, rstd."""
    mean = jnp.sum(x, axis=1) / tile.width
    centred = jnp.where(tile.valid[None, :], x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / tile.width + eps)
    return centred * rstd[:, None], mean, rstd


def _forward_kernel(*refs, eps: float, width: int, rows: int, with_branch: bool):
    if with_branch:
        x_ref, branch_ref, gate_ref, scale_ref, shift_ref, x_out_ref, h_ref, mean_ref, rstd_ref = refs
    else:
        x_ref, scale_ref, shift_ref, h_ref, mean_ref, rstd_ref = refs
    tile, block = _Tile(width), pl.ds(0, rows)
    x = tile.load(x_ref, block)
    if with_branch:
        x = x + tile.load(branch_ref, block) * tile.load(gate_ref)[None, :]
        tile.store(x_out_ref, x, block)
    n, mean, rstd = _normalise(x, tile, eps)
    h = n * (1.0 + tile.load(scale_ref))[None, :] + tile.load(shift_ref)[None, :]
    tile.store(h_ref, h, block)
    mean_ref[block] = mean
    rstd_ref[block] = rstd


def _backward_kernel(*refs, width: int, rows: int, sub_blocks: int, with_branch: bool):
    """Per program ``sub_blocks`` tiles of ``rows`` rows of one sample.

    With ``n = (x' - mean) rstd`` and ``dn = dh (1 + scale)``:
    ``dx' = rstd (dn - mean_C(dn) - n mean_C(dn n)) + dx'_out``, ``dx = dx'``,
    ``dbranch = dx' gate``; per-sample sums over rows: ``dscale = sum(dh n)``,
    ``dshift = sum(dh)``, ``dgate = sum(dx' branch)``.
    """
    if with_branch:
        (x_ref, branch_ref, gate_ref, scale_ref, mean_ref, rstd_ref, dh_ref, dx_out_ref,
         dx_ref, dbranch_ref, dscale_ref, dshift_ref, dgate_ref) = refs
    else:
        x_ref, scale_ref, mean_ref, rstd_ref, dh_ref, dx_ref, dscale_ref, dshift_ref = refs
    tile = _Tile(width)
    scale = 1.0 + tile.load(scale_ref)
    gate = tile.load(gate_ref) if with_branch else None
    zeros = jnp.zeros((tile.block_cols,), jnp.float32)
    dscale, dshift, dgate = zeros, zeros, zeros
    for s in range(sub_blocks):
        block = pl.ds(s * rows, rows)
        x = tile.load(x_ref, block)
        if with_branch:
            branch = tile.load(branch_ref, block)
            x = x + branch * gate[None, :]
        mean, rstd = mean_ref[block], rstd_ref[block]
        n = jnp.where(tile.valid[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        dh = tile.load(dh_ref, block)
        dn = dh * scale[None, :]
        mean_dn = jnp.sum(dn, axis=1) / width
        mean_dn_n = jnp.sum(dn * n, axis=1) / width
        dx = rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dn_n[:, None])
        dscale = dscale + jnp.sum(dh * n, axis=0)
        dshift = dshift + jnp.sum(dh, axis=0)
        if with_branch:
            dx = dx + tile.load(dx_out_ref, block)
            tile.store(dbranch_ref, dx * gate[None, :], block)
            dgate = dgate + jnp.sum(dx * branch, axis=0)
        tile.store(dx_ref, dx, block)
    tile.store(dscale_ref, dscale)
    tile.store(dshift_ref, dshift)
    if with_branch:
        tile.store(dgate_ref, dgate)


# --------------------------------------------------------------------------- pallas calls

def tile_rows(width: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Rows per tile: ``tile_elements / next_pow2(width)``, between 1 and ``MAX_ROWS``."""
    return max(1, min(MAX_ROWS, tile_elements // pl.next_power_of_2(width)))


def tiles(length: int, width: int, tile_elements: int = TILE_ELEMENTS) -> bool:
    """Whether the kernels take ``[B, length, width]``: whole tiles of rows per sample."""
    return width >= MIN_WIDTH and length % tile_rows(width, tile_elements) == 0


def sub_blocks(length: int, width: int, tile_elements: int = TILE_ELEMENTS,
               max_sub_blocks: int = MAX_SUB_BLOCKS) -> int:
    """Tiles per backward program: the largest count <= ``max_sub_blocks`` dividing the
    sample's tiles (fewer programs, fewer per-program partial sums)."""
    count = length // tile_rows(width, tile_elements)
    return next(k for k in range(max_sub_blocks, 0, -1) if count % k == 0)


def forward(x, branch, gate, scale, shift, *, eps: float, out_dtype, interpret: bool = False,
            num_warps: int = 4):
    """``(x' or None, h, mean [B, L], rstd [B, L])``; ``branch``/``gate`` None: no add."""
    batch, length, width = x.shape
    with_branch, rows = branch is not None, tile_rows(width)
    matrix = pl.BlockSpec((None, rows, width), lambda b, j: (b, j, 0))
    vector = pl.BlockSpec((None, width), lambda b, j: (b, 0))
    stats = pl.BlockSpec((None, rows), lambda b, j: (b, j))
    stat_shape = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    h_shape = jax.ShapeDtypeStruct(x.shape, out_dtype)
    if with_branch:
        inputs, in_specs = (x, branch, gate, scale, shift), [matrix, matrix, vector, vector, vector]
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), h_shape, stat_shape, stat_shape]
        out_specs = [matrix, matrix, stats, stats]
    else:
        inputs, in_specs = (x, scale, shift), [matrix, vector, vector]
        out_shape, out_specs = [h_shape, stat_shape, stat_shape], [matrix, stats, stats]
    kernel = functools.partial(_forward_kernel, eps=eps, width=width, rows=rows,
                               with_branch=with_branch)
    outs = pl.pallas_call(
        kernel, grid=(batch, length // rows), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=compiler_params(num_warps), interpret=interpret,
        name=FORWARD_KERNEL_NAME)(*inputs)
    return tuple(outs) if with_branch else (None, *outs)


def backward(x, branch, gate, scale, mean, rstd, dh, dx_out, *, interpret: bool = False,
             num_warps: int = 4, tile_elements: int = TILE_ELEMENTS,
             max_sub_blocks: int = MAX_SUB_BLOCKS):
    """Gradients of ``forward``: ``(dx, dbranch, dgate, dscale, dshift)`` (the branch
    terms None without a branch). ``length`` must be a multiple of
    ``tile_rows(width, tile_elements)``."""
    batch, length, width = x.shape
    with_branch, rows = branch is not None, tile_rows(width, tile_elements)
    count = sub_blocks(length, width, tile_elements, max_sub_blocks)
    programs = length // (rows * count)
    matrix = pl.BlockSpec((None, rows * count, width), lambda b, j: (b, j, 0))
    vector = pl.BlockSpec((None, width), lambda b, j: (b, 0))
    stats = pl.BlockSpec((None, rows * count), lambda b, j: (b, j))
    partial = pl.BlockSpec((None, None, width), lambda b, j: (b, j, 0))
    partial_shape = jax.ShapeDtypeStruct((batch, programs, width), jnp.float32)
    dx_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if with_branch:
        inputs = (x, branch, gate, scale, mean, rstd, dh, dx_out)
        in_specs = [matrix, matrix, vector, vector, stats, stats, matrix, matrix]
        out_shape = [dx_shape, jax.ShapeDtypeStruct(branch.shape, branch.dtype),
                     partial_shape, partial_shape, partial_shape]
        out_specs = [matrix, matrix, partial, partial, partial]
    else:
        inputs = (x, scale, mean, rstd, dh)
        in_specs = [matrix, vector, stats, stats, matrix]
        out_shape, out_specs = [dx_shape, partial_shape, partial_shape], [matrix, partial, partial]
    kernel = functools.partial(_backward_kernel, width=width, rows=rows, sub_blocks=count,
                               with_branch=with_branch)
    outs = pl.pallas_call(
        kernel, grid=(batch, programs), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=compiler_params(num_warps), interpret=interpret,
        name="hmar_adaln_bwd")(*inputs)
    if with_branch:
        dx, dbranch, dscale, dshift, dgate = outs
        return dx, dbranch, dgate.sum(1).astype(gate.dtype), dscale.sum(1), dshift.sum(1)
    dx, dscale, dshift = outs
    return dx, None, None, dscale.sum(1), dshift.sum(1)


# --------------------------------------------------------------------------- differentiable ops

def _kernel_forward(implementation: str, *args, **kwargs):
    """``forward`` of the implementation's kernels (``"gpu"``/``"interpret"``: Triton,
    ``"mosaic_gpu"``/``"mosaic_interpret"``: Mosaic GPU)."""
    if implementation.startswith("mosaic"):
        return adaln_mosaic_gpu.forward(*args, **kwargs,
                                        interpret=implementation == "mosaic_interpret")
    return forward(*args, **kwargs, interpret=implementation == "interpret")


def _kernel_backward(implementation: str, *args):
    """``backward`` of the implementation's kernels (as ``_kernel_forward``)."""
    if implementation.startswith("mosaic"):
        return adaln_mosaic_gpu.backward(*args, interpret=implementation == "mosaic_interpret")
    return backward(*args, interpret=implementation == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm_modulate(x, scale, shift, eps, out_dtype, implementation):
    return _kernel_forward(implementation, x, None, None, scale, shift, eps=eps,
                           out_dtype=out_dtype)[1]


def _layer_norm_modulate_fwd(x, scale, shift, eps, out_dtype, implementation):
    _, h, mean, rstd = _kernel_forward(implementation, x, None, None, scale, shift, eps=eps,
                                       out_dtype=out_dtype)
    return h, (x, scale, shift, mean, rstd)


def _layer_norm_modulate_bwd(eps, out_dtype, implementation, residuals, dh):
    x, scale, shift, mean, rstd = residuals
    dx, _, _, dscale, dshift = _kernel_backward(implementation, x, None, None, scale, mean,
                                                rstd, dh, None)
    return dx, dscale.astype(scale.dtype), dshift.astype(shift.dtype)


_layer_norm_modulate.defvjp(_layer_norm_modulate_fwd, _layer_norm_modulate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _add_layer_norm_modulate(x, branch, gate, scale, shift, eps, out_dtype, implementation):
    x_out, h, _, _ = _kernel_forward(implementation, x, branch, gate, scale, shift, eps=eps,
                                     out_dtype=out_dtype)
    return x_out, h


def _add_layer_norm_modulate_fwd(x, branch, gate, scale, shift, eps, out_dtype, implementation):
    x_out, h, mean, rstd = _kernel_forward(implementation, x, branch, gate, scale, shift,
                                           eps=eps, out_dtype=out_dtype)
    return (x_out, h), (x, branch, gate, scale, shift, mean, rstd)


def _add_layer_norm_modulate_bwd(eps, out_dtype, implementation, residuals, cotangents):
    x, branch, gate, scale, shift, mean, rstd = residuals
    dx_out, dh = cotangents
    dx, dbranch, dgate, dscale, dshift = _kernel_backward(implementation, x, branch, gate,
                                                          scale, mean, rstd, dh, dx_out)
    return dx, dbranch, dgate, dscale.astype(scale.dtype), dshift.astype(shift.dtype)


_add_layer_norm_modulate.defvjp(_add_layer_norm_modulate_fwd, _add_layer_norm_modulate_bwd)


# --------------------------------------------------------------------------- public API

def _kernel_applies(x: jax.Array, implementation: str) -> bool:
    if x.ndim != 3:
        return False
    if implementation.startswith("mosaic"):
        return adaln_mosaic_gpu.supports(*x.shape[1:])
    return tiles(*x.shape[1:])


def layer_norm_modulate(x: jax.Array, scale: jax.Array, shift: jax.Array, *, eps: float,
                        out_dtype, implementation: Implementation) -> jax.Array:
    """``LN(x) (1 + scale) + shift`` in ``out_dtype``: ``x [B, L, C]``, ``scale``/``shift [B, C]``.

    ``implementation``: ``"xla"``, ``"gpu"``, ``"interpret"``, ``"mosaic_gpu"`` or
    ``"mosaic_interpret"`` (``hmar_jax.pallas.dispatch``).
    """
    out_dtype = jnp.dtype(out_dtype)

    def reference(x, scale, shift):
        return reference_layer_norm_modulate(x, scale, shift, eps=eps, out_dtype=out_dtype)

    def kernel(x, scale, shift, *, implementation):
        if not _kernel_applies(x, implementation):
            return reference(x, scale, shift)
        return _layer_norm_modulate(x, scale, shift, eps, out_dtype, implementation)

    return dispatch(implementation, "layer_norm_modulate", reference, kernel, (x, scale, shift),
                    supported=WITH_MOSAIC)


def add_layer_norm_modulate(x: jax.Array, branch: jax.Array, gate: jax.Array, scale: jax.Array,
                            shift: jax.Array, *, eps: float, out_dtype,
                            implementation: Implementation) -> tuple[jax.Array, jax.Array]:
    """``(x', LN(x') (1 + scale) + shift)`` with ``x' = x + branch gate`` in ``x``'s dtype.

    ``x [B, L, C]`` (the residual stream), ``branch [B, L, C]``, ``gate``/``scale``/``shift
    [B, C]``; ``h`` in ``out_dtype``. ``implementation`` as ``layer_norm_modulate``.
    """
    out_dtype = jnp.dtype(out_dtype)

    def reference(x, branch, gate, scale, shift):
        return reference_add_layer_norm_modulate(x, branch, gate, scale, shift, eps=eps,
                                                 out_dtype=out_dtype)

    def kernel(x, branch, gate, scale, shift, *, implementation):
        if not _kernel_applies(x, implementation):
            return reference(x, branch, gate, scale, shift)
        return _add_layer_norm_modulate(x, branch, gate, scale, shift, eps, out_dtype,
                                        implementation)

    return dispatch(implementation, "add_layer_norm_modulate", reference, kernel,
                    (x, branch, gate, scale, shift), supported=WITH_MOSAIC)
