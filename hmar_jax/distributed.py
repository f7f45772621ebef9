"""Multi-process launches: JAX's distributed runtime, started when the launcher asks for it.

Several processes (one per host, or per GPU) join one runtime before any other JAX call.
Three launch environments are recognised, in this order:

* an explicit coordinator: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (a hand-written multi-node job, or several
  processes on one machine);
* SLURM with more than one task (``srun``): JAX reads the job's variables
  (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NODELIST``,
  ``SLURM_JOB_ID``); ``JAX_COORDINATOR_PORT`` overrides the port it derives from the job id;
* a TPU pod slice: ``launch/tpu_pod.sh`` sets ``HMAR_JAX_DISTRIBUTED=1`` on every worker
  (and GKE sets ``TPU_WORKER_HOSTNAMES``); JAX reads the rest from the TPU VM's metadata.

A single process needs nothing. Failure is bounded (``TIMEOUTS``): a process that stops
sending heartbeats (killed, its host gone) is declared dead after
``heartbeat_timeout_seconds`` and the coordination service then ends every other process
with an error, instead of leaving them waiting in a collective that can never complete;
the scheduler's relaunch resumes from the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

from hmar_jax.cli import InputError

# Set by launch/tpu_pod.sh: this process is one of a TPU pod slice's workers.
TPU_POD_VARIABLE = "HMAR_JAX_DISTRIBUTED"
TPU_WORKER_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                        "TPU_PROCESS_ADDRESSES_PATH")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """The coordination service's limits, in seconds (``jax.distributed.initialize``).

    Attributes:
      initialization: how long a process waits for all the others to join (hosts of a
        pod start minutes apart while they load the environment).
      heartbeat: silence after which a process counts as dead and the others are stopped.
        Heartbeats come from a thread of their own, so a long compile or a checkpoint
        write does not stop them; 30 s ends a job with a dead member in well under a minute.
      shutdown: how long a finished process waits for the others at exit.
    """

    initialization: int = 600
    heartbeat: int = 30
    shutdown: int = 120


TIMEOUTS = Timeouts()


def launch_environment(environ: dict | None = None) -> str | None:
    """``"coordinator"``, ``"slurm"`` or ``"tpu"`` when this process is one of several
    (module docstring), None for a single process.

    Raises:
      InputError: a coordinator address without the process count and index.
    """
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not environ.get(k)]
        if missing:
            raise InputError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not; set all three on "
                             "every process (process ids 0 .. JAX_NUM_PROCESSES - 1).")
        return "coordinator"
    if int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if environ.get(TPU_POD_VARIABLE) == "1" or any(environ.get(k) for k in TPU_WORKER_VARIABLES):
        return "tpu"
    return None


def initialize_if_multi_process() -> bool:
    """Joins JAX's distributed runtime when this process is one of several
    (:func:`launch_environment`), with the bounded :data:`TIMEOUTS`; returns whether it
    did. Call it first in a command's ``main``, before any other JAX call.

    Raises:
      InputError: the coordinator variables are incomplete or not numbers.
    """
    kind = launch_environment()
    if kind is None:
        return False
    import jax

    limits = dict(initialization_timeout=TIMEOUTS.initialization,
                  heartbeat_timeout_seconds=TIMEOUTS.heartbeat,
                  shutdown_timeout_seconds=TIMEOUTS.shutdown)
    if kind == "coordinator":
        try:
            count, index = (int(os.environ[k]) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
        except ValueError:
            raise InputError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers (got "
                             f"{os.environ['JAX_NUM_PROCESSES']!r}, "
                             f"{os.environ['JAX_PROCESS_ID']!r}).") from None
        if not 0 <= index < count:
            raise InputError(f"JAX_PROCESS_ID={index} is not in 0 .. JAX_NUM_PROCESSES - 1 "
                             f"= {count - 1}.")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], count, index, **limits)
    else:
        jax.distributed.initialize(**limits)
    return True
