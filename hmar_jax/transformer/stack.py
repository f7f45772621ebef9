"""Running a stack of AdaLN blocks: one function per strategy.

* ``run_scanned``: ``lax.scan`` over the layer axis (fast compile; under FSDP one block's
  weights are gathered at a time);
* ``run_unrolled``: a Python loop (XLA schedules across blocks; each block's last residual
  add runs inside the next block's first norm where the backward keeps its input anyway);
* ``run_cached``: VAR-mode sampling, each block reading and appending its slot of a KV
  cache.

The training strategies wrap each block in ``jax.checkpoint`` with the policy named by
``ExecutionConfig.remat`` (``checkpoint_policy``).

Dimension letters: n blocks, B batch, l tokens, C width, D conditioning width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hmar_jax import sharding
from hmar_jax.pallas import adaln, bias_gelu, ops
from hmar_jax.transformer.layers import (ATTENTION_PROJ_NAME, FFN_OUT_NAME, GELU_OUT_NAME,
                                         NORM_OUT_NAME, finish_residual)


def kernel_call_name(primitive_name: str, params: dict) -> str | None:
    """The kernel name of a Pallas call in a jaxpr, else None. A Triton- or Mosaic-TPU-lowered
    kernel is one ``pallas_call``; a Mosaic GPU kernel (``plgpu.kernel``) is an ``mpmd_map``,
    traced inside the ``custom_vmap_call`` that gives it a batching rule."""
    if primitive_name in ("pallas_call", "mpmd_map"):
        return str(params.get("name"))
    if primitive_name == "custom_vmap_call":
        inner = params["call"].jaxpr.eqns
        if len(inner) == 1:
            return kernel_call_name(inner[0].primitive.name, inner[0].params)
    return None


def _kernel_outputs_saveable(*kernel_names: str):
    """``jax.checkpoint`` policy: keep the outputs of the named Pallas kernels.

    Selecting a kernel's own outputs is what keeps it from running again: a Pallas call is
    never dropped from a rematerialised region (pallas_call's dead-code rule keeps every
    call), so with its outputs merely saved by name (``checkpoint_name`` on them) the rerun
    stays in the compiled backward, unused."""
    names = frozenset(kernel_names)

    def policy(prim, *_, **params) -> bool:
        return kernel_call_name(prim.name, params) in names

    return policy


_POLICIES = jax.checkpoint_policies
_DOTS = _POLICIES.dots_with_no_batch_dims_saveable
_ATTENTION_OUT = _kernel_outputs_saveable(*ops.FORWARD_KERNEL_NAMES)
_CHECKPOINT_POLICIES = {  # ExecutionConfig.remat -> what jax.checkpoint keeps
    "block": _POLICIES.nothing_saveable,
    "dots_attention_saveable": _POLICIES.save_from_both_policies(_DOTS, _ATTENTION_OUT),
    "projections_saveable": _POLICIES.save_from_both_policies(
        _ATTENTION_OUT, _POLICIES.save_only_these_names(ATTENTION_PROJ_NAME, FFN_OUT_NAME)),
    "activations_saveable": _POLICIES.save_from_both_policies(
        _POLICIES.save_from_both_policies(_DOTS, _POLICIES.save_only_these_names(
            NORM_OUT_NAME, GELU_OUT_NAME)),
        _kernel_outputs_saveable(*ops.FORWARD_KERNEL_NAMES, adaln.FORWARD_KERNEL_NAME,
                                 bias_gelu.FORWARD_KERNEL_NAME)),
}
# Policies whose backward keeps the FFN output: the unrolled stack may leave a block's last
# residual add to the next block (the pending output then lives one block longer, which is
# free only when the backward keeps it anyway).
_FFN_OUT_KEPT = ("none", "projections_saveable")


def checkpoint_policy(remat: str):
    """The ``jax.checkpoint`` policy of a remat name; None for ``"none"``."""
    if remat != "none" and remat not in _CHECKPOINT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; use 'none' or one of "
                         f"{sorted(_CHECKPOINT_POLICIES)}.")
    return _CHECKPOINT_POLICIES.get(remat)


def _rematerialised(fn, remat: str):
    policy = checkpoint_policy(remat)
    return fn if policy is None else jax.checkpoint(fn, policy=policy)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Consecutive blocks of a stack: their graphdef and parameters.

    Attributes:
      graphdef: one block's graph definition.
      params: ``stacked``: one tree with a leading layer axis ``[n, ...]``; otherwise a
        list of ``n`` trees (blocks unstacked for inference).
      count: n.
      stacked: see ``params``.
    """

    graphdef: Any
    params: Any
    count: int
    stacked: bool

    @classmethod
    def of(cls, stack: nnx.Module, layers: slice) -> "Layers":
        """``stack[layers]`` of a stacked block module or of an ``nnx.List`` of blocks."""
        if isinstance(stack, nnx.List):
            blocks = list(stack)[layers]
            graphdef = nnx.graphdef(blocks[0]) if blocks else None
            return cls(graphdef, [nnx.state(block) for block in blocks], len(blocks), False)
        graphdef, params = nnx.split(stack)
        params = jax.tree.map(lambda a: a[layers], params)
        return cls(graphdef, params, jax.tree.leaves(params)[0].shape[0], True)

    def block(self, params) -> nnx.Module:
        """One block from its parameters (gathered from their FSDP shards first)."""
        return nnx.merge(self.graphdef, sharding.gather_for_compute(params))

    def per_layer(self) -> list:
        """One parameter tree per block."""
        return split_layers(self.params, self.count) if self.stacked else list(self.params)

    def modulations(self, cond: jax.Array) -> jax.Array:
        """``[n, B, 6 C]``: every block's ``modulation(cond)``.

        Stacked: one batched matmul over the stacked ``ada_lin`` weights (``vmap``), or under
        an FSDP mesh a loop over the layers (``lax.map``) so that one block's weights are
        gathered at a time."""
        def modulation(params):
            return self.block(params).modulation(cond)

        if not self.stacked:
            return jnp.stack([modulation(params) for params in self.params])
        if sharding.fsdp_mesh_is_set():
            return jax.lax.map(modulation, self.params)
        return jax.vmap(modulation)(self.params)


def split_layers(tree, count: int) -> list:
    """``count`` trees of one layer each from a tree stacked on a leading layer axis.

    ``lax.split`` makes the gradient of the stack one concatenate per leaf; indexing layer
    by layer would make it a sum of ``count`` zero-padded copies, which XLA fuses into one
    slow pass.
    """
    leaves, treedef = jax.tree.flatten(tree)
    pieces = [jax.lax.split(leaf, (1,) * count) for leaf in leaves]
    return [treedef.unflatten([piece[i].reshape(piece[i].shape[1:]) for piece in pieces])
            for i in range(count)]


def run_scanned(layers: Layers, x: jax.Array, cond: jax.Array, spec: ops.AttentionSpec, *,
                rates: jax.Array, keys: jax.Array | None, modulations: jax.Array | None,
                remat: str) -> jax.Array:
    """Stacked blocks under ``lax.scan``; each block finishes its own residual adds.

    Args:
      layers: stacked blocks.
      x: float32 ``[B, l, C]``.
      cond: ``[B, D]``.
      spec: the blocks' attention.
      rates: ``[n]`` stochastic-depth rates; ``keys``: ``[n, 2]`` or None (no drop path).
      modulations: ``[n, B, 6 C]`` computed earlier, or None (each block computes its own).
      remat: ``ExecutionConfig.remat``.

    Returns:
      ``[B, l, C]`` float32.
    """
    def body(h, layer):
        params, rate, key, modulation = layer
        h, _, pending = layers.block(params).forward_deferred(
            h, cond, spec, drop_rate=rate, rng=key, modulation=modulation)
        return finish_residual(h, pending), None

    x, _ = jax.lax.scan(_rematerialised(body, remat), x,
                        (layers.params, rates, keys, modulations))
    return x


def run_unrolled(layers: Layers, x: jax.Array, cond: jax.Array, spec: ops.AttentionSpec, *,
                 rates: jax.Array, keys: jax.Array | None, modulations: jax.Array | None,
                 remat: str) -> jax.Array:
    """The blocks one after another (arguments as ``run_scanned``; unstacked blocks too).

    With stacked weights every block's AdaLN vectors are computed first, for the whole
    stack: a block's own ``ada_lin`` matmul has only B rows, and XLA would lay its output
    out batch-minor and carry that layout into the residual stream's elementwise fusions.
    Under the remat policies that keep the FFN output (``_FFN_OUT_KEPT``) a block's last
    residual add runs inside the next block's first norm (one read and write of the
    residual stream less per block).
    """
    if modulations is None and layers.stacked:
        modulations = layers.modulations(cond)
    per_layer = layers.per_layer()
    per_layer_modulations = ([None] * layers.count if modulations is None
                             else split_layers(modulations, layers.count))

    def run_block(h, pending, params, rate, key, modulation):
        h, _, pending = layers.block(params).forward_deferred(
            h, cond, spec, pending=pending, drop_rate=rate, rng=key, modulation=modulation)
        return h, pending

    def closed_block(h, params, rate, key, modulation):
        h, pending = run_block(h, None, params, rate, key, modulation)
        return finish_residual(h, pending)

    defer = remat in _FFN_OUT_KEPT
    step = _rematerialised(run_block if defer else closed_block, remat)
    pending = None
    for i in range(layers.count):
        layer = (per_layer[i], rates[i], None if keys is None else keys[i],
                 per_layer_modulations[i])
        if defer:
            x, pending = step(x, pending, *layer)
        else:
            x = step(x, *layer)
    return finish_residual(x, pending)


def run_cached(layers: Layers, x: jax.Array, cond: jax.Array, spec: ops.AttentionSpec, *,
               modulations: jax.Array | None, kv_cache: tuple[jax.Array, jax.Array],
               cache_start: int, scan: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """VAR-mode sampling: every block appends this scale's keys and values to its slot of
    ``kv_cache`` (``(k, v)``, each ``[n, B, L, N, K]``) at ``cache_start`` and attends to
    everything cached so far. Inference only (no drop path, no remat).

    Each block's slot is read and written back in place, so the cache is never copied
    whole; stacked blocks run under ``lax.scan`` with the cache in the carry when ``scan``.

    Returns:
      ``(x [B, l, C], kv_cache)``.
    """
    def body(h, cache, i, params, modulation):
        mine = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), cache)
        h, mine = layers.block(params)(h, cond, spec, kv_cache=mine, cache_start=cache_start,
                                       modulation=modulation)
        cache = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
                             cache, mine)
        return h, cache

    if scan and layers.stacked:
        def scanned(carry, layer):
            h, cache, i = carry
            h, cache = body(h, cache, i, *layer)
            return (h, cache, i + 1), None

        (x, kv_cache, _), _ = jax.lax.scan(scanned, (x, kv_cache, 0),
                                           (layers.params, modulations))
        return x, kv_cache
    per_layer_modulations = ([None] * layers.count if modulations is None
                             else split_layers(modulations, layers.count))
    for i, params in enumerate(layers.per_layer()):
        x, kv_cache = body(x, kv_cache, i, params, per_layer_modulations[i])
    return x, kv_cache
