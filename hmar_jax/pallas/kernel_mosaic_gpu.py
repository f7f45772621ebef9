"""Block-sparse flash attention for Hopper GPUs: Pallas with the Mosaic GPU lowering (sm90).

The same attention as ``kernel_gpu`` (the Triton-lowered kernel) and the same interface:
``forward``, ``forward_packed``, ``backward_dkdv``, ``backward_dq``, with host-side row
ranges (query i attends keys ``[row_start[i], row_end[i])``), column ranges for dK/dV,
natural-log ``lse [B, N, Lq]`` float32 and ``delta = sum(o * do, -1)``.

Hopper structure. Each program is one warpgroup that owns a tile of at most ``ROWS`` (64)
rows, the M of one warpgroup matrix multiply (``wgmma``). Both operands of every product
are read from shared memory where they can be (Q, K, V, dO tiles arrive there by TMA,
swizzled for ``wgmma``); the probabilities and dS go from registers straight into
``wgmma`` as its A operand. The loop over the tile's key (or query) steps is a TMA
pipeline of ``num_stages`` buffers: the copies of the next steps are in flight while the
current step computes, and a step's buffer is refilled as soon as its products have
completed. Several programs share a multiprocessor (a program is small: about 50 KB of
shared memory at the defaults), so one program's softmax overlaps another's matrix
products and copies. Warp specialisation (a copy warpgroup feeding two compute warpgroups
that share one key stream, as in FlashAttention-3) needs 128-row tiles with one key range;
here most tiles are single scales of fewer rows (the 256 px list has 13 tiles of at most 64
rows in 680), and a wider tile would visit the union of its scales' key ranges.

Tiles. ``plan_tiles`` cuts the rows into tiles the way ``kernel_gpu.plan_tiles`` does (rows
with equal ranges, small consecutive scales packed, none wider than ``ROWS``), with one
difference forced by TMA into swizzled shared memory: every copy starts at a row that is a
multiple of ``ALIGN`` (8). A tile ``[first, end)`` therefore loads the ``ROWS``-row box
starting at ``first`` rounded down to ``ALIGN`` and is sized so that its rows fit in it;
rows of the box outside the tile are computed and never stored. Its key steps start at the
first key of its rows rounded down to ``ALIGN``; steps that every row may attend entirely
run without the element mask, the others (the first step when it starts before a row's
range, a scale's last partial step, tiles that mix scales) apply it. No step outside
``[min row_start, max row_end)`` of the tile is loaded. Results are written exactly on the
tile's rows: the rows are staged in unswizzled shared memory and stored by TMA in chunks of
64, 32, ..., 1 rows (every output row is 128 or 256 bytes, so each chunk stays aligned for
TMA); reads past the sequence end are zero-filled and writes there dropped by TMA. The
forward writes its log-sum-exp as one full ``ROWS`` box per tile (``[B, N, T * ROWS]``) and
gathers it to ``[B, N, Lq]`` outside the kernel: the statistics are 1/K of the output's
bytes, and a box per tile needs no chunking. Sequences whose length is not a multiple of
``ALIGN`` (TMA tiles the global array by 8 rows) are padded by one copy.

Supported: head dims ``HEAD_DIMS`` (64, 128) in float16 or bfloat16 (``supports``);
the matrix products accumulate in float32; the softmax runs in base 2 with float32
statistics.

Interpret mode (``interpret=True``) runs the same kernels on CPU through Mosaic GPU's
interpreter, which simulates the warpgroup, shared memory, TMA and barriers but takes
``wgmma`` operands from shared memory only: there (and only there) the register operand
of a product is first written to a shared-memory stage (``_mma_acc``). Everything else,
the tile plans, copies, masks, softmax and chunked stores, is the code that runs on the
GPU.

Dimension letters: B batch, Lq/Lk query/key length, N heads, K head dim, T tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hmar_jax.pallas.block_sparse import row_spans

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS = 64  # rows per tile: one warpgroup's wgmma M
ALIGN = 8  # TMA into swizzled shared memory starts at multiples of 8 rows
HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PLAN_WIDTH = 8  # int32 fields per planned tile
_SWIZZLE = 128  # bytes; rows of 64 half-precision elements per swizzle tile
_CHUNKS = (64, 32, 16, 8, 4, 2, 1)  # row counts of the exact-row stores


@dataclasses.dataclass(frozen=True)
class MosaicLaunch:
    """Step size (keys per step in the forward and dQ kernels, queries per step in the
    dK/dV kernel; a multiple of 16) and pipeline depth of one kernel."""

    block: int = 64
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Launch parameters of the forward, dK/dV and dQ kernels."""

    forward: MosaicLaunch = MosaicLaunch()
    dkdv: MosaicLaunch = MosaicLaunch()
    dq: MosaicLaunch = MosaicLaunch()


def supports(head_dim: int, dtype) -> bool:
    """Whether these kernels take ``head_dim`` and ``dtype`` (else use ``kernel_gpu``)."""
    return head_dim in HEAD_DIMS and jnp.dtype(dtype) in DTYPES


# ===================================== host-side planning =====================================

def plan_tiles(range_start: np.ndarray, range_end: np.ndarray, block_cols: int,
               block_rows: int = ROWS, align: int = ALIGN) -> np.ndarray:
    """Tiles of one side of an attention call, with the column steps each tile visits.

    Args:
      range_start, range_end: int ``[R]``; row r attends columns ``[start[r], end[r])``.
      block_cols: columns per step (a multiple of ``align``).
      block_rows: rows of the box each tile loads.
      align: TMA alignment of every box's first row and first column.

    Returns:
      int32 ``[T, PLAN_WIDTH]``, per tile: first row, end row, first row of its box (a
      multiple of ``align``; the tile's rows fit in ``block_rows`` from there), first
      column (the rows' first key rounded down to ``align``), the number of leading masked
      steps, of unmasked steps after them, of all steps, and zero. Steps run from the first
      column in ``block_cols`` increments and end at the rows' last column.
    """
    range_start, range_end = np.asarray(range_start), np.asarray(range_end)
    # A tile's box starts at its first row rounded down to ``align``, and holds
    # ``block_rows`` rows from there.
    spans = row_spans(range_start, range_end, lambda first: block_rows - first % align)
    plan = np.zeros((len(spans), PLAN_WIDTH), np.int32)
    for i, (r0, r1) in enumerate(spans):
        lo, hi = int(range_start[r0:r1].min()), int(range_end[r0:r1].max())
        col0 = lo - lo % align
        total = max(0, -(-(hi - col0) // block_cols))
        head = min(total, max(0, -(-(int(range_start[r0:r1].max()) - col0) // block_cols)))
        full = min(total - head, max(0, (int(range_end[r0:r1].min()) - col0) // block_cols - head))
        plan[i, :7] = (r0, r1, r0 - r0 % align, col0, head, full, total)
    return plan


def visited_steps(range_start: np.ndarray, range_end: np.ndarray, block_cols: int) -> int:
    """Number of (tile, step) pairs a kernel visits (for benchmarks and tests)."""
    return int(plan_tiles(range_start, range_end, block_cols)[:, 6].sum())


def _lse_gather_index(plan: np.ndarray, length: int) -> np.ndarray:
    """int32 ``[Lq]``: where row r's log-sum-exp sits in the forward's ``[T * ROWS]`` boxes."""
    index = np.zeros(length, np.int32)
    for t, (first, end, row0, *_) in enumerate(plan):
        index[first:end] = t * ROWS + np.arange(first, end) - row0
    return index


# ======================================= in-kernel pieces =======================================

def _smem(shape, dtype, swizzled: bool = True):
    """Shared memory; ``swizzled``: tiled and swizzled for ``wgmma`` operands (128-byte
    swizzle, or the row's bytes when a row is shorter)."""
    if not swizzled:
        return plgpu.SMEM(shape, dtype)
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(_SWIZZLE, shape[-1] * itemsize)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def _aligned(x):
    return pl.multiple_of(x, ALIGN)


def _mma(a_ref, b_ref, shape):
    """``a @ b`` (both shared-memory refs) as a float32 ``[M, N]`` register array."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mma_acc(acc, a, b_ref, stage):
    """``acc + a @ b`` with ``a`` in registers (wgmma's register A operand). ``stage``
    (interpret mode only: its wgmma reads shared memory) is a shared-memory copy of ``a``."""
    if stage is None:
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b_ref))(plgpu.ACC.init(acc))
    stage[...] = a
    plgpu.commit_smem()
    return acc + _mma(stage, b_ref, acc.shape)


def _steps(head, full, total, body, carry):
    """Runs ``body(step, masked, carry)`` over a tile's steps: ``head`` masked steps,
    ``full`` unmasked ones, then masked ones up to ``total``."""
    carry = lax.fori_loop(0, head, lambda j, c: body(j, True, c), carry)
    carry = lax.fori_loop(head, head + full, lambda j, c: body(j, False, c), carry)
    return lax.fori_loop(head + full, total, lambda j, c: body(j, True, c), carry)


def _store_rows(stage, dst, first, end, row0):
    """TMA stores of rows ``[first, end)`` (at most ``ROWS``) of a tile whose box starts at
    row ``row0``: ``stage`` holds the box ``[ROWS, K]`` (unswizzled), ``dst(start, size)``
    is the destination ref of rows ``[start, start + size)``. The row count is cut into
    power-of-two chunks, so every row is written once and no row outside the tile."""
    count, offset = end - first, first - row0
    for size in _CHUNKS:
        @pl.when((count & size) != 0)
        def _store(size=size):
            at = count & ~(2 * size - 1)  # rows of the larger chunks before this one
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(offset + at, size)], dst(first + at, size))


def _row_vector(ref, axis: int):
    """A ``[ROWS]`` shared-memory vector as a row (``axis`` 1) or column (``axis`` 0)
    statistic of a ``wgmma`` result."""
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(axis))


def _allowed(start, end, first_col, shape):
    """Element mask ``start[r] <= first_col + c < end[r]`` of a ``[rows, cols]`` tile."""
    cols = first_col + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return ((cols >= lax.broadcast_in_dim(start, shape, [0]))
            & (cols < lax.broadcast_in_dim(end, shape, [0])))


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _stat(value):
    return plgpu.layout_cast(jnp.full((ROWS,), value, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1))


def _plan_fields(plan_ref, t):
    first, end, row0, col0, head, full, total = (plan_ref[t, i] for i in range(7))
    return first, end, _aligned(row0), _aligned(col0), head, full, total


class _Pipeline:
    """``num_stages`` shared-memory buffers per stream, filled by TMA one step ahead of use.

    ``sources(step)`` gives, per stream, the GMEM ref of that step; ``buffers`` the
    ``[num_stages, ...]`` shared-memory refs and ``barriers`` one barrier array
    ``[num_stages]`` per stream. Each issued copy is waited on exactly once, in order.
    """

    def __init__(self, sources, buffers, barriers, num_stages: int, total):
        self.sources, self.buffers, self.barriers = sources, buffers, barriers
        self.num_stages, self.total = num_stages, total

    def slot(self, step):
        return lax.rem(step, self.num_stages)

    def issue(self, step, slot):
        for src, buf, bar in zip(self.sources(step), self.buffers, self.barriers):
            plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

    def start(self):
        for j in range(self.num_stages):
            pl.when(j < self.total)(functools.partial(self.issue, j, j))

    def wait(self, stream: int, slot):
        plgpu.barrier_wait(self.barriers[stream].at[slot])

    def refill(self, step, slot):
        """After step ``step`` is done with ``slot``: load step ``step + num_stages``."""
        nxt = step + self.num_stages
        pl.when(nxt < self.total)(functools.partial(self.issue, nxt, slot))


# ========================================= the kernels =========================================

def _forward_kernel(plan_ref, start_ref, end_ref, *refs, block: int, num_stages: int,
                    scale: float, packed: bool):
    """One query tile: ``o`` rows ``[first, end)`` and the tile's ``lse`` box.

    Inputs after the ranges: ``q, k, v`` ``[B, L, N, K]``, or with ``packed`` HMAR's
    projection ``qkv [B, L, 3, N, K]``, its bias ``[3, N, K]`` and the temperature ``[N]``:
    then q and k get their bias and are L2-normalised (float32), q is scaled by the head's
    temperature, and the value bias is added to the output (a row's softmax weights sum to
    one, so ``P (V + 1 b) = P V + b``).
    """
    if packed:
        qkv_ref, bias_ref, temperature_ref, o_ref, lse_ref, *scratch = refs
        q_rows, k_rows, v_rows = (
            lambda b, h, r, n, part=part: qkv_ref.at[b, pl.ds(r, n), part, h] for part in range(3))
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, *scratch = refs
        q_rows, k_rows, v_rows = (
            lambda b, h, r, n, ref=ref: ref.at[b, pl.ds(r, n), h] for ref in (q_ref, k_ref, v_ref))
    (q_smem, range_smem, k_smem, v_smem, o_stage, lse_stage, p_stage, kn_smem, bias_smem,
     q_bars, k_bars, v_bars) = scratch
    t, h, b = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")
    first, end, row0, col0, head, full, total = _plan_fields(plan_ref, t)
    dtype = o_ref.dtype
    head_dim = q_smem.shape[-1]

    plgpu.copy_gmem_to_smem(q_rows(b, h, row0, ROWS), q_smem, q_bars.at[0])
    plgpu.copy_gmem_to_smem(start_ref.at[pl.ds(row0, ROWS)], range_smem.at[0], q_bars.at[1])
    plgpu.copy_gmem_to_smem(end_ref.at[pl.ds(row0, ROWS)], range_smem.at[1], q_bars.at[2])
    if packed:
        plgpu.copy_gmem_to_smem(bias_ref.at[:, h], bias_smem, q_bars.at[3])
    pipe = _Pipeline(lambda j: (k_rows(b, h, _aligned(col0 + j * block), block),
                                v_rows(b, h, _aligned(col0 + j * block), block)),
                     (k_smem, v_smem), (k_bars, v_bars), num_stages, total)
    pipe.start()
    for i in range(4 if packed else 3):
        plgpu.barrier_wait(q_bars.at[i])
    row_start, row_end = _row_vector(range_smem.at[0], 1), _row_vector(range_smem.at[1], 1)

    if packed:  # q <- normalize(q + bias_q) * temperature, in place
        q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        q = _normalized(q + _bias_row(bias_smem.at[0], q.shape)) * temperature_ref[h]
        q_smem[...] = q.astype(dtype)
        plgpu.commit_smem()

    def body(j, masked, carry):
        acc, m, l = carry
        slot = pipe.slot(j)
        pipe.wait(0, slot)
        k_tile = k_smem.at[slot]
        if packed:  # k <- normalize(k + bias_k), into its own buffer
            k = plgpu.load(k_tile, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            kn_smem[...] = _normalized(k + _bias_row(bias_smem.at[1], k.shape)).astype(dtype)
            plgpu.commit_smem()
            k_tile = kn_smem
        s = _mma(q_smem, k_tile.T, (ROWS, block)) * scale  # [ROWS, block], base 2
        if masked:
            s = jnp.where(_allowed(row_start, row_end, col0 + j * block, s.shape), s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
        alpha = jnp.exp2(m - m_use)
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        pipe.wait(1, slot)
        acc = _mma_acc(acc, p.astype(dtype), v_smem.at[slot], p_stage)
        pipe.refill(j, slot)
        return acc, m_new, l

    acc, m, l = _steps(head, full, total, body,
                       (_zeros((ROWS, head_dim)), _stat(-jnp.inf), _stat(0.0)))
    l_safe = jnp.where(l == 0.0, 1.0, l)  # box rows that attend nothing (outside the tile)
    m_use = jnp.where(m == -jnp.inf, 0.0, m)
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    if packed:
        out = out + _bias_row(bias_smem.at[2], out.shape)
    o_stage[...] = out.astype(dtype)
    lse_stage[...] = (m_use + jnp.log2(l_safe)) * LN_2
    plgpu.commit_smem()
    _store_rows(o_stage, lambda r, n: o_ref.at[b, pl.ds(r, n), h], first, end, row0)
    plgpu.copy_smem_to_gmem(lse_stage,
                            lse_ref.at[b, h, pl.ds(pl.multiple_of(t * ROWS, ROWS), ROWS)])
    plgpu.wait_smem_to_gmem(0)


def _normalized(x):
    """Rows of float32 ``x`` ``[rows, K]`` divided by their L2 norm (at least 1e-12)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=1))
    return x / lax.broadcast_in_dim(jnp.maximum(norm, 1e-12), x.shape, [0])


def _bias_row(ref, shape):
    """A ``[K]`` shared-memory bias broadcast over the rows of a ``[rows, K]`` tile."""
    row = plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0)).astype(jnp.float32)
    return lax.broadcast_in_dim(row, shape, [1])


def _dq_kernel(plan_ref, start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, q_smem, do_smem, stats_smem, range_smem, k_smem, v_smem, dq_stage,
               ds_stage, q_bars, k_bars, v_bars, *, block: int, num_stages: int, scale: float,
               sm_scale: float):
    """One query tile: dQ rows ``[first, end)``, looping over its key steps."""
    t, h, b = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")
    first, end, row0, col0, head, full, total = _plan_fields(plan_ref, t)
    head_dim = q_smem.shape[-1]
    dtype = dq_ref.dtype

    rows = pl.ds(row0, ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_bars.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, q_bars.at[1])
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], stats_smem.at[0], q_bars.at[2])
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], stats_smem.at[1], q_bars.at[3])
    plgpu.copy_gmem_to_smem(start_ref.at[rows], range_smem.at[0], q_bars.at[4])
    plgpu.copy_gmem_to_smem(end_ref.at[rows], range_smem.at[1], q_bars.at[5])
    pipe = _Pipeline(lambda j: (k_ref.at[b, pl.ds(_aligned(col0 + j * block), block), h],
                                v_ref.at[b, pl.ds(_aligned(col0 + j * block), block), h]),
                     (k_smem, v_smem), (k_bars, v_bars), num_stages, total)
    pipe.start()
    for i in range(6):
        plgpu.barrier_wait(q_bars.at[i])
    lse = _row_vector(stats_smem.at[0], 1) * LOG2_E
    delta = _row_vector(stats_smem.at[1], 1)
    row_start, row_end = _row_vector(range_smem.at[0], 1), _row_vector(range_smem.at[1], 1)

    def body(j, masked, dq):
        slot = pipe.slot(j)
        pipe.wait(0, slot)
        s = _mma(q_smem, k_smem.at[slot].T, (ROWS, block)) * scale
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        if masked:
            p = jnp.where(_allowed(row_start, row_end, col0 + j * block, s.shape), p, 0.0)
        pipe.wait(1, slot)
        dp = _mma(do_smem, v_smem.at[slot].T, (ROWS, block))
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
        dq = _mma_acc(dq, ds.astype(dtype), k_smem.at[slot], ds_stage)
        pipe.refill(j, slot)
        return dq

    dq = _steps(head, full, total, body, _zeros((ROWS, head_dim)))
    dq_stage[...] = (dq * sm_scale).astype(dtype)
    plgpu.commit_smem()
    _store_rows(dq_stage, lambda r, n: dq_ref.at[b, pl.ds(r, n), h], first, end, row0)
    plgpu.wait_smem_to_gmem(0)


def _dkdv_kernel(plan_ref, start_ref, end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, k_smem, v_smem, range_smem, q_smem, do_smem, lse_smem,
                 delta_smem, dk_stage, dv_stage, ds_stage, k_bars, q_bars, do_bars, lse_bars,
                 delta_bars, *, block: int, num_stages: int, scale: float, sm_scale: float):
    """One key tile: dK, dV rows ``[first, end)``, looping over the query steps that attend
    it. Works on the transposed scores ``S^T = K Q^T`` ``[ROWS keys, block queries]``, so
    the softmax statistics are per column."""
    t, h, b = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")
    first, end, row0, col0, head, full, total = _plan_fields(plan_ref, t)
    head_dim = k_smem.shape[-1]
    dtype = dk_ref.dtype

    rows = pl.ds(row0, ROWS)
    plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_smem, k_bars.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h], v_smem, k_bars.at[1])
    plgpu.copy_gmem_to_smem(start_ref.at[rows], range_smem.at[0], k_bars.at[2])
    plgpu.copy_gmem_to_smem(end_ref.at[rows], range_smem.at[1], k_bars.at[3])

    def sources(j):
        cols = pl.ds(_aligned(col0 + j * block), block)
        return (q_ref.at[b, cols, h], do_ref.at[b, cols, h], lse_ref.at[b, h, cols],
                delta_ref.at[b, h, cols])

    pipe = _Pipeline(sources, (q_smem, do_smem, lse_smem, delta_smem),
                     (q_bars, do_bars, lse_bars, delta_bars), num_stages, total)
    pipe.start()
    for i in range(4):
        plgpu.barrier_wait(k_bars.at[i])
    col_start, col_end = _row_vector(range_smem.at[0], 1), _row_vector(range_smem.at[1], 1)
    shape = (ROWS, block)

    def body(j, masked, carry):
        dk, dv = carry
        slot = pipe.slot(j)
        pipe.wait(0, slot)
        s_t = _mma(k_smem, q_smem.at[slot].T, shape) * scale
        pipe.wait(2, slot)
        lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0)) * LOG2_E
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, shape, [1]))
        if masked:
            p_t = jnp.where(_allowed(col_start, col_end, col0 + j * block, shape), p_t, 0.0)
        pipe.wait(1, slot)
        dv = _mma_acc(dv, p_t.astype(dtype), do_smem.at[slot], ds_stage)
        dp_t = _mma(v_smem, do_smem.at[slot].T, shape)
        pipe.wait(3, slot)
        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, shape, [1]))
        dk = _mma_acc(dk, ds_t.astype(dtype), q_smem.at[slot], ds_stage)
        pipe.refill(j, slot)
        return dk, dv

    zeros = _zeros((ROWS, head_dim))
    dk, dv = _steps(head, full, total, body, (zeros, zeros))
    dk_stage[...] = (dk * sm_scale).astype(dtype)
    dv_stage[...] = dv.astype(dtype)
    plgpu.commit_smem()
    _store_rows(dk_stage, lambda r, n: dk_ref.at[b, pl.ds(r, n), h], first, end, row0)
    _store_rows(dv_stage, lambda r, n: dv_ref.at[b, pl.ds(r, n), h], first, end, row0)
    plgpu.wait_smem_to_gmem(0)


# ========================================= the calls =========================================

def _check(head_dim: int, dtype, block: int) -> None:
    if not supports(head_dim, dtype):
        raise ValueError(f"The Mosaic GPU attention kernels take head dims {HEAD_DIMS} in "
                         f"float16/bfloat16, got {head_dim} in {jnp.dtype(dtype).name}; "
                         "use kernel_gpu.")
    if block % 16 or not 16 <= block <= 256:
        raise ValueError(f"block must be a multiple of 16 in [16, 256], got {block}.")


def _padded_length(length: int) -> int:
    return -(-length // ALIGN) * ALIGN


def _pad_rows(x: jax.Array, length: int, axis: int = 1) -> jax.Array:
    """``x`` padded with zeros along ``axis`` to ``length`` (no copy when it fits)."""
    if x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _ranges(starts: np.ndarray, ends: np.ndarray, length: int) -> tuple[jax.Array, jax.Array]:
    """Range vectors as int32 device arrays padded to ``length`` (padding: empty ranges)."""
    pad = length - len(starts)
    return (jnp.asarray(np.pad(np.asarray(starts, np.int32), (0, pad))),
            jnp.asarray(np.pad(np.asarray(ends, np.int32), (0, pad))))


def _call(body, out_type, scratch, grid, interpret: bool, name: str):
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=grid,
        grid_names=("tile", "head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=name)


def _forward_call(inputs, packed: bool, out_shape, row_start, row_end, *, sm_scale: float,
                  block: int, num_stages: int, interpret: bool):
    """The forward kernel over planned query tiles. ``inputs``: the kernel's inputs after
    the ranges (rows padded to a multiple of ``ALIGN``); ``out_shape``: ``(B, Lq, N, K)``
    of the output, Lq unpadded."""
    batch, len_q, heads, head_dim = out_shape
    dtype = inputs[0].dtype
    _check(head_dim, dtype, block)
    if packed and block not in (64, 128):
        raise ValueError(f"forward_packed normalises whole key steps: block 64 or 128, got "
                         f"{block}.")
    plan = plan_tiles(row_start, row_end, block)
    padded = _padded_length(len_q)
    starts, ends = _ranges(row_start, row_end, padded)
    num_stages = max(1, min(num_stages, int(plan[:, 6].max(initial=1))))
    scratch = (
        _smem((ROWS, head_dim), dtype),  # q
        plgpu.SMEM((2, ROWS), jnp.int32),  # row ranges
        _smem((num_stages, block, head_dim), dtype),  # k
        _smem((num_stages, block, head_dim), dtype),  # v
        _smem((ROWS, head_dim), dtype, swizzled=False),  # o rows
        plgpu.SMEM((ROWS,), jnp.float32),  # lse
        _smem((ROWS, block), dtype) if interpret else None,  # p (interpret mode)
        _smem((block, head_dim), dtype) if packed else None,  # normalised k
        plgpu.SMEM((3, head_dim), dtype) if packed else None,  # bias rows
        plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
    )
    kernel = functools.partial(_forward_kernel, block=block, num_stages=num_stages,
                               scale=sm_scale * LOG2_E, packed=packed)
    out_type = (jax.ShapeDtypeStruct((batch, padded, heads, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, heads, len(plan) * ROWS), jnp.float32))
    o, lse_boxes = _call(kernel, out_type, scratch, (len(plan), heads, batch), interpret,
                         "hmar_block_sparse_attention_fwd")(jnp.asarray(plan), starts, ends,
                                                            *inputs)
    lse = jnp.take(lse_boxes, jnp.asarray(_lse_gather_index(plan, len_q)), axis=2)
    return o[:, :len_q], lse


def forward(q: jax.Array, k: jax.Array, v: jax.Array, row_start: np.ndarray, row_end: np.ndarray,
            *, sm_scale: float = 1.0, block: int = 64, num_stages: int = 2,
            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward.

    Args:
      q: ``[B, Lq, N, K]``; k, v: ``[B, Lk, N, K]`` (same dtype: float16 or bfloat16).
      row_start, row_end: host int ``[Lq]``; query i attends keys ``[row_start[i], row_end[i])``.
      sm_scale: logit multiplier.
      block: keys per step (a multiple of 16).
      num_stages: key/value steps in flight.
      interpret: run in Mosaic GPU's interpreter (CPU).

    Returns:
      ``(o [B, Lq, N, K] in q.dtype, lse [B, N, Lq] float32)``.
    """
    inputs = (_pad_rows(q, _padded_length(q.shape[1])),
              *(_pad_rows(x, _padded_length(k.shape[1])) for x in (k, v)))
    return _forward_call(inputs, False, q.shape, row_start, row_end, sm_scale=sm_scale,
                         block=block, num_stages=num_stages, interpret=interpret)


def forward_packed(qkv: jax.Array, qkv_bias: jax.Array, temperature: jax.Array,
                   row_start: np.ndarray, row_end: np.ndarray, *, sm_scale: float = 1.0,
                   block: int = 64, num_stages: int = 2,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Self-attention forward straight from HMAR's packed projection, with the prologue of
    ``reference.hmar_qkv`` (bias, L2 normalisation of q and k in float32, per-head
    temperature on q) applied in the kernel: q once per tile, k to every key step as it
    arrives, the value bias to the output.

    Args:
      qkv: ``[B, L, 3, N, K]``.
      qkv_bias: ``[3, N, K]`` in qkv's dtype.
      temperature: float32 ``[N]``.
      row_start, row_end, sm_scale, num_stages, interpret: as ``forward``.
      block: keys per step, 64 or 128.

    Returns:
      ``(o [B, L, N, K] in qkv.dtype, lse [B, N, L] float32)``.
    """
    batch, length, _, heads, head_dim = qkv.shape
    inputs = (_pad_rows(qkv, _padded_length(length)), qkv_bias.astype(qkv.dtype),
              temperature.astype(jnp.float32))
    return _forward_call(inputs, True, (batch, length, heads, head_dim), row_start, row_end,
                         sm_scale=sm_scale, block=block, num_stages=num_stages,
                         interpret=interpret)


def _backward_setup(q, k, v, do, lse, delta, range_start, range_end, *, block: int,
                    num_stages: int, tile_side: int):
    """What both backward kernels start from: the tile plan over ``range_start/end`` (the
    rows of input ``tile_side``: 0 for queries, 1 for keys), the inputs with query rows and
    key rows padded to multiples of ``ALIGN``, the padded range vectors, and the pipeline
    depth cut to the longest tile's step count."""
    _check(q.shape[-1], q.dtype, block)
    plan = plan_tiles(range_start, range_end, block)
    len_q, len_k = _padded_length(q.shape[1]), _padded_length(k.shape[1])
    inputs = (_pad_rows(q, len_q), _pad_rows(k, len_k), _pad_rows(v, len_k), _pad_rows(do, len_q),
              _pad_rows(lse, len_q, axis=2), _pad_rows(delta, len_q, axis=2))
    starts, ends = _ranges(range_start, range_end, inputs[tile_side].shape[1])
    num_stages = max(1, min(num_stages, int(plan[:, 6].max(initial=1))))
    return plan, inputs, starts, ends, num_stages


def backward_dkdv(q, k, v, do, lse, delta, col_start: np.ndarray, col_end: np.ndarray, *,
                  sm_scale: float = 1.0, block: int = 64, num_stages: int = 2,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """dK, dV: one program per planned key tile, looping over the queries that attend it.

    Args:
      q, do: ``[B, Lq, N, K]``; k, v: ``[B, Lk, N, K]``.
      lse, delta: float32 ``[B, N, Lq]`` (``delta = sum(o * do, -1)``).
      col_start, col_end: host int ``[Lk]``; key j is attended by the queries
        ``[col_start[j], col_end[j])``.
      block: queries per step (a multiple of 16); sm_scale, num_stages, interpret: as
        ``forward``.

    Returns:
      ``(dk, dv)``, ``[B, Lk, N, K]`` in k's dtype.
    """
    batch, len_k, heads, head_dim = k.shape
    dtype = k.dtype
    plan, inputs, starts, ends, num_stages = _backward_setup(
        q, k, v, do, lse, delta, col_start, col_end, block=block, num_stages=num_stages,
        tile_side=1)
    padded = inputs[1].shape[1]
    scratch = (
        _smem((ROWS, head_dim), dtype), _smem((ROWS, head_dim), dtype),  # k, v
        plgpu.SMEM((2, ROWS), jnp.int32),  # column ranges
        _smem((num_stages, block, head_dim), dtype),  # q
        _smem((num_stages, block, head_dim), dtype),  # do
        plgpu.SMEM((num_stages, block), jnp.float32),  # lse
        plgpu.SMEM((num_stages, block), jnp.float32),  # delta
        _smem((ROWS, head_dim), dtype, swizzled=False),  # dk rows
        _smem((ROWS, head_dim), dtype, swizzled=False),  # dv rows
        _smem((ROWS, block), dtype) if interpret else None,  # p^T, ds^T (interpret mode)
        plgpu.Barrier(num_barriers=4),
        *(plgpu.Barrier(num_barriers=num_stages) for _ in range(4)),  # q, do, lse, delta
    )
    kernel = functools.partial(_dkdv_kernel, block=block, num_stages=num_stages,
                               scale=sm_scale * LOG2_E, sm_scale=sm_scale)
    out = jax.ShapeDtypeStruct((batch, padded, heads, head_dim), dtype)
    dk, dv = _call(kernel, (out, out), scratch, (len(plan), heads, batch), interpret,
                   "hmar_block_sparse_attention_dkdv")(jnp.asarray(plan), starts, ends, *inputs)
    return dk[:, :len_k], dv[:, :len_k]


def backward_dq(q, k, v, do, lse, delta, row_start: np.ndarray, row_end: np.ndarray, *,
                sm_scale: float = 1.0, block: int = 64, num_stages: int = 2,
                interpret: bool = False) -> jax.Array:
    """dQ: one program per planned query tile, looping over its key steps like the forward.

    Args: as ``backward_dkdv``, with the row ranges ``[Lq]`` and ``block`` keys per step.

    Returns:
      ``dq [B, Lq, N, K]`` in q's dtype.
    """
    batch, len_q, heads, head_dim = q.shape
    dtype = q.dtype
    plan, inputs, starts, ends, num_stages = _backward_setup(
        q, k, v, do, lse, delta, row_start, row_end, block=block, num_stages=num_stages,
        tile_side=0)
    padded = inputs[0].shape[1]
    scratch = (
        _smem((ROWS, head_dim), dtype), _smem((ROWS, head_dim), dtype),  # q, do
        plgpu.SMEM((2, ROWS), jnp.float32),  # lse, delta
        plgpu.SMEM((2, ROWS), jnp.int32),  # row ranges
        _smem((num_stages, block, head_dim), dtype),  # k
        _smem((num_stages, block, head_dim), dtype),  # v
        _smem((ROWS, head_dim), dtype, swizzled=False),  # dq rows
        _smem((ROWS, block), dtype) if interpret else None,  # ds (interpret mode)
        plgpu.Barrier(num_barriers=6), plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
    )
    kernel = functools.partial(_dq_kernel, block=block, num_stages=num_stages,
                               scale=sm_scale * LOG2_E, sm_scale=sm_scale)
    (dq,) = _call(kernel, (jax.ShapeDtypeStruct((batch, padded, heads, head_dim), dtype),),
                  scratch, (len(plan), heads, batch), interpret,
                  "hmar_block_sparse_attention_dq")(jnp.asarray(plan), starts, ends, *inputs)
    return dq[:, :len_q]
