"""GroupNorm + SiLU kernels (Pallas interpret mode on CPU) against jnp and flax's GroupNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import execution
from hmar_jax.pallas import group_norm as gn
from hmar_jax.tokenizer.model import VQVAE
from structure_helpers import SMALL_TOKENIZER

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")  # exact references on a GPU too

# The kernels: compiled on a GPU (``JAX_PLATFORMS=cuda``), in interpret mode on CPU.
KERNEL = "gpu" if jax.default_backend() == "gpu" else "interpret"

EPS = 1e-6


def _inputs(batch, height, width, channels, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    x = (2.0 * jax.random.normal(keys[0], (batch, height, width, channels)) + 0.5).astype(dtype)
    scale = (1.0 + 0.1 * jax.random.normal(keys[1], (channels,))).astype(dtype)
    bias = (0.1 * jax.random.normal(keys[2], (channels,))).astype(dtype)
    return x, scale, bias, jax.random.normal(keys[3], x.shape)


def _flax_two_pass(x, scale, bias, groups, silu):
    norm = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=EPS, use_fast_variance=False,
                         rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = scale, bias
    y = norm(x)
    return nnx.silu(y) if silu else y


def test_tiling_plan():
    # The encoder's 256 px / 160-channel norm: 16-pixel tiles of 256 columns (160 used), 16 per
    # program; 640 channels: 4-pixel tiles of 1024; odd pixel counts: one pixel per tile.
    assert gn.tile_rows(65536, 160) == 16 and gn.tiles_per_program(65536, 160) == 16
    assert gn.tile_rows(256, 640) == 4 and gn.tiles_per_program(256, 640) == 16
    assert gn.tile_rows(24, 40) == 8 and gn.tiles_per_program(24, 40) == 3
    assert gn.tile_rows(15, 40) == 1 and gn.tiles_per_program(15, 40) == 15
    assert gn.tile_rows(64, 16) == 32 and gn.tiles_per_program(64, 16) == 2
    # unmasked column strips: the largest power of two dividing C, at most 128
    assert [gn.strip_width(c) for c in (160, 320, 640, 40, 24, 256)] == [32, 64, 128, 8, 8, 128]


# (8, 8, 40): 40 channels as five 8-wide strips, 8 groups of 5; (3, 5, 24): 15 pixels, one
# per tile; (16, 16, 160): the encoder's channel count, 32 groups, several programs per sample.
@pytest.mark.parametrize("height, width, channels, groups",
                         [(8, 8, 40, 8), (3, 5, 24, 4), (16, 16, 160, 32)])
@pytest.mark.parametrize("silu", [False, True])
def test_kernels_match_the_reference_and_flax(height, width, channels, groups, silu):
    x, scale, bias, _ = _inputs(2, height, width, channels)
    got = gn.group_norm(x, scale, bias, groups=groups, eps=EPS, silu=silu, implementation=KERNEL)
    ref = gn.reference_group_norm(x, scale, bias, groups=groups, eps=EPS, silu=silu)
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(ref, _flax_two_pass(x, scale, bias, groups, silu),
                               atol=5e-6, rtol=1e-5)


def test_bfloat16_inputs_give_bfloat16_outputs_within_one_rounding():
    x, scale, bias, _ = _inputs(2, 8, 8, 40, jnp.bfloat16)
    got = gn.group_norm(x, scale, bias, groups=8, eps=EPS, silu=True, implementation=KERNEL)
    ref = gn.reference_group_norm(x, scale, bias, groups=8, eps=EPS, silu=True)
    exact = _flax_two_pass(*(a.astype(jnp.float32) for a in (x, scale, bias)), 8, True)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               atol=1e-2, rtol=8e-3)
    np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=3e-2, rtol=1e-2)


def test_gradients_are_the_references():
    x, scale, bias, weights = _inputs(2, 8, 8, 40)

    def loss(implementation):
        return lambda x, scale, bias: jnp.sum(weights * gn.group_norm(
            x, scale, bias, groups=8, eps=EPS, silu=True, implementation=implementation))

    got = jax.grad(loss(KERNEL), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, scale, bias)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_bad_groups_and_implementation_are_refused():
    x, scale, bias, _ = _inputs(1, 4, 4, 40)
    with pytest.raises(ValueError, match="not divisible into 16 groups"):
        gn.group_norm(x, scale, bias, groups=16, eps=EPS, silu=False, implementation="xla")
    # only resolved implementations: no "auto" or "pallas", no TPU kernel
    for implementation in ("triton", "auto", "pallas", "tpu"):
        with pytest.raises(ValueError, match=f"group_norm has no '{implementation}' "
                                             "implementation; use one of"):
            gn.group_norm(x, scale, bias, groups=8, eps=EPS, silu=False,
                          implementation=implementation)
    with pytest.raises(ValueError, match="execution.group_norm='triton' is not one of"):
        execution.ExecutionConfig(group_norm="triton")
    assert [execution.resolved(p).group_norm for p in ("gpu", "cpu", "tpu")] == \
        ["gpu", "xla", "xla"]


@pytest.mark.devices(4)
def test_kernel_gradients_under_a_mesh_equal_the_single_device_ones():
    """With the batch split over 4 CPU devices the gradients through the kernels equal the
    single-device ones. (That they run per device: ``test_compiled_structure``.)"""
    from hmar_jax import sharding

    x, scale, bias, weights = _inputs(8, 8, 8, 40)
    loss = lambda x, scale, bias: jnp.sum(weights * gn.group_norm(  # noqa: E731
        x, scale, bias, groups=8, eps=EPS, silu=True, implementation=KERNEL))
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    want = grad_fn(x, scale, bias)
    mesh = sharding.make_mesh((("data", 4),), jax.devices()[:4])
    placed = jax.device_put(x, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        grads = grad_fn(placed, scale, bias)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_tokenizer_with_the_kernels_gives_the_same_tokens():
    """The tokenizer's bf16 encode and decode with ``group_norm="pallas"`` give the same
    tokens as with ``"xla"`` (the same formula in jnp), and latents and images as close to
    the float32 tokenizer's, whose precision keeps flax's two-pass GroupNorm. (Which runs
    the kernels: ``test_compiled_structure``.)"""
    images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    outputs, exact_latent = {}, None
    for precision, choice in (("highest", "pallas"), ("bfloat16", "xla"), ("bfloat16", "pallas")):
        run = execution.resolved(jax.default_backend(), tokenizer_precision=precision,
                                 group_norm=choice)
        vae = VQVAE(SMALL_TOKENIZER, run, rngs=nnx.Rngs(0))
        assert (vae.precision, vae.group_norm_implementation) == \
            (precision, KERNEL if choice == "pallas" else "xla")
        latent = vae.encode_latent(images)
        exact_latent = latent if exact_latent is None else exact_latent
        outputs[precision, choice] = (vae.encode_to_indices(images), latent,
                                      vae.decode_latent(exact_latent))
    for got, want in zip(outputs["bfloat16", "pallas"][0], outputs["bfloat16", "xla"][0]):
        np.testing.assert_array_equal(got, want)
    exact = outputs["highest", "pallas"]
    for i in (1, 2):  # latents; images decoded from the float32 latents
        error = {choice: float(jnp.mean(jnp.abs(outputs["bfloat16", choice][i] - exact[i])))
                 for choice in ("xla", "pallas")}
        assert error["pallas"] < 1.25 * error["xla"] and error["pallas"] < 2e-2, (i, error)
