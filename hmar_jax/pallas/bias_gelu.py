"""The FFN's bias + tanh-GELU, ``gelu_tanh(h + b)``, as one Pallas pass per direction.

In bf16 XLA does not fold the bias and GELU into the cuBLAS epilogue of ``fc1``, so they
run as their own elementwise pass over the ``[M, F]`` activations (``M = B*L`` rows,
``F = 4C``), below the bandwidth of the residual-add passes next to it. The kernels here
do the same work in 2-D tiles of ``[block_rows, block_cols]`` (no per-element index
arithmetic for the bias broadcast, vector loads), in float32 with one rounding at the end:

* forward: ``y = x * sigmoid(2 u)`` with ``x = h + b``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``
  (the same function as ``0.5 x (1 + tanh(u))``);
* backward: ``dh = dy * gelu'(x)`` and, per row tile, the column sums of ``dh`` (summed
  to ``db`` outside).

``reference_bias_gelu`` is ``jax.nn.gelu(h + b, approximate=True)``. There is no TPU
kernel. Shapes the kernels do not tile (``F`` not a multiple of 128, ``M`` not a multiple
of 8) take the reference.

Dimension letters: M rows (batch x tokens), F hidden width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hmar_jax.pallas.dispatch import Implementation, dispatch
from hmar_jax.pallas.triton_util import compiler_params

FORWARD_KERNEL_NAME = "hmar_bias_gelu_fwd"  # for remat policies that keep its output
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715
TILE_ELEMENTS = 8192  # elements per program: 16 KiB of bf16 in and out
MAX_BLOCK_COLS = 1024


def _pre_activation(h, bias):
    return h.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]


def _gate(x):
    """``sigmoid(2 u)`` of the tanh-GELU, from exp (no tanh in the kernel), float32."""
    u = _SQRT_2_OVER_PI * (x + _CUBIC * x * x * x)
    return 1.0 / (1.0 + jnp.exp(-2.0 * u))


def _gelu_grad(x):
    s = _gate(x)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x * x)
    return s + 2.0 * x * s * (1.0 - s) * du_dx


def _forward_kernel(h_ref, bias_ref, y_ref):
    x = _pre_activation(h_ref[...], bias_ref[...])
    y_ref[...] = (x * _gate(x)).astype(y_ref.dtype)


def _backward_kernel(h_ref, bias_ref, dy_ref, dh_ref, dbias_ref):
    dh = dy_ref[...].astype(jnp.float32) * _gelu_grad(_pre_activation(h_ref[...], bias_ref[...]))
    dh_ref[...] = dh.astype(dh_ref.dtype)
    dbias_ref[...] = jnp.sum(dh, axis=0)[None, :]


def tiles(rows: int, cols: int) -> tuple[int, int] | None:
    """``(block_rows, block_cols)`` for an ``[rows, cols]`` array, or None if it does not tile.

    ``block_cols``: the largest power of two <= 1024 dividing ``cols`` (at least 128);
    ``block_rows``: a power of two dividing ``rows``, at most ``TILE_ELEMENTS / block_cols``
    (at least 8).
    """
    block_cols = MAX_BLOCK_COLS
    while block_cols >= 128 and cols % block_cols:
        block_cols //= 2
    if block_cols < 128:
        return None
    block_rows = max(TILE_ELEMENTS // block_cols, 8)
    while block_rows >= 8 and rows % block_rows:
        block_rows //= 2
    return None if block_rows < 8 else (block_rows, block_cols)


def _specs(block_rows: int, block_cols: int):
    matrix = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
    vector = pl.BlockSpec((block_cols,), lambda i, j: (j,))
    return matrix, vector


def forward(h: jax.Array, bias: jax.Array, *, interpret: bool = False,
            num_warps: int = 4) -> jax.Array:
    """``gelu_tanh(h + bias)`` in ``h``'s dtype; ``h [M, F]``, ``bias [F]``; must tile."""
    (rows, cols), (block_rows, block_cols) = h.shape, tiles(*h.shape)
    matrix, vector = _specs(block_rows, block_cols)
    return pl.pallas_call(
        _forward_kernel, grid=(rows // block_rows, cols // block_cols),
        in_specs=[matrix, vector], out_specs=matrix,
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
        compiler_params=compiler_params(num_warps),
        interpret=interpret, name=FORWARD_KERNEL_NAME)(h, bias)


def backward(h: jax.Array, bias: jax.Array, dy: jax.Array, *, interpret: bool = False,
             num_warps: int = 8) -> tuple[jax.Array, jax.Array]:
    """``(dh [M, F] in h's dtype, dbias [F] in bias's dtype)`` of ``forward``."""
    (rows, cols), (block_rows, block_cols) = h.shape, tiles(*h.shape)
    matrix, vector = _specs(block_rows, block_cols)
    partial_sums = pl.BlockSpec((1, block_cols), lambda i, j: (i, j))
    grid = (rows // block_rows, cols // block_cols)
    dh, dbias_parts = pl.pallas_call(
        _backward_kernel, grid=grid, in_specs=[matrix, vector, matrix],
        out_specs=[matrix, partial_sums],
        out_shape=[jax.ShapeDtypeStruct(h.shape, h.dtype),
                   jax.ShapeDtypeStruct((grid[0], cols), jnp.float32)],
        compiler_params=compiler_params(num_warps),
        interpret=interpret, name="hmar_bias_gelu_bwd")(h, bias, dy)
    return dh, jnp.sum(dbias_parts, axis=0).astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pallas_bias_gelu(h, bias, interpret):
    return forward(h, bias, interpret=interpret)


def _pallas_bias_gelu_fwd(h, bias, interpret):
    return forward(h, bias, interpret=interpret), (h, bias)


def _pallas_bias_gelu_bwd(interpret, residuals, dy):
    h, bias = residuals
    return backward(h, bias, dy, interpret=interpret)


_pallas_bias_gelu.defvjp(_pallas_bias_gelu_fwd, _pallas_bias_gelu_bwd)


def reference_bias_gelu(h: jax.Array, bias: jax.Array) -> jax.Array:
    """What the model computes without the kernel: bias in ``h``'s dtype, then the GELU."""
    return jax.nn.gelu(h + bias.astype(h.dtype), approximate=True)


def _kernel_bias_gelu(h: jax.Array, bias: jax.Array, *, implementation: str) -> jax.Array:
    """The kernels on one device's rows; shapes they do not tile take the reference."""
    rows = math.prod(h.shape[:-1])
    if tiles(rows, h.shape[-1]) is None:
        return reference_bias_gelu(h, bias)
    interpret = implementation == "interpret"
    return _pallas_bias_gelu(h.reshape(rows, h.shape[-1]), bias, interpret).reshape(h.shape)


def bias_gelu(h: jax.Array, bias: jax.Array, implementation: Implementation) -> jax.Array:
    """``gelu_tanh(h + bias)``: ``h [..., F]``, ``bias [F]`` -> ``[..., F]`` in ``h``'s dtype.

    ``implementation``: ``"xla"``, ``"gpu"`` or ``"interpret"`` (``hmar_jax.pallas.dispatch``).
    """
    return dispatch(implementation, "bias_gelu", reference_bias_gelu, _kernel_bias_gelu,
                    (h,), (bias,))
