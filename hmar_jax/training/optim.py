"""Optimizer recipe of the upstream runs: AdamW, weight-decay groups, ``lin0`` schedule.

* AdamW with betas (0.9, 0.95), eps 1e-8, global-norm clipping (2.0 upstream).
* No weight decay for biases, position/level embeddings, the attention temperatures
  and the word-embedding bias; full decay for every matrix, ``class_emb`` and
  ``mask_embed`` (upstream's name rules, mapped onto our parameter names).
* ``lin0``: linear warm-up from ``warmup_start`` x peak, the peak held for the first 5% of
  the remaining steps, then linear decay to ``end_fraction`` x peak.
* Weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end`` over the
  run (constant when they are equal, as in most upstream configs).
* The moments are float32 as upstream's; ``execution.moment_dtype="bfloat16"`` stores the
  first moment in bfloat16 (half its memory: 4 GB less at d30) as a memory option.

The stage parameter groups (``STAGE1_TRAINABLE``, ``STAGE2_TRAINABLE``) live here too: what
the optimizer updates in each stage.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hmar_jax.cli import InputError
from hmar_jax.transformer import is_mask_branch

# Stage 1 trains everything but the mask branch; stage 2 only the mask branch (the other
# parameters are frozen and not even differentiated).
STAGE1_TRAINABLE = nnx.All(nnx.Param, nnx.Not(is_mask_branch))
STAGE2_TRAINABLE = nnx.All(nnx.Param, is_mask_branch)


def trainable_filter(stage: int):
    """The nnx filter of the parameters ``stage`` (1 or 2) trains."""
    if stage not in (1, 2):
        raise InputError(f"config.stage must be 1 or 2, got {stage}; set --config.stage=1 or 2.")
    return STAGE1_TRAINABLE if stage == 1 else STAGE2_TRAINABLE


class TrainingDiverged(InputError):
    """A non-finite loss or gradient: the learning rate, the user's choice, is too high for
    the run; the message names the rate to lower and the checkpoint a rerun resumes from."""


NO_DECAY_LEAVES = ("bias", "q_bias", "v_bias", "scale_mul", "word_embed_bias", "pos_start",
                   "pos_embed")
NO_DECAY_MODULES = ("lvl_embed",)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay (same tree structure as ``params``)."""

    def leaf(path, _):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        names = [n for n in names if n != "value"]
        return not (names[-1] in NO_DECAY_LEAVES or any(n in NO_DECAY_MODULES for n in names))

    return jax.tree_util.tree_map_with_path(leaf, params)


def lin0_schedule(peak: float, total_steps: int, warmup_steps: int, warmup_start: float = 0.005,
                  end_fraction: float = 0.1, hold_fraction: float = 0.05) -> optax.Schedule:
    """The upstream ``lin0`` learning-rate schedule as a function of the step."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (warmup_start + (1 - warmup_start) * step / max(warmup_steps, 1))
        progress = (step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1)
        decay = peak * (end_fraction + (1 - end_fraction) * (1 - progress) / (1 - hold_fraction))
        after = jnp.where(progress < hold_fraction, peak, jnp.minimum(decay, peak))
        return jnp.where(step < warmup_steps, warm, after)

    return schedule


def cosine_weight_decay(start: float, end: float, total_steps: int) -> optax.Schedule:
    """``end + (start - end) (0.5 + 0.5 cos(pi t / (T - 1)))`` (upstream ``twd -> twde``)."""

    def schedule(step):
        progress = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
        return end + (start - end) * (0.5 + 0.5 * jnp.cos(jnp.pi * jnp.minimum(progress, 1.0)))

    return schedule


def scheduled_weight_decay(schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adds ``schedule(step) * param`` to the update (decoupled weight decay)."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        rate = schedule(state.count)
        updates = jax.tree.map(lambda u, p: u + rate * p, updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def adamw(schedule: optax.Schedule, params: Any, *, weight_decay: float, grad_clip: float,
          b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay_end: float | None = None, total_steps: int = 1,
          moment_dtype: str = "float32") -> optax.GradientTransformation:
    """Clipped AdamW with the upstream decay groups for ``params``' tree; the first moment in
    ``moment_dtype`` (a resolved ``ExecutionConfig.moment_dtype``)."""
    end = weight_decay if weight_decay_end is None else weight_decay_end
    decay = cosine_weight_decay(weight_decay, end, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.dtype(moment_dtype)),
        optax.masked(scheduled_weight_decay(decay), decay_mask(params)),
        optax.scale_by_learning_rate(schedule))


def from_config(optimizer: Any, params: Any, total_steps: int, moment_dtype: str = "float32"
                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(AdamW, lr schedule)`` from a training config's ``optimizer`` block and the run's
    resolved ``execution.moment_dtype``."""
    schedule = lin0_schedule(optimizer.peak_lr, total_steps, optimizer.warmup_steps,
                             end_fraction=optimizer.end_fraction)
    tx = adamw(schedule, params, weight_decay=optimizer.weight_decay,
               weight_decay_end=optimizer.weight_decay_end, total_steps=total_steps,
               grad_clip=optimizer.grad_clip, b1=optimizer.b1, b2=optimizer.b2,
               moment_dtype=moment_dtype)
    return tx, schedule
