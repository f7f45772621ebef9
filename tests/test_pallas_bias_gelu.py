"""The FFN's bias + GELU kernel (Pallas interpret mode on CPU) against the jnp expression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.mesh import AbstractDevice

from hmar_jax import execution
from hmar_jax.pallas import bias_gelu as bg
from hmar_jax.transformer import HMARTransformer, preset
from hmar_jax.transformer.layers import FeedForward, InitScales

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact references on a GPU too

# The kernel: compiled on a GPU (``JAX_PLATFORMS=cuda``), in interpret mode on CPU.
KERNEL = "gpu" if jax.default_backend() == "gpu" else "interpret"

ROWS, COLS = 96, 384  # tiles of [32, 128]: a 3 x 3 grid, so db sums three row tiles


def _inputs(dtype):
    h = (3.0 * jax.random.normal(jax.random.key(0), (ROWS, COLS))).astype(dtype)
    bias = jax.random.normal(jax.random.key(1), (COLS,), jnp.float32)
    weights = jax.random.normal(jax.random.key(2), (ROWS, COLS))  # a loss that mixes all outputs
    return h, bias, weights


def test_tiles():
    assert bg.tiles(ROWS, COLS) == (32, 128)
    assert bg.tiles(32768, 7680) == (16, 512)   # d30 at the 16x16 scale, B64
    assert bg.tiles(43520, 4096) == (8, 1024)   # d16 training, B64
    assert bg.tiles(64, 100) is None and bg.tiles(12, 128) is None


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-2)])
def test_values_and_gradients_match_the_reference(dtype, atol):
    h, bias, weights = _inputs(dtype)
    exact = bg.reference_bias_gelu(h.astype(jnp.float32), bias)
    out = bg.bias_gelu(h, bias, KERNEL)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=atol, rtol=atol)

    def loss(fn, h, bias):
        return jnp.sum(fn(h, bias).astype(jnp.float32) * weights)

    dh, dbias = jax.grad(lambda h, b: loss(lambda h, b: bg.bias_gelu(h, b, KERNEL), h, b),
                         argnums=(0, 1))(h, bias)
    dh_ref, dbias_ref = jax.grad(
        lambda h, b: loss(bg.reference_bias_gelu, h.astype(jnp.float32), b), argnums=(0, 1))(h, bias)
    assert dh.dtype == dtype and dbias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dh, np.float32), dh_ref, atol=atol, rtol=atol)
    # db sums 96 rows of dh: float32 inside the kernel, so only the input rounding remains.
    np.testing.assert_allclose(dbias, dbias_ref, atol=ROWS * atol / 4, rtol=atol)


def test_untileable_shapes_and_xla_take_the_jnp_expression():
    h = jax.random.normal(jax.random.key(0), (4, 5, 100))
    bias = jnp.linspace(-1, 1, 100)
    expected = jax.nn.gelu(h + bias, approximate=True)
    for implementation in ("xla", KERNEL):
        np.testing.assert_array_equal(bg.bias_gelu(h, bias, implementation), expected)
    # only resolved implementations: no "auto" or "pallas", no TPU kernel
    for implementation in ("triton", "auto", "pallas", "tpu"):
        with pytest.raises(ValueError, match=f"bias_gelu has no '{implementation}' "
                                             "implementation; use one of"):
            bg.bias_gelu(h, bias, implementation)


def test_kernels_lower_for_an_nvidia_gpu():
    """The Pallas-to-Triton lowering runs on CPU for an abstract H200 (what a GPU run
    compiles; the Triton compiler itself only runs on the GPU)."""
    device = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    h = jax.ShapeDtypeStruct((4096, 7680), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((7680,), jnp.float32)
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, args in ((bg.forward, (h, bias)), (bg.backward, (h, bias, h))):
            exported = jax.export.export(jax.jit(fn), platforms=["cuda"],
                                         disabled_checks=triton)(*args)
            assert "xla.gpu.triton" in exported.mlir_module()


def test_feed_forward_with_the_kernel_matches_xla():
    """The FFN layer with the kernel (fc1 matmul, then bias + GELU) against ``nnx.Linear`` +
    ``jax.nn.gelu`` (``gelu="xla"``): values and gradients of all four parameters."""
    init = InitScales(std=0.2, depth=2)
    layers = {gelu: FeedForward(32, 128, jnp.float32, init, nnx.Rngs(0), gelu=gelu)
              for gelu in ("xla", KERNEL)}
    x = jax.random.normal(jax.random.key(3), (2, 24, 32))

    def loss(ffn):
        return jnp.sum(jnp.sin(ffn(x)))

    (value, grads), (value_ref, grads_ref) = (nnx.value_and_grad(loss)(layers[b])
                                              for b in (KERNEL, "xla"))
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_execution_config_reaches_every_block():
    for gelu, want in (("pallas", "interpret"), ("xla", "xla"), ("auto", "xla")):
        model = nnx.eval_shape(lambda: HMARTransformer(  # noqa: B023
            preset("tiny"), execution.resolved("cpu", gelu=gelu), rngs=nnx.Rngs(0)))
        assert model.blocks.ffn.gelu_implementation == want
        assert model.mask_blocks.ffn.gelu_implementation == want
    with pytest.raises(ValueError, match="execution.gelu='cuda' is not one of"):
        execution.ExecutionConfig(gelu="cuda")


def test_auto_is_the_kernel_on_gpu_only():
    assert [execution.resolved(p).gelu for p in ("gpu", "cpu", "tpu")] == ["gpu", "xla", "xla"]
    assert execution.resolved("cpu", gelu="pallas").gelu == "interpret"
    assert execution.resolved("gpu", gelu="pallas").gelu == "gpu"
    assert execution.ExecutionConfig().gelu == "auto"
    with pytest.raises(ValueError, match="execution.gelu='pallas' has no TPU kernel"):
        execution.resolved("tpu", gelu="pallas")
