"""Losses of both training stages, stage-2 mask sampling and label dropout.

Everything here runs in float32 whatever the compute dtype of the model.

Dimension letters: B batch, L tokens, V vocabulary, S scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hmar_jax.scales import ScaleLayout


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross entropy (no label smoothing), ``[B, L, V], [B, L] -> [B, L]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _per_scale_means(values: jax.Array, layout: ScaleLayout) -> jax.Array:
    """Mean of ``values [B, L]`` over batch and each scale's tokens -> ``[S]``."""
    sums = jax.ops.segment_sum(jnp.sum(values, axis=0), jnp.asarray(layout.level_ids),
                               num_segments=layout.num_scales)
    counts = np.asarray(layout.tokens_per_scale, np.float32) * values.shape[0]
    return sums / counts


def scale_weighted_cross_entropy(logits: jax.Array, targets: jax.Array, token_weights: jax.Array,
                                 layout: ScaleLayout) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 loss: ``mean_b sum_t w_t CE_t`` with per-scale metrics.

    Args:
      logits: ``[B, L, V]``.
      targets: int ``[B, L]`` token indices.
      token_weights: ``[L]`` from ``ScaleLayout.token_loss_weights`` (uniform, equal,
        lognorm).
      layout: the scale layout (for per-scale metrics).

    Returns:
      ``(loss, metrics)``; metrics hold the unweighted mean CE and top-1 accuracy overall
      (``ce``, ``accuracy``) and per scale (``ce_per_scale``, ``accuracy_per_scale``, [S]).
    """
    ce = token_cross_entropy(logits, targets)  # [B, L]
    loss = jnp.mean(jnp.sum(ce * token_weights[None, :], axis=-1))
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return loss, {"ce": jnp.mean(ce), "accuracy": jnp.mean(correct),
                  "ce_per_scale": _per_scale_means(ce, layout),
                  "accuracy_per_scale": _per_scale_means(correct, layout)}


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, masked_rows: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 loss: mean CE over the masked positions only.

    Args:
      logits: ``[B, L, V]`` of the mask head.
      targets: int ``[B, L]``.
      masked_rows: bool ``[B or 1, L - 1]`` over the teacher-forcing rows; row r is token
        r + 1 (scale 0 is never masked).

    Returns:
      ``(loss, metrics)`` with the masked-token accuracy and the number of masked tokens
      per image.
    """
    weights = jnp.broadcast_to(masked_rows, (targets.shape[0], targets.shape[1] - 1))
    weights = weights.astype(jnp.float32)
    ce = token_cross_entropy(logits[:, 1:], targets[:, 1:])  # [B, L-1]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    correct = (jnp.argmax(logits[:, 1:], axis=-1) == targets[:, 1:]).astype(jnp.float32)
    return jnp.sum(ce * weights) / count, {
        "masked_accuracy": jnp.sum(correct * weights) / count,
        "masked_tokens": jnp.sum(weights) / targets.shape[0]}


def sample_stage2_mask(rng: jax.Array, layout: ScaleLayout, ratio: jax.Array | None = None
                       ) -> jax.Array:
    """Upstream stage-2 masking, shared by the whole batch.

    Draws ``r ~ U[0, 1)`` (unless ``ratio`` is given) and, for every scale k >= 1,
    masks ``ceil(r p_k^2)`` positions chosen uniformly without replacement.

    Returns:
      bool ``[L - 1]`` over the teacher-forcing rows.
    """
    ratio_rng, *scale_rngs = jax.random.split(rng, layout.num_scales)
    if ratio is None:
        ratio = jax.random.uniform(ratio_rng)
    rows = []
    for k in range(1, layout.num_scales):
        n = layout.tokens_per_scale[k]
        count = jnp.ceil(ratio * n)
        ranks = jnp.argsort(jnp.argsort(jax.random.uniform(scale_rngs[k - 1], (n,))))
        rows.append(ranks < count)
    return jnp.concatenate(rows)


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float, null_class: int) -> jax.Array:
    """Classifier-free-guidance label dropout: each label becomes ``null_class`` w.p. ``rate``."""
    drop = jax.random.bernoulli(rng, rate, labels.shape)
    return jnp.where(drop, null_class, labels)
