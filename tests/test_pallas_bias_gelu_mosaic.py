"""The FFN's bias + GELU kernels on Mosaic GPU (``bias_gelu_mosaic_gpu``) in Mosaic GPU's
interpreter against the jnp expression: values, both gradients through the op's
``custom_vjp``, and the shapes that take the reference. On a Hopper GPU
(``JAX_PLATFORMS=cuda``) the same tests run the compiled kernels. ``test_gpu_export`` lowers
them for CUDA at d16 shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.pallas import bias_gelu as bg
from hmar_jax.pallas import bias_gelu_mosaic_gpu

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")

ON_GPU = jax.default_backend() == "gpu"
IMPLEMENTATION = "mosaic_gpu" if ON_GPU else "mosaic_interpret"


def test_tiles():
    assert bias_gelu_mosaic_gpu.tiles(96, 384) == (32, 128)
    assert bias_gelu_mosaic_gpu.tiles(43520, 4096) == (32, 256)  # d16 training, B64
    assert bias_gelu_mosaic_gpu.tiles(40, 7680) == (8, 256)
    assert bias_gelu_mosaic_gpu.tiles(64, 100) is None
    assert bias_gelu_mosaic_gpu.tiles(12, 128) is None
    # d16, B64: 16 column blocks x 17 row groups of 80 tiles
    assert bias_gelu_mosaic_gpu.row_groups(43520 // 32, 16) == 17


# (96, 384): three column blocks of 128, one row group of three 32-row tiles (the pipeline
# reuses its slots); (64, 512): two blocks of 256 columns, two row groups (db adds their
# partial sums). float32 and bfloat16 activations.
@pytest.mark.parametrize("rows, cols, programs, dtype, tol",
                         [(96, 384, 3, jnp.float32, 1e-5), (64, 512, 4, jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_the_reference(rows, cols, programs, dtype, tol,
                                                  monkeypatch):
    monkeypatch.setattr(bias_gelu_mosaic_gpu, "TARGET_PROGRAMS", programs)
    keys = jax.random.split(jax.random.key(0), 3)
    h = (3.0 * jax.random.normal(keys[0], (rows, cols))).astype(dtype)
    bias = jax.random.normal(keys[1], (cols,), jnp.float32)
    dy = jax.random.normal(keys[2], (rows, cols)).astype(dtype)

    out, vjp = jax.vjp(lambda h, b: bg.bias_gelu(h, b, IMPLEMENTATION), h, bias)
    dh, dbias = vjp(dy)
    # the exact function: float32 throughout
    f32 = lambda h, b: bg.reference_bias_gelu(h.astype(jnp.float32), b)  # noqa: E731
    ref, ref_vjp = jax.vjp(f32, h, bias)
    dh_ref, dbias_ref = ref_vjp(dy.astype(jnp.float32))
    assert out.dtype == dh.dtype == dtype and dbias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(dh, np.float32), dh_ref, atol=tol, rtol=tol)
    # db sums the rows of dh in float32 in the kernel: only the rounding of dh's inputs
    np.testing.assert_allclose(dbias, dbias_ref, atol=rows * tol / 4, rtol=tol)


def test_untileable_shapes_take_the_reference():
    h = jax.random.normal(jax.random.key(0), (4, 5, 100))
    bias = jnp.linspace(-1, 1, 100)
    np.testing.assert_array_equal(bg.bias_gelu(h, bias, IMPLEMENTATION),
                                  jax.nn.gelu(h + bias, approximate=True))
