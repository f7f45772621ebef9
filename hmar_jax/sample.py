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

from hmar_jax import atomic_io, cli

# Counts and seeds are int32 inside the sampler. A JAX key keeps 32 bits of its seed, so
# seeds outside int32 would silently repeat others (2**32 draws what 0 draws).
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def check_int_range(flag: str, value: int, low: int, high: int = INT32_MAX) -> int:
    """Returns ``value`` if ``low <= value <= high``, else raises InputError naming the range."""
    if not low <= value <= high:
        raise cli.InputError(f"{flag} {value} is out of range; give an integer in {low}..{high}.")
    return value


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
        write_output(path, lambda f: np.savez(f, images=images, labels=labels,
                                              sample_index=sample_index), overwrite=overwrite)
    else:
        rows = [images[r:r + per_class] for r in range(0, len(images), per_class)]
        grid = visualize.grid_image(rows, upscale=max(1, 128 // images.shape[1]))
        write_output(path, lambda f: Image.fromarray(grid).save(f, format="PNG"),
                     overwrite=overwrite)
    return path


def write_output(path: pathlib.Path, write, *, overwrite: bool) -> None:
    """Creates the parent folder, then writes ``path`` atomically with ``write(file)``.
    Without ``overwrite`` a file that another run created meanwhile is refused
    (FileExistsError), never silently replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.atomic_write(path, write, overwrite=overwrite)


def add_common_arguments(parser: argparse.ArgumentParser, num_help: str, num_default: int) -> None:
    """Flags shared by the sample and edit commands."""
    from hmar_jax.sampling import PRESETS

    parser.add_argument("--checkpoint", required=True, help="pretrained bundle directory")
    parser.add_argument("--preset", default="default",
                        help=f"sampling preset: default (the bundle's) or {', '.join(sorted(PRESETS))}")
    parser.add_argument("--num", type=int, default=num_default, help=num_help)
    parser.add_argument("--out", required=True, help="output .png (grid) or .npz")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"sampling seed, {INT32_MIN}..{INT32_MAX}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--unstack-blocks", action="store_true",
                        help="a weight array per block (pretrained.load_pretrained): faster "
                             "batches, much longer first compile; for long runs")


def check_common_arguments(args: argparse.Namespace) -> None:
    """Everything the flags alone decide, checked before the bundle is loaded: the output
    format and location, the counts, the seed and the preset name."""
    from hmar_jax.sampling import check_preset_name

    if pathlib.Path(args.out).suffix not in (".png", ".npz"):
        raise cli.InputError(f"--out must end in .png or .npz, got {args.out}.")
    check_int_range("--num", args.num, 1)
    check_int_range("--seed", args.seed, INT32_MIN)
    check_preset_name(args.preset)
    cli.check_writable_output(args.out, overwrite=args.overwrite)


def open_bundle(args: argparse.Namespace):
    """``(bundle, sampling config)`` for the command's flags; raises FileNotFoundError or
    ValueError with the message the command prints."""
    from hmar_jax import pretrained, sampling
    from hmar_jax.training import metric_writers

    metric_writers.quiet_library_logs()
    bundle = pretrained.load_pretrained(args.checkpoint, unstack_blocks=args.unstack_blocks)
    return bundle, sampling.resolve_preset(args.preset, bundle)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hmar_jax.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "samples per class", 8)
    parser.add_argument("--classes", required=True, help="comma-separated class ids, or 'all'")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per compiled call")
    args = parser.parse_args(argv)
    check_int_range("--batch-size", args.batch_size, 1)
    check_common_arguments(args)
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hmar_jax import sampling

    out = pathlib.Path(args.out)
    bundle, config = open_bundle(args)
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
