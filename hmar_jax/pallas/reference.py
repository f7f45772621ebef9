"""Plain-jnp attention with an explicit [Lq, Lk] mask, and HMAR's q/k/v prologue: the
oracles for the kernels.

Dimension letters: B batch, L/Lq/Lk tokens, N heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                        *, sm_scale: float = 1.0) -> jax.Array:
    """``softmax(sm_scale q k^T + mask) v`` with the softmax in float32.

    Args:
      q: ``[B, Lq, N, K]``.
      k: ``[B, Lk, N, K]``.
      v: ``[B, Lk, N, K]``.
      mask: optional bool ``[Lq, Lk]``; True where attention is allowed. Every row must
        allow at least one key.
      sm_scale: logit multiplier (1 for HMAR's L2-normalised attention).

    Returns:
      ``[B, Lq, N, K]`` in v's dtype.
    """
    logits = jnp.einsum("bqnk,bsnk->bnqs", q, k,
                        preferred_element_type=jnp.float32) * sm_scale  # [B, N, Lq, Lk]
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqs,bsnk->bqnk", weights, v, preferred_element_type=jnp.float32).astype(v.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(|x|, eps)`` over the last axis (PyTorch ``F.normalize``), in float32."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    return x32 / jnp.maximum(norm, eps)


def hmar_qkv(qkv: jax.Array, qkv_bias: jax.Array, temperature: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HMAR's attention inputs from the packed projection (the fused kernel's prologue).

    Args:
      qkv: ``[B, L, 3, N, K]`` output of ``mat_qkv`` (no bias), in the compute dtype.
      qkv_bias: ``[3, N, K]`` (the key row is zero upstream); added in qkv's dtype.
      temperature: float32 ``[N]``, the per-head logit scale.

    Returns:
      ``q, k, v`` ``[B, L, N, K]`` in qkv's dtype: q and k L2-normalised in float32 over
      K, q multiplied by its head's temperature.
    """
    x = qkv + qkv_bias.astype(qkv.dtype)
    q = (l2_normalize(x[:, :, 0]) * temperature[:, None]).astype(qkv.dtype)
    k = l2_normalize(x[:, :, 1]).astype(qkv.dtype)
    return q, k, x[:, :, 2]
