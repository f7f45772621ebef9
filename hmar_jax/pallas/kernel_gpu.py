"""Block-sparse flash attention for GPUs: Pallas with the Triton lowering.

Every query row i may attend the keys ``[row_start[i], row_end[i])`` (block-diagonal:
its own scale; block-causal: everything up to the end of its scale). A query tile of
``block_q`` rows therefore only visits the keys ``[min row_start, max row_end)`` of its
rows, in tiles of ``block_k``; every other key tile is never loaded. Scale boundaries
need not align with tiles: tile starts follow the ranges and a per-element mask handles
partial tiles. The backward pass mirrors this with per-key query ranges
``[col_start[j], col_end[j])`` for dK/dV and the row ranges for dQ.

Arrays stay in the model's ``[B, L, N, K]`` layout (no transposes, no padding): the
kernels index one head's rows with a stride and use masked loads and stores at the
sequence end. Matmuls take the input dtype (bf16/fp16; fp32 runs at full IEEE
precision) and accumulate in fp32; the softmax runs in base 2 with fp32 statistics and
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

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def _ranges_slice(ref, start, size, valid, fill):
    return plgpu.load(ref.at[pl.ds(start, size)], mask=valid, other=fill)


def _rows(ref, start, size, valid):
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=valid[:, None], other=0.0)


def _tile_loop(row_start, row_end, block: int, body, init):
    """Runs ``body(start, masked, carry)`` over the tiles of ``[min row_start, max row_end)``.

    Tiles that every row may attend entirely (all rows share one start and the tile ends
    before the smallest row end) run first with ``masked=False`` and skip the element
    mask; the rest run with ``masked=True``.
    """
    lo, hi = jnp.min(row_start), jnp.max(row_end)
    uniform = jnp.max(row_start) == lo
    num_full = jnp.where(uniform, jnp.maximum(jnp.min(row_end) - lo, 0) // block, 0)
    carry = jax.lax.fori_loop(0, num_full, lambda j, c: body(lo + j * block, False, c), init)
    rest = lo + num_full * block
    return jax.lax.fori_loop(0, (hi - rest + block - 1) // block,
                             lambda j, c: body(rest + j * block, True, c), carry)


def _forward_kernel(row_start_ref, row_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    len_q: int, block_q: int, block_k: int, scale: float):
    first = pl.program_id(0) * block_q
    q_idx = first + jnp.arange(block_q)
    q_valid = q_idx < len_q
    row_start = _ranges_slice(row_start_ref, first, block_q, q_valid, 2 ** 30)
    row_end = _ranges_slice(row_end_ref, first, block_q, q_valid, 0)
    q = _rows(q_ref, first, block_q, q_valid)
    head_dim = q.shape[-1]
    hi = jnp.max(row_end)

    def body(start, masked, carry):
        acc, m, l = carry
        k_idx = start + jnp.arange(block_k)
        k_valid = k_idx < hi
        k = _rows(k_ref, start, block_k, k_valid)
        v = _rows(v_ref, start, block_k, k_valid)
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
    acc, m, l = _tile_loop(row_start, row_end, block_k, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    plgpu.store(o_ref.at[pl.ds(first, block_q), :], (acc / l_safe[:, None]).astype(o_ref.dtype),
                mask=q_valid[:, None])
    plgpu.store(lse_ref.at[pl.ds(first, block_q)], (m_safe + jnp.log2(l_safe)) * LN_2, mask=q_valid)


def _dkdv_kernel(col_start_ref, col_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, len_k: int, block_q: int, block_k: int, scale: float,
                 sm_scale: float):
    first = pl.program_id(0) * block_k
    k_idx = first + jnp.arange(block_k)
    k_valid = k_idx < len_k
    col_start = _ranges_slice(col_start_ref, first, block_k, k_valid, 2 ** 30)
    col_end = _ranges_slice(col_end_ref, first, block_k, k_valid, 0)
    hi = jnp.max(col_end)
    k = _rows(k_ref, first, block_k, k_valid)
    v = _rows(v_ref, first, block_k, k_valid)

    def body(start, masked, carry):
        dk, dv = carry
        q_idx = start + jnp.arange(block_q)
        q_valid = q_idx < hi
        q = _rows(q_ref, start, block_q, q_valid)
        do = _rows(do_ref, start, block_q, q_valid)
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
    dk, dv = _tile_loop(col_start, col_end, block_q, body, (zeros, zeros))
    plgpu.store(dk_ref.at[pl.ds(first, block_k), :], (dk * sm_scale).astype(dk_ref.dtype),
                mask=k_valid[:, None])
    plgpu.store(dv_ref.at[pl.ds(first, block_k), :], dv.astype(dv_ref.dtype), mask=k_valid[:, None])


def _dq_kernel(row_start_ref, row_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, len_q: int, block_q: int, block_k: int, scale: float, sm_scale: float):
    first = pl.program_id(0) * block_q
    q_idx = first + jnp.arange(block_q)
    q_valid = q_idx < len_q
    row_start = _ranges_slice(row_start_ref, first, block_q, q_valid, 2 ** 30)
    row_end = _ranges_slice(row_end_ref, first, block_q, q_valid, 0)
    hi = jnp.max(row_end)
    q = _rows(q_ref, first, block_q, q_valid)
    do = _rows(do_ref, first, block_q, q_valid)
    lse = _ranges_slice(lse_ref, first, block_q, q_valid, 0.0) * LOG2_E
    delta = _ranges_slice(delta_ref, first, block_q, q_valid, 0.0)

    def body(start, masked, dq):
        k_idx = start + jnp.arange(block_k)
        k_valid = k_idx < hi
        k = _rows(k_ref, start, block_k, k_valid)
        v = _rows(v_ref, start, block_k, k_valid)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        p = jnp.exp2(s - lse[:, None])
        if masked:
            allowed = (k_idx[None, :] >= row_start[:, None]) & (k_idx[None, :] < row_end[:, None])
            p = jnp.where(allowed, p, 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = _tile_loop(row_start, row_end, block_k, body, jnp.zeros((block_q, q.shape[-1]), jnp.float32))
    plgpu.store(dq_ref.at[pl.ds(first, block_q), :], (dq * sm_scale).astype(dq_ref.dtype),
                mask=q_valid[:, None])


def _head_spec(length: int, head_dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, length, None, head_dim), lambda t, b, h: (b, 0, h, 0))


def _vector_spec(length: int) -> pl.BlockSpec:
    return pl.BlockSpec((length,), lambda t, b, h: (0,))


def _stats_spec(length: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, length), lambda t, b, h: (b, h, 0))


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def forward(q: jax.Array, k: jax.Array, v: jax.Array, row_start: jax.Array, row_end: jax.Array, *,
            sm_scale: float = 1.0, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
            num_stages: int = 2, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward.

    Args:
      q: ``[B, Lq, N, K]``; k, v: ``[B, Lk, N, K]`` (same dtype).
      row_start, row_end: int32 ``[Lq]``; query i attends keys ``[row_start[i], row_end[i])``.
      sm_scale: logit multiplier.
      block_q, block_k: tile sizes (powers of two, >= 16).

    Returns:
      ``(o [B, Lq, N, K] in q.dtype, lse [B, N, Lq] float32)``.
    """
    b, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    kernel = functools.partial(_forward_kernel, len_q=len_q, block_q=block_q, block_k=block_k,
                               scale=sm_scale * LOG2_E)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(len_q, block_q), b, heads),
        in_specs=[_vector_spec(len_q), _vector_spec(len_q), _head_spec(len_q, head_dim),
                  _head_spec(len_k, head_dim), _head_spec(len_k, head_dim)],
        out_specs=[_head_spec(len_q, head_dim), _stats_spec(len_q)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, heads, len_q), jnp.float32)],
        compiler_params=_params(num_warps, num_stages), interpret=interpret,
        name="hmar_block_sparse_attention_fwd",
    )(row_start, row_end, q, k, v)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def backward_dkdv(q, k, v, do, lse, delta, col_start, col_end, *, sm_scale: float = 1.0,
                  block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """dK, dV: one program per key tile, looping over the query tiles that attend it.

    ``delta [B, N, Lq]`` is ``sum(o * do, -1)``; ``col_start``/``col_end`` (int32 ``[Lk]``)
    give, per key j, the queries ``[col_start[j], col_end[j])`` that attend it.
    """
    b, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, len_k=len_k, block_q=block_q, block_k=block_k,
                          scale=sm_scale * LOG2_E, sm_scale=sm_scale),
        grid=(pl.cdiv(len_k, block_k), b, heads),
        in_specs=[_vector_spec(len_k), _vector_spec(len_k), _head_spec(len_q, head_dim),
                  _head_spec(len_k, head_dim), _head_spec(len_k, head_dim),
                  _head_spec(len_q, head_dim), _stats_spec(len_q), _stats_spec(len_q)],
        out_specs=[_head_spec(len_k, head_dim), _head_spec(len_k, head_dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(num_warps, num_stages), interpret=interpret,
        name="hmar_block_sparse_attention_dkdv",
    )(col_start, col_end, q, k, v, do, lse, delta)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def backward_dq(q, k, v, do, lse, delta, row_start, row_end, *, sm_scale: float = 1.0,
                block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                interpret: bool = False) -> jax.Array:
    """dQ: one program per query tile, looping over its key tiles like the forward."""
    b, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    return pl.pallas_call(
        functools.partial(_dq_kernel, len_q=len_q, block_q=block_q, block_k=block_k,
                          scale=sm_scale * LOG2_E, sm_scale=sm_scale),
        grid=(pl.cdiv(len_q, block_q), b, heads),
        in_specs=[_vector_spec(len_q), _vector_spec(len_q), _head_spec(len_q, head_dim),
                  _head_spec(len_k, head_dim), _head_spec(len_k, head_dim),
                  _head_spec(len_q, head_dim), _stats_spec(len_q), _stats_spec(len_q)],
        out_specs=_head_spec(len_q, head_dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(num_warps, num_stages), interpret=interpret,
        name="hmar_block_sparse_attention_dq",
    )(row_start, row_end, q, k, v, do, lse, delta)


def softmax_delta(o: jax.Array, do: jax.Array) -> jax.Array:
    """``sum(o * do, -1)`` as ``[B, N, Lq]`` float32 (the backward's row correction)."""
    return jnp.einsum("blnk,blnk->bnl", o.astype(jnp.float32), do.astype(jnp.float32))


def visited_tiles(row_start: np.ndarray, row_end: np.ndarray, block_q: int, block_k: int) -> int:
    """Number of (query tile, key tile) pairs the forward visits (for benchmarks/tests)."""
    total = 0
    for first in range(0, len(row_start), block_q):
        lo, hi = row_start[first:first + block_q].min(), row_end[first:first + block_q].max()
        total += max(0, -(-(hi - lo) // block_k))
    return int(total)
