"""Plain-jnp attention with an explicit [Lq, Lk] mask: the oracle for the kernels.

Dimension letters: B batch, Lq query length, Lk key length, N heads, K head dim.
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
