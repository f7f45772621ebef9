"""GPU (Triton) block-sparse attention kernel in Pallas interpret mode vs the jnp reference
(with ``JAX_PLATFORMS=cuda`` on a GPU the same tests run the compiled kernels)."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import execution
from hmar_jax.pallas import kernel_gpu, ops
from hmar_jax.pallas.reference import hmar_qkv, reference_attention
from hmar_jax.scales import ScaleLayout
from hmar_jax.transformer import HMARTransformer, preset

from attention_inputs import packed_inputs

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact references on a GPU too

# The kernel: compiled on a GPU (``JAX_PLATFORMS=cuda``), in interpret mode on CPU.
KERNEL = "gpu" if jax.default_backend() == "gpu" else "interpret"

SMALL_TILES = ops.KernelTiles(ops.KernelLaunch(16, 16), ops.KernelLaunch(16, 32), ops.KernelLaunch(32, 16))
CASES = [  # patch_nums, tiles; blocks straddle tile edges in all of them
    ((1, 2, 3, 4, 5), SMALL_TILES),
    ((1, 2, 3, 5, 7), ops.KernelTiles(*(ops.KernelLaunch(16, 16),) * 3)),
    ((1, 3, 6), ops.KernelTiles(*(ops.KernelLaunch(32, 32),) * 3)),
    ((1, 2, 3, 4, 5, 6, 8), SMALL_TILES),
]


def _inputs(seed, length, dtype, heads=2, head_dim=32, batch=2):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (batch, length, heads, head_dim), jnp.float32).astype(dtype)
            for k in keys]


@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_gradients_match_reference(pattern, case, dtype):
    patch_nums, tiles = CASES[case]
    layout = ScaleLayout(patch_nums)
    seed = zlib.crc32(f"{pattern}-{case}-{dtype}".encode())
    q, k, v, do = _inputs(seed, layout.seq_len, jnp.dtype(dtype))
    sm_scale = 0.8
    spec = ops.AttentionSpec(pattern, patch_nums, KERNEL, tiles)
    out, vjp = jax.vjp(lambda *a: ops.attention(*a, spec, sm_scale=sm_scale), q, k, v)
    mask = jnp.asarray(layout.attention_mask(pattern))
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    ref, ref_vjp = jax.vjp(lambda *a: reference_attention(*a, mask, sm_scale=sm_scale), *f32)
    grads, ref_grads = vjp(do), ref_vjp(do.astype(jnp.float32))
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        got = np.asarray(got, np.float32)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, np.asarray(want), atol=tol * np.abs(want).max(), rtol=0)


def _packed_inputs(seed, length, dtype, batch=2, max_temperature=100.0):
    return packed_inputs(seed, length, dtype, batch=batch, heads=2, head_dim=32,
                         max_temperature=max_temperature)


def check_packed_attention(pattern: str, dtype: str, seed: int, margin: float = 1.0):
    """The kernel's ``hmar_attention`` against ``hmar_qkv`` + the reference in float32:
    output and the gradients w.r.t. the packed projection, bias and temperature.

    float32: temperatures up to 100 (upstream's clamp), errors within 2e-5 of each
    output's largest value; bfloat16: temperatures up to 10 (upstream initialises them at
    4), within 3e-2. The temperature gradient's error is measured against the sum of the
    magnitudes of its terms (a sum over ``B L K`` products that largely cancel). ``margin``
    scales the tolerances (seed sweeps run with less than 1). Hotter softmaxes are
    near one-hot, and a bf16 flash backward (P and dS rounded to bf16, ``D = rowsum(dO O)``
    from the bf16 output, as in every flash-attention kernel) then loses most digits of
    those cancelling sums: at temperatures up to 100, 24 seeds gave up to 15% on dqkv
    (CPU, interpret mode), platform-dependent, where float32 attention on bf16 inputs
    gives 5%."""
    patch_nums = (1, 2, 3, 5) if pattern == "block_diagonal" else (6,)
    length = ScaleLayout(patch_nums).seq_len
    f32 = dtype == "float32"
    qkv, bias, temperature, do = _packed_inputs(seed, length, jnp.dtype(dtype),
                                                max_temperature=100.0 if f32 else 10.0)
    spec = ops.AttentionSpec(pattern, patch_nums, KERNEL, SMALL_TILES)
    out, vjp = jax.vjp(lambda *a: ops.hmar_attention(*a, spec), qkv, bias, temperature)
    mask = spec.dense_mask()

    def reference(qkv, bias, temperature):
        q, k, v = hmar_qkv(qkv, bias, temperature)
        return reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)

    ref, ref_vjp = jax.vjp(reference, qkv, bias, temperature)
    grads, ref_grads = vjp(do), ref_vjp(do.astype(jnp.float32))
    assert out.shape == do.shape and out.dtype == qkv.dtype
    assert [g.dtype for g in grads] == [qkv.dtype, jnp.float32, jnp.float32]
    q, k, v = (a.astype(jnp.float32) for a in hmar_qkv(qkv, bias, temperature))
    dq = jax.vjp(lambda q: reference_attention(q, k, v, mask), q)[1](do.astype(jnp.float32))[0]
    temperature_terms = jnp.sum(jnp.abs(dq * q), axis=(0, 1, 3)) / temperature  # [N]
    tol = (2e-5 if f32 else 3e-2) * margin
    for name, got, want in zip(("out", "dqkv", "dbias", "dtemperature"), (out, *grads),
                               (ref, *ref_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.all(np.isfinite(got)), name
        scale = np.asarray(temperature_terms) if name == "dtemperature" else np.abs(want).max()
        worst = np.abs(got - want).max() / np.max(scale)
        assert np.all(np.abs(got - want) <= tol * scale), f"{name}: {worst:.3g} of its scale"
    return qkv, bias, temperature, spec


@pytest.mark.parametrize("pattern", ["block_diagonal", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_packed_attention_with_prologue_matches_reference(pattern, dtype):
    """``hmar_attention`` on the kernel (bias, q/k normalisation and temperature inside the
    forward kernel) equals preparing q, k, v with ``hmar_qkv`` and running the reference."""
    qkv, bias, temperature, spec = check_packed_attention(pattern, dtype, seed=3 + len(dtype))
    with pytest.raises(ValueError, match=r"qkv \[B, L, 3, N, K\]"):
        ops.hmar_attention(qkv[:, :, :2], bias, temperature, spec)


def test_log_sum_exp_and_full_pattern_with_unequal_lengths():
    q = _inputs(1, 9, jnp.float32)[0]
    k, v = _inputs(2, 30, jnp.float32)[:2]
    row_start, row_end = np.zeros(9, np.int32), np.full(9, 30, np.int32)
    out, lse = kernel_gpu.forward(q, k, v, row_start, row_end, block_q=16, block_k=16,
                                  interpret=True)
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(logits, -1)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v)), atol=1e-5)


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 5, 7), (1, 3, 6)])
@pytest.mark.parametrize("pattern", ["block_diagonal", "block_causal"])
def test_tile_plan_covers_exactly_the_blocks(patch_nums, pattern):
    layout = ScaleLayout(patch_nums)
    mask = layout.attention_mask(pattern)
    row_start, row_end = layout.key_ranges(pattern)
    plan = kernel_gpu.plan_tiles(row_start, row_end, 16, 16)
    covered = np.zeros_like(mask)
    assert plan[0, 0] == 0 and plan[-1, 1] == layout.seq_len
    assert np.all(plan[1:, 0] == plan[:-1, 1]) and np.all(plan[:, 1] - plan[:, 0] <= 16)
    for first, end, lo, full, total, hi, *_ in plan:
        covered[first:end, lo:min(lo + 16 * total, layout.seq_len)] = True
        assert mask[first:end, lo:lo + 16 * full].all()  # unmasked steps are fully allowed
    assert not (mask & ~covered).any()  # every allowed pair is visited


def test_visited_tiles_at_256px():
    layout = ScaleLayout.create(256)
    assert kernel_gpu.visited_tiles(*layout.key_ranges("block_diagonal"), 64, 64) == 32  # of 121
    assert kernel_gpu.visited_tiles(*layout.key_ranges("block_causal"), 64, 64) == 79


def test_implementation_resolution_and_fallback():
    assert [execution.resolved(p).attention for p in ("cpu", "gpu", "tpu")] == \
        ["xla", "gpu", "tpu"]
    assert [execution.resolved(p, attention="pallas").attention
            for p in ("cpu", "gpu", "tpu")] == ["interpret", "gpu", "tpu"]
    assert execution.resolved("gpu", attention="xla").attention == "xla"
    assert execution.resolved("tpu", attention="interpret").attention == "interpret"
    q, k, v, _ = _inputs(3, 14, jnp.float32, head_dim=24)  # not a power of two -> reference
    spec = ops.AttentionSpec("block_diagonal", (1, 2, 3), KERNEL)
    mask = jnp.asarray(ScaleLayout((1, 2, 3)).attention_mask("block_diagonal"))
    np.testing.assert_allclose(np.asarray(ops.attention(q, k, v, spec)),
                               np.asarray(reference_attention(q, k, v, mask)), atol=1e-6)
    with pytest.raises(ValueError, match="needs 14 tokens"):
        ops.attention(q[:, :10], k, v, spec)
    # only resolved implementations: no "auto", "pallas", "reference" or "cudnn"
    for implementation in ("triton", "auto", "pallas", "reference", "cudnn"):
        with pytest.raises(ValueError, match=f"attention has no '{implementation}' "
                                             "implementation; use one of"):
            ops.AttentionSpec("block_diagonal", (1, 2), implementation)


def test_compiled_kernels_run_small_unmasked_calls_with_the_reference(monkeypatch):
    """The compiled GPU implementation: unmasked calls with <= SMALL_FULL_KEYS keys (the
    sampler's small scales) take the reference; larger ones take the kernel. ``interpret``
    (tests) runs the kernel for both. (The kernel runs here in interpret mode whatever the
    spec names, so this runs on CPU; ``tpu``: tests/test_splash_attention.py.)"""
    calls = []
    real = ops._kernel_attention

    def kernel_attention(plan, q, k, v):
        calls.append((plan.kernel, k.shape[1]))
        return real(dataclasses.replace(plan, kernel="interpret"), q, k, v)

    monkeypatch.setattr(ops, "_kernel_attention", kernel_attention)
    small, large = ops.SMALL_FULL_KEYS, ops.SMALL_FULL_KEYS + 16
    for implementation in ("gpu", "interpret"):
        for length in (small, large):
            q, k, v, _ = _inputs(7, length, jnp.float32, heads=1, head_dim=16, batch=1)
            out = ops.attention(q, k, v, ops.AttentionSpec("full", (), implementation))
            np.testing.assert_allclose(np.asarray(out),
                                       np.asarray(reference_attention(q, k, v)), atol=2e-5)
    assert calls == [("gpu", large), ("interpret", small), ("interpret", large)]


def _float32_execution(attention: str) -> execution.ExecutionConfig:
    """The platform's resolution with ``attention`` and every other op on its reference,
    float32 compute, scanned blocks, no remat."""
    return execution.resolved(jax.default_backend(), attention=attention, layer_norm="xla",
                              gelu="xla", compute_dtype="float32", head_dtype="float32",
                              remat="none", scan_blocks=True)


@pytest.mark.slow
def test_model_with_kernel_matches_reference_forward_and_gradients():
    cfg = preset("tiny", init_adaln_gamma=0.5, init_head=1.0)
    reference = HMARTransformer(cfg, _float32_execution("xla"), rngs=nnx.Rngs(0))
    kernel = HMARTransformer(cfg, _float32_execution("pallas"), rngs=nnx.Rngs(0))
    assert kernel.attention_spec("block_diagonal").implementation == KERNEL
    assert reference.attention_spec("full").implementation == "xla"
    layout = cfg.layout
    x = jax.random.normal(jax.random.key(1), (2, layout.seq_len - 1, cfg.latent_channels))
    labels = jnp.asarray([1, 10])

    def loss(model):
        return jnp.mean(model(x, labels) ** 2) + jnp.mean(
            model.forward_masked(x, x, jnp.ones((1, layout.seq_len - 1), bool), labels) ** 2)

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    value_ref, grads_ref = value_and_grad(reference)
    value_ker, grads_ker = value_and_grad(kernel)
    assert float(value_ker) == pytest.approx(float(value_ref), rel=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads_ref), nnx.to_flat_state(grads_ker)):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=2e-5, err_msg=str(path))


@pytest.mark.devices(8)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.slow
def test_kernel_under_a_mesh_gives_the_unsharded_values(packed):
    """Under a batch-sharded mesh the op (which runs the kernel on each device's slice: XLA
    cannot partition a Pallas call) gives the unsharded output and gradients. (No all-gather
    of q/k/v: ``test_compiled_structure``.)"""
    patch_nums = (1, 2, 3, 4)
    layout = ScaleLayout(patch_nums)
    spec = ops.AttentionSpec("block_diagonal", patch_nums, KERNEL,
                             ops.KernelTiles(*(ops.KernelLaunch(16, 16),) * 3))
    if packed:  # the packed projection is sharded; bias and temperature are replicated
        qkv, bias, temperature, do = _packed_inputs(11, layout.seq_len, jnp.float32, batch=8)
        inputs = (qkv,)
        loss = lambda qkv: jnp.sum(ops.hmar_attention(qkv, bias, temperature, spec) * do)  # noqa: E731
    else:
        q, k, v, do = _inputs(11, layout.seq_len, jnp.float32, batch=8)
        inputs = (q, k, v)
        loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, spec) * do)  # noqa: E731

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))
    expected = grad_fn(*inputs)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, sharded) for a in inputs]
        got = grad_fn(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
