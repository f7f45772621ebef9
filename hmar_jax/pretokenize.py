"""Command line: encode a training config's dataset once into a token cache.

  python -m hmar_jax.pretokenize --config configs/demo.py \
      --config.tokenizer.export=TOKENIZER_DIR --out DIR/tokens
  python -m hmar_jax.train --config configs/demo.py --workdir DIR \
      --config.tokenizer.export=TOKENIZER_DIR --config.data.pretokenized=DIR/tokens

The dataset, the tokenizer (``config.tokenizer.export``, an existing export) and how it
runs (``config.execution``) come from the config, as in training; every example is encoded
once, centre-cropped (``hmar_jax.training.token_cache.pretokenize``). Bad input ends in one
``error:`` line and exit status 2.
"""

from __future__ import annotations


def define_flags() -> dict:
    """The command's absl flags, defined when it runs (``cli.run_absl``)."""
    from absl import flags

    from hmar_jax import cli

    defined = cli.define_config_flags("Training config file.", None)
    defined["out"] = flags.DEFINE_string("out", None, "Directory to write the token cache to.")
    defined["overwrite"] = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    flags.mark_flags_as_required(["out"])
    return defined


def main(argv, defined: dict):
    import numpy as np
    from absl import app, logging

    from hmar_jax.training import metric_writers, token_cache

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    out = defined["out"].value
    manifest = token_cache.pretokenize(defined["config"].value, out,
                                       overwrite=defined["overwrite"].value)
    logging.info("Wrote %d token rows of length %d to %s.", manifest["num_examples"],
                 manifest["seq_len"], out)
    size_mib = np.dtype(np.uint16).itemsize * manifest["num_examples"] * manifest["seq_len"] / 2**20
    print(f"wrote {manifest['num_examples']} examples x {manifest['seq_len']} tokens "
          f"({size_mib:.1f} MiB) to {out}")


if __name__ == "__main__":
    from hmar_jax import cli

    cli.run_absl(main, define_flags)
