"""Command line: encode a training config's dataset once into a token cache.

  python -m hmar_jax.pretokenize --config configs/demo.py --workdir DIR --out DIR/tokens
  python -m hmar_jax.train --config configs/demo.py --workdir DIR --config.data.pretokenized=DIR/tokens

The dataset, the tokenizer (``config.tokenizer.export``, else ``workdir/tokenizer``,
trained there first for the embedded digits) and its precision come from the config, as
in training; images are centre-cropped. One process encodes everything on its default
device (see ``hmar_jax.training.token_cache`` for the format). Bad input ends in one ``error:`` line
and exit status 2.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from hmar_jax import cli
from hmar_jax.training import data
from hmar_jax.training import metric_writers
from hmar_jax.training import token_cache
from hmar_jax.training import trainer


def _define_flags() -> dict:
    """The CLI's absl flags, defined only when run as a program: ``--config`` and
    ``--workdir`` are also ``hmar_jax.train``'s, and absl refuses a flag defined twice in
    one process (the tests import both modules)."""
    defined = {
        "config": config_flags.DEFINE_config_file("config", None, "Training config file.",
                                                  lock_config=True),
        "workdir": flags.DEFINE_string("workdir", None, "The training workdir (for its tokenizer)."),
        "out": flags.DEFINE_string("out", None, "Directory to write the token cache to."),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace an existing --out."),
    }
    flags.mark_flags_as_required(["config", "workdir", "out"])
    return defined


def dataset_batches(config, batch_size: int):
    """Every example of ``config.data`` once, centre-cropped, as ``{"image", "label"}``
    batches in [-1, 1] (the last batch may be smaller)."""
    d = config.data
    if d.name == "digits":
        images, labels = data.digits_split(d.image_size, d.split)
        for start in range(0, len(labels), batch_size):
            yield data.to_model_range({"image": images[start:start + batch_size],
                                       "label": labels[start:start + batch_size]})
        return
    yield from data.image_iterator(data.image_source(d), image_size=d.image_size,
                                   batch_size=batch_size, seed=0, train=False,
                                   skip_corrupt=d.skip_corrupt, num_workers=d.num_workers)


def pretokenize(config, workdir: str, out: str, overwrite: bool = False) -> dict:
    """Writes the token cache of ``config``'s dataset to ``out``; returns its manifest."""
    if config.data.pretokenized:
        raise ValueError("config.data.pretokenized is set: pretokenize reads the images, leave it "
                         "empty here.")
    vae = trainer.load_or_train_tokenizer(config, pathlib.Path(workdir).absolute())
    if vae.config.image_size != config.data.image_size:
        raise ValueError(f"The tokenizer takes {vae.config.image_size} px images but "
                         f"data.image_size={config.data.image_size}.")
    d = config.data
    source = {"name": d.name, "split": d.split, "image_size": d.image_size,
              "tfds_name": d.tfds_name, "root": pathlib.Path(d.root).name if d.root else ""}
    manifest = token_cache.write_token_cache(vae, dataset_batches(config, config.batch_size), out,
                                             source=source, overwrite=overwrite)
    logging.info("Wrote %d token rows of length %d to %s.", manifest["num_examples"],
                 manifest["seq_len"], out)
    return manifest


def main(argv, defined: dict):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    metric_writers.quiet_library_logs()
    out = defined["out"].value
    manifest = pretokenize(defined["config"].value, defined["workdir"].value, out,
                           defined["overwrite"].value)
    size_mib = np.dtype(np.uint16).itemsize * manifest["num_examples"] * manifest["seq_len"] / 2**20
    print(f"wrote {manifest['num_examples']} examples x {manifest['seq_len']} tokens "
          f"({size_mib:.1f} MiB) to {out}")


if __name__ == "__main__":
    _flags = _define_flags()
    cli.run_absl(lambda argv: main(argv, _flags))
