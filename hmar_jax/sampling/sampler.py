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
import numpy as np
from flax import nnx

from hmar_jax.sampling.editing import EditTarget, edit_target
from hmar_jax.tokenizer.model import VQVAE
from hmar_jax.transformer import HMARTransformer

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


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Upstream top-k then top-p filtering; removed entries become -inf.

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p drops, in ascending
    order, the entries whose cumulative probability (including themselves) is <= 1 - top_p,
    always keeping the largest. Both reduce to a per-row value threshold, so one
    descending sort of the values serves both (no index sorts): entry i of the descending
    order survives top-p when the probability of the entries above it is < top_p.
    ``logits [..., V]`` float32.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    use_k, use_p = 0 < top_k < vocab, 0.0 < top_p < 1.0
    if not (use_k or use_p):
        return logits
    descending = -jnp.sort(-logits, axis=-1)  # [..., V]
    threshold = descending[..., top_k - 1:top_k] if use_k else descending[..., -1:]
    if use_p:
        kept = jnp.where(descending >= threshold, descending, -jnp.inf)
        probs = jax.nn.softmax(kept, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # probability of the entries before i
        last = jnp.sum((above < top_p) & (kept > -jnp.inf), axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(descending, jnp.maximum(last, 0), axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def seed_array(seed) -> jax.Array | np.int32:
    """``seed`` as the int32 scalar the compiled samplers take as an argument, so that a
    new seed reuses the compiled program. A key keeps the low 32 bits of a Python integer
    seed, and so does this: every seed draws what ``jax.random.key(seed)`` draws. Raises
    ValueError for a seed that is not an integer."""
    if isinstance(seed, jax.Array):
        return seed
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    return np.uint32(int(seed) % 2**32).view(np.int32)


def sample_keys(seed, labels: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per sample from (seed, class, index): ``[B]`` keys; ``seed`` an integer or
    an int32 scalar (``seed_array``)."""
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
    return (ranks < count) & candidates


def _confidence(filtered: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.softmax(filtered, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _guide(logits: jax.Array, t: float) -> jax.Array:
    half = logits.shape[0] // 2
    return (1 + t) * logits[:half] - t * logits[half:]


TokenSampler = Callable[[int, jax.Array, jax.Array], jax.Array]


def _resolve_schedules(config: SamplingConfig, model: HMARTransformer):
    layout = model.config.layout
    schedules = config.mask_schedule or tuple((l,) for l in layout.tokens_per_scale)
    if schedules == "auto":
        schedules = default_mask_schedule(layout.patch_nums)
    if len(schedules) != layout.num_scales:
        raise ValueError(f"mask_schedule has {len(schedules)} entries for {layout.num_scales} scales.")
    for k, (schedule, count) in enumerate(zip(schedules, layout.tokens_per_scale)):
        if sum(schedule) != count:
            raise ValueError(f"mask_schedule[{k}] = {schedule} must sum to {count}.")
    refines = any(len(s) > 1 and count > 1 for s, count in zip(schedules, layout.tokens_per_scale))
    if refines and model.config.attention_pattern == "block_causal":
        raise ValueError("VAR-mode (block-causal) models sample without refinement; use "
                         "mask_schedule=None.")
    if refines and model.config.num_mask_layers == 0:
        raise ValueError("This model has no mask branch; use mask_schedule=None.")
    return schedules


def generate(model: HMARTransformer, vae: VQVAE, labels: jax.Array, sample_index: jax.Array,
             seed: int, config: SamplingConfig, *, edit: EditTarget | None = None,
             token_sampler: TokenSampler | None = None, return_trace: bool = False):
    """Samples images for ``labels`` (int ``[B]``; the null class gives unconditional ones).

    HMAR models (block-diagonal) run each scale alone; VAR-mode models
    (``attention_pattern="block_causal"``) run the same loop with a KV cache, each scale
    attending to all earlier ones (no refinement).

    Args:
      model: the HMAR transformer (mask branch needed when ``config.mask_schedule`` masks).
      vae: the tokenizer of the model.
      labels: int ``[B]`` classes.
      sample_index: int ``[B]`` index of each sample within its class (randomness).
      seed: global seed.
      config: sampling knobs.
      edit: tokens to keep (zero-shot editing, see ``edit_target``): at every scale the
        kept tokens replace the proposal, refinement re-masks only editable tokens, the
        final f_hat keeps the source's latent outside the edited region, and the image
        there is the source's reconstruction.
      token_sampler: replaces the categorical draw, ``(k, filtered [B, l, V], keys [B]) ->
        tokens [B, l]`` (teacher forcing in tests, custom samplers).
      return_trace: also return the raw logits, tokens and masked sets of every pass.

    Returns:
      images ``[B, H, W, 3]`` in [0, 1] (and the trace dict when asked).
    """
    mcfg, layout = model.config, model.config.layout
    num_scales, batch = layout.num_scales, labels.shape[0]
    schedules = _resolve_schedules(config, model)
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, mcfg.null_class)])  # [cond; uncond]
    keys = sample_keys(seed, labels, sample_index)
    modulations = model.adaln_modulations(labels2)  # once for all passes
    mask_cfg = config.cfg * 1e-6 if config.mask_cfg is None else config.mask_cfg
    kv_cache = None
    if mcfg.attention_pattern == "block_causal":
        kv_cache = model.init_kv_cache(2 * batch, model.execution.compute_dtype)
    f_hat = jnp.zeros((batch, layout.latent_side, layout.latent_side, mcfg.latent_channels))
    trace: dict[str, jax.Array] = {}

    def draw(k, step, filtered):
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, 100 * k + step))(keys)
        if token_sampler is not None:
            return token_sampler(k, filtered, step_keys)
        return draw_tokens(step_keys, filtered, config.temperature)

    def codes(k, tokens):  # tokens [B, l] -> scale k's codebook rows [B, p_k, p_k, Cv]
        side = layout.patch_nums[k]
        return vae.lookup(tokens.reshape(batch, side, side))

    for k, side in enumerate(layout.patch_nums):
        tokens_in_scale = side * side
        keep = None if edit is None else edit.keep[k]
        x_ns = None
        if k > 0:
            x_ns = vae.scale_input(k, f_hat).reshape(batch, tokens_in_scale, -1)  # [B, l, Cv]
            x_ns = jnp.concatenate([x_ns, x_ns])
        if kv_cache is None:
            logits = model.forward_scale(k, labels2, x_ns, modulations=modulations)  # [2B, l, V]
        else:
            logits, kv_cache = model.forward_scale(k, labels2, x_ns, kv_cache=kv_cache,
                                                   modulations=modulations)
        filtered = filter_logits(_guide(logits, config.guidance(k, num_scales)), config.top_k,
                                 config.top_p)
        tokens = draw(k, 0, filtered)  # [B, l]
        if keep is not None:
            tokens = jnp.where(keep, edit.tokens[k], tokens)
        if return_trace:
            trace[f"ns_logits_s{k}"] = logits
        schedule = schedules[k]
        if tokens_in_scale > 1 and len(schedule) > 1:
            editable = jnp.ones_like(tokens, bool) if keep is None else ~keep
            masked = _lowest(_confidence(filtered, tokens), editable, sum(schedule[1:]))
            for step in range(1, len(schedule)):
                if return_trace:
                    trace[f"mask_s{k}_step{step}"] = masked
                own = vae.scale_residual(k, codes(k, tokens))  # the scale's own contribution
                x_mask = vae.scale_input(k, own).reshape(batch, tokens_in_scale, -1)
                mask_logits = model.forward_scale(
                    k, labels2, x_ns, x_mask=jnp.concatenate([x_mask, x_mask]),
                    masked=jnp.concatenate([masked, masked]), modulations=modulations)
                if return_trace:
                    trace[f"mask_logits_s{k}_step{step}"] = mask_logits
                filtered = filter_logits(_guide(mask_logits, mask_cfg), config.top_k, config.top_p)
                tokens = jnp.where(masked, draw(k, step, filtered), tokens)
                if step < len(schedule) - 1:
                    masked = _lowest(_confidence(filtered, tokens), masked, sum(schedule[step + 1:]))
        if return_trace:
            trace[f"tokens_s{k}"] = tokens
        f_hat, _ = vae.add_scale(k, f_hat, codes(k, tokens))
    if edit is not None:
        f_hat = jnp.where(edit.latent_keep, edit.source_latent, f_hat)
    decoded = vae.decode_latent(f_hat)  # [B, H, W, 3] in [-1, 1]
    if edit is not None:
        decoded = jnp.where(edit.pixel_keep, vae.decode_latent(edit.source_latent), decoded)
    images = (decoded + 1.0) / 2.0
    return (images, trace) if return_trace else images


def generate_compiled(model: HMARTransformer, vae: VQVAE, labels: jax.Array,
                      sample_index: jax.Array, seed: int, config: SamplingConfig,
                      edit: EditTarget | None = None) -> jax.Array:
    """``generate`` compiled once per (model, scale list, config, batch size): no Python
    per token, and another ``seed`` runs the same program.

    Example:
      >>> images = generate_compiled(model, vae, jnp.array([207, 360]), jnp.array([0, 0]),
      ...                            seed=0, config=PRESETS["hmar-d16"])     # [2, 256, 256, 3]
    """
    return _generate_jit(model, vae, labels, sample_index, seed_array(seed), config, edit)


@nnx.jit(static_argnames="config")
def _generate_jit(model, vae, labels, sample_index, seed, config, edit):
    return generate(model, vae, labels, sample_index, seed, config, edit=edit)


def edit(model: HMARTransformer, vae: VQVAE, images: jax.Array, regenerate: jax.Array,
         labels: jax.Array, sample_index: jax.Array, seed: int, config: SamplingConfig
         ) -> jax.Array:
    """Zero-shot inpainting, outpainting or class-conditional editing.

    Args:
      images: ``[B, H, W, 3]`` in [0, 1], the sources.
      regenerate: bool ``[B, H, W]``, True where new content is sampled (see ``box_mask``).
      labels: int ``[B]``: a class for class-conditional edits, or ``model.config.num_classes``
        (the null class) for plain in/outpainting.
      sample_index, seed, config: as in ``generate``.

    Returns:
      ``[B, H, W, 3]`` in [0, 1].
    """
    check_labels(labels, model.config.num_classes, allow_null=True)
    target = edit_target(vae, jnp.asarray(images, jnp.float32), jnp.asarray(regenerate))
    return generate_compiled(model, vae, jnp.asarray(labels, jnp.int32),
                             jnp.asarray(sample_index, jnp.int32), seed=seed, config=config,
                             edit=target)


def check_labels(labels, num_classes: int, allow_null: bool = False) -> None:
    """Raises ValueError naming the first class id outside ``[0, num_classes)`` (or the
    null class ``num_classes`` when ``allow_null``). Python integers too large for any
    NumPy integer type are checked as well (they are out of range, not a crash)."""
    values = np.asarray(labels)
    if values.dtype.kind == "O" and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                        for v in values.flat):
        pass  # Python ints beyond int64: compared exactly below
    elif values.dtype.kind not in "iu":
        raise ValueError(f"Class ids must be integers, got dtype {values.dtype}.")
    limit = num_classes + 1 if allow_null else num_classes
    bad = values[((values < 0) | (values >= limit)).astype(bool)]
    if bad.size:
        allowed = f"0..{num_classes - 1}" + (f" or {num_classes} (unconditional)" if allow_null else "")
        raise ValueError(f"Class id {int(bad[0])} is out of range: this model has classes {allowed}.")
