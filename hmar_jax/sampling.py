"""HMAR sampling: next-scale proposals with masked refinement inside each scale.

Per scale k (a Python loop: shapes stay static), the next-scale branch proposes every
token of the scale from ``area(f_hat, p_k)`` alone (no KV cache), with classifier-free
guidance ramped as ``t_k = cfg k / (S - 1)`` over a ``[cond; uncond]`` batch. If the
scale's mask schedule has more than one entry, the least confident proposals are
re-masked and re-predicted by the mask branch over a few steps: the schedule's first
entry is the number of proposals kept, each later entry the number finalised at that
step, and only still-masked tokens can be re-masked (confidence = probability of the
sampled token under the filtered distribution, no noise). The scale is then added to
``f_hat`` and the next scale starts.

Randomness is per sample: sample i of class c draws from
``fold_in(fold_in(key(seed), c), i)``, so results do not depend on batch layout or
device count.

Dimension letters: B batch, S scales, p side of a scale, l = p^2 tokens, V vocabulary,
P latent side, Cv latent channels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hmar_jax.model import HMARTransformer
from hmar_jax.vqvae import VQVAE

DEFAULT_MASK_SCHEDULE_256 = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,),
                             (256,))


def default_mask_schedule(patch_nums: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Upstream's default refinement for any scale list: the 2x2 scale keeps 1 proposal and
    re-predicts 3 in one step, the 3x3 scale keeps 1 and finalises 1, 2, 5 in three steps,
    every other scale is a single next-scale pass (14 passes at 256 px)."""
    special = {2: (1, 3), 3: (1, 1, 2, 5)}
    return tuple(special.get(p, (p * p,)) for p in patch_nums)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Every sampling knob (hashable: it is a static argument of the compiled sampler).

    Attributes:
      cfg: classifier-free guidance scale at the last scale (ramped from 0 at scale 0).
      top_k: keep the k largest logits (ties kept); 0 disables.
      top_p: nucleus threshold in (0, 1); 0 or 1 disables.
      temperature: softmax temperature of the token draw (upstream: 1).
      mask_schedule: per scale, tokens kept from the proposal then finalised per mask
        step; ``"auto"`` uses ``default_mask_schedule``; None runs the next-scale branch
        alone (no refinement).
      mask_cfg: guidance scale of the mask steps (upstream: cfg 1e-6, i.e. none).
    """

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    temperature: float = 1.0
    mask_schedule: tuple[tuple[int, ...], ...] | str | None = "auto"
    mask_cfg: float | None = None

    def guidance(self, k: int, num_scales: int) -> float:
        return self.cfg * k / max(num_scales - 1, 1)


# Named presets per released checkpoint (upstream config/sample and config/evaluate).
PRESETS: dict[str, SamplingConfig] = {
    "hmar-d16": SamplingConfig(cfg=1.7, top_k=1000, top_p=0.99),
    "hmar-d20": SamplingConfig(cfg=1.9, top_k=950, top_p=0.99),
    "hmar-d24": SamplingConfig(cfg=2.1, top_k=900, top_p=0.99),
    "hmar-d30": SamplingConfig(cfg=1.7, top_k=1000, top_p=0.99),
    "hmar-d30-fid": SamplingConfig(cfg=1.6, top_k=650, top_p=0.99),
    "var-readme": SamplingConfig(cfg=1.5, top_k=900, top_p=0.96, mask_schedule=None),
}


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Upstream top-k then top-p filtering; removed entries become -inf.

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p sorts ascending and drops
    the entries whose cumulative probability (including themselves) is <= 1 - top_p, always
    keeping the largest. ``logits [..., V]`` float32.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if 0.0 < top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
        drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def sample_keys(seed: int, labels: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per sample from (seed, class, index): ``[B]`` keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda c, i: jax.random.fold_in(jax.random.fold_in(base, c), i))(labels, indices)


def draw_tokens(keys: jax.Array, filtered: jax.Array, temperature: float) -> jax.Array:
    """One categorical draw per token with per-sample keys: ``[B, l, V] -> [B, l]``."""
    return jax.vmap(lambda key, lg: jax.random.categorical(key, lg / temperature, axis=-1))(
        keys, filtered).astype(jnp.int32)


def _lowest(confidence: jax.Array, candidates: jax.Array, count: int) -> jax.Array:
    """bool ``[B, l]``: the ``count`` lowest-confidence positions among ``candidates``."""
    ranked = jnp.argsort(jnp.where(candidates, confidence, jnp.inf), axis=-1)
    ranks = jnp.argsort(ranked, axis=-1)
    return ranks < count


def _confidence(filtered: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.softmax(filtered, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _guide(logits: jax.Array, t: float) -> jax.Array:
    half = logits.shape[0] // 2
    return (1 + t) * logits[:half] - t * logits[half:]


TokenSampler = Callable[[int, jax.Array, jax.Array], jax.Array]


def generate(model: HMARTransformer, vae: VQVAE, labels: jax.Array, sample_index: jax.Array,
             seed: int, config: SamplingConfig, *, token_sampler: TokenSampler | None = None,
             return_trace: bool = False):
    """Samples images for ``labels`` (int ``[B]``; the null class gives unconditional ones).

    Args:
      model: the HMAR transformer (mask branch needed when ``config.mask_schedule`` masks).
      vae: the tokenizer of the model.
      labels: int ``[B]`` classes.
      sample_index: int ``[B]`` index of each sample within its class (randomness).
      seed: global seed.
      config: sampling knobs.
      token_sampler: replaces the categorical draw, ``(k, filtered [B, l, V], keys [B]) ->
        tokens [B, l]`` (teacher forcing in tests, custom samplers).
      return_trace: also return the raw logits and masked sets of every pass.

    Returns:
      images ``[B, H, W, 3]`` in [0, 1] (and the trace dict when asked).
    """
    mcfg, layout = model.config, model.config.layout
    num_scales, batch = layout.num_scales, labels.shape[0]
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, mcfg.null_class)])  # [cond; uncond]
    keys = sample_keys(seed, labels, sample_index)
    mask_cfg = config.cfg * 1e-6 if config.mask_cfg is None else config.mask_cfg
    schedules = config.mask_schedule or tuple((l,) for l in layout.tokens_per_scale)
    if schedules == "auto":
        schedules = default_mask_schedule(layout.patch_nums)
    if len(schedules) != num_scales:
        raise ValueError(f"mask_schedule has {len(schedules)} entries for {num_scales} scales.")
    f_hat = jnp.zeros((batch, layout.latent_side, layout.latent_side, mcfg.latent_channels))
    trace: dict[str, jax.Array] = {}

    def draw(k, step, filtered):
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, 100 * k + step))(keys)
        if token_sampler is not None:
            return token_sampler(k, filtered, step_keys)
        return draw_tokens(step_keys, filtered, config.temperature)

    for k, side in enumerate(layout.patch_nums):
        tokens_in_scale = side * side
        x_ns = None
        if k > 0:
            x_ns = vae.scale_input(k, f_hat).reshape(batch, tokens_in_scale, -1)  # [B, l, Cv]
            x_ns = jnp.concatenate([x_ns, x_ns])
        logits = model.forward_scale(k, labels2, x_ns)  # [2B, l, V]
        filtered = filter_logits(_guide(logits, config.guidance(k, num_scales)), config.top_k,
                                 config.top_p)
        tokens = draw(k, 0, filtered)  # [B, l]
        if return_trace:
            trace[f"ns_logits_s{k}"] = logits
        schedule = schedules[k]
        if sum(schedule) != tokens_in_scale:
            raise ValueError(f"mask_schedule[{k}] = {schedule} must sum to {tokens_in_scale}.")
        if tokens_in_scale > 1 and len(schedule) > 1:
            masked = _lowest(_confidence(filtered, tokens), jnp.ones_like(tokens, bool),
                             sum(schedule[1:]))
            for step in range(1, len(schedule)):
                if return_trace:
                    trace[f"mask_s{k}_step{step}"] = masked
                own = vae.scale_residual(k, vae.lookup(tokens.reshape(batch, side, side)))
                x_mask = vae.scale_input(k, own).reshape(batch, tokens_in_scale, -1)
                mask_logits = model.forward_scale(
                    k, labels2, x_ns, x_mask=jnp.concatenate([x_mask, x_mask]),
                    masked=jnp.concatenate([masked, masked]))
                if return_trace:
                    trace[f"mask_logits_s{k}_step{step}"] = mask_logits
                filtered = filter_logits(_guide(mask_logits, mask_cfg), config.top_k, config.top_p)
                tokens = jnp.where(masked, draw(k, step, filtered), tokens)
                if step < len(schedule) - 1:
                    masked = _lowest(_confidence(filtered, tokens), masked, sum(schedule[step + 1:]))
        f_hat = f_hat + vae.scale_residual(k, vae.lookup(tokens.reshape(batch, side, side)))
    images = (vae.decode_latent(f_hat) + 1.0) / 2.0
    return (images, trace) if return_trace else images


@nnx.jit(static_argnames=("seed", "config"))
def generate_compiled(model: HMARTransformer, vae: VQVAE, labels: jax.Array,
                      sample_index: jax.Array, seed: int, config: SamplingConfig) -> jax.Array:
    """``generate`` compiled once per (model, scale list, config): no Python per token.

    Example:
      >>> images = generate_compiled(model, vae, jnp.array([207, 360]), jnp.array([0, 0]),
      ...                            seed=0, config=PRESETS["hmar-d16"])     # [2, 256, 256, 3]
    """
    return generate(model, vae, labels, sample_index, seed, config)
