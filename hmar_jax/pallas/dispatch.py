"""How every op in ``hmar_jax.pallas`` chooses between its kernel and its reference.

Each op takes an ``Implementation`` that the execution config resolved for the platform
(``hmar_jax.execution``); nothing here looks at the platform:

* ``"xla"``: the op's plain-jnp reference, which XLA fuses with its neighbours;
* ``"gpu"``: the Pallas kernel compiled for the GPU;
* ``"tpu"``: the TPU kernel (attention only: JAX's splash attention, ``splash``);
* ``"interpret"``: the GPU kernel in Pallas interpret mode, so the kernels' code runs on
  CPU (tests);
* ``"mosaic_gpu"`` / ``"mosaic_interpret"`` (attention and AdaLN): the kernels
  written for Pallas's Mosaic GPU backend (Hopper), compiled or in Mosaic GPU's interpreter
  (any platform: tests).

XLA cannot partition a Pallas call, so under a mesh the kernels run on each device's share
of the batch (``run_per_device``); the kernels here work per example and need no
communication.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax

Implementation = Literal["xla", "gpu", "tpu", "interpret", "mosaic_gpu", "mosaic_interpret"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "gpu", "tpu", "interpret", "mosaic_gpu",
                                    "mosaic_interpret")
# The elementwise ops with kernels on both Pallas GPU lowerings (Triton and Mosaic GPU): AdaLN.
WITH_MOSAIC: tuple[str, ...] = ("xla", "gpu", "interpret", "mosaic_gpu", "mosaic_interpret")


def check_implementation(implementation: str, op: str,
                         supported: tuple[str, ...] = ("xla", "gpu", "interpret")) -> None:
    """Raises ValueError unless ``op`` has ``implementation`` (one of ``supported``)."""
    if implementation not in supported:
        raise ValueError(f"{op} has no {implementation!r} implementation; use one of "
                         f"{supported} (hmar_jax.execution resolves the platform's choice).")


def run_per_device(fn: Callable, batched: tuple[jax.Array, ...],
                   replicated: tuple[jax.Array, ...] = ()):
    """Runs ``fn(*batched, *replicated)`` on each device's slice of the ``batched`` arrays'
    leading axis under the mesh set with ``jax.set_mesh`` (the batch split over every mesh
    axis, as the trainer and sampler shard it); ``replicated`` arrays go whole to every
    device and their gradients are summed over the devices by ``shard_map``'s transpose.

    Without this a sharded batch would be all-gathered and every device would run the
    kernel on the whole batch. ``fn`` may return a tuple (every output batched). Without a
    mesh, with one device, or with a batch the mesh cannot split evenly, ``fn`` runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batched[0].shape[0] % mesh.size:
        return fn(*batched, *replicated)
    batch_spec = jax.sharding.PartitionSpec(mesh.axis_names)
    in_specs = (batch_spec,) * len(batched) + (jax.sharding.PartitionSpec(),) * len(replicated)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=batch_spec,
                         check_vma=False)(*batched, *replicated)


def dispatch(implementation: Implementation, op: str, reference: Callable, kernel: Callable,
             batched: tuple[jax.Array, ...], replicated: tuple[jax.Array, ...] = (),
             supported: tuple[str, ...] = ("xla", "gpu", "interpret")):
    """The one dispatch of the elementwise ops: ``reference(*batched, *replicated)`` for
    ``"xla"``, else ``kernel(*batched, *replicated, implementation=...)`` on each device's
    share of the batch. ``supported``: the op's implementations (``WITH_MOSAIC`` for the ops
    with Mosaic GPU kernels). ``kernel`` may itself fall back to the reference for a shape
    it does not tile."""
    check_implementation(implementation, op, supported)
    if implementation == "xla":
        return reference(*batched, *replicated)
    return run_per_device(functools.partial(kernel, implementation=implementation),
                          batched, replicated)
