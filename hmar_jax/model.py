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

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax import sharding
from hmar_jax.execution import REFERENCE, ExecutionConfig
from hmar_jax.frozen_config import config_from_dict
from hmar_jax.layers import (ATTENTION_PROJ_NAME, FFN_OUT_NAME, GELU_OUT_NAME, NORM_OUT_NAME,
                             AdaLNBeforeHead, AdaLNSelfAttnBlock, Head, InitScales,
                             finish_residual)
from hmar_jax.pallas import adaln, bias_gelu, ops
from hmar_jax.scales import ScaleLayout, resolve_patch_nums

# Execution settings that earlier exports stored with the architecture; read and ignored.
LEGACY_EXECUTION_FIELDS = ("attention_backend", "attention_prologue_backend", "gelu_backend",
                           "norm_backend", "dtype", "head_dtype", "scan_blocks", "remat")


@dataclasses.dataclass(frozen=True)
class HMARConfig:
    """Frozen hyper-parameters of the transformer.

    Attributes:
      depth: number of blocks d.
      width: C; defaults to 64 d (upstream ties width to depth).
      num_heads: N; defaults to d (head dim 64).
      mlp_ratio: MLP hidden width / C.
      num_classes: class labels 0..num_classes-1; label ``num_classes`` is the null
        (unconditional) class.
      vocab_size: V, tokenizer codebook size.
      latent_channels: Cv, tokenizer latent channels.
      patch_nums: scale sides, coarse to fine.
      num_mask_layers: n, blocks of the masked-refinement tail (0: next-scale only).
      attention_pattern: ``block_diagonal`` (HMAR) or ``block_causal`` (VAR).
      drop_path_rate: maximum stochastic-depth rate (linear over blocks); defaults to
        ``0.1 d / 24``.
      norm_eps: LayerNorm epsilon.
      init_adaln, init_adaln_gamma, init_head: upstream init multipliers.
    """

    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    latent_channels: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_mask_layers: int = 8
    attention_pattern: str = "block_diagonal"
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("patch_nums", resolve_patch_nums(self.patch_nums))
        if self.width is None:
            set_("width", 64 * self.depth)
        if self.num_heads is None:
            set_("num_heads", self.depth)
        if self.drop_path_rate is None:
            set_("drop_path_rate", 0.1 * self.depth / 24)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        if not 0 <= self.num_mask_layers <= self.depth:
            raise ValueError(f"num_mask_layers must be in [0, depth={self.depth}], "
                             f"got {self.num_mask_layers}.")
        if self.attention_pattern not in ("block_diagonal", "block_causal"):
            raise ValueError(f"Unknown attention_pattern {self.attention_pattern!r}; use "
                             "'block_diagonal' (HMAR) or 'block_causal' (VAR).")

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_base_layers(self) -> int:
        return self.depth - self.num_mask_layers

    @property
    def init_std(self) -> float:
        return math.sqrt(1.0 / self.width / 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # A training-time regulariser: it changes neither the parameters nor the function.
    TRAINING_FIELDS = ("drop_path_rate",)

    def architecture(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields that define the parameters and the function."""
        return {k: v for k, v in self.to_dict().items()
                if k not in self.TRAINING_FIELDS and k not in ignore}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HMARConfig":
        """From a stored config; execution settings that exports used to carry are dropped."""
        return config_from_dict(cls, {k: v for k, v in values.items()
                                      if k not in LEGACY_EXECUTION_FIELDS})

    def replace(self, **changes) -> "HMARConfig":
        return dataclasses.replace(self, **changes)


def _kernel_outputs_saveable(*kernel_names: str):
    """``jax.checkpoint`` policy: keep the outputs of the named Pallas kernels.

    Selecting a kernel's own outputs is what keeps it from running again: a Pallas call is
    never dropped from a rematerialised region (pallas_call's dead-code rule keeps every
    call), so with its outputs merely saved by name (``checkpoint_name`` on them) the rerun
    stays in the compiled backward, unused."""
    names = frozenset(kernel_names)

    def policy(prim, *_, **params) -> bool:
        return prim.name == "pallas_call" and str(params.get("name")) in names

    return policy


_POLICIES = jax.checkpoint_policies
_DOTS = _POLICIES.dots_with_no_batch_dims_saveable
_ATTENTION_OUT = _kernel_outputs_saveable(ops.FORWARD_KERNEL_NAME)
_FFN_OUT_KEPT = ("none", "projections_saveable")  # remat settings whose backward keeps it
_CHECKPOINT_POLICIES = {  # ExecutionConfig.remat -> what jax.checkpoint keeps ("none": none)
    "block": _POLICIES.nothing_saveable,
    "dots_attention_saveable": _POLICIES.save_from_both_policies(_DOTS, _ATTENTION_OUT),
    "projections_saveable": _POLICIES.save_from_both_policies(
        _ATTENTION_OUT, _POLICIES.save_only_these_names(ATTENTION_PROJ_NAME, FFN_OUT_NAME)),
    "activations_saveable": _POLICIES.save_from_both_policies(
        _POLICIES.save_from_both_policies(_DOTS, _POLICIES.save_only_these_names(
            NORM_OUT_NAME, GELU_OUT_NAME)),
        _kernel_outputs_saveable(ops.FORWARD_KERNEL_NAME, adaln.FORWARD_KERNEL_NAME,
                                 bias_gelu.FORWARD_KERNEL_NAME)),
}


# Upstream sizes (width 64 d, heads d) and the gamma init per depth from the HMAR configs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "d16": dict(depth=16, init_adaln_gamma=1e-3),
    "d20": dict(depth=20, init_adaln_gamma=1e-3),
    "d24": dict(depth=24, init_adaln_gamma=1e-4),
    "d30": dict(depth=30, init_adaln_gamma=1e-5),
    # CPU-sized variant for tests and notebooks.
    "tiny": dict(depth=2, width=64, num_heads=2, num_classes=10, vocab_size=64,
                 latent_channels=8, patch_nums=(1, 2, 3, 4), num_mask_layers=1),
}


def preset(name: str, **overrides) -> HMARConfig:
    """``HMARConfig`` of a named size (``d16``/``d20``/``d24``/``d30``/``tiny``)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available: {sorted(MODEL_PRESETS)}.")
    return HMARConfig(**(MODEL_PRESETS[name] | overrides))


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

    def _run(self, stack: nnx.Module, layers: slice, rate_offset: int, x: jax.Array,
             cond: jax.Array, spec: ops.AttentionSpec, rng: jax.Array | None,
             kv_cache=None, cache_start: int = 0, modulations: jax.Array | None = None):
        """Runs ``stack[layers]`` on ``x [B, l, C]``; returns ``(x, kv_cache)``.

        ``modulations``: the whole stack's AdaLN vectors ``[layers, B, 6 C]`` when already
        computed (``adaln_modulations``), sliced like the parameters.
        """
        cfg = self.config
        per_block = isinstance(stack, nnx.List)  # unstack_blocks: one set of arrays per block
        if per_block:
            blocks = list(stack)[layers]
            graphdef = nnx.graphdef(blocks[0]) if blocks else None
            params = [nnx.state(block) for block in blocks]
            count = len(params)
        else:
            graphdef, params = nnx.split(stack)
            params = jax.tree.map(lambda a: a[layers], params)
            count = jax.tree.leaves(params)[0].shape[0]
        modulations = None if modulations is None else modulations[layers]
        if count == 0:
            return x, kv_cache
        scan = self.execution.scan_blocks and not per_block
        if modulations is None and not scan and not per_block:
            # Unrolled, each block's ``ada_lin`` matmul has only B rows; XLA then lays its
            # [B, 6C] output out batch-minor and carries that layout into the residual
            # stream's elementwise fusions (``f32[L, C, B]``). Computed for the whole
            # stack first (a batched matmul, as the scan's body does), they stay row-major.
            modulations = _stack_modulations(graphdef, params, cond)
        rates = jnp.asarray(self._drop_rates()[rate_offset:rate_offset + count])
        keys = jax.random.split(rng, count) if rng is not None else None

        def run_block(h, pending, layer):
            layer_params, rate, key, cache, modulation = layer
            block = nnx.merge(graphdef, sharding.gather_for_compute(layer_params))
            return block.forward_deferred(h, cond, spec, pending=pending, drop_rate=rate,
                                          rng=key, kv_cache=cache, cache_start=cache_start,
                                          modulation=modulation)

        def body(h, layer):  # scanned: each block finishes its own residual adds
            h, cache, pending = run_block(h, None, layer)
            return finish_residual(h, pending), cache

        # Unrolled, a block's FFN residual add can run in the next block's first norm kernel.
        # The pending FFN output then lives until the next block: free when the backward
        # keeps it anyway (no remat, or a policy that saves it), one more [B, L, C] per
        # block otherwise (d30 B32 ``activations_saveable``: +1.4 GiB), so not under those.
        policy = _CHECKPOINT_POLICIES.get(self.execution.remat)
        remat = (lambda fn: fn) if policy is None else functools.partial(jax.checkpoint,
                                                                          policy=policy)
        body = remat(body)
        deferred_body = remat(run_block) if self.execution.remat in _FFN_OUT_KEPT else None
        x = x.astype(jnp.float32)
        if scan and kv_cache is not None:
            # The cache rides in the carry and each layer's slot is updated in place (as a
            # scanned output it would be copied whole at every scale).
            def cached_body(carry, layer):
                h, cache, i = carry
                layer_params, rate, key, modulation = layer
                mine = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                                    cache)
                h, mine = body(h, (layer_params, rate, key, mine, modulation))
                cache = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
                                     cache, mine)
                return (h, cache, i + 1), None

            (x, kv_cache, _), _ = jax.lax.scan(cached_body, (x, kv_cache, 0),
                                               (params, rates, keys, modulations))
            return x, kv_cache
        if scan:
            return jax.lax.scan(body, x, (params, rates, keys, kv_cache, modulations))
        layer_params = params if per_block else _unstack_layers(params, count)
        layer_modulations = [None] * count if modulations is None else _unstack_layers(
            modulations, count)
        caches, pending = [], None
        for i in range(count):
            take = lambda tree: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa: E731
            layer = (layer_params[i], rates[i], take(keys), take(kv_cache), layer_modulations[i])
            if deferred_body is None:
                x, cache = body(x, layer)
            else:
                x, cache, pending = deferred_body(x, pending, layer)
            caches.append(cache)
        x = finish_residual(x, pending)
        stacked = None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
        return x, stacked

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

        def stacked(stack: nnx.Module) -> jax.Array:
            if isinstance(stack, nnx.List):  # unstack_blocks
                return jnp.stack([block.modulation(cond) for block in stack])
            return _stack_modulations(*nnx.split(stack), cond)

        out = {"blocks": stacked(self.blocks)}
        if self.mask_blocks is not None:
            out["mask_blocks"] = stacked(self.mask_blocks)
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


# ----- block-stack helpers --------------------------------------------------------------------
def _unstack_layers(tree, count: int) -> list:
    """``count`` trees of one layer each from a tree stacked on a leading layer axis.

    ``lax.split`` makes the gradient of the stack one concatenate per leaf. Indexing layer
    by layer made it a sum of ``count`` zero-padded copies, which XLA fuses into one pass
    that ran at about a tenth of the memory bandwidth (the d30 fc1 gradient: 10.9 ms on an
    H200, ``benchmarks/README.md``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    pieces = [jax.lax.split(leaf, (1,) * count) for leaf in leaves]
    return [treedef.unflatten([piece[i].reshape(piece[i].shape[1:]) for piece in pieces])
            for i in range(count)]


def _stack_modulations(graphdef, params, cond: jax.Array) -> jax.Array:
    """``[layers, B, 6 C]``: each stacked block's ``modulation(cond)``.

    One batched matmul over the stacked ``ada_lin`` weights (``vmap``). Under an FSDP mesh
    a loop over the layers (``lax.map``) instead, so that one block's weights are gathered
    at a time (the whole d30 stack is 1.3 GB in bf16). The loop cost the unsharded d16 B64
    training step about 210 more kernel launches and 0.5 ms on an H200 (pooled medians of
    60 steps, ``benchmarks/README.md``, session 13)."""
    def modulation(layer_params):
        block = nnx.merge(graphdef, sharding.gather_for_compute(layer_params))
        return block.modulation(cond)

    if sharding.fsdp_mesh_is_set():
        return jax.lax.map(modulation, params)
    return jax.vmap(modulation)(params)


# ----- parameter groups -----------------------------------------------------------------------
MASK_BRANCH = ("mask_blocks", "mask_head_nm", "mask_head", "mask_embed")


def is_mask_branch(path: tuple, _value=None) -> bool:
    """nnx filter: parameters trained in stage 2 (the mask tail, its head and mask_embed)."""
    return bool(path) and path[0] in MASK_BRANCH


STAGE2_TRAINABLE = nnx.All(nnx.Param, is_mask_branch)
STAGE1_TRAINABLE = nnx.All(nnx.Param, nnx.Not(is_mask_branch))


def cast_matmul_weights(module: nnx.Module) -> nnx.Module:
    """Stores every ``nnx.Linear``'s kernel and bias in that layer's compute dtype, in place.

    For inference. A Linear with ``dtype=bfloat16`` converts its float32 weights at every
    call, and the sampler calls every block 14 times per batch. Stored in bf16, the outputs
    are the same bit for bit (the layer would cast to that dtype anyway), the weights take
    half the memory and no pass converts them: for d30 B64 on an H200 the sampler's XLA buffers fall from
    15.4 to 8.9 GiB and the batch from 631.8 to 617.5 ms. Layers without a compute dtype
    (the heads, ``word_embed``) keep theirs. Not for training: the optimizer wants the
    float32 weights.

    Returns:
      ``module`` (modified).
    """
    for _, layer in nnx.iter_modules(module):
        if not isinstance(layer, nnx.Linear) or layer.dtype is None:
            continue
        for param in (layer.kernel, layer.bias):
            value = None if param is None else param.get_value()
            if value is None or value.dtype == jnp.dtype(layer.dtype):
                continue
            if isinstance(value, jax.ShapeDtypeStruct):  # abstract (nnx.eval_shape)
                param.set_value(jax.ShapeDtypeStruct(value.shape, jnp.dtype(layer.dtype)))
            else:
                param.set_value(value.astype(layer.dtype))
    return module


def unstack_blocks(model: HMARTransformer) -> HMARTransformer:
    """Gives every block its own weight arrays, in place. For inference.

    Trained and checkpointed models keep each stack's parameters in arrays with a leading
    layer axis (``[depth, ...]``, what ``lax.scan`` and the sharding rules want). At
    inference every pass then slices each block's weights out of those arrays, and XLA
    copies each slice before cuBLAS reads it: on an H200 that was about 27 ms of copies in
    a 605 ms d30 B64 batch (14 passes x 30 blocks x 88 MB of bf16 weights). Unstacked,
    the blocks always run unrolled (``scan_blocks`` no longer applies) and read their
    weights in place, at the price of a longer compile. Outputs are unchanged. Call after
    ``cast_matmul_weights`` and after placing the parameters on devices; the model's
    state then has ``blocks/0/...`` paths, so save the model it came from, not this one.

    Returns:
      ``model`` (modified).
    """
    for name in ("blocks", "mask_blocks"):
        stack = getattr(model, name)
        if stack is None or isinstance(stack, nnx.List):
            continue
        graphdef, state = nnx.split(stack)
        count = jax.tree.leaves(state)[0].shape[0]

        def layer(a, i):  # abstract arrays (nnx.eval_shape) stay abstract
            if isinstance(a, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
            return a[i]

        setattr(model, name, nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a: layer(a, i), state))
                                       for i in range(count)]))
    return model


def count_params(cfg: HMARConfig, which=nnx.Param) -> int:
    """Number of parameters matching ``which``, from abstract shapes (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: HMARTransformer(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, which)))
