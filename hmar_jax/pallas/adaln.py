"""AdaLN's LayerNorm + modulation, with the residual add before it, as one Pallas pass.

Every block computes, twice::

    x' = x + branch * gate                     float32 residual stream, [B, L, C]
    h  = LN(x') (1 + scale) + shift            cast to the matmul dtype, [B, L, C]

with ``gate``, ``scale``, ``shift`` one ``[B, C]`` vector per sample (the AdaLN
modulation; ``gate`` also carries the per-sample drop-path factor). The first LN of a
block has no add (``layer_norm_modulate``), the second follows the attention's residual
add (``add_layer_norm_modulate``). XLA runs each of these as several passes over the
``[B, L, C]`` activations (a reduction for the statistics, the normalisation, the
residual add, transposes), forward, in the rematerialised forward and in the backward;
in the session-7 profile of the d16 step they were about 2.6 ms of each block's
forward+backward against a bandwidth floor of about 1 ms (``benchmarks/README.md``).

The kernels here read every input once from HBM: a program owns ``ROWS`` rows of one
sample and walks their ``C`` columns in 128-wide chunks three times (sum, centred sum of
squares, output), the second and third walks hitting L2. The backward recomputes the
normalised values from the saved per-row mean and reciprocal std and returns, besides
``dx`` (and ``dbranch``), the per-sample sums over rows of the modulation gradients as
per-program partial sums that XLA adds up. Statistics and gradients are float32.

``backend``: ``"xla"`` is the plain jnp the model computed before (the reference);
``"pallas"`` runs the Triton kernels on GPU and the same kernels in Pallas interpret
mode on CPU (tests); ``"auto"`` (default) is ``"pallas"`` on GPU and ``"xla"``
elsewhere. Shapes the kernels do not tile (``C`` not a multiple of 128, ``L`` not a
multiple of 8) and TPUs (no Mosaic kernel) take the ``"xla"`` path. Under a mesh each
device runs the kernels on its share of the batch (``per_batch_shard``).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hmar_jax.pallas.per_batch import per_batch_shard

NormBackend = Literal["auto", "xla", "pallas"]
NORM_BACKENDS: tuple[str, ...] = ("auto", "xla", "pallas")
ROWS = 8  # rows per load: every load and store is a [ROWS, COLS] tile
COLS = 128
MAX_SUB_BLOCKS = 5  # backward: ROWS-row sub-blocks per program (fewer partial sums)


# --------------------------------------------------------------------------- reference

def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32. ``[..., C]``."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def reference_layer_norm_modulate(x, scale, shift, *, eps: float, out_dtype) -> jax.Array:
    """``LN(x) (1 + scale) + shift``: ``x [B, L, C]``, ``scale``/``shift [B, C]``."""
    return (layer_norm(x, eps) * (1 + scale[:, None]) + shift[:, None]).astype(out_dtype)


def reference_add_layer_norm_modulate(x, branch, gate, scale, shift, *, eps: float, out_dtype):
    """``(x', LN(x') (1 + scale) + shift)`` with ``x' = x + branch gate``."""
    x = x + (branch * gate[:, None]).astype(x.dtype)
    return x, reference_layer_norm_modulate(x, scale, shift, eps=eps, out_dtype=out_dtype)


# --------------------------------------------------------------------------- kernels

def _chunk(c: int) -> pl.Slice:
    return pl.ds(c * COLS, COLS)


def _residual(x_ref, branch_ref, gate_ref, rows, c):
    """``x + branch gate`` of one ``[ROWS, COLS]`` tile, float32."""
    x = x_ref[rows, _chunk(c)].astype(jnp.float32)
    if branch_ref is not None:
        gate = gate_ref[_chunk(c)].astype(jnp.float32)
        x = x + branch_ref[rows, _chunk(c)].astype(jnp.float32) * gate[None, :]
    return x


def _row_statistics(x_ref, branch_ref, gate_ref, rows, chunks: int, eps: float):
    total = sum(jnp.sum(_residual(x_ref, branch_ref, gate_ref, rows, c), axis=1)
                for c in range(chunks))
    mean = total / (chunks * COLS)
    centred = sum(jnp.sum(jnp.square(_residual(x_ref, branch_ref, gate_ref, rows, c)
                                     - mean[:, None]), axis=1) for c in range(chunks))
    return mean, jax.lax.rsqrt(centred / (chunks * COLS) + eps)


def _forward_kernel(*refs, eps: float, chunks: int, with_branch: bool):
    if with_branch:
        x_ref, branch_ref, gate_ref, scale_ref, shift_ref, x_out_ref, h_ref, mean_ref, rstd_ref = refs
    else:
        x_ref, scale_ref, shift_ref, h_ref, mean_ref, rstd_ref = refs
        branch_ref = gate_ref = x_out_ref = None
    rows = pl.ds(0, ROWS)
    mean, rstd = _row_statistics(x_ref, branch_ref, gate_ref, rows, chunks, eps)
    for c in range(chunks):
        x = _residual(x_ref, branch_ref, gate_ref, rows, c)
        if x_out_ref is not None:
            x_out_ref[rows, _chunk(c)] = x.astype(x_out_ref.dtype)
        scale = 1.0 + scale_ref[_chunk(c)].astype(jnp.float32)
        shift = shift_ref[_chunk(c)].astype(jnp.float32)
        h = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
        h_ref[rows, _chunk(c)] = h.astype(h_ref.dtype)
    mean_ref[rows] = mean
    rstd_ref[rows] = rstd


def _backward_kernel(*refs, chunks: int, sub_blocks: int, with_branch: bool):
    """Per program ``sub_blocks * ROWS`` rows of one sample.

    With ``n = (x' - mean) rstd`` and ``dn = dh (1 + scale)``:
    ``dx' = rstd (dn - mean_C(dn) - n mean_C(dn n)) + dx'_out``, ``dx = dx'``,
    ``dbranch = dx' gate``; per-sample sums over rows: ``dscale = sum(dh n)``,
    ``dshift = sum(dh)``, ``dgate = sum(dx' branch)``.
    """
    if with_branch:
        (x_ref, branch_ref, gate_ref, scale_ref, mean_ref, rstd_ref, dh_ref, dx_out_ref,
         dx_ref, dbranch_ref, dscale_ref, dshift_ref, dgate_ref) = refs
    else:
        x_ref, scale_ref, mean_ref, rstd_ref, dh_ref, dx_ref, dscale_ref, dshift_ref = refs
        branch_ref = gate_ref = dx_out_ref = dbranch_ref = dgate_ref = None
    width = chunks * COLS
    zeros = jnp.zeros((COLS,), jnp.float32)
    dscale, dshift, dgate = [zeros] * chunks, [zeros] * chunks, [zeros] * chunks
    scales = [1.0 + scale_ref[_chunk(c)].astype(jnp.float32) for c in range(chunks)]

    def normalised(rows, c, mean, rstd):
        x = _residual(x_ref, branch_ref, gate_ref, rows, c)
        return (x - mean[:, None]) * rstd[:, None]

    for s in range(sub_blocks):
        rows = pl.ds(s * ROWS, ROWS)
        mean, rstd = mean_ref[rows], rstd_ref[rows]
        sum_dn = jnp.zeros((ROWS,), jnp.float32)
        sum_dn_n = jnp.zeros((ROWS,), jnp.float32)
        for c in range(chunks):
            n = normalised(rows, c, mean, rstd)
            dh = dh_ref[rows, _chunk(c)].astype(jnp.float32)
            dn = dh * scales[c][None, :]
            sum_dn = sum_dn + jnp.sum(dn, axis=1)
            sum_dn_n = sum_dn_n + jnp.sum(dn * n, axis=1)
            dscale[c] = dscale[c] + jnp.sum(dh * n, axis=0)
            dshift[c] = dshift[c] + jnp.sum(dh, axis=0)
        mean_dn, mean_dn_n = sum_dn / width, sum_dn_n / width
        for c in range(chunks):
            n = normalised(rows, c, mean, rstd)
            dn = dh_ref[rows, _chunk(c)].astype(jnp.float32) * scales[c][None, :]
            dx = rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dn_n[:, None])
            if with_branch:
                dx = dx + dx_out_ref[rows, _chunk(c)].astype(jnp.float32)
                gate = gate_ref[_chunk(c)].astype(jnp.float32)
                dbranch_ref[rows, _chunk(c)] = (dx * gate[None, :]).astype(dbranch_ref.dtype)
                branch = branch_ref[rows, _chunk(c)].astype(jnp.float32)
                dgate[c] = dgate[c] + jnp.sum(dx * branch, axis=0)
            dx_ref[rows, _chunk(c)] = dx.astype(dx_ref.dtype)
    for c in range(chunks):
        dscale_ref[_chunk(c)] = dscale[c]
        dshift_ref[_chunk(c)] = dshift[c]
        if with_branch:
            dgate_ref[_chunk(c)] = dgate[c]


# --------------------------------------------------------------------------- pallas calls

def tiles(length: int, width: int) -> bool:
    """Whether the kernels take ``[B, length, width]``: ``width % 128 == 0``, ``length % 8 == 0``."""
    return width % COLS == 0 and length % ROWS == 0


def sub_blocks(length: int) -> int:
    """``ROWS``-row sub-blocks per backward program: the largest count <= ``MAX_SUB_BLOCKS``
    dividing ``length / ROWS``."""
    blocks = length // ROWS
    return next(k for k in range(MAX_SUB_BLOCKS, 0, -1) if blocks % k == 0)


def _params(num_warps: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def forward(x, branch, gate, scale, shift, *, eps: float, out_dtype, interpret: bool = False,
            num_warps: int = 4):
    """``(x' or None, h, mean [B, L], rstd [B, L])``; ``branch``/``gate`` None: no add."""
    batch, length, width = x.shape
    with_branch = branch is not None
    matrix = pl.BlockSpec((None, ROWS, width), lambda b, j: (b, j, 0))
    vector = pl.BlockSpec((None, width), lambda b, j: (b, 0))
    stats = pl.BlockSpec((None, ROWS), lambda b, j: (b, j))
    stat_shape = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    h_shape = jax.ShapeDtypeStruct(x.shape, out_dtype)
    if with_branch:
        inputs, in_specs = (x, branch, gate, scale, shift), [matrix, matrix, vector, vector, vector]
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), h_shape, stat_shape, stat_shape]
        out_specs = [matrix, matrix, stats, stats]
    else:
        inputs, in_specs = (x, scale, shift), [matrix, vector, vector]
        out_shape, out_specs = [h_shape, stat_shape, stat_shape], [matrix, stats, stats]
    kernel = functools.partial(_forward_kernel, eps=eps, chunks=width // COLS,
                               with_branch=with_branch)
    outs = pl.pallas_call(
        kernel, grid=(batch, length // ROWS), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_params(num_warps), interpret=interpret,
        name="hmar_adaln_fwd")(*inputs)
    return tuple(outs) if with_branch else (None, *outs)


def backward(x, branch, gate, scale, mean, rstd, dh, dx_out, *, interpret: bool = False,
             num_warps: int = 4):
    """Gradients of ``forward``: ``(dx, dbranch, dgate, dscale, dshift)`` (the branch
    terms None without a branch)."""
    batch, length, width = x.shape
    with_branch = branch is not None
    rows = sub_blocks(length) * ROWS
    programs = length // rows
    matrix = pl.BlockSpec((None, rows, width), lambda b, j: (b, j, 0))
    vector = pl.BlockSpec((None, width), lambda b, j: (b, 0))
    stats = pl.BlockSpec((None, rows), lambda b, j: (b, j))
    partial = pl.BlockSpec((None, None, width), lambda b, j: (b, j, 0))
    partial_shape = jax.ShapeDtypeStruct((batch, programs, width), jnp.float32)
    dx_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if with_branch:
        inputs = (x, branch, gate, scale, mean, rstd, dh, dx_out)
        in_specs = [matrix, matrix, vector, vector, stats, stats, matrix, matrix]
        out_shape = [dx_shape, jax.ShapeDtypeStruct(branch.shape, branch.dtype),
                     partial_shape, partial_shape, partial_shape]
        out_specs = [matrix, matrix, partial, partial, partial]
    else:
        inputs = (x, scale, mean, rstd, dh)
        in_specs = [matrix, vector, stats, stats, matrix]
        out_shape, out_specs = [dx_shape, partial_shape, partial_shape], [matrix, partial, partial]
    kernel = functools.partial(_backward_kernel, chunks=width // COLS,
                               sub_blocks=rows // ROWS, with_branch=with_branch)
    outs = pl.pallas_call(
        kernel, grid=(batch, programs), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_params(num_warps), interpret=interpret,
        name="hmar_adaln_bwd")(*inputs)
    if with_branch:
        dx, dbranch, dscale, dshift, dgate = outs
        return dx, dbranch, dgate.sum(1).astype(gate.dtype), dscale.sum(1), dshift.sum(1)
    dx, dscale, dshift = outs
    return dx, None, None, dscale.sum(1), dshift.sum(1)


# --------------------------------------------------------------------------- differentiable ops

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm_modulate(x, scale, shift, eps, out_dtype, interpret):
    return forward(x, None, None, scale, shift, eps=eps, out_dtype=out_dtype,
                   interpret=interpret)[1]


def _layer_norm_modulate_fwd(x, scale, shift, eps, out_dtype, interpret):
    _, h, mean, rstd = forward(x, None, None, scale, shift, eps=eps, out_dtype=out_dtype,
                               interpret=interpret)
    return h, (x, scale, shift, mean, rstd)


def _layer_norm_modulate_bwd(eps, out_dtype, interpret, residuals, dh):
    x, scale, shift, mean, rstd = residuals
    dx, _, _, dscale, dshift = backward(x, None, None, scale, mean, rstd, dh, None,
                                        interpret=interpret)
    return dx, dscale.astype(scale.dtype), dshift.astype(shift.dtype)


_layer_norm_modulate.defvjp(_layer_norm_modulate_fwd, _layer_norm_modulate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _add_layer_norm_modulate(x, branch, gate, scale, shift, eps, out_dtype, interpret):
    x_out, h, _, _ = forward(x, branch, gate, scale, shift, eps=eps, out_dtype=out_dtype,
                             interpret=interpret)
    return x_out, h


def _add_layer_norm_modulate_fwd(x, branch, gate, scale, shift, eps, out_dtype, interpret):
    x_out, h, mean, rstd = forward(x, branch, gate, scale, shift, eps=eps, out_dtype=out_dtype,
                                   interpret=interpret)
    return (x_out, h), (x, branch, gate, scale, shift, mean, rstd)


def _add_layer_norm_modulate_bwd(eps, out_dtype, interpret, residuals, cotangents):
    x, branch, gate, scale, shift, mean, rstd = residuals
    dx_out, dh = cotangents
    dx, dbranch, dgate, dscale, dshift = backward(x, branch, gate, scale, mean, rstd, dh,
                                                  dx_out, interpret=interpret)
    return dx, dbranch, dgate, dscale.astype(scale.dtype), dshift.astype(shift.dtype)


_add_layer_norm_modulate.defvjp(_add_layer_norm_modulate_fwd, _add_layer_norm_modulate_bwd)


# --------------------------------------------------------------------------- public API

def resolve_norm_backend(backend: NormBackend, platform: str | None = None) -> str:
    """``auto`` -> ``pallas`` on GPU, ``xla`` elsewhere; other names unchanged."""
    if backend not in NORM_BACKENDS:
        raise ValueError(f"Unknown norm backend {backend!r}; use one of {NORM_BACKENDS}.")
    if backend == "auto":
        return "pallas" if (platform or jax.default_backend()) == "gpu" else "xla"
    return backend


# Each device runs the kernels on its share of the batch (every input is per sample).
def _local_layer_norm_modulate(x, scale, shift, *, eps, out_dtype, interpret):
    return _layer_norm_modulate(x, scale, shift, eps, out_dtype, interpret)


def _local_add_layer_norm_modulate(x, branch, gate, scale, shift, *, eps, out_dtype, interpret):
    return _add_layer_norm_modulate(x, branch, gate, scale, shift, eps, out_dtype, interpret)


def _use_kernel(backend: NormBackend, x: jax.Array) -> tuple[bool, bool]:
    """``(run the kernels, in interpret mode)`` for ``x [B, L, C]``."""
    platform = jax.default_backend()
    use = (resolve_norm_backend(backend, platform) == "pallas" and platform != "tpu"
           and x.ndim == 3 and tiles(*x.shape[1:]))
    return use, platform != "gpu"


def layer_norm_modulate(x: jax.Array, scale: jax.Array, shift: jax.Array, *, eps: float,
                        out_dtype, backend: NormBackend = "auto") -> jax.Array:
    """``LN(x) (1 + scale) + shift`` in ``out_dtype``: ``x [B, L, C]``, ``scale``/``shift [B, C]``."""
    use, interpret = _use_kernel(backend, x)
    if not use:
        return reference_layer_norm_modulate(x, scale, shift, eps=eps, out_dtype=out_dtype)
    return per_batch_shard(functools.partial(_local_layer_norm_modulate, eps=eps,
                                             out_dtype=jnp.dtype(out_dtype), interpret=interpret),
                           (x, scale, shift))


def add_layer_norm_modulate(x: jax.Array, branch: jax.Array, gate: jax.Array, scale: jax.Array,
                            shift: jax.Array, *, eps: float, out_dtype,
                            backend: NormBackend = "auto") -> tuple[jax.Array, jax.Array]:
    """``(x', LN(x') (1 + scale) + shift)`` with ``x' = x + branch gate`` in ``x``'s dtype.

    ``x [B, L, C]`` (the residual stream), ``branch [B, L, C]``, ``gate``/``scale``/``shift
    [B, C]``; ``h`` in ``out_dtype``.
    """
    use, interpret = _use_kernel(backend, x)
    if not use:
        return reference_add_layer_norm_modulate(x, branch, gate, scale, shift, eps=eps,
                                                 out_dtype=out_dtype)
    return per_batch_shard(functools.partial(_local_add_layer_norm_modulate, eps=eps,
                                             out_dtype=jnp.dtype(out_dtype), interpret=interpret),
                           (x, branch, gate, scale, shift))
