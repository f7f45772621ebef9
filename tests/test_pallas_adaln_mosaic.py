"""AdaLN LayerNorm + modulation kernels on Mosaic GPU (``adaln_mosaic_gpu``) in Mosaic GPU's
interpreter against the jnp references: the forward's outputs and saved statistics, the
gradients of both ops through their ``custom_vjp``, and the shapes that take the reference.
On a Hopper GPU (``JAX_PLATFORMS=cuda``) the same tests run the compiled kernels.
``test_gpu_export`` lowers them for CUDA at d16 shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.pallas import adaln, adaln_mosaic_gpu

pytestmark = pytest.mark.usefixtures("exact_float32_matmuls")

ON_GPU = jax.default_backend() == "gpu"
IMPLEMENTATION = "mosaic_gpu" if ON_GPU else "mosaic_interpret"
EPS = 1e-6
# of each tensor's largest reference element: float32 inputs, bfloat16 inputs or outputs
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(length, width, dtype):
    keys = jax.random.split(jax.random.key(0), 9)
    shape, vec = (2, length, width), (2, width)
    x = (2.0 * jax.random.normal(keys[0], shape) + 0.5).astype(dtype)  # a mean per row
    branch = jax.random.normal(keys[1], shape).astype(jnp.bfloat16)
    gate, scale, shift = (0.5 * jax.random.normal(k, vec) for k in keys[2:5])
    cotangents = (jax.random.normal(keys[5], shape).astype(dtype),
                  jax.random.normal(keys[6], shape).astype(dtype))
    return x, branch, gate, scale, shift, cotangents


def _close(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out, ref)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.abs(out - ref).max() <= tol * np.abs(ref).max(), np.abs(out - ref).max()


def test_plan():
    assert adaln_mosaic_gpu.supports(680, 1024) and adaln_mosaic_gpu.supports(680, 1920)
    assert not adaln_mosaic_gpu.supports(169, 1024) and not adaln_mosaic_gpu.supports(680, 100)
    # d16 and d30 with B = 64: 5 programs of 136 rows per sample
    assert adaln_mosaic_gpu.programs_per_sample(64, 680) == 5
    assert adaln_mosaic_gpu.programs_per_sample(2, 680) == 170  # spans of 4 rows
    # rows per step: the forward with a branch moves 12 bytes per element, the backward 18
    assert [adaln_mosaic_gpu.step_rows(1024, n) for n in (12, 18)] == [4, 2]
    assert [adaln_mosaic_gpu.step_rows(1920, n) for n in (12, 18)] == [2, 1]


# (40, 384): one program of ten 4-row steps per sample, a width of three strided vectors;
# (48, 512): four programs of three steps per sample (the backward's partial sums added),
# vectors of 4 elements per thread. float32 or bfloat16 inputs (the residual stream x and
# the cotangents; the branch is bfloat16, h bfloat16).
@pytest.mark.parametrize("length, width, programs, dtype",
                         [(40, 384, 2, jnp.float32), (48, 512, 8, jnp.bfloat16)])
def test_kernels_match_the_reference(length, width, programs, dtype, monkeypatch):
    monkeypatch.setattr(adaln_mosaic_gpu, "TARGET_PROGRAMS", programs)
    x, branch, gate, scale, shift, (dx_out, dh) = _inputs(length, width, dtype)
    tol, out_dtype = TOLERANCE[dtype], jnp.bfloat16
    norm = dict(eps=EPS, out_dtype=out_dtype)

    # the forward kernel's outputs, statistics included
    x_out, h, mean, rstd = adaln_mosaic_gpu.forward(x, branch, gate, scale, shift, **norm,
                                                    interpret=not ON_GPU)
    x_ref, h_ref = adaln.reference_add_layer_norm_modulate(x, branch, gate, scale, shift, **norm)
    x32 = x.astype(jnp.float32) + branch.astype(jnp.float32) * gate[:, None]
    _close(x_out, x_ref, tol)
    _close(h, h_ref, TOLERANCE[jnp.bfloat16])
    _close(mean, jnp.mean(x32, -1), 1e-5)
    _close(rstd, jax.lax.rsqrt(jnp.var(x32, -1) + EPS), 1e-5)
    _, h, mean, rstd = adaln_mosaic_gpu.forward(x, None, None, scale, shift, **norm,
                                                interpret=not ON_GPU)
    _close(h, adaln.reference_layer_norm_modulate(x, scale, shift, **norm),
           TOLERANCE[jnp.bfloat16])
    _close(mean, jnp.mean(x.astype(jnp.float32), -1), 1e-5)

    # both ops' gradients through the custom_vjp, with random cotangents
    def ops(implementation):
        def add_ln(*args):
            return adaln.add_layer_norm_modulate(*args, **norm, implementation=implementation)

        def ln(*args):
            return adaln.layer_norm_modulate(*args, **norm, implementation=implementation)

        add_out, add_vjp = jax.vjp(add_ln, x, branch, gate, scale, shift)
        ln_out, ln_vjp = jax.vjp(ln, x, scale, shift)
        return (*add_out, ln_out), (*add_vjp((dx_out, dh.astype(out_dtype))),
                                     *ln_vjp(dh.astype(out_dtype)))

    (outs, grads), (outs_ref, grads_ref) = ops(IMPLEMENTATION), ops("xla")
    for out, ref in zip(outs, outs_ref):
        _close(out, ref, TOLERANCE[jnp.bfloat16] if jnp.bfloat16 in (out.dtype, dtype) else tol)
    for grad, ref in zip(grads, grads_ref):
        _close(grad, ref, TOLERANCE[jnp.bfloat16] if dtype == jnp.bfloat16 else 1e-4)


@pytest.mark.parametrize("length, width", [(6, 128), (8, 100)])
def test_untileable_shapes_take_the_reference(length, width):
    """``L`` not a multiple of 4, ``C`` not a multiple of 128."""
    x, branch, gate, scale, shift, _ = _inputs(length, width, jnp.float32)
    norm = dict(eps=EPS, out_dtype=jnp.float32)
    out = adaln.add_layer_norm_modulate(x, branch, gate, scale, shift, **norm,
                                        implementation=IMPLEMENTATION)
    expected = adaln.reference_add_layer_norm_modulate(x, branch, gate, scale, shift, **norm)
    for a, b in zip(out, expected):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        adaln.layer_norm_modulate(x, scale, shift, **norm, implementation=IMPLEMENTATION),
        adaln.reference_layer_norm_modulate(x, scale, shift, **norm))
