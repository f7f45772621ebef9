"""Command line: class-conditional samples from a pretrained bundle.

  python -m hmar_jax.sample --checkpoint checkpoints/hmar-d16 --preset hmar-d16 \\
      --classes 207,360 --num 8 --out samples.png          # a PNG grid, one row per class
  python -m hmar_jax.sample --checkpoint checkpoints/digits --preset default \\
      --classes all --num 100 --out samples.npz            # uint8 images, labels, sample_index

Sample i of class c depends only on (seed, c, i), so results do not depend on the batch
size or on how many devices share the work. ``--preset default`` uses the sampling config
stored with the bundle. Editing lives in ``python -m hmar_jax.edit``.
Exit status 2 with a one-line message on any problem with the input.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

from hmar_jax import cli
from hmar_jax.sampling import commands


def parse_classes(text: str, num_classes: int) -> np.ndarray:
    """``"all"`` or comma-separated ids -> int32 ``[n]``; ValueError naming a bad entry."""
    if text.strip() == "all":
        return np.arange(num_classes, dtype=np.int32)
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise ValueError(f"--classes entry {part!r} is not an integer; give ids like 207,360 "
                             "or 'all'.")
        ids.append(int(part))
    from hmar_jax.sampling import check_labels

    check_labels(np.asarray(ids, dtype=object), num_classes)  # exact, however large the id
    return np.asarray(ids, np.int32)


def write_samples(path: pathlib.Path, images: np.ndarray, labels: np.ndarray,
                  sample_index: np.ndarray, per_class: int, *, overwrite: bool) -> pathlib.Path:
    """``.npz`` (images, labels, sample_index) or ``.png`` (a row per class), written
    atomically so an interrupted run leaves no file that looks complete."""
    from hmar_jax.sampling import visualize

    if path.suffix == ".npz":
        cli.write_output(path, lambda f: np.savez(f, images=images, labels=labels,
                                                  sample_index=sample_index), overwrite=overwrite)
    else:
        rows = [images[r:r + per_class] for r in range(0, len(images), per_class)]
        grid = visualize.grid_image(rows, upscale=max(1, 128 // images.shape[1]))
        cli.write_output(path, lambda f: Image.fromarray(grid).save(f, format="PNG"),
                         overwrite=overwrite)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hmar_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands.add_bundle_arguments(parser, "samples per class", 8)
    parser.add_argument("--classes", required=True, help="comma-separated class ids, or 'all'")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per compiled call")
    args = parser.parse_args(argv)
    cli.check_int_range("--batch-size", args.batch_size, 1)
    commands.check_bundle_arguments(args)
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hmar_jax import sampling

    out = pathlib.Path(args.out)
    bundle, config = commands.open_bundle(args)
    classes = parse_classes(args.classes, bundle.model.config.num_classes)
    labels = np.repeat(classes, args.num)
    sample_index = np.tile(np.arange(args.num, dtype=np.int32), len(classes))
    images = sampling.generate_batches(bundle.model, bundle.vae, labels, sample_index,
                                       seed=args.seed, config=config, batch_size=args.batch_size)
    write_samples(out, images, labels, sample_index, args.num, overwrite=args.overwrite)
    print(f"Wrote {len(images)} samples to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
