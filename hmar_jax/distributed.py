"""Multi-process launches: JAX's distributed runtime, started when the launcher asks for it.

A SLURM job of several tasks, an explicit coordinator (``JAX_COORDINATOR_ADDRESS``) or a
TPU pod slice runs one process per host or device; they must join one runtime before any
other JAX call. ``jax.distributed.initialize()`` reads the rest (process count and index,
the coordinator) from the same environment. A single process needs nothing.
"""

from __future__ import annotations

import os


def initialize_if_multi_process() -> bool:
    """Calls ``jax.distributed.initialize()`` when this process is one of several (SLURM with
    more than one task, a JAX coordinator address, or TPU worker host names in the
    environment); returns whether it did. Call it first in a command's ``main``."""
    several = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or any(
        os.environ.get(key) for key in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"))
    if several:
        import jax

        jax.distributed.initialize()
    return several
