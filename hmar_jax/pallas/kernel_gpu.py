"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering.

Every query row i may attend the keys ``[row_start[i], row_end[i])`` (block-diagonal:
its own scale; block-causal: everything up to the end of its scale). Tiles are planned
on the host (``plan_tiles``): query rows with identical ranges (one scale) are cut into
tiles of at most ``block_q`` rows, and consecutive small scales share one tile. A tile
visits only the keys ``[min row_start, max row_end)`` of its rows, in steps of
``block_k`` starting at that range's first key, so no key tile outside the allowed
blocks is ever loaded. Steps that every row of the tile may attend entirely run without
the element mask; only the rest (a scale's last partial step, tiles that mix scales)
apply it. The backward pass mirrors this with per-key query ranges
``[col_start[j], col_end[j])`` for dK/dV and the row ranges for dQ.

Arrays stay in the model's ``[B, L, N, K]`` layout (no transposes, no padding): the
kernels index one head's rows with a stride and use masked loads and stores at the
sequence end. ``forward_packed`` reads q, k and v as three strided views of HMAR's packed
projection ``[B, L, 3, N, K]`` and prepares each tile as it is loaded (bias, float32 L2
normalisation, per-head temperature on q), so the model never writes q, k, v out in the forward pass. The backward kernels read q, k
and v prepared once by XLA: preparing every loaded tile again there costs more than the
write it saves, since each q or k tile meets many tiles.
Matmuls take the input dtype (bf16/fp16; fp32 runs at full IEEE precision) and
accumulate in fp32; the softmax runs in base 2 with fp32 statistics and
the saved log-sum-exp is natural-log ``[B, N, Lq]`` float32.

Dimension letters: B batch, Lq/Lk query/key length, N heads, K head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hmar_jax.pallas.block_sparse import row_spans
from hmar_jax.pallas.reference import l2_normalize
from hmar_jax.pallas.triton_util import compiler_params, load_rows

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def _ranges_slice(ref, start, size, valid, fill):
    return plgpu.load(ref.at[pl.ds(start, size)], mask=valid, other=fill)


PLAN_WIDTH = 8  # int32 fields per planned tile (padded for a power-of-two block)


def plan_tiles(range_start: np.ndarray, range_end: np.ndarray, block_rows: int,
               block_cols: int) -> np.ndarray:
    """Host-side tile plan for one side of an attention call.

    Args:
      range_start, range_end: int ``[R]``; row r attends columns ``[start[r], end[r])``.
      block_rows: most rows per tile.
      block_cols: column step.

    Returns:
      int32 ``[T, PLAN_WIDTH]``, per tile: first row, end row, first column, number of
      unmasked column steps, total column steps, end column (then zeros).
    """
    range_start, range_end = np.asarray(range_start), np.asarray(range_end)
    spans = row_spans(range_start, range_end, lambda first: block_rows)
    plan = np.zeros((len(spans), PLAN_WIDTH), np.int32)
    for i, (r0, r1) in enumerate(spans):
        lo, hi = int(range_start[r0:r1].min()), int(range_end[r0:r1].max())
        total = max(0, -(-(hi - lo) // block_cols))
        full = 0
        if int(range_start[r0:r1].max()) == lo:
            full = max(0, int(range_end[r0:r1].min()) - lo) // block_cols
        plan[i, :6] = (r0, r1, lo, min(full, total), total, hi)
    return plan


def _tile_loop(plan_ref, block: int, body, init):
    """Runs ``body(start, masked, carry)`` over a planned tile's column steps."""
    lo, num_full, num_total = plan_ref[2], plan_ref[3], plan_ref[4]
    carry = jax.lax.fori_loop(0, num_full, lambda j, c: body(lo + j * block, False, c), init)
    return jax.lax.fori_loop(num_full, num_total, lambda j, c: body(lo + j * block, True, c), carry)


def _forward_kernel(plan_ref, row_start_ref, row_end_ref, q_ref, k_ref, v_ref, *refs,
                    block_q: int, block_k: int, scale: float, prologue: bool):
    """With ``prologue`` the refs after v are the q/k/v bias rows ``[K]`` and the head's
    temperature, applied to each loaded tile as ``reference.hmar_qkv`` does."""
    if prologue:
        q_bias_ref, k_bias_ref, v_bias_ref, temperature_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    first, hi = plan_ref[0], plan_ref[5]
    q_idx = first + jnp.arange(block_q)
    q_valid = q_idx < plan_ref[1]
    row_start = _ranges_slice(row_start_ref, first, block_q, q_valid, 2 ** 30)
    row_end = _ranges_slice(row_end_ref, first, block_q, q_valid, 0)
    q = load_rows(q_ref, first, block_q, q_valid)
    head_dim = q.shape[-1]
    if prologue:
        temperature = temperature_ref[0]
        q = (l2_normalize(q + q_bias_ref[...][None, :]) * temperature).astype(q.dtype)
        k_bias, v_bias = k_bias_ref[...][None, :], v_bias_ref[...][None, :]

    def body(start, masked, carry):
        acc, m, l = carry
        k_idx = start + jnp.arange(block_k)
        k_valid = k_idx < hi
        k = load_rows(k_ref, start, block_k, k_valid)
        v = load_rows(v_ref, start, block_k, k_valid)
        if prologue:
            k = l2_normalize(k + k_bias).astype(v.dtype)
            v = v + v_bias
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [bq, bk], base 2
        if masked:
            allowed = (k_idx[None, :] >= row_start[:, None]) & (k_idx[None, :] < row_end[:, None])
            s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key yet
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, l = _tile_loop(plan_ref, block_k, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    plgpu.store(o_ref.at[pl.ds(first, block_q), :], (acc / l_safe[:, None]).astype(o_ref.dtype),
                mask=q_valid[:, None])
    plgpu.store(lse_ref.at[pl.ds(first, block_q)], (m_safe + jnp.log2(l_safe)) * LN_2, mask=q_valid)


def _dkdv_kernel(plan_ref, col_start_ref, col_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, block_q: int, block_k: int, scale: float,
                 sm_scale: float):
    first, hi = plan_ref[0], plan_ref[5]
    k_idx = first + jnp.arange(block_k)
    k_valid = k_idx < plan_ref[1]
    col_start = _ranges_slice(col_start_ref, first, block_k, k_valid, 2 ** 30)
    col_end = _ranges_slice(col_end_ref, first, block_k, k_valid, 0)
    k = load_rows(k_ref, first, block_k, k_valid)
    v = load_rows(v_ref, first, block_k, k_valid)

    def body(start, masked, carry):
        dk, dv = carry
        q_idx = start + jnp.arange(block_q)
        q_valid = q_idx < hi
        q = load_rows(q_ref, start, block_q, q_valid)
        do = load_rows(do_ref, start, block_q, q_valid)
        lse = _ranges_slice(lse_ref, start, block_q, q_valid, 0.0) * LOG2_E
        delta = _ranges_slice(delta_ref, start, block_q, q_valid, 0.0)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [bq, bk]
        p = jnp.exp2(s - lse[:, None])
        if masked:
            allowed = (q_idx[:, None] >= col_start[None, :]) & (q_idx[:, None] < col_end[None, :])
            p = jnp.where(allowed, p, 0.0)
        dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
    dk, dv = _tile_loop(plan_ref, block_q, body, (zeros, zeros))
    plgpu.store(dk_ref.at[pl.ds(first, block_k), :], (dk * sm_scale).astype(dk_ref.dtype),
                mask=k_valid[:, None])
    plgpu.store(dv_ref.at[pl.ds(first, block_k), :], dv.astype(dv_ref.dtype), mask=k_valid[:, None])


def _dq_kernel(plan_ref, row_start_ref, row_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, block_q: int, block_k: int, scale: float, sm_scale: float):
    first, hi = plan_ref[0], plan_ref[5]
    q_idx = first + jnp.arange(block_q)
    q_valid = q_idx < plan_ref[1]
    row_start = _ranges_slice(row_start_ref, first, block_q, q_valid, 2 ** 30)
    row_end = _ranges_slice(row_end_ref, first, block_q, q_valid, 0)
    q = load_rows(q_ref, first, block_q, q_valid)
    do = load_rows(do_ref, first, block_q, q_valid)
    lse = _ranges_slice(lse_ref, first, block_q, q_valid, 0.0) * LOG2_E
    delta = _ranges_slice(delta_ref, first, block_q, q_valid, 0.0)

    def body(start, masked, dq):
        k_idx = start + jnp.arange(block_k)
        k_valid = k_idx < hi
        k = load_rows(k_ref, start, block_k, k_valid)
        v = load_rows(v_ref, start, block_k, k_valid)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        p = jnp.exp2(s - lse[:, None])
        if masked:
            allowed = (k_idx[None, :] >= row_start[:, None]) & (k_idx[None, :] < row_end[:, None])
            p = jnp.where(allowed, p, 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _tile_loop(plan_ref, block_k, body, jnp.zeros((block_q, q.shape[-1]), jnp.float32))
    plgpu.store(dq_ref.at[pl.ds(first, block_q), :], (dq * sm_scale).astype(dq_ref.dtype),
                mask=q_valid[:, None])


def _head_spec(length: int, head_dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, length, None, head_dim), lambda t, b, h: (b, 0, h, 0))


def _vector_spec(length: int) -> pl.BlockSpec:
    return pl.BlockSpec((length,), lambda t, b, h: (0,))


def _plan_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None, PLAN_WIDTH), lambda t, b, h: (t, 0))


def _stats_spec(length: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, length), lambda t, b, h: (b, h, 0))


def _backward_in_specs(len_q: int, len_k: int, head_dim: int) -> list:
    """q, k, v, do, lse, delta (both backward kernels, unpacked inputs)."""
    return [_head_spec(len_q, head_dim), _head_spec(len_k, head_dim), _head_spec(len_k, head_dim),
            _head_spec(len_q, head_dim), _stats_spec(len_q), _stats_spec(len_q)]


def _backward_call(over_keys: bool, starts: np.ndarray, ends: np.ndarray, inputs, in_specs,
                   outputs: list, *, sm_scale: float, block_q: int = 64, block_k: int = 64,
                   num_warps: int = 4, num_stages: int = 2,
                   interpret: bool = False) -> list[jax.Array]:
    """One backward kernel over planned tiles: ``over_keys`` the dK/dV kernel (a program
    per key tile, ``starts``/``ends`` the col ranges ``[Lk]``), else the dQ kernel (per
    query tile, the row ranges ``[Lq]``). ``inputs``/``in_specs`` follow the plan and the
    two range vectors; ``outputs``: the ``[B, L, N, K]`` results' shapes."""
    kernel, name = ((_dkdv_kernel, "hmar_block_sparse_attention_dkdv") if over_keys
                    else (_dq_kernel, "hmar_block_sparse_attention_dq"))
    plan = plan_tiles(starts, ends, *((block_k, block_q) if over_keys else (block_q, block_k)))
    batch, length, heads, head_dim = outputs[0].shape
    return pl.pallas_call(
        functools.partial(kernel, block_q=block_q, block_k=block_k, scale=sm_scale * LOG2_E,
                          sm_scale=sm_scale),
        grid=(len(plan), batch, heads),
        in_specs=[_plan_spec(), _vector_spec(len(starts)), _vector_spec(len(starts)), *in_specs],
        out_specs=[_head_spec(length, head_dim)] * len(outputs), out_shape=list(outputs),
        compiler_params=compiler_params(num_warps, num_stages), interpret=interpret, name=name,
    )(jnp.asarray(plan), *_int32(starts, ends), *inputs)


def _forward_call(plan, row_start, row_end, inputs, in_specs, out_shape, *, prologue: bool,
                  sm_scale: float, block_q: int, block_k: int, num_warps: int, num_stages: int,
                  interpret: bool):
    """The forward ``pallas_call`` over ``grid (tiles, B, N)``; ``inputs`` after the ranges."""
    b, len_q, heads, head_dim = out_shape.shape
    kernel = functools.partial(_forward_kernel, block_q=block_q, block_k=block_k,
                               scale=sm_scale * LOG2_E, prologue=prologue)
    return pl.pallas_call(
        kernel, grid=(len(plan), b, heads),
        in_specs=[_plan_spec(), _vector_spec(len_q), _vector_spec(len_q), *in_specs],
        out_specs=[_head_spec(len_q, head_dim), _stats_spec(len_q)],
        out_shape=[out_shape, jax.ShapeDtypeStruct((b, heads, len_q), jnp.float32)],
        compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
        name="hmar_block_sparse_attention_fwd",
    )(jnp.asarray(plan), *_int32(row_start, row_end), *inputs)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, row_start: np.ndarray, row_end: np.ndarray,
            *, sm_scale: float = 1.0, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
            num_stages: int = 2, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward.

    Args:
      q: ``[B, Lq, N, K]``; k, v: ``[B, Lk, N, K]`` (same dtype).
      row_start, row_end: host int ``[Lq]``; query i attends keys ``[row_start[i], row_end[i])``.
      sm_scale: logit multiplier.
      block_q, block_k: tile sizes (powers of two, >= 16).

    Returns:
      ``(o [B, Lq, N, K] in q.dtype, lse [B, N, Lq] float32)``.
    """
    len_q, len_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    plan = plan_tiles(row_start, row_end, block_q, block_k)
    specs = [_head_spec(len_q, head_dim), _head_spec(len_k, head_dim), _head_spec(len_k, head_dim)]
    return _forward_call(plan, row_start, row_end, (q, k, v), specs,
                         jax.ShapeDtypeStruct(q.shape, q.dtype), prologue=False,
                         sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                         num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _packed_specs(length: int, head_dim: int) -> tuple[list, list]:
    """BlockSpecs (grid ``(tiles, B, N)``) of q, k, v as strided views of
    ``qkv [B, L, 3, N, K]``, and of their bias rows and the temperature's ``[N, 8]`` rows."""
    def packed(part):
        return pl.BlockSpec((None, length, None, None, head_dim),
                            lambda t, b, h: (b, 0, part, h, 0))

    def bias(part):
        return pl.BlockSpec((None, None, head_dim), lambda t, b, h: (part, h, 0))

    return ([packed(0), packed(1), packed(2)],
            [bias(0), bias(1), bias(2), pl.BlockSpec((None, PLAN_WIDTH), lambda t, b, h: (h, 0))])


def _prologue_inputs(qkv_bias: jax.Array, temperature: jax.Array) -> tuple:
    """The arrays behind ``_packed_specs``' prologue specs: the bias three times (one view
    per part) and the temperature as ``[N, 8]`` rows (a power-of-two block per head)."""
    rows = jnp.broadcast_to(temperature.astype(jnp.float32)[:, None],
                            (temperature.shape[0], PLAN_WIDTH))
    return qkv_bias, qkv_bias, qkv_bias, rows


def forward_packed(qkv: jax.Array, qkv_bias: jax.Array, temperature: jax.Array,
                   row_start: np.ndarray, row_end: np.ndarray, *, sm_scale: float = 1.0,
                   block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                   num_stages: int = 2, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Self-attention forward straight from HMAR's packed projection, with the prologue
    of ``reference.hmar_qkv`` (bias, L2 normalisation of q and k in float32, per-head
    temperature on q) applied to every tile as it is loaded, so that q, k and v are
    never written out.

    Args:
      qkv: ``[B, L, 3, N, K]``.
      qkv_bias: ``[3, N, K]`` in qkv's dtype.
      temperature: float32 ``[N]``.
      row_start, row_end, sm_scale, block sizes: as ``forward``.

    Returns:
      ``(o [B, L, N, K] in qkv.dtype, lse [B, N, L] float32)``.
    """
    batch, length, _, heads, head_dim = qkv.shape
    plan = plan_tiles(row_start, row_end, block_q, block_k)
    qkv_specs, prologue_specs = _packed_specs(length, head_dim)
    specs = [*qkv_specs, *prologue_specs]
    inputs = (qkv, qkv, qkv, *_prologue_inputs(qkv_bias, temperature))
    return _forward_call(plan, row_start, row_end, inputs, specs,
                         jax.ShapeDtypeStruct((batch, length, heads, head_dim), qkv.dtype),
                         prologue=True, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                         num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def backward_dkdv(q, k, v, do, lse, delta, col_start: np.ndarray, col_end: np.ndarray, *,
                  sm_scale: float = 1.0, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                  num_stages: int = 2, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """dK, dV: one program per planned key tile, looping over the queries that attend it.

    ``delta [B, N, Lq]`` is ``sum(o * do, -1)``; ``col_start``/``col_end`` (host int ``[Lk]``)
    give, per key j, the queries ``[col_start[j], col_end[j])`` that attend it.
    """
    dk, dv = _backward_call(
        True, col_start, col_end, (q, k, v, do, lse, delta),
        _backward_in_specs(q.shape[1], k.shape[1], q.shape[-1]),
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        sm_scale=sm_scale, block_q=block_q, block_k=block_k,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return dk, dv


def backward_dq(q, k, v, do, lse, delta, row_start: np.ndarray, row_end: np.ndarray, *,
                sm_scale: float = 1.0, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """dQ: one program per planned query tile, looping over its key steps like the forward."""
    (dq,) = _backward_call(
        False, row_start, row_end, (q, k, v, do, lse, delta),
        _backward_in_specs(q.shape[1], k.shape[1], q.shape[-1]),
        [jax.ShapeDtypeStruct(q.shape, q.dtype)],
        sm_scale=sm_scale, block_q=block_q, block_k=block_k,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    return dq


def _int32(*arrays) -> list[jax.Array]:
    return [jnp.asarray(np.asarray(a, np.int32)) for a in arrays]


def visited_tiles(row_start: np.ndarray, row_end: np.ndarray, block_q: int, block_k: int) -> int:
    """Number of (query tile, key step) pairs the forward visits (for benchmarks/tests)."""
    return int(plan_tiles(row_start, row_end, block_q, block_k)[:, 4].sum())
