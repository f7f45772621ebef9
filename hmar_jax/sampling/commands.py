"""What the command lines that sample from a pretrained bundle share (``python -m
hmar_jax.sample``, ``python -m hmar_jax.edit``, ``python -m hmar_jax.evaluate generate``):
their flags, the checks the flags alone decide (made before the bundle is loaded), the
execution config the flags ask for, and opening the bundle.

A library module: the command lines import it, never each other.
"""

from __future__ import annotations

import argparse
import pathlib

from hmar_jax import cli
from hmar_jax.execution import ExecutionConfig

UNSTACK_BLOCKS_HELP = ("a weight array per block (execution.unstack_blocks): faster batches, "
                       "much longer first compile; for long runs")


def add_bundle_arguments(parser: argparse.ArgumentParser, num_help: str,
                         num_default: int) -> None:
    """Flags shared by the sample and edit commands."""
    from hmar_jax.sampling import PRESETS

    parser.add_argument("--checkpoint", required=True, help="pretrained bundle directory")
    parser.add_argument("--preset", default="default",
                        help=f"sampling preset: default (the bundle's) or {', '.join(sorted(PRESETS))}")
    parser.add_argument("--num", type=int, default=num_default, help=num_help)
    parser.add_argument("--out", required=True, help="output .png (grid) or .npz")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"sampling seed, {cli.INT32_MIN}..{cli.INT32_MAX}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_execution_arguments(parser)


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """The execution choices a sampling command offers; the rest are the platform's
    defaults (``ExecutionConfig``), which need no flag."""
    parser.add_argument("--unstack-blocks", action="store_true", help=UNSTACK_BLOCKS_HELP)


def execution_from_args(args: argparse.Namespace) -> ExecutionConfig:
    """The (unresolved) execution config the flags of :func:`add_execution_arguments` ask
    for; ``pretrained.load_pretrained`` resolves it for the platform."""
    return ExecutionConfig(unstack_blocks=args.unstack_blocks)


def check_bundle_arguments(args: argparse.Namespace) -> None:
    """Everything the flags of :func:`add_bundle_arguments` alone decide, checked before the
    bundle is loaded: the output format and location, the counts, the seed and the preset
    name."""
    from hmar_jax.sampling import check_preset_name

    if pathlib.Path(args.out).suffix not in (".png", ".npz"):
        raise cli.InputError(f"--out must end in .png or .npz, got {args.out}.")
    cli.check_int_range("--num", args.num, 1)
    cli.check_int_range("--seed", args.seed, cli.INT32_MIN)
    check_preset_name(args.preset)
    cli.check_writable_output(args.out, overwrite=args.overwrite)


def open_bundle(args: argparse.Namespace, mesh=None):
    """``(bundle, sampling config)`` for the command's ``--checkpoint``, ``--preset`` and
    execution flags, the parameters placed on ``mesh`` if given; raises FileNotFoundError
    or ValueError with the message the command prints."""
    from hmar_jax import pretrained
    from hmar_jax.sampling import resolve_preset
    from hmar_jax.training import metric_writers

    metric_writers.quiet_library_logs()
    bundle = pretrained.load_pretrained(args.checkpoint, execution_from_args(args), mesh=mesh)
    return bundle, resolve_preset(args.preset, bundle)
