"""Mosaic TPU block-sparse attention (forward and backward) in Pallas interpret mode on CPU.

Every kernel result is compared with ``reference_attention`` (and its ``jax.vjp``)
evaluated in float32 on the same (possibly bf16) inputs. Tile sizes below 128 are only
legal in interpret mode; they make the tiny sequences span several tiles so that scale
boundaries straddle tile edges. The lowering of the real-TPU configuration (128 tiles)
is checked separately by exporting for the TPU platform.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from hmar_jax.pallas import kernel_tpu, ops
from hmar_jax.pallas.reference import reference_attention
from hmar_jax.scales import PATCH_NUMS, ScaleLayout

TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def _inputs(seed_key, shape_q, shape_k, dtype):
    """Fresh q, k, v, do for one parametrisation (seeded by its description)."""
    key = jax.random.key(zlib.crc32(repr(seed_key).encode()))
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, shape_q, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, shape_k, jnp.float32).astype(dtype)
    v = jax.random.normal(kv, shape_k, jnp.float32).astype(dtype)
    do = jax.random.normal(kd, shape_q, jnp.float32).astype(dtype)
    return q, k, v, do


def _reference(q, k, v, do, mask, sm_scale):
    """float32 o, lse [B, N, Lq] and (dq, dk, dv) of the dense-mask oracle."""
    q, k, v, do = (x.astype(jnp.float32) for x in (q, k, v, do))
    o, vjp = jax.vjp(lambda a, b, c: reference_attention(a, b, c, mask, sm_scale=sm_scale),
                     q, k, v)
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k) * sm_scale
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return o, jax.nn.logsumexp(logits, axis=-1), vjp(do)


def _assert_close(name, actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name} has non-finite values"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6)
    assert err <= tol, f"{name}: relative max error {err:.2e} > {tol:.0e}"


def _check_kernels(q, k, v, do, ranges, mask, *, sm_scale, block_q, block_k, interpret=True):
    row_start, row_end, col_start, col_end = ranges
    tiles = dict(sm_scale=sm_scale, block_q=block_q, block_k=block_k, interpret=interpret)
    o, lse = kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, **tiles)
    dq, dk, dv = kernel_tpu.backward(q, k, v, o, lse, do, row_start=row_start, row_end=row_end,
                                     col_start=col_start, col_end=col_end, **tiles)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    assert (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    ref_o, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, do, mask, sm_scale)
    tol = TOL[jnp.dtype(q.dtype).name]
    for name, actual, expected in (("o", o, ref_o), ("lse", lse, ref_lse), ("dq", dq, ref_dq),
                                   ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        _assert_close(name, actual, expected, tol)


# pattern, patch_nums, dtype, block_q, block_k, B, N, K, sm_scale
CASES = [
    ("block_diagonal", (1, 2, 3, 4, 5), "float32", 16, 16, 1, 2, 64, 0.125),
    ("block_causal", (1, 2, 3, 4, 5), "bfloat16", 16, 32, 2, 1, 128, 1.0),
    ("block_diagonal", (1, 2, 3, 5, 7), "bfloat16", 32, 16, 1, 2, 128, 2.5),
    ("block_causal", (1, 2, 3, 5, 7), "float32", 32, 32, 2, 1, 64, 0.125),
    ("block_diagonal", (1, 3, 6), "float32", 16, 32, 2, 2, 128, 1.0),
    ("block_causal", (1, 3, 6), "float16", 32, 16, 1, 1, 64, 0.7),
    ("block_diagonal", PATCH_NUMS[256], "bfloat16", 128, 128, 1, 1, 64, 1.0),
    ("block_causal", PATCH_NUMS[256], "float32", 128, 128, 1, 1, 128, 0.125),
]


@pytest.mark.parametrize("pattern, patch_nums, dtype, block_q, block_k, batch, heads, head_dim, "
                         "sm_scale", CASES)
def test_forward_backward_match_reference(pattern, patch_nums, dtype, block_q, block_k, batch,
                                          heads, head_dim, sm_scale):
    layout = ScaleLayout(patch_nums)
    shape = (batch, layout.seq_len, heads, head_dim)
    q, k, v, do = _inputs((pattern, patch_nums, dtype, block_q, block_k), shape, shape, dtype)
    ranges = (*layout.key_ranges(pattern), *layout.query_ranges(pattern))
    _check_kernels(q, k, v, do, ranges, jnp.asarray(layout.attention_mask(pattern)),
                   sm_scale=sm_scale, block_q=block_q, block_k=block_k)


def test_tpu_interpret_mode_random_parallel_order():
    """The TPU interpreter shuffles the parallel grid axes, NaN-fills fresh buffers and
    looks for races: the kernels must not depend on any of that."""
    layout = ScaleLayout((1, 3, 6))
    shape = (2, layout.seq_len, 2, 64)
    q, k, v, do = _inputs("tpu-interpret", shape, shape, "float32")
    ranges = (*layout.key_ranges("block_causal"), *layout.query_ranges("block_causal"))
    _check_kernels(q, k, v, do, ranges, jnp.asarray(layout.attention_mask("block_causal")),
                   sm_scale=0.3, block_q=16, block_k=16,
                   interpret=pltpu.InterpretParams(random_seed=7, detect_races=True))


def test_unmasked_rectangular():
    """Lq != Lk with every key legal (the ``full`` pattern of a query block vs a cache)."""
    len_q, len_k = 25, 55
    q, k, v, do = _inputs("full", (1, len_q, 2, 64), (1, len_k, 2, 64), "float32")
    ranges = (np.zeros(len_q, np.int32), np.full(len_q, len_k, np.int32),
              np.zeros(len_k, np.int32), np.full(len_k, len_q, np.int32))
    _check_kernels(q, k, v, do, ranges, None, sm_scale=0.125, block_q=16, block_k=32)


def test_custom_vjp_under_jit():
    """forward/backward as a custom_vjp, differentiated with jax.grad inside jit."""
    layout = ScaleLayout((1, 2, 3, 4, 5))
    pattern = "block_diagonal"
    row_start, row_end = layout.key_ranges(pattern)
    col_start, col_end = layout.query_ranges(pattern)
    tiles = dict(sm_scale=0.5, block_q=16, block_k=16, interpret=True)

    @jax.custom_vjp
    def attention(q, k, v):
        return kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, **tiles)[0]

    def attention_fwd(q, k, v):
        o, lse = kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, **tiles)
        return o, (q, k, v, o, lse)

    def attention_bwd(res, do):
        return kernel_tpu.backward(*res, do, row_start=row_start, row_end=row_end,
                                   col_start=col_start, col_end=col_end, **tiles)

    attention.defvjp(attention_fwd, attention_bwd)
    shape = (1, layout.seq_len, 1, 64)
    q, k, v, w = _inputs("custom_vjp", shape, shape, "float32")
    mask = jnp.asarray(layout.attention_mask(pattern))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * w)

    grads = jax.jit(jax.grad(functools.partial(loss, attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(functools.partial(
        loss, lambda a, b, c: reference_attention(a, b, c, mask, sm_scale=0.5)),
        argnums=(0, 1, 2))(q, k, v)
    for name, actual, expected in zip(("dq", "dk", "dv"), grads, ref):
        _assert_close(name, actual, expected, TOL["float32"])


def _tile_any(mask, block_q, block_k):
    """bool [Tq, Tk]: tile pairs with at least one legal element."""
    len_q, len_k = mask.shape
    n_q, n_k = -(-len_q // block_q), -(-len_k // block_k)
    padded = np.zeros((n_q * block_q, n_k * block_k), bool)
    padded[:len_q, :len_k] = mask
    return padded.reshape(n_q, block_q, n_k, block_k).any(axis=(1, 3))


def _visited(schedule, num_other):
    out = np.zeros((schedule.first.shape[0], num_other), bool)
    for t, (first, count) in enumerate(zip(schedule.first, schedule.count)):
        out[t, first:first + count] = True
    return out


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4, 5), (1, 2, 3, 5, 7), (1, 3, 6),
                                        PATCH_NUMS[256], PATCH_NUMS[512]])
@pytest.mark.parametrize("block_q, block_k", [(16, 16), (16, 32), (128, 128), (256, 128)])
def test_tile_schedule_is_exact(pattern, patch_nums, block_q, block_k):
    """Visited tile pairs are exactly those holding a legal element, in both directions."""
    layout = ScaleLayout(patch_nums)
    length = layout.seq_len
    tile_any = _tile_any(layout.attention_mask(pattern), block_q, block_k)
    rows = kernel_tpu.tile_schedule(*layout.key_ranges(pattern), length, block_q, block_k)
    np.testing.assert_array_equal(_visited(rows, tile_any.shape[1]), tile_any)
    cols = kernel_tpu.tile_schedule(*layout.query_ranges(pattern), length, block_k, block_q)
    np.testing.assert_array_equal(_visited(cols, tile_any.shape[0]), tile_any.T)
    assert rows.visited == cols.visited == tile_any.sum()
    assert rows.width == rows.count.max() and (rows.count >= 1).all()


def test_tile_schedule_skips_tiles_at_256px():
    layout = ScaleLayout(PATCH_NUMS[256])  # L = 680: 6 x 6 tiles of 128
    diag = kernel_tpu.tile_schedule(*layout.key_ranges("block_diagonal"), 680, 128, 128)
    causal = kernel_tpu.tile_schedule(*layout.key_ranges("block_causal"), 680, 128, 128)
    # Query tile 3 (rows 384-511) holds the end of scale 8 and the start of scale 9, so it
    # needs key tiles 1-5; the grid is 6 x 5 steps, 20 of them computed (of 36 pairs).
    np.testing.assert_array_equal(diag.first, [0, 0, 1, 1, 3, 3])
    np.testing.assert_array_equal(diag.count, [2, 4, 3, 5, 3, 3])
    assert diag.visited == 20 and diag.width == 5
    assert causal.visited == 28 and causal.width == 6


def test_lowers_for_tpu():
    """Pallas -> Mosaic lowering for the real-TPU configuration (128 tiles), via export:
    checks block shapes and primitives without a TPU (not Mosaic's own compilation)."""
    layout = ScaleLayout(PATCH_NUMS[256])
    for pattern, head_dim, dtype in (("block_diagonal", 64, jnp.bfloat16),
                                     ("block_causal", 128, jnp.float32)):
        row_start, row_end = layout.key_ranges(pattern)
        col_start, col_end = layout.query_ranges(pattern)
        x = jax.ShapeDtypeStruct((2, layout.seq_len, 4, head_dim), dtype)
        lse = jax.ShapeDtypeStruct((2, 4, layout.seq_len), jnp.float32)
        fwd = functools.partial(kernel_tpu.forward, row_start=row_start, row_end=row_end,
                                sm_scale=0.3)
        bwd = functools.partial(kernel_tpu.backward, row_start=row_start, row_end=row_end,
                                col_start=col_start, col_end=col_end, sm_scale=0.3)
        exported = export.export(jax.jit(fwd), platforms=["tpu"])(x, x, x)
        assert exported.mlir_module().count("tpu_custom_call") == 1
        exported = export.export(jax.jit(bwd), platforms=["tpu"])(x, x, x, x, lse, x)
        assert exported.mlir_module().count("tpu_custom_call") == 2


def test_argument_errors():
    layout = ScaleLayout((1, 2, 3))
    shape = (1, layout.seq_len, 1, 64)
    q, k, v, do = _inputs("errors", shape, shape, "float32")
    row_start, row_end = layout.key_ranges("block_diagonal")
    with pytest.raises(ValueError, match="multiple of 128"):
        kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, block_q=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, block_k=12,
                           interpret=True)
    with pytest.raises(ValueError, match=r"lie in \[0, 14\]"):
        kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end + 1, interpret=True)
    o, lse = kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end, block_q=16,
                                block_k=16, interpret=True)
    with pytest.raises(ValueError, match="transpose"):  # block-causal columns
        kernel_tpu.backward(q, k, v, o, lse, do, row_start=row_start, row_end=row_end,
                            col_start=np.zeros_like(row_start),
                            col_end=np.full_like(row_end, layout.seq_len), interpret=True)


def test_the_tpu_implementation_runs_the_mosaic_kernels():
    """``AttentionSpec(implementation="tpu")`` (what ``ExecutionConfig`` resolves
    ``attention`` to on TPU): the op's forward and gradient lower to these kernels (one
    forward, two backward calls), as does the model's packed attention (q, k, v prepared
    by XLA first)."""
    layout = ScaleLayout(PATCH_NUMS[256])
    spec = ops.AttentionSpec("block_diagonal", PATCH_NUMS[256], "tpu")
    x = jax.ShapeDtypeStruct((2, layout.seq_len, 4, 64), jnp.bfloat16)
    qkv = jax.ShapeDtypeStruct((2, layout.seq_len, 3, 4, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((3, 4, 64), jnp.float32)
    temperature = jax.ShapeDtypeStruct((4,), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(ops.attention(q, k, v, spec).astype(jnp.float32))

    def packed_loss(qkv, bias, temperature):
        return jnp.sum(ops.hmar_attention(qkv, bias, temperature, spec).astype(jnp.float32))

    exported = export.export(jax.jit(loss), platforms=["tpu"])(x, x, x)
    assert exported.mlir_module().count("tpu_custom_call") == 1
    for fn, args in ((loss, (x, x, x)), (packed_loss, (qkv, bias, temperature))):
        exported = export.export(jax.jit(jax.grad(fn, argnums=(0, 1, 2))),
                                 platforms=["tpu"])(*args)
        assert exported.mlir_module().count("tpu_custom_call") == 3
