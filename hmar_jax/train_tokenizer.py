"""Command line for tokenizer training.

  python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py --workdir DIR

Writes the export ``DIR/tokenizer`` that HMAR training and pretokenizing take
(``--config.tokenizer.export=DIR/tokenizer``). Any config leaf can be overridden, e.g.
``--config.num_train_steps=200``; unknown keys are rejected (the config is locked). Bad
input ends in one ``error:`` line and exit status 2.
"""


def define_flags() -> dict:
    """The command's absl flags, defined when it runs (``cli.run_absl``)."""
    from hmar_jax import cli

    return cli.define_config_flags("Tokenizer config file.", "Directory for checkpoints, logs and outputs.")


def main(argv, defined: dict):
    from absl import app, logging

    from hmar_jax.training import metric_writers, tokenizer_trainer

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    workdir = defined["workdir"].value
    results = tokenizer_trainer.train_and_evaluate(defined["config"].value, workdir)
    logging.info("Tokenizer eval: %s", results)
    print(f"reconstruction MSE {results['reconstruction_mse']:.4f} "
          f"(PSNR {results['psnr_db']:.1f} dB), codebook usage {results['codebook_usage']:.1%} "
          f"({results['codes_used']} codes); outputs in {workdir}, the export in "
          f"{workdir}/tokenizer")


if __name__ == "__main__":
    from hmar_jax import cli

    cli.run_absl(main, define_flags)
