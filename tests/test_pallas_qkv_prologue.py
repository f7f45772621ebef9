"""The q/k/v prologue's backward kernel (``hmar_jax/pallas/qkv_prologue.py``) in Pallas
interpret mode against differentiating ``reference.hmar_qkv``, and inside the attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice

from hmar_jax.pallas import ops, qkv_prologue
from hmar_jax.pallas.reference import hmar_qkv


def _inputs(dtype, batch=2, length=30, heads=3, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    qkv = jax.random.normal(keys[0], (batch, length, 3, heads, head_dim)).astype(dtype)
    bias = 0.1 * jax.random.normal(keys[1], (3, heads, head_dim))
    temperature = 1.0 + jax.random.uniform(keys[2], (heads,))
    cotangents = [jax.random.normal(k, (batch, length, heads, head_dim)).astype(dtype)
                  for k in keys[3:]]
    return qkv, bias, temperature, cotangents


@pytest.mark.parametrize("length, want", [(680, (32, 4, 6)), (30, (32, 1, 1)), (5, (8, 1, 1)),
                                          (2240, (32, 4, 18))])
def test_tiling_covers_the_rows(length, want):
    rows, sub_tiles, chunks = qkv_prologue.tiling(length)
    assert (rows, sub_tiles, chunks) == want
    assert rows * sub_tiles * chunks >= length > rows * sub_tiles * (chunks - 1)


@pytest.mark.parametrize("dtype, length", [(jnp.float32, 30), (jnp.bfloat16, 30),
                                           (jnp.float32, 5), (jnp.bfloat16, 70)])
def test_kernel_matches_the_reference_gradient(dtype, length):
    qkv, bias, temperature, (dq, dk, dv) = _inputs(dtype, length=length)
    want = qkv_prologue.reference_prologue_backward(qkv, bias, temperature, dq, dk, dv)
    got = qkv_prologue.prologue_backward(qkv, bias, temperature, dq, dk, dv,
                                         implementation="interpret")
    assert [g.shape for g in got] == [w.shape for w in want]
    assert [g.dtype for g in got] == [qkv.dtype, bias.dtype, temperature.dtype]
    exact = dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=1e-5 if exact else 2e-2, atol=1e-5 if exact else 2e-2)
    np.testing.assert_array_equal(np.asarray(got[0][:, :, 2]), np.asarray(dv))  # v: passed on
    scale = float(jnp.max(jnp.abs(want[1])))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]),
                               atol=(1e-5 if exact else 2e-2) * scale)
    # bf16: in interpret mode XLA on the CPU keeps the kernel's bf16 bias add in float32
    # (excess precision) where the eager reference rounds it; the temperature gradient, a
    # sum of B L K products with cancellation, shows that most (errors up to 0.017 here).
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]),
                               rtol=1e-5 if exact else 0.0, atol=0.0 if exact else 0.05)


def test_zero_rows_take_the_eps_branch_as_torch_does():
    """A q or k row with ``x = qkv + bias = 0``: ``F.normalize`` divides by eps, so its
    gradient is ``dy / eps`` (PyTorch's norm has a zero subgradient there; differentiating
    the jnp reference gives NaN, so those rows are checked alone)."""
    qkv, bias, temperature, (dq, dk, dv) = _inputs(jnp.float32)
    bias = bias.at[0, 1].set(qkv[0, 3, 0, 1]).at[1, 2].set(qkv[1, 7, 1, 2])
    qkv = qkv.at[:, :, :2].add(-bias[None, None, :2])  # (b, l) = (0, 3) q head 1 / (1, 7) k head 2
    qkv = qkv.at[0, 3, 0, 1].set(-bias[0, 1]).at[1, 7, 1, 2].set(-bias[1, 2])
    dqkv, dbias, dtemperature = qkv_prologue.prologue_backward(
        qkv, bias, temperature, dq, dk, dv, implementation="interpret")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in (dqkv, dtemperature))
    np.testing.assert_allclose(np.asarray(dqkv[0, 3, 0, 1]),
                               np.asarray(dq[0, 3, 1] * temperature[1] / qkv_prologue.EPS), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dqkv[1, 7, 1, 2]),
                               np.asarray(dk[1, 7, 2] / qkv_prologue.EPS), rtol=1e-6)
    want = qkv_prologue.reference_prologue_backward(qkv, bias, temperature, dq, dk, dv)[0]
    other = np.ones(qkv.shape, bool)
    other[0, 3, 0, 1] = other[1, 7, 1, 2] = False
    np.testing.assert_allclose(np.asarray(dqkv)[other], np.asarray(want)[other], rtol=1e-5,
                               atol=1e-5)


def test_unknown_implementation_is_one_clear_error():
    qkv, bias, temperature, (dq, dk, dv) = _inputs(jnp.float32)
    # the kernel is the GPU one: no TPU implementation, and only resolved names
    for implementation in ("triton", "pallas", "pallas_fused", "tpu"):
        with pytest.raises(ValueError, match=f"qkv prologue backward has no '{implementation}' "
                                             r"implementation; use one of \('xla', 'gpu', "
                                             r"'interpret'\)"):
            qkv_prologue.prologue_backward(qkv, bias, temperature, dq, dk, dv,
                                           implementation=implementation)


@pytest.mark.parametrize("temperature_scale", [1.0, 100.0])
def test_attention_gradients_with_the_kernel_equal_the_reference_prologue(temperature_scale):
    """``hmar_attention`` with the attention kernel in interpret mode (the prologue inside
    the forward kernel, the prologue's Pallas pass after the backward kernels) gives the
    gradients of the backward kernels on ``hmar_qkv``'s q, k, v followed by differentiating
    ``hmar_qkv`` with XLA, at temperatures about 1 and about 100 (VAR's clamp). (That the
    pass runs: ``test_compiled_structure``.)"""
    qkv, bias, temperature, _ = _inputs(jnp.float32, batch=2, length=14, heads=2, head_dim=16)
    temperature = temperature * temperature_scale
    weights = jax.random.normal(jax.random.key(3), (2, 14, 2, 16))
    spec = ops.AttentionSpec("block_diagonal", (1, 2, 3), "interpret")
    packed = lambda *args: jnp.sum(ops.hmar_attention(*args, spec) * weights)  # noqa: E731
    prepared = lambda *args: jnp.sum(ops.attention(*hmar_qkv(*args), spec) * weights)  # noqa: E731
    want = jax.grad(prepared, argnums=(0, 1, 2))(qkv, bias, temperature)
    got = jax.grad(packed, argnums=(0, 1, 2))(qkv, bias, temperature)
    for g, w in zip(got, want):
        assert bool(jnp.all(jnp.isfinite(g)))
        scale = float(jnp.max(jnp.abs(w)))
        tolerance = 1e-5 * temperature_scale  # float32 sums, amplified by the temperature
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tolerance,
                                   atol=tolerance * scale)


@pytest.mark.parametrize("batch, heads", [(64, 16), (32, 30)])  # d16 B64, d30 B32 at 256 px
def test_kernels_lower_for_an_nvidia_gpu(batch, heads):
    """The prologue pass and the packed attention's backward (dK/dV and dQ kernels, then
    the prologue pass): the Pallas-to-Triton lowering runs on CPU for an abstract H200
    (what a GPU run compiles; the Triton compiler itself only runs on the GPU)."""
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    qkv = jax.ShapeDtypeStruct((batch, 680, 3, heads, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((3, heads, 64), jnp.float32)
    temperature = jax.ShapeDtypeStruct((heads,), jnp.float32)
    grad = jax.ShapeDtypeStruct((batch, 680, heads, 64), jnp.bfloat16)
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    lse = jax.ShapeDtypeStruct((batch, heads, 680), jnp.float32)
    plan = ops._Plan("gpu", "block_diagonal", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                     ops.KernelTiles(), 1.0)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(qkv_prologue.kernel_prologue_backward),
                                     platforms=["cuda"], disabled_checks=triton)(
            qkv, bias, temperature, grad, grad, grad)
        assert "xla.gpu.triton" in exported.mlir_module()
        backward = functools.partial(ops._packed_backward, plan)
        exported = jax.export.export(jax.jit(backward), platforms=["cuda"],
                                     disabled_checks=triton)(qkv, bias, temperature, grad, lse,
                                                             grad)
        assert exported.mlir_module().count("xla.gpu.triton") >= 3  # dK/dV, dQ, prologue
