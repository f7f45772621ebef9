"""AdaLN LayerNorm + modulation kernels (Pallas interpret mode on CPU) against the jnp ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import execution
from hmar_jax.pallas import adaln, ops
from hmar_jax.transformer.layers import AdaLNSelfAttnBlock, InitScales
from structure_helpers import norm_gelu_norm

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact references on a GPU too

# The kernels: compiled on a GPU (``JAX_PLATFORMS=cuda``), in interpret mode on CPU.
KERNEL = "gpu" if jax.default_backend() == "gpu" else "interpret"

EPS = 1e-6


def _inputs(batch, length, width):
    keys = jax.random.split(jax.random.key(0), 8)
    shape, vec = (batch, length, width), (batch, width)
    x = 2.0 * jax.random.normal(keys[0], shape) + 0.5  # a non-zero mean per row
    branch = jax.random.normal(keys[1], shape).astype(jnp.bfloat16)
    gate, scale, shift = (0.5 * jax.random.normal(k, vec) for k in keys[2:5])
    weights = (jax.random.normal(keys[5], shape), jax.random.normal(keys[6], shape))
    return x, branch, gate, scale, shift, weights


def test_tiling_plan():
    assert [adaln.tile_rows(w) for w in (1024, 1920, 256, 64)] == [4, 2, 8, 8]
    assert adaln.tiles(680, 1024) and adaln.tiles(680, 1920) and adaln.tiles(256, 1920)
    assert not adaln.tiles(169, 1920) and not adaln.tiles(30, 64) and not adaln.tiles(16, 8)
    assert adaln.sub_blocks(680, 1024) == 5 and adaln.sub_blocks(40, 256) == 5
    assert adaln.sub_blocks(16, 128) == 2


# (40, 256): five 8-row tiles in one backward program; (16, 128): two tiles per program;
# (24, 320): 320 columns in tiles of 512 (masked), 8 rows.
@pytest.mark.parametrize("length, width", [(40, 256), (16, 128), (24, 320)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_add_layer_norm_modulate_matches_the_reference(length, width, out_dtype):
    x, branch, gate, scale, shift, (w_x, w_h) = _inputs(2, length, width)
    norm = dict(eps=EPS, out_dtype=out_dtype)

    def loss(implementation, *args):
        x_out, h = adaln.add_layer_norm_modulate(*args, **norm, implementation=implementation)
        h1 = adaln.layer_norm_modulate(x_out, 0.5 * args[3], args[4], **norm,
                                       implementation=implementation)
        return (jnp.sum(x_out * w_x) + jnp.sum(h.astype(jnp.float32) * w_h)
                + jnp.sum(h1.astype(jnp.float32) * w_x * w_h), (x_out, h, h1))

    args = (x, branch, gate, scale, shift)
    grad = lambda implementation: jax.jit(jax.grad(  # noqa: E731
        lambda *a: loss(implementation, *a), argnums=range(5), has_aux=True))(*args)
    (grads, outs), (grads_ref, outs_ref) = grad(KERNEL), grad("xla")
    for out, ref in zip(outs, outs_ref):
        assert out.dtype == ref.dtype
        # bf16 outputs: the kernel rounds once from float32, as the reference does
        tol = 1e-5 if out.dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=tol, rtol=tol)
    for g, g_ref, arg in zip(grads, grads_ref, args):
        assert g.shape == arg.shape and g.dtype == arg.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   atol=2e-3 if g.dtype == jnp.bfloat16 else 2e-4, rtol=1e-2)


def test_untileable_shapes_and_xla_take_the_reference():
    x, _, _, scale, shift, _ = _inputs(2, 5, 100)
    expected = adaln.reference_layer_norm_modulate(x, scale, shift, eps=EPS, out_dtype=jnp.float32)
    for implementation in ("xla", KERNEL):
        out = adaln.layer_norm_modulate(x, scale, shift, eps=EPS, out_dtype=jnp.float32,
                                        implementation=implementation)
        np.testing.assert_array_equal(out, expected)
    # only resolved implementations: no "auto" or "pallas", no TPU kernel
    for implementation in ("cuda", "auto", "pallas", "tpu"):
        with pytest.raises(ValueError, match=f"layer_norm_modulate has no '{implementation}' "
                                             "implementation; use one of"):
            adaln.layer_norm_modulate(x, scale, shift, eps=EPS, out_dtype=jnp.float32,
                                      implementation=implementation)
        with pytest.raises(ValueError, match=f"add_layer_norm_modulate has no "
                                             f"'{implementation}' implementation"):
            adaln.add_layer_norm_modulate(x, x, scale, scale, shift, eps=EPS,
                                          out_dtype=jnp.float32, implementation=implementation)
    assert [execution.resolved(p).layer_norm for p in ("gpu", "cpu", "tpu")] == \
        ["gpu", "xla", "xla"]
    assert execution.resolved("cpu", layer_norm="pallas").layer_norm == "interpret"
    with pytest.raises(ValueError, match="execution.layer_norm='triton' is not one of"):
        execution.ExecutionConfig(layer_norm="triton")


def test_block_with_kernels_matches_xla_with_drop_path():
    """A whole block (attention, FFN, stochastic depth on) with the norm kernels
    (``layer_norm=`` the kernel) against ``"xla"``: same outputs and parameter gradients."""
    width, patch_nums = 128, (2, 6)  # 40 tokens: the kernels tile
    spec = ops.AttentionSpec("block_diagonal", patch_nums, "xla")
    init = InitScales(std=0.05, depth=2, adaln_gamma=0.5)
    x = jax.random.normal(jax.random.key(1), (3, 40, width))
    cond = jax.random.normal(jax.random.key(2), (3, width))
    results = {}
    for layer_norm in ("xla", KERNEL):
        block = AdaLNSelfAttnBlock(width, 2, 4.0, width, EPS, jnp.float32, init, nnx.Rngs(0),
                                   gelu="xla", layer_norm=layer_norm)
        graphdef, params = nnx.split(block)

        def loss(params, x):
            out, _ = nnx.merge(graphdef, params)(x, cond, spec, drop_rate=0.5,
                                                 rng=jax.random.key(3))
            return jnp.sum(jnp.sin(out)), out

        results[layer_norm] = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    (grads, out), (grads_ref, out_ref) = results[KERNEL], results["xla"]
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref) > 5
    for g, g_ref in zip(flat, flat_ref):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-3)


@pytest.mark.devices(4)
@pytest.mark.parametrize("mesh_spec", [(("data", 4),), (("data", 2), ("fsdp", 2))])
def test_kernel_gradients_under_a_mesh_equal_the_single_device_ones(mesh_spec):
    """Under a 4-device CPU mesh (data parallel, or data x fsdp with the batch split over
    both axes as the trainer splits it) the gradients through the Pallas calls (AdaLN norms,
    bias + GELU; the bias's summed over devices) equal the single-device ones. (That the
    kernels run per device: ``test_compiled_structure``.)"""
    from hmar_jax import sharding

    x, branch, gate, scale, shift, (w_x, w_h) = _inputs(8, 16, 128)
    bias = jax.random.normal(jax.random.key(9), (128,))

    def loss(*args):
        x_out, h = norm_gelu_norm(*args, eps=EPS, implementation=KERNEL)
        return jnp.sum(h * w_h) + jnp.sum(x_out * w_x)

    args = (x, branch, gate, scale, shift, bias)
    grad_fn = jax.jit(jax.grad(loss, argnums=range(6)))
    want = grad_fn(*args)
    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:4])
    batch = sharding.batch_sharding(mesh)
    placed = [jax.device_put(a, batch) for a in args[:5]] + [bias]
    with jax.set_mesh(mesh):
        grads = grad_fn(*placed)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                                   atol=1e-4, rtol=1e-4)
