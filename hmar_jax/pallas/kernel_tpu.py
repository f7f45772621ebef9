"""Block-sparse flash attention for TPUs: Pallas with the Mosaic TPU lowering.

Every query row i may attend the keys ``[row_start[i], row_end[i])`` (block-diagonal:
its own scale; block-causal: everything up to the end of its scale). Equivalently key j
is attended by the queries ``[col_start[j], col_end[j])``.

TPU grids are static, so sparsity is planned on the host (numpy) before the kernels
are traced: ``tile_schedule`` gives every query tile t the contiguous run of key tiles
``[first[t], first[t] + count[t])`` that holds any of its rows' keys. The grid is
``(B, N, query tiles, width)`` with ``width = max(count)``; the tables travel by scalar
prefetch (SMEM). Step ``j`` of tile ``t`` maps to key tile ``first[t] + min(j, count[t] - 1)``,
so the steps past ``count[t]`` repeat the last block index (Mosaic then skips the DMA)
and their compute is gated off with ``pl.when``. Inside a tile an element mask built
from the row ranges handles scale boundaries that do not align with tiles. dK/dV run
the transposed schedule (per key tile, the query tiles from ``col_start``/``col_end``);
dQ reuses the forward schedule.

Layout: the wrappers transpose to ``[B, N, L, K]`` and zero-pad the query and key axes
to whole tiles. Padded query rows get the empty range ``[0, 0)`` and padded keys are
never inside a real row's range, so padding never contributes; padded rows produce
finite values that are sliced off before returning. Matmuls take the input dtype (fp16
is widened to fp32) and accumulate in fp32; the softmax statistics are fp32, kept
lane-replicated as ``[rows, 128]`` (the vreg-friendly shape), and the saved log-sum-exp
is natural-log ``[B, N, Lq]`` float32. The backward's ``delta = rowsum(o * dO)`` is
plain jnp.

On a real TPU the tiles must be multiples of 128 (checked); interpret mode (CPU tests)
accepts any multiple of 8.

Dimension letters: B batch, Lq/Lk query/key length, N heads, K head dim, T tiles.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_LANES = 128
# Finite "minus infinity" for masked logits: exp(MASK_VALUE - x) underflows to 0 and
# no inf - inf can appear.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


class TileSchedule(NamedTuple):
    """Host-side tile plan of one axis against the other (numpy int32 ``[T]`` each).

    Attributes:
      first: first visited tile of the other axis for each tile of this axis.
      count: number of consecutive tiles visited from ``first`` (0: none).
    """

    first: np.ndarray
    count: np.ndarray

    @property
    def width(self) -> int:
        """Grid extent of the inner loop, ``max(count)`` (at least 1)."""
        return max(1, int(self.count.max(initial=0)))

    @property
    def visited(self) -> int:
        """Number of (tile, other tile) pairs the kernels compute."""
        return int(self.count.sum())


def tile_schedule(row_start, row_end, length: int, block_q: int, block_k: int) -> TileSchedule:
    """Key tiles each query tile must visit.

    For query tile t (rows ``[t * block_q, (t + 1) * block_q)``), the visited key tiles are
    the hull of the tiles touched by the ranges ``[row_start[i], row_end[i])`` of its rows;
    empty ranges are ignored. The hull is exact (no fully masked tile is visited) when the
    union of a tile's ranges is contiguous, which holds for the block-diagonal and
    block-causal patterns. Called with per-key ranges ``col_start, col_end`` and the
    block sizes swapped, it gives the query tiles of each key tile (dK/dV).

    Args:
      row_start, row_end: int ``[Lq]``; row i attends ``[row_start[i], row_end[i])``.
      length: key length Lk (ranges must lie in ``[0, Lk]``).
      block_q: rows per tile of the scheduled axis.
      block_k: columns per tile of the visited axis.

    Returns:
      A ``TileSchedule`` over ``ceil(Lq / block_q)`` tiles.
    """
    start = np.asarray(row_start, np.int64)
    end = np.asarray(row_end, np.int64)
    if start.ndim != 1 or start.shape != end.shape:
        raise ValueError(f"Range tables must be 1-D and alike, got {start.shape} and {end.shape}.")
    nonempty = end > start
    if np.any(nonempty & ((start < 0) | (end > length))):
        raise ValueError(f"Attention ranges must lie in [0, {length}].")
    num_tiles = -(-start.shape[0] // block_q)
    pad = num_tiles * block_q - start.shape[0]
    nonempty = np.pad(nonempty, (0, pad)).reshape(num_tiles, block_q)
    lo = np.where(nonempty, np.pad(start, (0, pad)).reshape(num_tiles, block_q), length).min(1)
    hi = np.where(nonempty, np.pad(end, (0, pad)).reshape(num_tiles, block_q), 0).max(1)
    any_key = nonempty.any(1)
    first = np.where(any_key, lo // block_k, 0)
    count = np.where(any_key, -(-hi // block_k) - first, 0)
    return TileSchedule(first.astype(np.int32), count.astype(np.int32))


def _check_ranges(row_start, row_end, len_q: int, len_k: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        start, end = np.asarray(row_start), np.asarray(row_end)
    except jax.errors.TracerArrayConversionError as e:
        raise TypeError("row/col ranges must be static numpy arrays (they plan the grid on "
                        "the host), not traced values.") from e
    if start.shape != (len_q,) or end.shape != (len_q,):
        raise ValueError(f"Range tables must have shape ({len_q},), got {start.shape} and "
                         f"{end.shape}.")
    start, end = start.astype(np.int32), end.astype(np.int32)
    if np.any((end > start) & ((start < 0) | (end > len_k))):
        raise ValueError(f"Attention ranges must lie in [0, {len_k}].")
    return np.where(end > start, start, 0), np.where(end > start, end, 0)


def _check_blocks(block_q: int, block_k: int, interpret: Any) -> None:
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block <= 0 or block % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {block}.")
        if not interpret and block % NUM_LANES:
            raise ValueError(f"{name} must be a multiple of {NUM_LANES} on TPU, got {block}.")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """Matmul operand dtype: the promoted input dtype, with fp16 widened to fp32 (not
    every TPU generation has fp16 matmuls; bf16 would lose fp16's mantissa)."""
    dtype = jnp.result_type(*arrays)
    return jnp.dtype(jnp.float32) if dtype == jnp.float16 else dtype


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """``[rows, 128]`` lane-replicated values -> ``[rows, n]``."""
    reps = -(-n // NUM_LANES)
    if reps > 1:
        x = jnp.tile(x, (1, reps))
    return x if x.shape[1] == n else x[:, :n]


def _lane_table(ranges: np.ndarray, padded_len: int) -> jax.Array:
    """int32 ``[L]`` -> ``[padded_len, 128]`` (padding rows 0, i.e. the empty range)."""
    col = jnp.asarray(np.pad(ranges, (0, padded_len - ranges.shape[0])))
    return jnp.broadcast_to(col[:, None], (padded_len, NUM_LANES))


def _to_heads(x: jax.Array, padded_len: int) -> jax.Array:
    """``[B, L, N, K]`` -> ``[B, N, padded_len, K]``, zero-padded."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - x.shape[2]), (0, 0)))


def _from_heads(x: jax.Array, length: int) -> jax.Array:
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def _visited_index(t, j, first_ref, count_ref):
    """Tile index for step j of tile t; steps past the count repeat the last one."""
    return first_ref[t] + jnp.minimum(j, jnp.maximum(count_ref[t] - 1, 0))


def _in_range(idx, start_ref, end_ref, n: int):
    """Element mask ``start <= idx < end`` with per-row ranges from ``[rows, 128]`` refs."""
    return (idx >= _lanes(start_ref[...], n)) & (idx < _lanes(end_ref[...], n))


# ----------------------------------------------------------------------------- forward


def _forward_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, start_ref, end_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, sm_scale: float):
    t, j = pl.program_id(2), pl.program_id(3)
    block_q, head_dim = acc_scr.shape
    block_k = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(j < count_ref[t])
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
        if sm_scale != 1.0:
            s = s * sm_scale
        key = (first_ref[t] + j) * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        allowed = _in_range(key, start_ref, end_ref, block_k)
        s = jnp.where(allowed, s, MASK_VALUE)
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        # Rows with no allowed key so far have m_next == MASK_VALUE: the select keeps
        # their masked entries at 0 instead of exp(0).
        p = jnp.exp(jnp.where(allowed, s - _lanes(m_next, block_k), MASK_VALUE))
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        v = v_ref[...]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, head_dim) + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)  # rows without keys (padding): o = 0
        o_ref[...] = (acc_scr[...] * _lanes(1.0 / l_safe, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = m_scr[...] + jnp.log(l_safe)


def forward(q: jax.Array, k: jax.Array, v: jax.Array, *, row_start, row_end,
            sm_scale: float = 1.0, block_q: int = 128, block_k: int = 128,
            interpret: Any = False) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward.

    Args:
      q: ``[B, Lq, N, K]`` (bf16, fp16 or fp32).
      k, v: ``[B, Lk, N, K]``.
      row_start, row_end: static int ``[Lq]`` (numpy); query i attends keys
        ``[row_start[i], row_end[i])``.
      sm_scale: logit multiplier.
      block_q, block_k: tile sizes (multiples of 128 on TPU, of 8 in interpret mode).
      interpret: passed to ``pallas_call`` (True or ``pltpu.InterpretParams`` on CPU).

    Returns:
      ``(o, lse)``: o ``[B, Lq, N, K]`` in q's dtype and lse ``[B, N, Lq]`` float32, the
      natural-log log-sum-exp of ``sm_scale * q.k`` over the allowed keys.
    """
    batch, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    if k.shape != (batch, len_k, heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not match.")
    _check_blocks(block_q, block_k, interpret)
    start, end = _check_ranges(row_start, row_end, len_q, len_k)
    sched = tile_schedule(start, end, len_k, block_q, block_k)
    n_q, n_k = -(-len_q // block_q), -(-len_k // block_k)
    dtype = _compute_dtype(q, k, v)
    qh = _to_heads(q.astype(dtype), n_q * block_q)
    kh = _to_heads(k.astype(dtype), n_k * block_k)
    vh = _to_heads(v.astype(dtype), n_k * block_k)

    def q_map(b, h, t, j, first_ref, count_ref):
        return b, h, t, 0

    def kv_map(b, h, t, j, first_ref, count_ref):
        return b, h, _visited_index(t, j, first_ref, count_ref), 0

    def range_map(b, h, t, j, first_ref, count_ref):
        return t, 0

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_map)
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_map)
    range_spec = pl.BlockSpec((block_q, NUM_LANES), range_map)
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, sm_scale=float(sm_scale)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, n_q, sched.width),
            in_specs=[q_spec, kv_spec, kv_spec, range_spec, range_spec],
            out_specs=[q_spec, pl.BlockSpec((None, None, block_q, NUM_LANES), q_map)],
            scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                            pltpu.VMEM((block_q, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qh.shape, dtype),
                   jax.ShapeDtypeStruct((batch, heads, n_q * block_q, NUM_LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="hmar_block_sparse_attention_fwd",
    )(jnp.asarray(sched.first), jnp.asarray(sched.count), qh, kh, vh,
      _lane_table(start, n_q * block_q), _lane_table(end, n_q * block_q))
    return _from_heads(o, len_q).astype(q.dtype), lse[:, :, :len_q, 0]


# ---------------------------------------------------------------------------- backward


def _dq_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               start_ref, end_ref, dq_ref, acc_scr, *, sm_scale: float):
    """dQ for one query tile, looping over its key tiles; logits are ``[bq, bk]``."""
    t, j = pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(j < count_ref[t])
    def _step():
        k, v = k_ref[...], v_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32)
        if sm_scale != 1.0:
            s = s * sm_scale
        key = (first_ref[t] + j) * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        allowed = _in_range(key, start_ref, end_ref, block_k)
        lse = lse_ref[0][:, None]  # [1, bq] -> [bq, 1]
        p = jnp.exp(jnp.where(allowed, s - lse, MASK_VALUE))
        dp = lax.dot_general(do_ref[...].astype(v.dtype), v, _NT,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[0][:, None])
        acc_scr[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(first_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                start_ref, end_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, sm_scale: float):
    """dK and dV for one key tile, looping over its query tiles.

    Works on transposed logits ``[bk, bq]`` (keys on sublanes) so every matmul is a
    plain or rhs-transposed one: ``dV += P^T dO`` and ``dK += dS^T Q`` need no transpose.
    The mask uses the per-key query ranges.
    """
    c, j = pl.program_id(2), pl.program_id(3)
    block_q = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(j < count_ref[c])
    def _step():
        q, do, v = q_ref[...], do_ref[...], v_ref[...]
        st = lax.dot_general(k_ref[...], q, _NT, preferred_element_type=jnp.float32)
        if sm_scale != 1.0:
            st = st * sm_scale
        query = (first_ref[c] + j) * block_q + lax.broadcasted_iota(jnp.int32, st.shape, 1)
        allowed = _in_range(query, start_ref, end_ref, block_q)
        pt = jnp.exp(jnp.where(allowed, st - lse_ref[...], MASK_VALUE))  # [bk, bq]
        dv_scr[...] += lax.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do.astype(v.dtype), _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[...])
        dk_scr[...] += lax.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, o: jax.Array, lse: jax.Array,
             do: jax.Array, *, row_start, row_end, col_start, col_end, sm_scale: float = 1.0,
             block_q: int = 128, block_k: int = 128,
             interpret: Any = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Block-sparse attention backward.

    Args:
      q: ``[B, Lq, N, K]``; k, v: ``[B, Lk, N, K]``.
      o, lse: the outputs of ``forward``.
      do: cotangent of o, ``[B, Lq, N, K]``.
      row_start, row_end: static int ``[Lq]``, the key range of each query.
      col_start, col_end: static int ``[Lk]``, the query range of each key (the same
        mask, transposed).
      sm_scale, block_q, block_k, interpret: as in ``forward``.

    Returns:
      ``(dq, dk, dv)`` with the dtypes of q, k and v.
    """
    batch, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    if k.shape != (batch, len_k, heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"q {q.shape}, k {k.shape} and v {v.shape} do not match.")
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (batch, heads, len_q):
        raise ValueError(f"o {o.shape}, do {do.shape} or lse {lse.shape} do not match q "
                         f"{q.shape}.")
    _check_blocks(block_q, block_k, interpret)
    r_start, r_end = _check_ranges(row_start, row_end, len_q, len_k)
    c_start, c_end = _check_ranges(col_start, col_end, len_k, len_q)
    # O(L) consistency check: key j must be covered by exactly col_end - col_start rows.
    cover = np.zeros(len_k + 1, np.int64)
    np.add.at(cover, r_start, 1)
    np.add.at(cover, r_end, -1)
    if not np.array_equal(np.cumsum(cover)[:len_k], c_end - c_start):
        raise ValueError("col_start/col_end are not the transpose of row_start/row_end.")
    q_sched = tile_schedule(r_start, r_end, len_k, block_q, block_k)
    k_sched = tile_schedule(c_start, c_end, len_q, block_k, block_q)
    n_q, n_k = -(-len_q // block_q), -(-len_k // block_k)
    len_qp, len_kp = n_q * block_q, n_k * block_k

    dtype = _compute_dtype(q, k, v)
    qh = _to_heads(q.astype(dtype), len_qp)
    kh = _to_heads(k.astype(dtype), len_kp)
    vh = _to_heads(v.astype(dtype), len_kp)
    doh = _to_heads(do.astype(dtype), len_qp)
    delta = jnp.einsum("blnk,blnk->bnl", o.astype(jnp.float32), do.astype(jnp.float32))
    pad_rows = ((0, 0), (0, 0), (0, len_qp - len_q))
    # [B, N, 1, Lq]: lane vectors per query tile. Padded rows: lse 0, delta 0 (masked).
    lse_p = jnp.pad(lse.astype(jnp.float32), pad_rows)[:, :, None, :]
    delta_p = jnp.pad(delta, pad_rows)[:, :, None, :]

    # dQ: grid over (b, h, query tile, visited key tile).
    def row_map(b, h, t, j, first_ref, count_ref):
        return b, h, t, 0

    def col_map(b, h, t, j, first_ref, count_ref):
        return b, h, _visited_index(t, j, first_ref, count_ref), 0

    def stat_row_map(b, h, t, j, first_ref, count_ref):
        return b, h, 0, t

    def range_map(b, h, t, j, first_ref, count_ref):
        return t, 0

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), row_map)
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), col_map)
    stat_spec = pl.BlockSpec((None, None, 1, block_q), stat_row_map)
    range_spec = pl.BlockSpec((block_q, NUM_LANES), range_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=float(sm_scale)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, n_q, q_sched.width),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, range_spec,
                      range_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qh.shape, dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="hmar_block_sparse_attention_dq",
    )(jnp.asarray(q_sched.first), jnp.asarray(q_sched.count), qh, kh, vh, doh, lse_p, delta_p,
      _lane_table(r_start, len_qp), _lane_table(r_end, len_qp))

    # dK/dV: grid over (b, h, key tile, visited query tile).
    def own_map(b, h, c, j, first_ref, count_ref):
        return b, h, c, 0

    def visit_map(b, h, c, j, first_ref, count_ref):
        return b, h, _visited_index(c, j, first_ref, count_ref), 0

    def stat_visit_map(b, h, c, j, first_ref, count_ref):
        return b, h, 0, _visited_index(c, j, first_ref, count_ref)

    def key_range_map(b, h, c, j, first_ref, count_ref):
        return c, 0

    own_spec = pl.BlockSpec((None, None, block_k, head_dim), own_map)
    visit_spec = pl.BlockSpec((None, None, block_q, head_dim), visit_map)
    stat_spec = pl.BlockSpec((None, None, 1, block_q), stat_visit_map)
    key_range_spec = pl.BlockSpec((block_k, NUM_LANES), key_range_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=float(sm_scale)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, n_k, k_sched.width),
            in_specs=[visit_spec, own_spec, own_spec, visit_spec, stat_spec, stat_spec,
                      key_range_spec, key_range_spec],
            out_specs=[own_spec, own_spec],
            scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                            pltpu.VMEM((block_k, head_dim), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, dtype), jax.ShapeDtypeStruct(vh.shape, dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=interpret,
        name="hmar_block_sparse_attention_dkv",
    )(jnp.asarray(k_sched.first), jnp.asarray(k_sched.count), qh, kh, vh, doh, lse_p, delta_p,
      _lane_table(c_start, len_kp), _lane_table(c_end, len_kp))
    return (_from_heads(dq, len_q).astype(q.dtype), _from_heads(dk, len_k).astype(k.dtype),
            _from_heads(dv, len_k).astype(v.dtype))
