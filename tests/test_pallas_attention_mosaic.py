"""Mosaic GPU block-sparse attention kernels (``kernel_mosaic_gpu``) in Mosaic GPU's
interpreter vs the jnp reference; their lowering for CUDA (on CPU, through ``jax.export``);
the op's wiring. On a Hopper GPU (``JAX_PLATFORMS=cuda``) the same tests run the compiled
kernels.

What only the GPU checks: the interpreter reads ``wgmma`` operands from shared memory, so
the products with a register operand (P V, dS K, P^T dO, dS^T Q) run through a
shared-memory stage there (``kernel_mosaic_gpu._mma_acc``); the compiled programs (PTX,
register allocation) and the timing. ``benchmarks/attention.py --check`` runs the large
shapes on the GPU.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax import execution
from hmar_jax.pallas import block_sparse, kernel_mosaic_gpu, ops
from hmar_jax.pallas.reference import hmar_qkv, reference_attention
from hmar_jax.scales import ScaleLayout

from attention_inputs import packed_inputs

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
IMPLEMENTATION = "mosaic_gpu" if ON_GPU else "mosaic_interpret"
TOLERANCE = 2e-2  # of each tensor's largest reference element (bf16/fp16 inputs)
SHORT = (1, 2, 3, 4, 5, 6, 8)  # L = 155: padded to 160 rows for TMA
ALIGNED = (1, 2, 3, 5, 7, 8)  # L = 152: no padding
L680 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _inputs(seed, length, dtype, batch, heads, head_dim=64):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32).astype(dtype)
            for k in keys]


def _reference(q, k, v, do, mask, sm_scale):
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    out, vjp = jax.vjp(lambda *a: reference_attention(*a, mask, sm_scale=sm_scale), *f32)
    logits = jnp.einsum("bqnk,bsnk->bnqs", *f32[:2], precision="highest") * sm_scale
    lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return (out, lse, *vjp(do.astype(jnp.float32)))


def _kernels(q, k, v, do, layout, pattern, sm_scale, block, num_stages=2):
    row_start, row_end = layout.key_ranges(pattern)
    col_start, col_end = layout.query_ranges(pattern)
    kwargs = dict(sm_scale=sm_scale, block=block, num_stages=num_stages, interpret=INTERPRET)
    o, lse = kernel_mosaic_gpu.forward(q, k, v, row_start, row_end, **kwargs)
    delta = block_sparse.softmax_delta(o, do)
    dk, dv = kernel_mosaic_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end,
                                             **kwargs)
    dq = kernel_mosaic_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end, **kwargs)
    return o, lse, dq, dk, dv


def check_kernels(patch_nums, pattern, dtype, batch, heads, block, num_stages=2, head_dim=64):
    """Output, log-sum-exp, dQ, dK and dV of the three kernels against the float32
    reference: within ``TOLERANCE`` of each tensor's largest element (the log-sum-exp:
    within 1e-3), every element finite (an unwritten row would not be)."""
    layout = ScaleLayout(patch_nums)
    seed = zlib.crc32(f"{patch_nums}-{pattern}-{dtype}-{block}".encode())
    q, k, v, do = _inputs(seed, layout.seq_len, jnp.dtype(dtype), batch, heads, head_dim)
    sm_scale = 0.8
    got = _kernels(q, k, v, do, layout, pattern, sm_scale, block, num_stages)
    want = _reference(q, k, v, do, jnp.asarray(layout.attention_mask(pattern)), sm_scale)
    assert [g.dtype for g in got] == [q.dtype, jnp.float32, q.dtype, q.dtype, q.dtype]
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape and np.all(np.isfinite(g)), name
        tol = 1e-3 if name == "lse" else TOLERANCE * np.abs(w).max()
        err = np.abs(g - w).max()
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kernels_match_reference(pattern, dtype):
    """A scale list whose length (155) is padded for TMA, odd batch and head counts."""
    check_kernels(SHORT, pattern, dtype, batch=3, heads=1, block=64)


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
def test_kernels_with_32_row_steps_and_three_stages(pattern):
    """Steps smaller than a tile, a deeper pipeline, a length TMA takes unpadded."""
    check_kernels(ALIGNED, pattern, "bfloat16", batch=1, heads=3, block=32, num_stages=3)


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("block", [pytest.param(64, marks=pytest.mark.slow), 128])
def test_kernels_match_reference_at_256px(pattern, block):
    """The 680-token scale list (256 px)."""
    check_kernels(L680, pattern, "bfloat16", batch=1, heads=1, block=block)


def test_head_dim_128():
    check_kernels(ALIGNED, "block_causal", "float16", batch=1, heads=1, block=64, head_dim=128)


def test_full_pattern_with_unequal_lengths():
    """Unmasked attention of 40 queries over 100 keys (both padded for TMA): output and
    log-sum-exp, and the gradients through the backward kernels."""
    q = _inputs(1, 40, jnp.bfloat16, 1, 3)[0]
    k, v, do = _inputs(2, 100, jnp.bfloat16, 1, 3)[:3]
    do = do[:, :40]
    rows = (np.zeros(40, np.int32), np.full(40, 100, np.int32))
    cols = (np.zeros(100, np.int32), np.full(100, 40, np.int32))
    kwargs = dict(sm_scale=0.5, interpret=INTERPRET)
    o, lse = kernel_mosaic_gpu.forward(q, k, v, *rows, **kwargs)
    delta = block_sparse.softmax_delta(o, do)
    dk, dv = kernel_mosaic_gpu.backward_dkdv(q, k, v, do, lse, delta, *cols, **kwargs)
    dq = kernel_mosaic_gpu.backward_dq(q, k, v, do, lse, delta, *rows, **kwargs)
    want = _reference(q, k, v, do, jnp.ones((40, 100), bool), 0.5)
    for name, g, w in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        tol = 1e-3 if name == "lse" else TOLERANCE * np.abs(w).max()
        assert g.shape == w.shape and np.abs(g - w).max() <= tol, name


def _packed_inputs(seed, length, dtype):
    return packed_inputs(seed, length, dtype, batch=1, heads=3, head_dim=64, max_temperature=10.0)

def test_packed_forward_with_prologue_matches_reference():
    """``forward_packed``: bias, q/k normalisation and temperature inside the kernel."""
    layout = ScaleLayout(SHORT)
    qkv, bias, temperature, _ = _packed_inputs(5, layout.seq_len, jnp.bfloat16)
    row_start, row_end = layout.key_ranges("block_diagonal")
    out, lse = kernel_mosaic_gpu.forward_packed(qkv, bias.astype(qkv.dtype), temperature,
                                                row_start, row_end, interpret=INTERPRET)
    q, k, v = (a.astype(jnp.float32) for a in hmar_qkv(qkv, bias, temperature))
    mask = jnp.asarray(layout.attention_mask("block_diagonal"))
    want = reference_attention(q, k, v, mask)
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k, precision="highest")
    want_lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
    assert out.dtype == qkv.dtype and out.shape == want.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want),
                               atol=TOLERANCE * float(jnp.abs(want).max()), rtol=0)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=0.05, rtol=0)


@pytest.mark.slow
def test_op_with_mosaic_matches_reference_forward_and_gradients():
    """``ops.attention`` and ``ops.hmar_attention`` on the Mosaic kernels (custom_vjp,
    packed prologue and its backward) against the reference."""
    layout = ScaleLayout(SHORT)
    spec = ops.AttentionSpec("block_causal", SHORT, IMPLEMENTATION)
    q, k, v, do = _inputs(9, layout.seq_len, jnp.bfloat16, batch=1, heads=3)
    out, vjp = jax.vjp(lambda *a: ops.attention(*a, spec, sm_scale=0.7), q, k, v)
    want = _reference(q, k, v, do, spec.dense_mask(), 0.7)
    for name, g, w in zip(("o", "dq", "dk", "dv"), (out, *vjp(do)), (want[0], *want[2:])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= TOLERANCE * np.abs(w).max(), name

    qkv, bias, temperature, do = _packed_inputs(10, layout.seq_len, jnp.bfloat16)
    out, vjp = jax.vjp(lambda *a: ops.hmar_attention(*a, spec), qkv, bias, temperature)

    def reference(qkv, bias, temperature):
        prepared = hmar_qkv(qkv, bias, temperature)
        return reference_attention(*(a.astype(jnp.float32) for a in prepared), spec.dense_mask())

    want, ref_vjp = jax.vjp(reference, qkv, bias, temperature)
    grads, ref_grads = vjp(do), ref_vjp(do.astype(jnp.float32))
    for name, g, w in zip(("out", "dqkv", "dbias"), (out, *grads[:2]), (want, *ref_grads[:2])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 3e-2 * np.abs(w).max(), name


@pytest.mark.parametrize("patch_nums", [L680, (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), SHORT])
@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_tile_plan_covers_exactly_the_blocks(patch_nums, pattern, block):
    """Every allowed (query, key) pair is visited once; boxes start at multiples of 8 and
    hold their tile; unmasked steps are fully allowed; no step starts at or past the rows'
    last key (no tile outside the allowed blocks is loaded)."""
    layout = ScaleLayout(patch_nums)
    mask = layout.attention_mask(pattern)
    for transpose, (starts, ends) in ((False, layout.key_ranges(pattern)),
                                      (True, layout.query_ranges(pattern))):
        allowed = mask.T if transpose else mask
        plan = kernel_mosaic_gpu.plan_tiles(starts, ends, block)
        visits = np.zeros(allowed.shape, np.int32)
        assert plan[0, 0] == 0 and plan[-1, 1] == layout.seq_len
        assert np.all(plan[1:, 0] == plan[:-1, 1])
        for first, end, row0, col0, head, full, total, _ in plan:
            assert row0 % 8 == 0 and row0 <= first < end <= row0 + kernel_mosaic_gpu.ROWS
            assert col0 % 8 == 0 and head + full <= total
            rows = slice(first, end)
            hi = ends[first:end].max()
            assert col0 <= starts[first:end].min() and col0 + (total - 1) * block < hi
            for j in range(total):
                cols = slice(col0 + j * block, min(col0 + (j + 1) * block, layout.seq_len))
                if head <= j < head + full:
                    assert allowed[rows, cols].all()
                visits[rows, cols] += allowed[rows, cols]
        np.testing.assert_array_equal(visits, allowed.astype(np.int32))


def test_visited_steps_at_256px():
    layout = ScaleLayout.create(256)
    # the Triton kernel's 64x64 plan visits 32 (block-diagonal) and 79 (block-causal) tiles
    assert kernel_mosaic_gpu.visited_steps(*layout.key_ranges("block_diagonal"), 64) == 35
    assert kernel_mosaic_gpu.visited_steps(*layout.key_ranges("block_causal"), 64) == 82


def test_lowering_for_cuda():
    """The three kernels lower to Mosaic GPU programs for CUDA on a machine without a GPU
    (``jax.export``): layouts, shared-memory budget, TMA and wgmma shapes are checked there;
    only the PTX compilation waits for the GPU."""
    layout = ScaleLayout(ALIGNED)
    row_start, row_end = layout.key_ranges("block_diagonal")
    col_start, col_end = layout.query_ranges("block_diagonal")
    s = jax.ShapeDtypeStruct((2, layout.seq_len, 3, 64), jnp.bfloat16)
    stats = jax.ShapeDtypeStruct((2, 3, layout.seq_len), jnp.float32)

    def run(q, k, v, do, lse, delta):
        o, lse_out = kernel_mosaic_gpu.forward(q, k, v, row_start, row_end, block=128)
        dk, dv = kernel_mosaic_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end)
        dq = kernel_mosaic_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end)
        return o, lse_out, dq, dk, dv

    exported = jax.export.export(jax.jit(run), platforms=["cuda"])(s, s, s, s, stats, stats)
    text = exported.mlir_module()
    assert text.count("mosaic_gpu") >= 3  # one custom call per kernel

    packed = jax.ShapeDtypeStruct((2, layout.seq_len, 3, 3, 64), jnp.bfloat16)
    bias, temperature = (jax.ShapeDtypeStruct((3, 3, 64), jnp.bfloat16),
                         jax.ShapeDtypeStruct((3,), jnp.float32))
    jax.export.export(jax.jit(lambda x, b, t: kernel_mosaic_gpu.forward_packed(
        x, b, t, row_start, row_end)), platforms=["cuda"])(packed, bias, temperature)


def test_unsupported_calls():
    q = jnp.zeros((1, 64, 1, 32), jnp.bfloat16)
    ranges = (np.zeros(64, np.int32), np.full(64, 64, np.int32))
    with pytest.raises(ValueError, match="head dims"):
        kernel_mosaic_gpu.forward(q, q, q, *ranges)
    q64 = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        kernel_mosaic_gpu.forward(q64, q64, q64, *ranges)
    assert kernel_mosaic_gpu.supports(64, jnp.bfloat16)
    assert kernel_mosaic_gpu.supports(128, "float16")
    assert not kernel_mosaic_gpu.supports(64, jnp.float32)


def test_execution_choices_and_fallbacks(monkeypatch):
    assert execution.resolved("gpu", attention="mosaic_gpu").attention == "mosaic_gpu"
    assert execution.resolved("gpu").attention == "gpu"  # the default stays the Triton kernel
    for platform in execution.PLATFORMS:
        assert execution.resolved(platform, attention="mosaic_interpret").attention == \
            "mosaic_interpret"
    for platform in ("cpu", "tpu"):
        with pytest.raises(ValueError, match="'mosaic_gpu' cannot run on"):
            execution.resolved(platform, attention="mosaic_gpu")
    with pytest.raises(ValueError, match="is not one of"):
        execution.ExecutionConfig(gelu="mosaic_gpu")
    # float32 (or a head dim other than 64/128) goes to the Triton kernel
    calls = []
    real = ops._kernel_attention

    def kernel_attention(plan, q, k, v):
        calls.append(plan.kernel)
        return real(plan, q, k, v)

    monkeypatch.setattr(ops, "_kernel_attention", kernel_attention)
    layout = ScaleLayout((1, 2, 3))
    q, k, v, _ = _inputs(3, layout.seq_len, jnp.float32, 1, 1, head_dim=16)
    spec = ops.AttentionSpec("block_diagonal", (1, 2, 3), "mosaic_interpret",
                             ops.KernelTiles(*(ops.KernelLaunch(16, 16),) * 3))
    out = ops.attention(q, k, v, spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(
        q, k, v, jnp.asarray(layout.attention_mask("block_diagonal")))), atol=1e-5)
    assert calls == ["interpret"]
