"""Command line for tokenizer training.

  python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py --workdir DIR

Any config leaf can be overridden, e.g. ``--config.num_train_steps=200``; unknown
keys are rejected (the config is locked). Bad input ends in one ``error:`` line and exit
status 2.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.training import metric_writers
from hmar_jax.training import tokenizer_trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Tokenizer config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    results = tokenizer_trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Tokenizer eval: %s", results)
    print(f"reconstruction MSE {results['reconstruction_mse']:.4f} "
          f"(PSNR {results['psnr_db']:.1f} dB), codebook usage {results['codebook_usage']:.1%} "
          f"({results['codes_used']} codes); outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    cli.run_absl(main)
