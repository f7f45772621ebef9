"""Device meshes and parameter shardings, written as data.

The mesh comes from config as ``(("data", -1), ("fsdp", 1))``: axis names and sizes, one
of which may be -1 (all remaining devices). Batches are split over every mesh axis.
Parameters are sharded fully-sharded-data-parallel style: each array is split along
its largest dimension that the ``fsdp`` axis divides (skipping the stacked layer axis of
scanned blocks), and small arrays stay replicated. Optimizer states follow their
parameters because they share shapes and tree paths.

Dimension letters: B batch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshSpec = Sequence[tuple[str, int]]
FSDP_AXIS = "fsdp"
STACKED = ("blocks", "mask_blocks")  # subtrees whose leading axis is the layer index


def make_mesh(spec: MeshSpec, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) from ``((name, size), ...)``; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in spec)
    sizes = [int(size) for _, size in spec]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {tuple(spec)}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {tuple(spec)}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"Mesh {tuple(spec)} needs {math.prod(sizes)} devices but "
                         f"{len(devices)} are available; adjust config.mesh.")
    return Mesh(np.asarray(devices).reshape(sizes), names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def check_batch_split(batch_size: int, microbatches: int, devices: int) -> None:
    """Refuses a global batch that does not split into ``microbatches`` equal parts, each
    even over the ``devices`` (one error naming the numbers and the fix)."""
    if microbatches < 1 or batch_size % microbatches:
        raise ValueError(f"microbatches={microbatches} must be >= 1 and divide "
                         f"batch_size={batch_size}.")
    if (batch_size // microbatches) % devices:
        raise ValueError(f"Each microbatch of {batch_size // microbatches} images (batch_size="
                         f"{batch_size} / microbatches={microbatches}) must split evenly over the "
                         f"{devices} devices; change batch_size or microbatches.")


def split_like_batch(x: jax.Array, axis: int) -> jax.Array:
    """``x`` with ``axis`` split over every axis of the mesh set with ``jax.set_mesh``, as
    the batch is (e.g. the rows of stacked microbatches); unchanged without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [None] * x.ndim
    spec[axis] = mesh.axis_names
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_spec(path: tuple, shape: tuple[int, ...], fsdp_size: int,
               min_size: int = 2 ** 14) -> PartitionSpec:
    """FSDP spec for one array: its largest ``fsdp``-divisible dim, or replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    names = [_path_name(p) for p in path]
    first = 1 if any(n in STACKED for n in names) else 0  # keep the layer axis whole
    candidates = [d for d in range(first, len(shape)) if shape[d] % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda d: shape[d])
    return PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def gather_for_compute(tree: Any) -> Any:
    """One layer's parameters, all-gathered (replicated) where they are used.

    Under a mesh with an ``fsdp`` axis > 1 (``jax.set_mesh``), the model calls this on
    each block's parameters inside the block loop, so XLA all-gathers one block's weights
    at a time (and reduces their gradients in the backward) while the activations stay
    split by batch. Left to itself the partitioner may instead keep the weights sharded,
    split the matmul outputs by feature and all-to-all those activations back to batch
    shards, once per block and pass. Without such a mesh:
    ``tree`` unchanged.
    """
    if not fsdp_mesh_is_set():
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, PartitionSpec()), tree)


def gather_outside_blocks(tree: Any) -> Any:
    """``gather_for_compute`` for every array of a model state except the stacked blocks
    (``STACKED``), which the model gathers one block at a time. For the embeddings, the
    heads and the other arrays used once per forward (a few tens of MB at d30): sharded
    along the width, the class embedding alone made the start token feature-sharded and
    cost all-to-alls of activations."""
    if not fsdp_mesh_is_set():
        return tree

    def leaf(path, value):
        if any(_path_name(p) in STACKED for p in path):
            return value
        return jax.lax.with_sharding_constraint(value, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf, tree)


def fsdp_mesh_is_set() -> bool:
    """Whether the current mesh (``jax.set_mesh``) has an ``fsdp`` axis of size > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get(FSDP_AXIS, 1) > 1


def _path_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array of ``tree`` (params or optimizer state)."""
    fsdp_size = mesh.shape.get(FSDP_AXIS, 1)

    def leaf(path, value):
        shape = tuple(getattr(value, "shape", ()))
        return NamedSharding(mesh, param_spec(path, shape, fsdp_size))

    return jax.tree_util.tree_map_with_path(leaf, tree)
