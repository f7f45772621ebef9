"""The HMAR transformer: a Markovian next-scale branch and a masked-refinement branch.

One module holds both branches of the released combined model:

* ``blocks`` (depth d, stacked on a leading layer axis) with ``head_nm``/``head``: the
  next-scale predictor (stage 1, "NSP"). Upstream splits these into ``base_blocks``
  (the first d - n) and ``ns_blocks`` (the last n).
* ``mask_blocks`` (n) with ``mask_head_nm``/``mask_head`` and ``mask_embed``: the
  masked-prediction tail (stage 2). The mask branch runs ``blocks[:d - n]`` (shared,
  not copied) followed by ``mask_blocks``.

Three forwards share the weights: ``__call__`` (stage-1 training over all L tokens),
``forward_masked`` (stage-2 training) and ``forward_scale`` (one scale alone, as the
sampler runs it; with a KV cache for VAR mode). ``attention_pattern='block_causal'``
turns the model into VAR (no mask branch needed).

Dimension letters: B batch, L tokens, S scales, p side of one scale, C width,
D conditioning width (= C), N heads, K head dim, V vocabulary, Cv latent channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.execution import REFERENCE, ExecutionConfig
from hmar_jax.pallas import ops
from hmar_jax.transformer import stack
from hmar_jax.transformer.config import HMARConfig
from hmar_jax.transformer.layers import AdaLNBeforeHead, AdaLNSelfAttnBlock, Head, InitScales


def _stacked_blocks(cfg: HMARConfig, execution: ExecutionConfig, count: int, init: InitScales,
                    rngs: nnx.Rngs):
    """``count`` blocks with every parameter stacked on a leading layer axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> AdaLNSelfAttnBlock:
        return AdaLNSelfAttnBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.width, cfg.norm_eps,
                                  jnp.dtype(execution.compute_dtype), init, rngs,
                                  gelu=execution.gelu, layer_norm=execution.layer_norm)

    return create(rngs)


class HMARTransformer(nnx.Module):
    """Class-conditional next-scale predictor with a masked-refinement branch.

    ``execution`` (resolved, ``hmar_jax.execution``) sets the compute dtypes, the kernels,
    rematerialisation and scanned or unrolled blocks; the default is the plain-jnp
    reference in float32.

    Example:
      >>> model = HMARTransformer(preset("tiny"), rngs=nnx.Rngs(0))
      >>> x = jnp.zeros((2, model.config.layout.seq_len - 1, 8))   # teacher forcing [B, L-1, Cv]
      >>> model(x, jnp.array([3, 10])).shape                       # label 10 = null class
      (2, 30, 64)
    """

    def __init__(self, cfg: HMARConfig, execution: ExecutionConfig = REFERENCE, *,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.execution = execution.require_resolved("HMARTransformer")
        c, layout = cfg.width, cfg.layout
        init = InitScales(cfg.init_std, cfg.depth, cfg.init_adaln, cfg.init_adaln_gamma, cfg.init_head)
        normal = nnx.initializers.normal(cfg.init_std)
        self.class_emb = nnx.Embed(cfg.num_classes + 1, c, embedding_init=normal, rngs=rngs)
        self.pos_start = nnx.Param(normal(rngs.params(), (c,)))
        self.pos_embed = nnx.Param(normal(rngs.params(), (layout.seq_len, c)))
        self.lvl_embed = nnx.Embed(layout.num_scales, c, embedding_init=normal, rngs=rngs)
        self.word_embed = nnx.Linear(cfg.latent_channels, c, use_bias=False, kernel_init=normal,
                                     rngs=rngs)
        self.word_embed_bias = nnx.Param(jnp.zeros((c,), jnp.float32))
        self.blocks = _stacked_blocks(cfg, execution, cfg.depth, init, rngs)
        self.head_nm, self.head = self._make_head(cfg, execution, init, rngs)
        if cfg.num_mask_layers:
            self.mask_blocks = _stacked_blocks(cfg, execution, cfg.num_mask_layers, init, rngs)
            self.mask_head_nm, self.mask_head = self._make_head(cfg, execution, init, rngs)
            self.mask_embed = nnx.Param(normal(rngs.params(), (c,)))
        else:
            self.mask_blocks = self.mask_head_nm = self.mask_head = self.mask_embed = None

    @staticmethod
    def _make_head(cfg: HMARConfig, execution: ExecutionConfig, init: InitScales,
                   rngs: nnx.Rngs):
        norm = AdaLNBeforeHead(cfg.width, cfg.width, cfg.norm_eps, init, rngs)
        head = Head(cfg.width, cfg.vocab_size, matmul_dtype=execution.head_dtype,
                    kernel_init=init.kernel_init, rngs=rngs)
        head.kernel[...] = head.kernel[...] * init.head
        return norm, head

    # ----- embeddings -------------------------------------------------------------------
    def condition(self, labels: jax.Array) -> jax.Array:
        """Class vectors ``[B, D]`` (AdaLN conditioning and start-token content)."""
        return self.class_emb(labels)

    def _level_position(self, token_slice: slice) -> jax.Array:
        level_ids = jnp.asarray(self.config.layout.level_ids[token_slice])
        return self.lvl_embed(level_ids) + self.pos_embed[token_slice]  # [l, C]

    def _word_embedding(self, x_ns: jax.Array, x_mask: jax.Array | None,
                        masked: jax.Array | None) -> jax.Array:
        """Token inputs ``[B, l, Cv]`` -> ``[B, l, C]``.

        Next-scale branch: ``W x_ns + b``. Mask branch: ``W x_ns + (mask_embed if masked
        else W x_mask) + b`` with ``masked`` bool ``[B or 1, l]``.
        """
        words = self.word_embed(x_ns.astype(jnp.float32))
        if x_mask is not None:
            if self.mask_embed is None:
                raise ValueError("This model has no mask branch (num_mask_layers=0).")
            own = self.word_embed(x_mask.astype(jnp.float32))
            words = words + jnp.where(masked[..., None], self.mask_embed[...], own)
        return words + self.word_embed_bias[...]

    def embed_sequence(self, cond: jax.Array, x_ns: jax.Array, x_mask: jax.Array | None = None,
                       masked: jax.Array | None = None) -> jax.Array:
        """Full sequence ``[B, L, C]``: start token, then the L - 1 token inputs."""
        start = (cond + self.pos_start[...])[:, None]  # [B, 1, C]
        words = self._word_embedding(x_ns, x_mask, masked)  # [B, L-1, C]
        return jnp.concatenate([start, words], axis=1) + self._level_position(slice(None))

    def embed_scale(self, k: int, cond: jax.Array, x_ns: jax.Array | None,
                    x_mask: jax.Array | None = None, masked: jax.Array | None = None) -> jax.Array:
        """Scale k alone ``[B, p_k^2, C]``; for k = 0 only ``cond`` is used."""
        position = self._level_position(self.config.layout.token_slice(k))
        if k == 0:
            return (cond + self.pos_start[...])[:, None] + position
        return self._word_embedding(x_ns, x_mask, masked) + position

    # ----- block stacks -------------------------------------------------------------------
    def _drop_rates(self) -> np.ndarray:
        return np.linspace(0.0, self.config.drop_path_rate, self.config.depth, dtype=np.float32)

    def _run(self, blocks: nnx.Module, layers: slice, rate_offset: int, x: jax.Array,
             cond: jax.Array, spec: ops.AttentionSpec, rng: jax.Array | None,
             kv_cache=None, cache_start: int = 0, modulations: jax.Array | None = None):
        """Runs ``blocks[layers]`` on ``x [B, l, C]`` with the execution's strategy
        (``transformer.stack``); returns ``(x, kv_cache)``.

        ``modulations``: the whole stack's AdaLN vectors ``[layers, B, 6 C]`` when already
        computed (``adaln_modulations``), sliced like the parameters.
        """
        selected = stack.Layers.of(blocks, layers)
        if selected.count == 0:
            return x, kv_cache
        modulations = None if modulations is None else modulations[layers]
        x = x.astype(jnp.float32)
        if kv_cache is not None:
            return stack.run_cached(selected, x, cond, spec, modulations=modulations,
                                    kv_cache=kv_cache, cache_start=cache_start,
                                    scan=self.execution.scan_blocks)
        rates = jnp.asarray(self._drop_rates()[rate_offset:rate_offset + selected.count])
        keys = jax.random.split(rng, selected.count) if rng is not None else None
        run = (stack.run_scanned if self.execution.scan_blocks and selected.stacked
               else stack.run_unrolled)
        return run(selected, x, cond, spec, rates=rates, keys=keys, modulations=modulations,
                   remat=self.execution.remat), None

    def _next_scale_trunk(self, h, cond, spec, rng, kv_cache=None, cache_start=0,
                          modulations=None):
        modulations = modulations or {}
        h, kv_cache = self._run(self.blocks, slice(None), 0, h, cond, spec, rng, kv_cache,
                                cache_start, modulations.get("blocks"))
        return self.head(self.head_nm(h, cond)), kv_cache

    def _mask_trunk(self, h, cond, spec, rng, modulations=None):
        if self.mask_blocks is None:
            raise ValueError("This model has no mask branch (num_mask_layers=0).")
        base, modulations = self.config.num_base_layers, modulations or {}
        rng_base, rng_tail = (None, None) if rng is None else tuple(jax.random.split(rng))
        h, _ = self._run(self.blocks, slice(0, base), 0, h, cond, spec, rng_base,
                         modulations=modulations.get("blocks"))
        h, _ = self._run(self.mask_blocks, slice(None), base, h, cond, spec, rng_tail,
                         modulations=modulations.get("mask_blocks"))
        return self.mask_head(self.mask_head_nm(h, cond))

    def adaln_modulations(self, labels: jax.Array) -> dict[str, jax.Array]:
        """Every block's AdaLN vectors for ``labels [B]``, float32.

        Returns ``{"blocks": [depth, B, 6 C], "mask_blocks": [n, B, 6 C]}`` (no
        ``mask_blocks`` without a mask branch). They depend only on the labels, so the
        sampler computes them once per batch and hands them to every ``forward_scale``
        instead of re-running ``ada_lin`` (one weight read per block) in every pass.
        """
        cond = self.condition(labels)

        out = {"blocks": stack.Layers.of(self.blocks, slice(None)).modulations(cond)}
        if self.mask_blocks is not None:
            out["mask_blocks"] = stack.Layers.of(self.mask_blocks, slice(None)).modulations(cond)
        return out

    def attention_spec(self, pattern: str) -> ops.AttentionSpec:
        """The blocks' ``AttentionSpec`` for ``pattern`` with the resolved implementation."""
        return ops.AttentionSpec(pattern, self.config.patch_nums, self.execution.attention)

    def _sequence_spec(self) -> ops.AttentionSpec:
        return self.attention_spec(self.config.attention_pattern)

    def _check_sequence(self, x: jax.Array, labels: jax.Array) -> None:
        cfg = self.config
        want = (cfg.layout.seq_len - 1, cfg.latent_channels)
        if x.ndim != 3 or tuple(x.shape[1:]) != want or labels.shape != (x.shape[0],):
            raise ValueError(f"Expected token inputs [B, {want[0]}, {want[1]}] and labels [B], "
                             f"got {tuple(x.shape)} and {tuple(labels.shape)}.")

    # ----- forwards -------------------------------------------------------------------------
    def __call__(self, x_ns: jax.Array, labels: jax.Array, *, rng: jax.Array | None = None
                 ) -> jax.Array:
        """Stage-1 (next-scale) training forward.

        Args:
          x_ns: teacher-forcing inputs ``[B, L - 1, Cv]`` (``VQVAE.teacher_forcing_inputs``).
          labels: int ``[B]``; ``num_classes`` is the null class (label dropout is the
            caller's job, see ``losses.drop_labels``).
          rng: enables stochastic depth when given.

        Returns:
          float32 logits ``[B, L, V]``.
        """
        self._check_sequence(x_ns, labels)
        cond = self.condition(labels)
        logits, _ = self._next_scale_trunk(self.embed_sequence(cond, x_ns), cond,
                                           self._sequence_spec(), rng)
        return logits

    def forward_masked(self, x_ns: jax.Array, x_mask: jax.Array, masked: jax.Array,
                       labels: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Stage-2 (masked prediction) training forward.

        Args:
          x_ns: ``[B, L - 1, Cv]`` next-scale inputs.
          x_mask: ``[B, L - 1, Cv]`` mask-branch inputs (``VQVAE.mask_branch_inputs``).
          masked: bool ``[B or 1, L - 1]``; True rows get ``mask_embed`` instead of
            ``W x_mask``. Scale 0 has no row and is never masked.
          labels: int ``[B]``.
          rng: enables stochastic depth when given (frozen blocks included, as upstream).

        Returns:
          float32 logits ``[B, L, V]`` of the mask head.
        """
        self._check_sequence(x_ns, labels)
        cond = self.condition(labels)
        h = self.embed_sequence(cond, x_ns, x_mask, masked)
        return self._mask_trunk(h, cond, self._sequence_spec(), rng)

    def forward_scale(self, k: int, labels: jax.Array, x_ns: jax.Array | None = None, *,
                      x_mask: jax.Array | None = None, masked: jax.Array | None = None,
                      kv_cache=None, modulations: dict[str, jax.Array] | None = None):
        """One scale alone, as at sampling time (no mask; no cache needed for HMAR).

        Args:
          k: scale index (static).
          labels: int ``[B]``.
          x_ns: ``[B, p_k^2, Cv]`` = ``area(f_hat, p_k)`` flattened; None for k = 0.
          x_mask, masked: mask-branch inputs ``[B, p_k^2, Cv]`` and bool ``[B, p_k^2]``;
            when given the mask branch runs instead of the next-scale branch.
          kv_cache: VAR mode only: ``(k, v)`` each ``[depth, B, L, N, K]`` from
            ``init_kv_cache``; this scale's keys are appended and attention covers all
            earlier scales (block-causal).
          modulations: ``adaln_modulations(labels)``, when computed once for many passes.

        Returns:
          float32 logits ``[B, p_k^2, V]``, or ``(logits, kv_cache)`` when a cache is given.
        """
        cond = self.condition(labels)
        h = self.embed_scale(k, cond, x_ns, x_mask, masked)
        spec = self.attention_spec("full")
        if x_mask is not None:
            if kv_cache is not None:
                raise ValueError("The mask branch runs without a KV cache.")
            return self._mask_trunk(h, cond, spec, None, modulations)
        start = int(self.config.layout.starts[k])
        logits, kv_cache_out = self._next_scale_trunk(h, cond, spec, None, kv_cache, start,
                                                      modulations)
        return logits if kv_cache is None else (logits, kv_cache_out)

    def init_kv_cache(self, batch: int, dtype=jnp.float32):
        """Empty VAR-mode cache: ``(k, v)``, each ``[depth, B, L, N, K]``."""
        cfg = self.config
        shape = (cfg.depth, batch, cfg.layout.seq_len, cfg.num_heads, cfg.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


# ----- parameter groups -----------------------------------------------------------------------
MASK_BRANCH = ("mask_blocks", "mask_head_nm", "mask_head", "mask_embed")


def is_mask_branch(path: tuple, _value=None) -> bool:
    """nnx filter: parameters trained in stage 2 (the mask tail, its head and mask_embed)."""
    return bool(path) and path[0] in MASK_BRANCH


def count_params(cfg: HMARConfig, which=nnx.Param) -> int:
    """Number of parameters matching ``which``, from abstract shapes (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: HMARTransformer(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, which)))
