"""AdaLN's residual add + LayerNorm + modulation for Hopper GPUs: Pallas with the Mosaic GPU
lowering (sm90).

The same ops as the Triton-lowered kernels in ``adaln`` and the same outputs: ``forward``
returns ``(x', h, mean, rstd)`` (``x' = x + branch gate`` only with a branch), ``backward``
returns ``(dx, dbranch, dgate, dscale, dshift)`` with the modulation gradients summed over
each sample's rows. Statistics and gradients are float32.

Design. A program is one warpgroup that owns ``span`` consecutive rows of one sample
(grid ``[programs per sample, B]``). It loads the sample's modulation vectors once, then
runs a TMA pipeline (``pipeline``) over steps of ``rows`` rows: the copies of
the next step are in flight while the current one computes, and each step's outputs leave
by TMA from shared memory. Every input is read once and every output written once. A step
holds whole rows (``[rows, C]`` is contiguous in the ``[B, L, C]`` arrays), so its copies
are plain bulk copies with no 256-element box limit, and the row's statistics, the
normalisation and the residual add need no second pass over global memory.

Registers. The row reductions run on one row at a time, as a ``[C]`` vector in the
warpgroup's strided layout (thread t holds ``vec`` consecutive elements every ``128 vec``
columns). That layout reduces over the whole vector (a warp shuffle and a cross-warp
exchange through shared memory), which is the one reduction a row needs, and it is the
layout the modulation vectors and the backward's per-sample sums use as well: the sums over
rows of ``dh n``, ``dh`` and ``dx' branch`` are plain elementwise accumulators carried
through the pipeline, written once per program as ``[B, programs, C]`` partial sums that XLA
adds up. (A tiled ``[rows, C]`` register layout would need 64-row tiles, the WGMMA shape,
which do not fit shared memory at these widths.)

Statistics. The forward gathers the span's mean and reciprocal std in shared memory and
writes them with one copy per program; the backward reads them the same way. A span is a
multiple of ``ROW_ALIGN`` (4) rows so that each of those copies is a multiple of 16 bytes.

The pipeline is written out here rather than taken from ``plgpu.emit_pipeline`` because
that one predicates its output stores, which Mosaic GPU's interpreter does not run, and the
kernels are tested in that interpreter.

Supported (``supports``): ``C`` a multiple of ``WIDTH_ALIGN`` (128: whole strided vectors
for the 128 threads) and ``L`` a multiple of ``ROW_ALIGN``; other shapes take the reference
in ``adaln``.

Interpret mode (``interpret=True``) runs the same kernels on CPU in Mosaic GPU's
interpreter (the pipeline, copies and barriers simulated; register layouts are not).

Dimension letters: B batch, L tokens, C width, P programs per sample.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FORWARD_KERNEL_NAME = "hmar_adaln_fwd"  # the Triton kernel's name: remat policies select it
ROW_ALIGN = 4  # rows per program: a multiple of 4 float32 statistics = 16 bytes per copy
WIDTH_ALIGN = 128  # columns: whole strided vectors for the warpgroup's 128 threads
MAX_ROWS = 4  # rows per pipeline step
NUM_STAGES = 2  # pipeline steps in flight
SMEM_BUDGET = 96 * 1024  # pipeline buffers per program: two programs fit a multiprocessor
TARGET_PROGRAMS = 264  # two programs per multiprocessor of an H100 (132)


def load_in_bounds(src, dst, barrier) -> None:
    """TMA load of ``src`` (GMEM) into ``dst`` (SMEM), completing on ``barrier``.

    Promising in-bounds lets a contiguous slice (whole rows of a row-major array) go as one
    plain bulk copy, which has no tensor map and so no limit of 256 elements per box
    dimension; other slices go through a tensor map as usual."""
    plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def pipeline(steps: int, sources, inputs, barriers, destinations, outputs, body, carry=None):
    """Runs ``body(step, input_tiles, output_tiles, carry) -> carry`` for ``step`` in
    ``[0, steps)`` and returns the last carry.

    ``inputs[i]`` is a ``[S, *tile]`` shared-memory buffer that TMA fills with
    ``sources(step)[i]`` (a GMEM ref) up to ``S`` steps ahead, ``barriers[i]`` its ``S``
    barriers; ``outputs[i]`` is a ``[S, *tile]`` buffer whose slot the body writes and which
    is stored to ``destinations(step)[i]`` after the step. A slot's inputs are refilled after
    the step's ``commit_smem`` (a fence and a warpgroup barrier: every thread has read
    them), and its outputs are rewritten only after the stores issued ``S`` steps earlier
    have read them.
    """
    stages = inputs[0].shape[0]

    def issue(step, slot):
        for src, buf, bar in zip(sources(step), inputs, barriers):
            load_in_bounds(src, buf.at[slot], bar.at[slot])

    for step in range(min(stages, steps)):
        issue(step, step)

    def loop(step, carry):
        slot = lax.rem(step, stages)
        for bar in barriers:
            plgpu.barrier_wait(bar.at[slot])
        # the stores from this slot, issued S steps ago (one group per output), have read it
        plgpu.wait_smem_to_gmem((stages - 1) * len(outputs), wait_read_only=True)
        carry = body(step, [buf.at[slot] for buf in inputs], [buf.at[slot] for buf in outputs],
                     carry)
        plgpu.commit_smem()
        for buf, dst in zip(outputs, destinations(step)):
            plgpu.copy_smem_to_gmem(buf.at[slot], dst)
        pl.when(step + stages < steps)(lambda: issue(step + stages, slot))
        return carry

    carry = lax.fori_loop(0, steps, loop, carry)
    plgpu.wait_smem_to_gmem(0)
    return carry


def supports(length: int, width: int) -> bool:
    """Whether these kernels take ``[B, length, width]``."""
    return width % WIDTH_ALIGN == 0 and length % ROW_ALIGN == 0


def step_rows(width: int, bytes_per_row: int) -> int:
    """Rows per pipeline step: the most (at most ``MAX_ROWS``, a power of two) whose
    ``NUM_STAGES`` buffers of ``bytes_per_row`` bytes per element stay in ``SMEM_BUDGET``."""
    rows = MAX_ROWS
    while rows > 1 and NUM_STAGES * rows * width * bytes_per_row > SMEM_BUDGET:
        rows //= 2
    return rows


def programs_per_sample(batch: int, length: int) -> int:
    """P: the fewest programs per sample that reach ``TARGET_PROGRAMS`` in all, each owning
    a span of ``length / P`` rows, a multiple of ``ROW_ALIGN``. Fewer, longer spans load
    the modulation vectors and write the backward's partial sums less often."""
    for count in range(max(1, -(-TARGET_PROGRAMS // batch)), length // ROW_ALIGN + 1):
        if length % count == 0 and (length // count) % ROW_ALIGN == 0:
            return count
    return length // ROW_ALIGN


def _strided(width: int):
    """The register layout of a ``[C]`` row: ``vec`` (4, 2 or 1) consecutive elements per
    thread every ``128 vec`` columns."""
    vec = next(v for v in (4, 2, 1) if width % (WIDTH_ALIGN * v) == 0)
    return plgpu.Layout.WG_STRIDED((width,), vec_size=vec)


class _Row:
    """Loads and stores of ``[C]`` rows of shared-memory refs in the strided layout."""

    def __init__(self, width: int):
        self.width, self.layout = width, _strided(width)

    def load(self, ref):
        return plgpu.load(ref, layout=self.layout).astype(jnp.float32)

    def zeros(self):
        return plgpu.layout_cast(jnp.zeros((self.width,), jnp.float32), self.layout)

    @staticmethod
    def store(ref, value):
        ref[...] = value.astype(ref.dtype)


def _load_vectors(refs, smem, barriers, batch):
    """The sample's ``[C]`` modulation vectors from ``[B, C]`` refs, by TMA, as registers."""
    for i, (ref, buf) in enumerate(zip(refs, smem)):
        load_in_bounds(ref.at[batch], buf, barriers.at[i])
    for i in range(len(refs)):
        plgpu.barrier_wait(barriers.at[i])
    row = _Row(refs[0].shape[-1])
    return [row.load(buf) for buf in smem]


def _tiles(refs, batch, first_row, rows: int):
    """Rows ``[first_row, first_row + rows)`` of sample ``batch`` of ``[B, L, C]`` refs."""
    return [ref.at[batch, pl.ds(first_row, rows)] for ref in refs]


def _forward_kernel(*refs, eps: float, rows: int, span: int, with_branch: bool):
    """Rows ``[p span, (p + 1) span)`` of sample ``b``: ``x'`` (with a branch), ``h`` and
    the rows' statistics. Refs: the matrices in (``x``, ``branch``), the vectors (``gate``,
    ``scale``, ``shift``), the matrices out (``x'``, ``h``), ``mean``, ``rstd``, scratch."""
    n_in = 2 if with_branch else 1
    n_vec = n_in + 1
    matrix_in, vector_refs = refs[:n_in], refs[n_in:n_in + n_vec]
    matrix_out = refs[n_in + n_vec:2 * n_in + n_vec]
    mean_ref, rstd_ref, scratch = refs[2 * n_in + n_vec], refs[2 * n_in + n_vec + 1], refs[-1]
    vec_smem, vec_bars, stat_smem, in_bufs, in_bars, out_bufs = scratch
    p, b = lax.axis_index("program"), lax.axis_index("batch")
    width = matrix_in[0].shape[-1]
    row = _Row(width)
    vectors = _load_vectors(vector_refs, vec_smem, vec_bars, b)
    gate = vectors[0] if with_branch else None
    scale1, shift = 1.0 + vectors[-2], vectors[-1]

    def step(j, tiles_in, tiles_out, carry):
        for r in range(rows):
            x = row.load(tiles_in[0].at[r])
            if with_branch:
                x = x + row.load(tiles_in[1].at[r]) * gate
                row.store(tiles_out[0].at[r], x)
            mean = jnp.sum(x) * (1.0 / width)
            centred = x - mean
            rstd = lax.rsqrt(jnp.sum(centred * centred) * (1.0 / width) + eps)
            row.store(tiles_out[-1].at[r], centred * rstd * scale1 + shift)
            stat_smem[0, j * rows + r] = mean
            stat_smem[1, j * rows + r] = rstd
        return carry

    first = p * span
    pipeline(span // rows, lambda j: _tiles(matrix_in, b, first + j * rows, rows), in_bufs,
              in_bars, lambda j: _tiles(matrix_out, b, first + j * rows, rows), out_bufs, step)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stat_smem.at[0], mean_ref.at[b, pl.ds(first, span)])
    plgpu.copy_smem_to_gmem(stat_smem.at[1], rstd_ref.at[b, pl.ds(first, span)])
    plgpu.wait_smem_to_gmem(0)


def _backward_kernel(*refs, rows: int, span: int, with_branch: bool):
    """Rows ``[p span, (p + 1) span)`` of sample ``b``. Refs: the matrices in (``x``,
    ``dh``, with a branch also ``branch``, ``dx'_out``), the vectors (``scale``, ``gate``),
    ``mean``, ``rstd``, the matrices out (``dx``, ``dbranch``), the partial sums, scratch.

    With ``n = (x' - mean) rstd`` and ``dn = dh (1 + scale)``:
    ``dx' = rstd (dn - mean_C(dn) - n mean_C(dn n)) + dx'_out``, ``dx = dx'``,
    ``dbranch = dx' gate``; this program's partial sums over rows: ``dscale = sum(dh n)``,
    ``dshift = sum(dh)``, ``dgate = sum(dx' branch)``.
    """
    n_in, n_vec, n_out = (4, 2, 2) if with_branch else (2, 1, 1)
    matrix_in, vector_refs = refs[:n_in], refs[n_in:n_in + n_vec]
    mean_ref, rstd_ref = refs[n_in + n_vec:n_in + n_vec + 2]
    matrix_out = refs[n_in + n_vec + 2:n_in + n_vec + 2 + n_out]
    partial_ref, scratch = refs[-2], refs[-1]
    vec_smem, vec_bars, stat_smem, in_bufs, in_bars, out_bufs, sum_smem = scratch
    p, b = lax.axis_index("program"), lax.axis_index("batch")
    width = matrix_in[0].shape[-1]
    row = _Row(width)
    first = p * span
    load_in_bounds(mean_ref.at[b, pl.ds(first, span)], stat_smem.at[0],
                            vec_bars.at[n_vec])
    load_in_bounds(rstd_ref.at[b, pl.ds(first, span)], stat_smem.at[1],
                            vec_bars.at[n_vec + 1])
    vectors = _load_vectors(vector_refs, vec_smem, vec_bars, b)
    scale1, gate = 1.0 + vectors[0], vectors[-1] if with_branch else None
    plgpu.barrier_wait(vec_bars.at[n_vec])
    plgpu.barrier_wait(vec_bars.at[n_vec + 1])

    def step(j, tiles_in, tiles_out, carry):
        dscale, dshift, dgate = carry
        for r in range(rows):
            x = row.load(tiles_in[0].at[r])
            if with_branch:
                branch = row.load(tiles_in[2].at[r])
                x = x + branch * gate
            rstd = stat_smem[1, j * rows + r]
            n = (x - stat_smem[0, j * rows + r]) * rstd
            dh = row.load(tiles_in[1].at[r])
            dn = dh * scale1
            mean_dn = jnp.sum(dn) * (1.0 / width)
            mean_dn_n = jnp.sum(dn * n) * (1.0 / width)
            dx = rstd * (dn - mean_dn - n * mean_dn_n)
            dscale, dshift = dscale + dh * n, dshift + dh
            if with_branch:
                dx = dx + row.load(tiles_in[3].at[r])
                row.store(tiles_out[1].at[r], dx * gate)
                dgate = dgate + dx * branch
            row.store(tiles_out[0].at[r], dx)
        return dscale, dshift, dgate

    sums = pipeline(span // rows, lambda j: _tiles(matrix_in, b, first + j * rows, rows),
                     in_bufs, in_bars, lambda j: _tiles(matrix_out, b, first + j * rows, rows),
                     out_bufs, step, (row.zeros(), row.zeros(), row.zeros()))
    for i in range(sum_smem.shape[0]):
        row.store(sum_smem.at[i], sums[i])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sum_smem, partial_ref.at[b, p])
    plgpu.wait_smem_to_gmem(0)


# --------------------------------------------------------------------------- calls

def _scratch(vectors, span: int, rows: int, matrix_in, matrix_out, extra_barriers: int = 0):
    """Shared memory of a program: the modulation vectors and their barriers (plus
    ``extra_barriers``), the span's statistics, the pipeline's input buffers and barriers
    and its output buffers."""
    width = matrix_in[0].shape[-1]
    stages = min(NUM_STAGES, span // rows)
    return [
        [plgpu.SMEM((width,), v.dtype) for v in vectors],
        plgpu.Barrier(num_barriers=len(vectors) + extra_barriers),
        plgpu.SMEM((2, span), jnp.float32),  # mean, rstd
        [plgpu.SMEM((stages, rows, width), m.dtype) for m in matrix_in],
        [plgpu.Barrier(num_barriers=stages) for _ in matrix_in],
        [plgpu.SMEM((stages, rows, width), m.dtype) for m in matrix_out],
    ]


def _call(body, out_type, scratch, grid, interpret: bool, name: str):
    return plgpu.kernel(
        lambda *refs: body(*refs[:-len(scratch)], refs[-len(scratch):]),
        out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("program", "batch"),
        interpret=plgpu.InterpretGPUParams() if interpret else None, kernel_name=name)


def _layout(batch: int, length: int, width: int, matrices) -> tuple[int, int, int]:
    """``(rows per step, programs per sample, span)`` for pipelines over ``matrices``."""
    per_row = sum(jnp.dtype(m.dtype).itemsize for m in matrices)
    programs = programs_per_sample(batch, length)
    return step_rows(width, per_row), programs, length // programs


def forward(x, branch, gate, scale, shift, *, eps: float, out_dtype, interpret: bool = False):
    """``(x' or None, h, mean [B, L], rstd [B, L])``; ``branch``/``gate`` None: no add.

    ``x [B, L, C]``, ``branch [B, L, C]``, ``gate``/``scale``/``shift [B, C]``; ``x'`` in
    ``x``'s dtype, ``h`` in ``out_dtype``. The shape must pass ``supports``.
    """
    batch, length, width = x.shape
    with_branch = branch is not None
    h_type = jax.ShapeDtypeStruct(x.shape, out_dtype)
    stat_type = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    if with_branch:
        matrix_in, vectors = (x, branch), (gate, scale, shift)
        matrix_out = (jax.ShapeDtypeStruct(x.shape, x.dtype), h_type)
    else:
        matrix_in, vectors, matrix_out = (x,), (scale, shift), (h_type,)
    rows, programs, span = _layout(batch, length, width, matrix_in + matrix_out)
    scratch = _scratch(vectors, span, rows, matrix_in, matrix_out)
    kernel = functools.partial(_forward_kernel, eps=eps, rows=rows, span=span,
                               with_branch=with_branch)
    outs = _call(kernel, (*matrix_out, stat_type, stat_type), scratch, (programs, batch),
                 interpret, FORWARD_KERNEL_NAME)(*matrix_in, *vectors)
    return tuple(outs) if with_branch else (None, *outs)


def backward(x, branch, gate, scale, mean, rstd, dh, dx_out, *, interpret: bool = False):
    """Gradients of ``forward``: ``(dx, dbranch, dgate, dscale, dshift)`` (the branch terms
    None without a branch); ``dgate`` in ``gate``'s dtype, ``dscale``/``dshift`` float32
    ``[B, C]``."""
    batch, length, width = x.shape
    with_branch = branch is not None
    dx_type = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if with_branch:
        matrix_in, vectors = (x, dh, branch, dx_out), (scale, gate)
        matrix_out = (dx_type, jax.ShapeDtypeStruct(branch.shape, branch.dtype))
    else:
        matrix_in, vectors, matrix_out = (x, dh), (scale,), (dx_type,)
    rows, programs, span = _layout(batch, length, width, matrix_in + matrix_out)
    sums = 3 if with_branch else 2
    scratch = _scratch(vectors, span, rows, matrix_in, matrix_out, extra_barriers=2)
    scratch.append(plgpu.SMEM((sums, width), jnp.float32))  # the program's sums over rows
    partial_type = jax.ShapeDtypeStruct((batch, programs, sums, width), jnp.float32)
    kernel = functools.partial(_backward_kernel, rows=rows, span=span, with_branch=with_branch)
    outs = _call(kernel, (*matrix_out, partial_type), scratch, (programs, batch), interpret,
                 "hmar_adaln_bwd")(*matrix_in, *vectors, mean, rstd)
    totals = outs[-1].sum(1)  # [B, sums, C]
    if with_branch:
        return outs[0], outs[1], totals[:, 2].astype(gate.dtype), totals[:, 0], totals[:, 1]
    return outs[0], None, None, totals[:, 0], totals[:, 1]
