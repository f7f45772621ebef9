"""The backward of HMAR's q/k/v prologue as one Pallas pass.

The attention's forward kernel applies the prologue of ``reference.hmar_qkv`` (bias in
qkv's dtype, L2 normalisation of q and k in float32, the per-head temperature on q) to
every tile it loads. Its backward (``ops._packed_backward``) gets ``dq, dk, dv [B, L, N, K]``
from the attention backward kernels and has to return ``dqkv [B, L, 3, N, K]`` and the
gradients of the bias ``[3, N, K]`` and the temperature ``[N]``. Differentiating
``hmar_qkv`` with XLA gives several fusions that read the packed projection and the
three cotangents more than once. The kernel here reads each of them once and writes
``dqkv`` once, with per-program partial sums of the bias and temperature gradients that
XLA adds up.

Per row and head, in float32, with ``x = qkv + bias`` (added in qkv's dtype),
``m = max(|x|, eps)`` and ``y = x / m``::

    q = y_q t:   dy_q = dq t,   dt = sum over B, L, K of dq y_q
    k = y_k:     dy_k = dk
    dx = (dy - y (y . dy) [|x| > eps]) / m        (q and k; F.normalize's gradient)
    dx_v = dv
    dbias = sum over B and L of dx (rounded to qkv's dtype first, as dqkv)

``prologue_backward(..., implementation)``: ``"xla"`` differentiates
``reference.hmar_qkv`` (the reference); ``"gpu"`` runs the kernel, ``"interpret"`` the
same kernel in interpret mode (tests).

Grid ``(B, N, 3 T)``: a program handles one of q, k, v for one head and one chunk of
``rows x sub_tiles`` rows (``T`` chunks cover L), loading ``[rows, K]`` tiles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hmar_jax.pallas.dispatch import Implementation, check_implementation
from hmar_jax.pallas.reference import hmar_qkv
from hmar_jax.pallas.triton_util import compiler_params, load_rows, store_rows

KERNEL_NAME = "hmar_qkv_prologue_bwd"
EPS = 1e-12  # reference.l2_normalize's
TEMPERATURE_WIDTH = 8  # the temperature rides as a power-of-two block [N, 8] per head


def reference_prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv):
    """``(dqkv, dbias, dtemperature)`` by differentiating ``reference.hmar_qkv``."""
    _, vjp = jax.vjp(hmar_qkv, qkv, qkv_bias, temperature)
    return vjp((dq, dk, dv))


def _kernel(qkv_ref, bias_ref, temperature_ref, dq_ref, dk_ref, dv_ref, dqkv_ref, dbias_ref,
            dtemperature_ref, *, rows: int, sub_tiles: int, chunks: int, length: int):
    part = pl.program_id(2) // chunks
    first = (pl.program_id(2) % chunks) * rows * sub_tiles
    head_dim = dqkv_ref.shape[-1]
    zeros = jnp.zeros((head_dim,), jnp.float32)

    def normalised_gradient(grad_ref, scale):
        """q (scale = temperature) or k: stores dx, returns the sums of dx and dq y."""
        bias = bias_ref[...].astype(qkv_ref.dtype)

        def body(i, carry):
            dbias, dtemperature = carry
            start = first + i * rows
            valid = start + jnp.arange(rows) < length
            x = load_rows(qkv_ref, start, rows, valid).astype(qkv_ref.dtype) + bias[None, :]
            x = x.astype(jnp.float32)  # the bias added in qkv's dtype, as the reference does
            norm = jnp.sqrt(jnp.sum(x * x, axis=1))
            inv = 1.0 / jnp.maximum(norm, EPS)
            y = x * inv[:, None]
            grad = load_rows(grad_ref, start, rows, valid).astype(jnp.float32)
            dy = grad * scale
            radial = jnp.where(norm > EPS, jnp.sum(y * dy, axis=1), 0.0)
            dx = ((dy - y * radial[:, None]) * inv[:, None]).astype(dqkv_ref.dtype)
            store_rows(dqkv_ref, start, rows, valid, dx)
            return (dbias + jnp.sum(dx.astype(jnp.float32), axis=0),
                    dtemperature + jnp.sum(grad * y, axis=0))

        return jax.lax.fori_loop(0, sub_tiles, body, (zeros, zeros))

    @pl.when(part == 0)
    def _():
        dbias, dtemperature = normalised_gradient(dq_ref, temperature_ref[0])
        dbias_ref[...] = dbias
        dtemperature_ref[...] = dtemperature

    @pl.when(part == 1)
    def _():
        dbias, _ = normalised_gradient(dk_ref, 1.0)
        dbias_ref[...] = dbias
        dtemperature_ref[...] = zeros

    @pl.when(part == 2)
    def _():
        def body(i, dbias):
            start = first + i * rows
            valid = start + jnp.arange(rows) < length
            dv = load_rows(dv_ref, start, rows, valid).astype(dqkv_ref.dtype)
            store_rows(dqkv_ref, start, rows, valid, dv)
            return dbias + jnp.sum(dv.astype(jnp.float32), axis=0)

        dbias_ref[...] = jax.lax.fori_loop(0, sub_tiles, body, zeros)
        dtemperature_ref[...] = zeros


def tiling(length: int, rows: int = 32, sub_tiles: int = 4) -> tuple[int, int, int]:
    """``(rows, sub_tiles, chunks)``: ``[rows, K]`` tiles, ``sub_tiles`` of them per
    program, ``chunks`` programs per (batch, head, part) covering ``length`` rows; rows is
    a power of two no larger than needed."""
    rows = min(rows, pl.next_power_of_2(length))
    sub_tiles = max(1, min(sub_tiles, math.ceil(length / rows)))
    return rows, sub_tiles, math.ceil(length / (rows * sub_tiles))


def kernel_prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv, *, interpret: bool = False,
                             rows: int = 32, sub_tiles: int = 4, num_warps: int = 4):
    """``(dqkv [B, L, 3, N, K] in qkv's dtype, dbias [3, N, K] in qkv_bias's dtype,
    dtemperature [N] float32)`` from the three ``[B, L, N, K]`` cotangents."""
    batch, length, three, heads, head_dim = qkv.shape
    rows, sub_tiles, chunks = tiling(length, rows, sub_tiles)
    packed = pl.BlockSpec((None, length, None, None, head_dim),
                          lambda b, h, p: (b, 0, p // chunks, h, 0))
    head = pl.BlockSpec((None, length, None, head_dim), lambda b, h, p: (b, 0, h, 0))
    partial = pl.BlockSpec((None, None, None, None, head_dim),
                           lambda b, h, p: (b, p % chunks, p // chunks, h, 0))
    temperature_rows = jnp.broadcast_to(temperature.astype(jnp.float32)[:, None],
                                        (heads, TEMPERATURE_WIDTH))
    partial_shape = jax.ShapeDtypeStruct((batch, chunks, three, heads, head_dim), jnp.float32)
    dqkv, dbias, dtemperature = pl.pallas_call(
        functools.partial(_kernel, rows=rows, sub_tiles=sub_tiles, chunks=chunks, length=length),
        grid=(batch, heads, three * chunks),
        in_specs=[packed,
                  pl.BlockSpec((None, None, head_dim), lambda b, h, p: (p // chunks, h, 0)),
                  pl.BlockSpec((None, TEMPERATURE_WIDTH), lambda b, h, p: (h, 0)),
                  head, head, head],
        out_specs=[packed, partial, partial],
        out_shape=[jax.ShapeDtypeStruct(qkv.shape, qkv.dtype), partial_shape, partial_shape],
        compiler_params=compiler_params(num_warps),
        interpret=interpret, name=KERNEL_NAME,
    )(qkv, qkv_bias.astype(qkv.dtype), temperature_rows, dq, dk, dv)
    return (dqkv, jnp.sum(dbias, axis=(0, 1)).astype(qkv_bias.dtype),
            jnp.sum(dtemperature[:, :, 0], axis=(0, 1, 3)).astype(temperature.dtype))


def prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv, *,
                      implementation: Implementation):
    """The prologue's backward: ``"xla"`` differentiates ``reference.hmar_qkv``, ``"gpu"``
    and ``"interpret"`` run the kernel. ``qkv [B, L, 3, N, K]``, ``qkv_bias [3, N, K]``,
    ``temperature [N]``, ``dq, dk, dv [B, L, N, K]``."""
    check_implementation(implementation, "qkv prologue backward")
    if implementation == "xla":
        return reference_prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv)
    return kernel_prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv,
                                    interpret=implementation == "interpret")
