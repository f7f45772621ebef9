"""Command line for HMAR training.

  python -m hmar_jax.train --config configs/demo.py --workdir DIR [--config.a.b=value ...]

The config is locked, so a mistyped key fails at launch. On multi-process launches
(TPU pods, SLURM) ``jax.distributed.initialize()`` runs first. Bad input (a config key or
value, a data folder, a workdir of another run, a diverging learning rate) ends in one
``error:`` line and exit status 2.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.training import metric_writers
from hmar_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
flags.mark_flags_as_required(["config", "workdir"])



def is_multi_process_launch() -> bool:
    """True under SLURM with several tasks, an explicit JAX coordinator, or a TPU pod."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    if is_multi_process_launch():
        import jax

        jax.distributed.initialize()  # reads the SLURM / TPU / coordinator environment
    metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Final metrics: %s", metrics)
    if "stopped_at_step" in metrics:
        # Stopped on request, with everything saved and flushed: exit now. The stop may have
        # interrupted a wait for data whose reader threads are blocked in a read that never
        # returns, and the interpreter would wait for them at exit.
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli.run_absl(main)
