"""The single attention entry point used by the model.

``attention(q, k, v, spec)`` computes multi-head attention over a next-scale token
sequence. ``spec`` says which scales the sequence holds and which pattern applies:

* ``block_diagonal`` (HMAR): each scale attends only to itself;
* ``block_causal`` (VAR): each scale attends to itself and all earlier scales;
* ``full``: no mask (one scale alone at sampling time, or a query block against a
  KV cache that holds exactly the legal keys).

``spec.implementation`` (``hmar_jax.pallas.dispatch``) is ``"xla"`` (plain jnp with a dense
mask: the oracle, fused by XLA), ``"gpu"`` (``kernel_gpu``: Pallas on Triton), ``"tpu"``
(JAX's splash attention, ``splash``), ``"interpret"`` (the GPU kernel in interpret mode, for
tests; the splash path runs in interpret mode through ``splash.attention(...,
interpret=True)``), ``"mosaic_gpu"`` (``kernel_mosaic_gpu``: Pallas on Mosaic GPU, Hopper
only) or ``"mosaic_interpret"`` (that kernel in Mosaic GPU's interpreter, for tests). The
compiled kernels run
unmasked calls with at most ``SMALL_FULL_KEYS`` keys (the sampler's small scales) with the
reference: a launch grid of one tile per batch row and head costs more than one fused XLA
op there. A head dim the kernels cannot take (not a power of two >= 16) falls back to the
reference with a one-time warning; the Mosaic GPU kernel takes head dims 64 and 128 in
float16/bfloat16 and hands other calls to the Triton kernel (``"gpu"``/``"interpret"``),
also with a one-time warning.

``hmar_attention(qkv, qkv_bias, temperature, spec)`` is the model's self-attention from
the packed ``mat_qkv`` output. The GPU kernel (and interpret mode) applies the bias, q/k
normalisation and temperature to each tile it loads (``kernel_gpu.forward_packed``), so
q, k and v are never written out in the forward pass (the Mosaic GPU kernel likewise,
``kernel_mosaic_gpu.forward_packed``); in the backward ``hmar_qkv``
prepares them once for the backward kernels and ``qkv_prologue``'s one-pass kernel turns
the kernels' dq, dk, dv into the packed gradients (beside the Mosaic GPU kernel, XLA's
differentiation of ``hmar_qkv`` does: that path holds no Triton kernel). Elsewhere
``reference.hmar_qkv`` prepares q, k, v and ``attention`` runs.

This module owns the ``custom_vjp`` around the GPU kernels' forward and backward; splash
attention brings its own.

Dimension letters: B batch, L tokens, N heads, K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hmar_jax.pallas import block_sparse, kernel_gpu, kernel_mosaic_gpu, qkv_prologue, splash
from hmar_jax.pallas.dispatch import Implementation, check_implementation, run_per_device
from hmar_jax.pallas.reference import hmar_qkv, reference_attention
from hmar_jax.scales import ScaleLayout

Pattern = Literal["block_diagonal", "block_causal", "full"]
SMALL_FULL_KEYS = 64
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("xla", "gpu", "tpu", "interpret", "mosaic_gpu",
                                              "mosaic_interpret")
# Kernels that run through this module's custom_vjp, and the Triton kernel that takes a
# Mosaic GPU call its kernel cannot (head dim, dtype).
_KERNELS = ("gpu", "interpret", "mosaic_gpu", "mosaic_interpret")
_MOSAIC_FALLBACK = {"mosaic_gpu": "gpu", "mosaic_interpret": "interpret"}
# The prologue backward (``qkv_prologue``) per attention kernel: its one-pass Triton kernel
# beside the Triton attention; XLA's differentiation of ``hmar_qkv`` beside the Mosaic GPU
# attention, so that path runs no kernel on the deprecated Triton lowering.
_PROLOGUE_BACKWARD = {"gpu": "gpu", "interpret": "interpret", "mosaic_gpu": "xla",
                      "mosaic_interpret": "xla"}


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """Tile sizes (powers of two >= 16) and Triton launch parameters of one kernel."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def kwargs(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Launch parameters of the forward, dK/dV and dQ kernels (GPU)."""

    forward: KernelLaunch = KernelLaunch()
    dkdv: KernelLaunch = KernelLaunch()
    dq: KernelLaunch = KernelLaunch()


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static description of one attention call (hashable, safe as a jit static arg).

    Attributes:
      pattern: mask pattern, see the module docstring.
      patch_nums: scales the sequence holds (ignored for ``full``).
      implementation: ``xla``, ``gpu``, ``tpu``, ``interpret``, ``mosaic_gpu`` or
        ``mosaic_interpret`` (module docstring).
      tiles: the Triton kernel's tile sizes.
      mosaic_tiles: the Mosaic GPU kernel's step sizes and pipeline depths.
    """

    pattern: Pattern = "block_diagonal"
    patch_nums: tuple[int, ...] = ()
    implementation: Implementation = "xla"
    tiles: KernelTiles = KernelTiles()
    mosaic_tiles: kernel_mosaic_gpu.MosaicTiles = kernel_mosaic_gpu.MosaicTiles()

    def __post_init__(self):
        if self.pattern not in ("block_diagonal", "block_causal", "full"):
            raise ValueError(f"Unknown attention pattern {self.pattern!r}; use 'block_diagonal', "
                             "'block_causal' or 'full'.")
        check_implementation(self.implementation, "attention", ATTENTION_IMPLEMENTATIONS)

    def with_pattern(self, pattern: Pattern) -> "AttentionSpec":
        return dataclasses.replace(self, pattern=pattern)

    def dense_mask(self) -> jax.Array | None:
        """bool ``[L, L]`` for the pattern, or None for ``full``."""
        if self.pattern == "full":
            return None
        return jnp.asarray(ScaleLayout(self.patch_nums).attention_mask(self.pattern))


@functools.lru_cache(maxsize=64)
def _ranges(pattern: str, patch_nums: tuple[int, ...], len_q: int, len_k: int):
    """Row ranges ``[Lq]`` and column ranges ``[Lk]`` (int32 numpy) for a pattern."""
    if pattern == "full":
        return (np.zeros(len_q, np.int32), np.full(len_q, len_k, np.int32),
                np.zeros(len_k, np.int32), np.full(len_k, len_q, np.int32))
    layout = ScaleLayout(patch_nums)
    return (*layout.key_ranges(pattern), *layout.query_ranges(pattern))


@dataclasses.dataclass(frozen=True)
class _Plan:
    kernel: str  # one of _KERNELS
    pattern: str
    patch_nums: tuple[int, ...]
    tiles: KernelTiles
    sm_scale: float
    mosaic_tiles: kernel_mosaic_gpu.MosaicTiles = kernel_mosaic_gpu.MosaicTiles()

    @property
    def mosaic(self) -> bool:
        return self.kernel.startswith("mosaic")

    @property
    def interpret(self) -> bool:
        return self.kernel in ("interpret", "mosaic_interpret")


def _mosaic_kwargs(launch: kernel_mosaic_gpu.MosaicLaunch, plan: _Plan) -> dict:
    return dict(block=launch.block, num_stages=launch.num_stages, sm_scale=plan.sm_scale,
                interpret=plan.interpret)


def _kernel_forward(plan: _Plan, q, k, v):
    row_start, row_end, _, _ = _ranges(plan.pattern, plan.patch_nums, q.shape[1], k.shape[1])
    if plan.mosaic:
        return kernel_mosaic_gpu.forward(q, k, v, row_start, row_end,
                                         **_mosaic_kwargs(plan.mosaic_tiles.forward, plan))
    t = plan.tiles
    return kernel_gpu.forward(q, k, v, row_start, row_end, sm_scale=plan.sm_scale,
                              interpret=plan.interpret, **t.forward.kwargs())


def _kernel_backward(plan: _Plan, q, k, v, o, lse, do):
    row_start, row_end, col_start, col_end = _ranges(plan.pattern, plan.patch_nums, q.shape[1],
                                                     k.shape[1])
    delta = block_sparse.softmax_delta(o, do)
    if plan.mosaic:
        m = plan.mosaic_tiles
        dk, dv = kernel_mosaic_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end,
                                                 **_mosaic_kwargs(m.dkdv, plan))
        dq = kernel_mosaic_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end,
                                           **_mosaic_kwargs(m.dq, plan))
        return dq, dk, dv
    t = plan.tiles
    interpret = plan.interpret
    dk, dv = kernel_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end,
                                      sm_scale=plan.sm_scale,
                                      interpret=interpret, **t.dkdv.kwargs())
    dq = kernel_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end,
                                sm_scale=plan.sm_scale, interpret=interpret,
                                **t.dq.kwargs())
    return dq, dk, dv


# The GPU forward kernel's name, and every attention forward kernel's (GPU and splash), for
# remat policies that keep their outputs.
FORWARD_KERNEL_NAME = "hmar_block_sparse_attention_fwd"
FORWARD_KERNEL_NAMES = (FORWARD_KERNEL_NAME, splash.FORWARD_KERNEL_NAME)


def _kernel_op(forward, backward):
    """A differentiable op ``op(plan, *inputs) -> o`` from a kernel forward
    ``forward(plan, *inputs) -> (o, lse)`` and ``backward(plan, *inputs, o, lse, do)``
    that returns the inputs' cotangents (the forward's inputs, o and lse are saved)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(plan: _Plan, *inputs):
        return forward(plan, *inputs)[0]

    def op_fwd(plan: _Plan, *inputs):
        o, lse = forward(plan, *inputs)
        return o, (*inputs, o, lse)

    def op_bwd(plan: _Plan, residuals, do):
        return tuple(backward(plan, *residuals, do.astype(residuals[-2].dtype)))

    op.defvjp(op_fwd, op_bwd)
    return op


def _packed_forward(plan: _Plan, qkv, qkv_bias, temperature):
    length = qkv.shape[1]
    row_start, row_end, _, _ = _ranges(plan.pattern, plan.patch_nums, length, length)
    if plan.mosaic:
        return kernel_mosaic_gpu.forward_packed(
            qkv, qkv_bias.astype(qkv.dtype), temperature, row_start, row_end,
            **_mosaic_kwargs(plan.mosaic_tiles.forward, plan))
    return kernel_gpu.forward_packed(qkv, qkv_bias.astype(qkv.dtype), temperature, row_start,
                                     row_end, sm_scale=plan.sm_scale, interpret=plan.interpret,
                                     **plan.tiles.forward.kwargs())


def _packed_backward(plan: _Plan, qkv, qkv_bias, temperature, o, lse, do):
    """The backward kernels take q, k, v prepared once by ``hmar_qkv``; ``qkv_prologue``'s
    pass turns their dq, dk, dv into the packed gradients."""
    q, k, v = hmar_qkv(qkv, qkv_bias, temperature)
    dq, dk, dv = _kernel_backward(plan, q, k, v, o, lse, do)
    return qkv_prologue.prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv,
                                          implementation=_PROLOGUE_BACKWARD[plan.kernel])


_kernel_attention = _kernel_op(_kernel_forward, _kernel_backward)
_packed_kernel_attention = _kernel_op(_packed_forward, _packed_backward)


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    logging.warning("Block-sparse attention kernel not used (%s); using the reference.", reason)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec,
              *, sm_scale: float = 1.0) -> jax.Array:
    """Multi-head attention under ``spec``, differentiable in q, k and v.

    Args:
      q: ``[B, Lq, N, K]``.
      k, v: ``[B, Lk, N, K]`` (same dtype as q); for the masked patterns
        Lq = Lk = L of ``spec.patch_nums``.
      spec: pattern, scales and implementation.
      sm_scale: logit multiplier (HMAR uses 1 with L2-normalised q and k).

    Returns:
      ``[B, Lq, N, K]`` in q's dtype.

    Example:
      >>> spec = AttentionSpec("block_diagonal", (1, 2, 3), "gpu")
      >>> out = attention(q, k, v, spec)          # q, k, v: [B, 14, N, K]
    """
    _check_length(spec, q.shape[1], k.shape[1])
    kernel = _implementation(spec, q.shape[-1], k.shape[1], q.dtype)
    if kernel == "xla":
        return reference_attention(q, k, v, spec.dense_mask(), sm_scale=sm_scale)
    if kernel == "tpu":
        return run_per_device(functools.partial(
            splash.attention, pattern=spec.pattern, patch_nums=tuple(spec.patch_nums),
            sm_scale=float(sm_scale)), (q, k, v))
    plan = _Plan(kernel, spec.pattern, tuple(spec.patch_nums), spec.tiles, float(sm_scale),
                 spec.mosaic_tiles)
    return run_per_device(functools.partial(_kernel_attention, plan), (q, k, v))


def _check_length(spec: AttentionSpec, len_q: int, len_k: int) -> None:
    """The masked patterns need exactly the L tokens of ``spec.patch_nums``."""
    if spec.pattern != "full":
        length = ScaleLayout(spec.patch_nums).seq_len
        if len_q != length or len_k != length:
            raise ValueError(f"{spec.pattern} attention over patch_nums {spec.patch_nums} needs "
                             f"{length} tokens, got q {len_q} and k {len_k}.")


def _implementation(spec: AttentionSpec, head_dim: int, len_k: int, dtype) -> str:
    """The implementation of one call, one of ``ATTENTION_IMPLEMENTATIONS`` (module
    docstring)."""
    kernel = spec.implementation
    if kernel != "xla" and (head_dim < 16 or head_dim & (head_dim - 1)):
        _warn_fallback(f"head dim {head_dim} is not a power of two >= 16")
        return "xla"
    if (kernel in ("gpu", "tpu", "mosaic_gpu") and spec.pattern == "full"
            and len_k <= SMALL_FULL_KEYS):
        return "xla"
    if kernel in _MOSAIC_FALLBACK and not kernel_mosaic_gpu.supports(head_dim, dtype):
        _warn_mosaic_fallback(head_dim, jnp.dtype(dtype).name)
        return _MOSAIC_FALLBACK[kernel]
    return kernel


@functools.lru_cache(maxsize=None)
def _warn_mosaic_fallback(head_dim: int, dtype: str) -> None:
    logging.warning("Mosaic GPU attention takes head dims %s in float16/bfloat16, not %d in %s; "
                    "using the Triton kernel.", kernel_mosaic_gpu.HEAD_DIMS, head_dim, dtype)


def hmar_attention(qkv: jax.Array, qkv_bias: jax.Array, temperature: jax.Array,
                   spec: AttentionSpec) -> jax.Array:
    """HMAR self-attention from the packed projection, differentiable in all three inputs.

    Equals ``attention(*reference.hmar_qkv(qkv, qkv_bias, temperature), spec)``: q and k
    are L2-normalised (float32) and q is scaled by its head's temperature, so the logits
    are ``temperature_h cos(q, k)``. The GPU kernels (and interpret modes) do this inside
    the forward kernel; splash attention (TPU) and the reference get prepared q, k, v.

    Args:
      qkv: ``[B, L, 3, N, K]``, the ``mat_qkv`` output without bias (compute dtype).
      qkv_bias: ``[3, N, K]`` (any float dtype; added in qkv's dtype).
      temperature: float32 ``[N]``.
      spec: pattern, scales and implementation; L must match ``spec.patch_nums`` unless
        ``full``.

    Returns:
      ``[B, L, N, K]`` in qkv's dtype.
    """
    _, length, three, heads, head_dim = qkv.shape
    if three != 3 or qkv_bias.shape != (3, heads, head_dim) or temperature.shape != (heads,):
        raise ValueError(f"hmar_attention needs qkv [B, L, 3, N, K], bias [3, N, K] and "
                         f"temperature [N]; got {qkv.shape}, {qkv_bias.shape}, "
                         f"{temperature.shape}.")
    kernel = _implementation(spec, head_dim, length, qkv.dtype)
    if kernel not in _KERNELS:
        return attention(*hmar_qkv(qkv, qkv_bias, temperature), spec)
    _check_length(spec, length, length)
    plan = _Plan(kernel, spec.pattern, tuple(spec.patch_nums), spec.tiles, 1.0,
                 spec.mosaic_tiles)
    return run_per_device(functools.partial(_packed_kernel_attention, plan), (qkv,),
                          (qkv_bias, temperature))
