"""The single attention entry point used by the model.

``attention(q, k, v, spec)`` computes multi-head attention over a next-scale token
sequence. ``spec`` says which scales the sequence holds and which pattern applies:

* ``block_diagonal`` (HMAR): each scale attends only to itself;
* ``block_causal`` (VAR): each scale attends to itself and all earlier scales;
* ``full``: no mask (one scale alone at sampling time, or a query block against a
  KV cache that holds exactly the legal keys).

Backends (``spec.backend``):

* ``auto`` (default): the Pallas kernel of the platform on GPU and TPU (but the
  reference for unmasked calls with at most ``SMALL_FULL_KEYS`` keys), the reference
  on CPU;
* ``reference``: plain jnp with a dense mask (the oracle; XLA fuses it);
* ``pallas``: the platform's kernel; on CPU the GPU kernel runs in Pallas interpret
  mode (slow; for tests);
* ``cudnn``: ``jax.nn.dot_product_attention`` with cuDNN's fused attention on GPU (a
  dense mask for the masked patterns, so no tile skipping); XLA's implementation
  elsewhere. On an H200 it samples d30 as fast as the kernel (648 vs 644 ms a batch),
  not faster, so ``auto`` does not pick it.

``hmar_attention(qkv, qkv_bias, temperature, spec)`` is the model's self-attention
from the packed ``mat_qkv`` output: on GPU (and in interpret mode) the kernel applies
the bias, q/k normalisation and temperature to each tile it loads
(``kernel_gpu.forward_packed``), so q, k and v are never written out in the forward
pass; elsewhere ``reference.hmar_qkv`` prepares them and ``attention`` runs. In the
backward (``AttentionSpec.prologue_backend``), ``hmar_qkv`` prepares q, k, v for the
backward kernels and XLA differentiates it (``xla``), or ``qkv_prologue``'s one-pass
kernel turns the kernels' dq, dk, dv into the packed gradients (``pallas``; ``auto``, the
default, picks it on GPU and ``xla`` in interpret mode); with
``pallas_fused`` the backward kernels also prepare the tiles they load from ``qkv``
(``kernel_gpu.backward_packed``) instead of reading q, k, v prepared by XLA.

This module owns the ``custom_vjp`` around the kernels' forward and backward. A head
dim the kernels cannot take (not a power of two >= 16) falls back to the reference
with a one-time warning.

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

from hmar_jax.pallas import kernel_gpu, qkv_prologue
from hmar_jax.pallas.qkv_prologue import PROLOGUE_BACKENDS
from hmar_jax.pallas.per_batch import per_batch_shard
from hmar_jax.pallas.reference import hmar_qkv, reference_attention
from hmar_jax.scales import ScaleLayout

Pattern = Literal["block_diagonal", "block_causal", "full"]
# ``auto`` runs unmasked calls with at most this many keys (the sampler's scales up to
# 8x8) with the reference: the kernel's grid of B x N programs with one tile each costs
# about 0.1 ms per call on an H200 at B = 128, N = 30, whatever the scale.
SMALL_FULL_KEYS = 64
Backend = Literal["auto", "reference", "pallas", "cudnn"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "pallas", "cudnn")


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
      backend: implementation choice, see the module docstring.
      tiles: kernel tile sizes.
      prologue_backend: the backward of ``hmar_attention``'s q/k/v prologue when the
        GPU kernel (or interpret mode) runs: ``xla`` prepares q, k, v with
        ``reference.hmar_qkv`` for the backward kernels and differentiates it; ``pallas``
        differentiates it with ``qkv_prologue``'s one-pass kernel; ``pallas_fused`` also
        prepares the tiles inside the backward kernels; ``auto`` (default) is ``pallas``
        on GPU and ``xla`` in interpret mode (module docstring).
    """

    pattern: Pattern = "block_diagonal"
    patch_nums: tuple[int, ...] = ()
    backend: Backend = "auto"
    tiles: KernelTiles = KernelTiles()
    prologue_backend: str = "auto"

    def __post_init__(self):
        if self.pattern not in ("block_diagonal", "block_causal", "full"):
            raise ValueError(f"Unknown attention pattern {self.pattern!r}; use 'block_diagonal', "
                             "'block_causal' or 'full'.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown attention backend {self.backend!r}; available: {BACKENDS}.")
        if self.prologue_backend not in PROLOGUE_BACKENDS:
            raise ValueError(f"Unknown prologue backend {self.prologue_backend!r}; use one of "
                             f"{PROLOGUE_BACKENDS}.")

    def dense_mask(self) -> jax.Array | None:
        """bool ``[L, L]`` for the pattern, or None for ``full``."""
        if self.pattern == "full":
            return None
        return jnp.asarray(ScaleLayout(self.patch_nums).attention_mask(self.pattern))


def resolve_backend(backend: Backend, platform: str | None = None) -> str:
    """Maps a configured backend to ``reference``, ``cudnn``, ``gpu``, ``tpu`` or
    ``interpret``."""
    platform = platform or jax.default_backend()
    if backend == "cudnn":
        return "cudnn"
    if backend == "reference" or (backend == "auto" and platform not in ("gpu", "tpu")):
        return "reference"
    if platform in ("gpu", "tpu"):
        return platform
    return "interpret"


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
    kernel: str  # gpu | tpu | interpret
    pattern: str
    patch_nums: tuple[int, ...]
    tiles: KernelTiles
    sm_scale: float
    prologue_backend: str = "xla"


def _kernel_forward(plan: _Plan, q, k, v):
    row_start, row_end, _, _ = _ranges(plan.pattern, plan.patch_nums, q.shape[1], k.shape[1])
    t = plan.tiles
    if plan.kernel == "tpu":
        from hmar_jax.pallas import kernel_tpu  # local: Mosaic TPU lowering only needed there

        return kernel_tpu.forward(q, k, v, row_start=row_start, row_end=row_end,
                                  sm_scale=plan.sm_scale)
    return kernel_gpu.forward(q, k, v, row_start, row_end, sm_scale=plan.sm_scale, interpret=plan.kernel == "interpret",
                              **t.forward.kwargs())


def _kernel_backward(plan: _Plan, q, k, v, o, lse, do):
    row_start, row_end, col_start, col_end = _ranges(plan.pattern, plan.patch_nums, q.shape[1],
                                                     k.shape[1])
    t = plan.tiles
    if plan.kernel == "tpu":
        from hmar_jax.pallas import kernel_tpu

        return kernel_tpu.backward(q, k, v, o, lse, do, row_start=row_start, row_end=row_end,
                                   col_start=col_start, col_end=col_end, sm_scale=plan.sm_scale)
    interpret = plan.kernel == "interpret"
    delta = kernel_gpu.softmax_delta(o, do)
    dk, dv = kernel_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end,
                                      sm_scale=plan.sm_scale,
                                      interpret=interpret, **t.dkdv.kwargs())
    dq = kernel_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end,
                                sm_scale=plan.sm_scale, interpret=interpret,
                                **t.dq.kwargs())
    return dq, dk, dv


# The GPU and TPU forward kernels' name, for remat policies that keep their outputs.
FORWARD_KERNEL_NAME = "hmar_block_sparse_attention_fwd"


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
    return kernel_gpu.forward_packed(qkv, qkv_bias.astype(qkv.dtype), temperature, row_start,
                                     row_end, sm_scale=plan.sm_scale,
                                     interpret=plan.kernel == "interpret",
                                     **plan.tiles.forward.kwargs())


def _packed_backward(plan: _Plan, qkv, qkv_bias, temperature, o, lse, do):
    """``prologue_backend`` ``"xla"`` and ``"pallas"``: the backward kernels take q, k, v
    prepared by ``hmar_qkv``; ``"pallas_fused"``: they prepare every tile they load from
    ``qkv`` (``kernel_gpu.backward_packed``). Then XLA (``"xla"``) or ``qkv_prologue``'s
    pass (the others) turns their dq, dk, dv into the packed gradients."""
    interpret = plan.kernel == "interpret"
    if plan.prologue_backend == "pallas_fused":
        length = qkv.shape[1]
        dq, dk, dv = kernel_gpu.backward_packed(
            qkv, qkv_bias.astype(qkv.dtype), temperature, do, lse,
            kernel_gpu.softmax_delta(o, do), _ranges(plan.pattern, plan.patch_nums, length, length),
            sm_scale=plan.sm_scale, dkdv_tiles=plan.tiles.dkdv.kwargs(),
            dq_tiles=plan.tiles.dq.kwargs(), interpret=interpret)
    else:
        q, k, v = hmar_qkv(qkv, qkv_bias, temperature)
        dq, dk, dv = _kernel_backward(plan, q, k, v, o, lse, do)
    vjp_backend = "xla" if plan.prologue_backend == "xla" else "pallas"
    return qkv_prologue.prologue_backward(qkv, qkv_bias, temperature, dq, dk, dv,
                                          backend=vjp_backend, interpret=interpret)


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
      spec: pattern, scales and backend.
      sm_scale: logit multiplier (HMAR uses 1 with L2-normalised q and k).

    Returns:
      ``[B, Lq, N, K]`` in q's dtype.

    Example:
      >>> spec = AttentionSpec("block_diagonal", (1, 2, 3))
      >>> out = attention(q, k, v, spec)          # q, k, v: [B, 14, N, K]
    """
    _check_length(spec, q.shape[1], k.shape[1])
    kernel = _implementation(spec, q.shape[-1], k.shape[1])
    if kernel == "reference":
        return reference_attention(q, k, v, spec.dense_mask(), sm_scale=sm_scale)
    if kernel == "cudnn":
        return fused_dense_attention(q, k, v, spec.dense_mask(), sm_scale=sm_scale)
    plan = _Plan(kernel, spec.pattern, tuple(spec.patch_nums), spec.tiles, float(sm_scale))
    return per_batch_shard(functools.partial(_kernel_attention, plan), (q, k, v))


def _check_length(spec: AttentionSpec, len_q: int, len_k: int) -> None:
    """The masked patterns need exactly the L tokens of ``spec.patch_nums``."""
    if spec.pattern != "full":
        length = ScaleLayout(spec.patch_nums).seq_len
        if len_q != length or len_k != length:
            raise ValueError(f"{spec.pattern} attention over patch_nums {spec.patch_nums} needs "
                             f"{length} tokens, got q {len_q} and k {len_k}.")


def _implementation(spec: AttentionSpec, head_dim: int, len_k: int) -> str:
    """``reference``, ``cudnn``, ``gpu``, ``tpu`` or ``interpret`` for one call."""
    kernel = resolve_backend(spec.backend)
    if kernel != "reference" and (head_dim < 16 or head_dim & (head_dim - 1)):
        _warn_fallback(f"head dim {head_dim} is not a power of two >= 16")
        kernel = "reference"
    if spec.backend == "auto" and spec.pattern == "full" and len_k <= SMALL_FULL_KEYS:
        kernel = "reference"  # the sampler's small scales: one fused XLA op beats a launch grid
    return kernel


def hmar_attention(qkv: jax.Array, qkv_bias: jax.Array, temperature: jax.Array,
                   spec: AttentionSpec) -> jax.Array:
    """HMAR self-attention from the packed projection, differentiable in all three inputs.

    Equals ``attention(*reference.hmar_qkv(qkv, qkv_bias, temperature), spec)``: q and k
    are L2-normalised (float32) and q is scaled by its head's temperature, so the logits
    are ``temperature_h cos(q, k)``. The GPU kernel (and interpret mode) does this inside
    the forward kernel; the TPU kernel, cuDNN and the reference get prepared q, k, v.

    Args:
      qkv: ``[B, L, 3, N, K]``, the ``mat_qkv`` output without bias (compute dtype).
      qkv_bias: ``[3, N, K]`` (any float dtype; added in qkv's dtype).
      temperature: float32 ``[N]``.
      spec: pattern, scales and backend; L must match ``spec.patch_nums`` unless ``full``.

    Returns:
      ``[B, L, N, K]`` in qkv's dtype.
    """
    _, length, three, heads, head_dim = qkv.shape
    if three != 3 or qkv_bias.shape != (3, heads, head_dim) or temperature.shape != (heads,):
        raise ValueError(f"hmar_attention needs qkv [B, L, 3, N, K], bias [3, N, K] and "
                         f"temperature [N]; got {qkv.shape}, {qkv_bias.shape}, "
                         f"{temperature.shape}.")
    kernel = _implementation(spec, head_dim, length)
    if kernel not in ("gpu", "interpret"):
        return attention(*hmar_qkv(qkv, qkv_bias, temperature), spec)
    _check_length(spec, length, length)
    plan = _Plan(kernel, spec.pattern, tuple(spec.patch_nums), spec.tiles, 1.0,
                 resolve_prologue_backend(spec.prologue_backend, kernel))
    return per_batch_shard(functools.partial(_packed_kernel_attention, plan), (qkv,),
                            (qkv_bias, temperature))


def resolve_prologue_backend(prologue_backend: str, kernel: str) -> str:
    """``AttentionSpec.prologue_backend`` for a kernel run (``gpu`` or ``interpret``):
    ``auto`` is ``pallas`` on GPU and ``xla`` in interpret mode (the CPU tests' speed)."""
    if prologue_backend != "auto":
        return prologue_backend
    return "pallas" if kernel == "gpu" else "xla"


def fused_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          *, sm_scale: float = 1.0) -> jax.Array:
    """``jax.nn.dot_product_attention``: cuDNN's fused kernel on GPU for bf16/fp16 inputs,
    XLA's implementation otherwise. ``mask`` bool ``[Lq, Lk]`` or None; ``[B, L, N, K]``."""
    fused = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    mask = None if mask is None else mask[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale,
                                        implementation="cudnn" if fused else None)
