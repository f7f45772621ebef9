"""Running a Pallas call on each device's share of a batch under a ``jax.set_mesh`` mesh."""

from __future__ import annotations

import jax


def per_batch_shard(fn, batched: tuple[jax.Array, ...],
                    replicated: tuple[jax.Array, ...] = ()) -> jax.Array:
    """Runs ``fn(*batched, *replicated)`` on each device's slice of the ``batched`` arrays'
    leading axis under the mesh set with ``jax.set_mesh`` (the batch split over every mesh
    axis, as the trainer and sampler shard it); ``replicated`` arrays go whole to every
    device.

    XLA cannot partition a Pallas call, so without this a sharded batch would be
    all-gathered and every device would run the kernel on the whole batch. The kernels
    here work per example, so they need no communication; the gradients of ``replicated``
    inputs are summed over the devices by ``shard_map``'s transpose. ``fn`` may return a
    tuple (every output batched). Without a mesh, with one device, or with a batch the
    mesh cannot split evenly, ``fn`` runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batched[0].shape[0] % mesh.size:
        return fn(*batched, *replicated)
    batch_spec = jax.sharding.PartitionSpec(mesh.axis_names)
    in_specs = (batch_spec,) * len(batched) + (jax.sharding.PartitionSpec(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=batch_spec,
                         check_vma=False)(*batched, *replicated)
