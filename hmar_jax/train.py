"""Command line for HMAR training.

  python -m hmar_jax.train --config configs/demo.py --workdir DIR \
      --config.tokenizer.export=TOKENIZER_DIR [--config.a.b=value ...]

The config is locked, so a mistyped key fails at launch. The tokenizer is an export made
beforehand (``python -m hmar_jax.train_tokenizer``, or converted). On multi-process
launches (TPU pods, SLURM) the distributed runtime starts first
(``hmar_jax.distributed``). Bad input (a config key or value, a missing tokenizer, a data
folder, a workdir of another run, a diverging learning rate) ends in one ``error:`` line
and exit status 2. A finished run ends by printing where its results are: the sample grid
and scores when the config asks for them, and the export.
"""

import os
import sys


def define_flags() -> dict:
    """The command's absl flags, defined when it runs (``cli.run_absl``)."""
    from hmar_jax import cli

    return cli.define_config_flags("Experiment config file.", "Directory for checkpoints, logs and exports.")


def main(argv, defined: dict):
    import jax
    from absl import app, logging

    from hmar_jax import distributed
    from hmar_jax.training import metric_writers, trainer

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    distributed.initialize_if_multi_process()
    config, workdir = defined["config"].value, defined["workdir"].value
    metrics = trainer.train_and_evaluate(config, workdir)
    logging.info("Final metrics: %s", metrics)
    if "stopped_at_step" in metrics:
        # Stopped on request, with everything saved and flushed: exit now. The stop may have
        # interrupted a wait for data whose reader threads are blocked in a read that never
        # returns, and the interpreter would wait for them at exit.
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if jax.process_index() == 0:
        print("\n".join(trainer.summary_lines(config, workdir)))


if __name__ == "__main__":
    from hmar_jax import cli

    cli.run_absl(main, define_flags)
