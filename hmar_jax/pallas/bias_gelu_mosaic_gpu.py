"""The FFN's bias + tanh-GELU for Hopper GPUs: Pallas with the Mosaic GPU lowering (sm90).

The same op as the Triton-lowered kernels in ``bias_gelu`` and the same outputs, with the
same float32 math (``bias_gelu.gate`` and ``bias_gelu.gelu_grad``, one rounding at the end):
``forward`` returns ``gelu_tanh(h + b)``, ``backward`` returns ``dh`` and ``db``, the column
sums of ``dh``.

Design. A program is one warpgroup that owns one column block of ``BLOCK_COLS`` columns and
a run of row tiles (grid ``[F / BLOCK_COLS, G]``). It loads its slice of the bias once and
runs a TMA pipeline (``mosaic_util.pipeline``) over ``[block_rows, BLOCK_COLS]`` tiles: the
copies of the next tiles are in flight while the current one computes, and every input is
read once and every output written once. A tile is a TMA box of at most 256 elements per
dimension (``BLOCK_COLS`` columns of 2 or 4 bytes: a multiple of 16 bytes per row).

Registers. A tile is a 2-D array in the warpgroup's strided layout (thread t holds ``vec``
consecutive elements every ``128 vec``), which takes the elementwise math and the bias
broadcast over rows as a plain repetition of the bias's registers: every row of a tile
starts a new round of the threads because ``BLOCK_COLS`` is a multiple of ``128 vec``. That
layout has no reduction over one axis, so the backward does not reduce columns per tile: it
accumulates ``dh`` elementwise over the program's tiles and sums the accumulator's rows once
at the end, through shared memory, writing one partial sum ``[G, F]`` per program that XLA
adds up.

Supported (``tiles``): ``F`` a multiple of 128 and ``M`` a multiple of 8, the Triton
kernels' rule; other shapes take the reference in ``bias_gelu``.

Interpret mode (``interpret=True``) runs the same kernels on CPU in Mosaic GPU's
interpreter.

Dimension letters: M rows (batch x tokens), F hidden width, G row groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hmar_jax.pallas.bias_gelu import gate, gelu_grad
from hmar_jax.pallas.mosaic_util import load_in_bounds, pipeline

FORWARD_KERNEL_NAME = "hmar_bias_gelu_fwd"  # the Triton kernel's name: remat policies select it
MAX_BLOCK_COLS = 256  # TMA's largest box dimension
MAX_BLOCK_ROWS = 32  # 32 x 256 elements: 64 float32 registers per thread per tile
NUM_STAGES = 2  # tiles in flight
TARGET_PROGRAMS = 264  # two programs per multiprocessor of an H100 (132)


def tiles(rows: int, cols: int) -> tuple[int, int] | None:
    """``(block_rows, block_cols)`` for ``[rows, cols]``, or None if it does not tile.

    ``block_cols``: 256 if it divides ``cols``, else 128; ``block_rows``: the largest power
    of two <= 32 dividing ``rows`` (at least 8)."""
    if cols % 128 or rows % 8:
        return None
    block_rows = MAX_BLOCK_ROWS
    while rows % block_rows:
        block_rows //= 2
    return block_rows, MAX_BLOCK_COLS if cols % MAX_BLOCK_COLS == 0 else 128


def row_groups(row_tiles: int, col_blocks: int) -> int:
    """G: the fewest groups of whole row tiles (dividing ``row_tiles``) that bring the
    programs to ``TARGET_PROGRAMS``. Fewer, longer runs load the bias and write partial
    sums less often."""
    for count in range(max(1, -(-TARGET_PROGRAMS // col_blocks)), row_tiles + 1):
        if row_tiles % count == 0:
            return count
    return row_tiles


def _layout(shape):
    """The strided register layout of a ``[block_rows, block_cols]`` tile or a
    ``[block_cols]`` row: 2 consecutive elements per thread (1 for 128 columns)."""
    vec = 2 if shape[-1] % 256 == 0 else 1
    return plgpu.Layout.WG_STRIDED(tuple(shape), vec_size=vec)


def _load(ref):
    return plgpu.load(ref, layout=_layout(ref.shape)).astype(jnp.float32)


def _bias_tile(bias_smem, tile_shape):
    bias = _load(bias_smem)
    return lax.broadcast_in_dim(bias, tile_shape, (1,))


def _kernel(*refs, block_rows: int, block_cols: int, steps: int, backward: bool):
    """Column block ``c``, row tiles ``[g steps, (g + 1) steps)``. Refs: ``h``, (``dy``),
    ``bias``, the output (``y`` or ``dh``), (the partial sums ``[G, F]``), scratch."""
    if backward:
        h_ref, dy_ref, bias_ref, dh_ref, partial_ref, scratch = refs
        matrix_in, matrix_out = (h_ref, dy_ref), (dh_ref,)
    else:
        h_ref, bias_ref, y_ref, scratch = refs
        matrix_in, matrix_out = (h_ref,), (y_ref,)
    bias_smem, bias_bar, in_bufs, in_bars, out_bufs, sum_smem = scratch
    c, g = lax.axis_index("cols"), lax.axis_index("rows")
    cols = pl.ds(c * block_cols, block_cols)
    load_in_bounds(bias_ref.at[cols], bias_smem, bias_bar.at[0])
    plgpu.barrier_wait(bias_bar.at[0])
    tile_shape = (block_rows, block_cols)
    bias = _bias_tile(bias_smem, tile_shape)

    def at(refs, step):
        rows = pl.ds((g * steps + step) * block_rows, block_rows)
        return [ref.at[rows, cols] for ref in refs]

    def body(step, tiles_in, tiles_out, acc):
        x = _load(tiles_in[0]) + bias
        if not backward:
            tiles_out[0][...] = (x * gate(x)).astype(tiles_out[0].dtype)
            return acc
        dh = _load(tiles_in[1]) * gelu_grad(x)
        tiles_out[0][...] = dh.astype(tiles_out[0].dtype)
        return acc + dh

    zeros = plgpu.layout_cast(jnp.zeros(tile_shape, jnp.float32), _layout(tile_shape))
    acc = pipeline(steps, functools.partial(at, matrix_in), in_bufs, in_bars,
                   functools.partial(at, matrix_out), out_bufs, body,
                   zeros if backward else None)
    if backward:  # the accumulator's column sums, through shared memory
        sum_smem[...] = acc
        total = _load(sum_smem.at[0])
        for r in range(1, block_rows):
            total = total + _load(sum_smem.at[r])
        bias_smem[...] = total  # reused: the bias was read before the pipeline
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(bias_smem, partial_ref.at[g, cols])
        plgpu.wait_smem_to_gmem(0)


def _call(h, inputs, out_type, backward: bool, interpret: bool, name: str):
    rows, cols = h.shape
    block_rows, block_cols = tiles(rows, cols)
    col_blocks = cols // block_cols
    groups = row_groups(rows // block_rows, col_blocks)
    steps = rows // block_rows // groups
    stages = min(NUM_STAGES, steps)
    tile = (stages, block_rows, block_cols)
    if backward:
        out_type = (out_type, jax.ShapeDtypeStruct((groups, cols), jnp.float32))
        matrix_in = inputs[:2]
    else:
        matrix_in = inputs[:1]
    scratch = (
        plgpu.SMEM((block_cols,), jnp.float32),  # bias slice (then the column sums)
        plgpu.Barrier(num_barriers=1),
        [plgpu.SMEM(tile, m.dtype) for m in matrix_in],
        [plgpu.Barrier(num_barriers=stages) for _ in matrix_in],
        [plgpu.SMEM(tile, h.dtype)],
        plgpu.SMEM((block_rows, block_cols), jnp.float32) if backward else None,
    )
    kernel = functools.partial(_kernel, block_rows=block_rows, block_cols=block_cols,
                               steps=steps, backward=backward)
    return plgpu.kernel(
        lambda *refs: kernel(*refs[:-len(scratch)], refs[-len(scratch):]),
        out_type=out_type, scratch_types=scratch, grid=(col_blocks, groups),
        grid_names=("cols", "rows"),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name=name)(*inputs)


def forward(h: jax.Array, bias: jax.Array, *, interpret: bool = False) -> jax.Array:
    """``gelu_tanh(h + bias)`` in ``h``'s dtype; ``h [M, F]``, ``bias [F]``; must tile."""
    return _call(h, (h, bias.astype(jnp.float32)), jax.ShapeDtypeStruct(h.shape, h.dtype),
                 False, interpret, FORWARD_KERNEL_NAME)


def backward(h: jax.Array, bias: jax.Array, dy: jax.Array, *,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(dh [M, F] in h's dtype, dbias [F] in bias's dtype)`` of ``forward``."""
    dh, partial = _call(h, (h, dy, bias.astype(jnp.float32)),
                        jax.ShapeDtypeStruct(h.shape, h.dtype), True, interpret,
                        "hmar_bias_gelu_bwd")
    return dh, jnp.sum(partial, axis=0).astype(bias.dtype)
