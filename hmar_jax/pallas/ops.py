"""The single attention entry point used by the model.

``attention(q, k, v, spec)`` computes multi-head attention over a next-scale token
sequence. ``spec`` says which scales the sequence holds and which pattern applies:

* ``block_diagonal`` (HMAR): each scale attends only to itself;
* ``block_causal`` (VAR): each scale attends to itself and all earlier scales;
* ``full``: no mask (one scale alone at sampling time, or a query block against a
  KV cache that holds exactly the legal keys).

Backends: ``reference`` (plain jnp with a dense [L, L] mask, the oracle). The
block-sparse Pallas kernels plug in here; the model never imports a kernel directly.

Dimension letters: B batch, L tokens, N heads, K head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from hmar_jax.pallas.reference import reference_attention
from hmar_jax.scales import ScaleLayout

Pattern = Literal["block_diagonal", "block_causal", "full"]
Backend = Literal["reference"]
BACKENDS: tuple[str, ...] = ("reference",)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static description of one attention call (hashable, safe as a jit static arg).

    Attributes:
      pattern: mask pattern, see the module docstring.
      patch_nums: scales the sequence holds (ignored for ``full``).
      backend: implementation to use.
    """

    pattern: Pattern = "block_diagonal"
    patch_nums: tuple[int, ...] = ()
    backend: Backend = "reference"

    def __post_init__(self):
        if self.pattern not in ("block_diagonal", "block_causal", "full"):
            raise ValueError(f"Unknown attention pattern {self.pattern!r}; use 'block_diagonal', "
                             "'block_causal' or 'full'.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown attention backend {self.backend!r}; available: {BACKENDS}.")

    def dense_mask(self) -> jax.Array | None:
        """bool ``[L, L]`` for the pattern, or None for ``full``."""
        if self.pattern == "full":
            return None
        return jnp.asarray(ScaleLayout(self.patch_nums).attention_mask(self.pattern))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec,
              *, sm_scale: float = 1.0) -> jax.Array:
    """Multi-head attention under ``spec``.

    Args:
      q: ``[B, Lq, N, K]``.
      k, v: ``[B, Lk, N, K]``; for the masked patterns Lq = Lk = L of ``spec.patch_nums``.
      spec: pattern and backend.
      sm_scale: logit multiplier.

    Returns:
      ``[B, Lq, N, K]``.

    Example:
      >>> spec = AttentionSpec("block_diagonal", (1, 2, 3))
      >>> out = attention(q, k, v, spec)          # q, k, v: [B, 14, N, K]
    """
    if spec.pattern != "full":
        length = ScaleLayout(spec.patch_nums).seq_len
        if q.shape[1] != length or k.shape[1] != length:
            raise ValueError(f"{spec.pattern} attention over patch_nums {spec.patch_nums} needs "
                             f"{length} tokens, got q {q.shape[1]} and k {k.shape[1]}.")
    return reference_attention(q, k, v, spec.dense_mask(), sm_scale=sm_scale)
