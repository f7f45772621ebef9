"""Command line: generate evaluation samples and score them.

  python -m hmar_jax.evaluate generate --checkpoint DIR --preset hmar-d16 --per-class 50 \\
      --out samples.npz [--seed 0] [--chunk 1000]
  python -m hmar_jax.evaluate metrics --samples samples.npz \\
      --ref VIRTUAL_imagenet256_labeled.npz --inception DIR [--out metrics.json]
  python -m hmar_jax.evaluate digits --samples workdirs/demo/stage2/samples.npz

``generate`` writes ``per_class`` samples of every class, class-major, into an npz with
``arr_0`` (uint8 [N, H, W, 3]) and ``labels``; it resumes from ``<out>.parts/`` after a
crash, and on several hosts splits the chunks between processes (shared filesystem;
process 0 packs). ``metrics`` prints and writes Inception Score, FID, sFID, precision and
recall against OpenAI's reference batch, using the FID Inception converted with
``python -m hmar_jax.convert inception``. ``digits`` scores digit samples (accuracy of
a classifier trained on real digits, Fréchet distance in its feature space).

Exit status 2 with a one-line message on any problem with the inputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pathlib
import sys
import time

import numpy as np

from hmar_jax import cli
from hmar_jax.atomic_io import atomic_write


def _check_report_output(path: str | None) -> None:
    """A JSON report replaces an earlier one (no --overwrite); its folder must be writable."""
    if path is not None:
        cli.check_writable_output(path, overwrite=True)


def _write_json(path: str | None, report: dict) -> None:
    if path is not None:
        out = pathlib.Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
        print(f"wrote {out}")


def run_metrics(args: argparse.Namespace) -> int:
    from hmar_jax.evaluate import inception, metrics

    cli.check_int_range("--batch-size", args.batch_size, 1)
    cli.check_int_range("--block", args.block, 1)
    _check_report_output(args.out)
    samples = metrics.check_samples(args.samples)  # the inputs before the Inception is loaded
    metrics.check_reference(args.ref)
    model = inception.load_inception(args.inception, preprocessing=args.preprocessing)
    feature_fn = metrics.make_feature_fn(model, args.batch_size)
    start = time.time()
    report = metrics.evaluate(samples, args.ref, feature_fn, batch_size=args.batch_size,
                              block=args.block)
    print(f"Inception Score: {report['inception_score']:.4f}")
    print(f"FID: {report['fid']:.4f}")
    print(f"sFID: {report['sfid']:.4f}")
    print(f"Precision: {report['precision']:.4f}")
    print(f"Recall: {report['recall']:.4f}")
    report.update(samples=str(samples), reference=str(args.ref), inception=str(args.inception),
                  preprocessing=args.preprocessing, seconds=round(time.time() - start, 1))
    _write_json(args.out, report)
    return 0


def _read_digit_samples(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    from hmar_jax.evaluate import metrics

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the trainer writes samples.npz in its "
                                "workdir).")
    keys = metrics.npz_keys(path)
    key = next((k for k in ("images", "arr_0") if k in keys), None)
    if key is None or "labels" not in keys:
        raise ValueError(f"{path} has keys {keys}; expected 'images' (or 'arr_0') and "
                         "'labels', as the trainer writes.")
    arrays = metrics.load_npz(path, (key, "labels"))
    images, labels = arrays[key], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
            or labels.shape != images.shape[:1] or labels.dtype.kind not in "iu" \
            or not len(labels):
        raise ValueError(f"{path}: images {images.dtype} {images.shape} and labels "
                         f"{labels.dtype} {labels.shape}; expected uint8 [N, S, S, 3] and "
                         "integer [N], N >= 1.")
    return images, labels


def run_digits(args: argparse.Namespace) -> int:
    from hmar_jax.evaluate import digits

    _check_report_output(args.out)
    images, labels = _read_digit_samples(pathlib.Path(args.samples))
    report = digits.evaluate_samples(images, labels)
    print(f"Accuracy: {report['accuracy']:.4f} (classifier on held-out real digits: "
          f"{report['classifier_accuracy_on_real_held_out']:.4f})")
    distance = report["frechet_distance"]
    shown = "n/a (needs 2 samples)" if distance is None else f"{distance:.4f}"
    print(f"Fréchet distance: {shown} (real held-out digits: "
          f"{report['frechet_distance_real_held_out']:.4f})")
    _write_json(args.out, report)
    return 0


def _check_generate_args(args: argparse.Namespace) -> None:
    from hmar_jax import sampling

    cli.check_int_range("--per-class", args.per_class, 1)
    cli.check_int_range("--chunk", args.chunk, 1)
    cli.check_int_range("--batch-size", args.batch_size, 1)
    cli.check_int_range("--seed", args.seed, cli.INT32_MIN)
    sampling.check_preset_name(args.preset)


def run_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    from hmar_jax.evaluate import generation

    out = generation.check_output_free(args.out)  # before the (slow) model load
    import jax

    from hmar_jax import distributed, sampling
    from hmar_jax.sampling import commands

    distributed.initialize_if_multi_process()
    # Placed once, replicated over the local devices exactly as generate_batches shards
    # its sampler, so the per-chunk calls below do not copy the weights again.
    local_mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
    pre, config = commands.open_bundle(args, mesh=local_mesh)
    plan = generation.GenerationPlan(pre.model.config.num_classes, args.per_class, args.chunk)
    run_info = {"checkpoint": str(pathlib.Path(args.checkpoint).absolute()),
                "preset": args.preset, "sampling": repr(config), "seed": args.seed}

    def generate_fn(labels: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        return sampling.generate_batches(pre.model, pre.vae, labels, sample_index, seed=args.seed,
                                         config=config, batch_size=args.batch_size,
                                         mesh=local_mesh)

    barrier = None
    if jax.process_count() > 1:  # all processes wait here until every chunk is written
        from jax.experimental import multihost_utils

        barrier = functools.partial(multihost_utils.sync_global_devices,
                                    "hmar_jax.evaluate.generate")

    print(f"Generating {plan.num_samples} samples ({args.per_class} per class, "
          f"{plan.num_chunks} chunks of {plan.chunk_size}) into {generation.parts_dir(out)}")
    written = generation.generate_npz(generate_fn, plan, out, run_info=run_info,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count(), barrier=barrier)
    if written is not None:
        print(f"wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hmar_jax.sampling import commands

    parser = argparse.ArgumentParser(prog="python -m hmar_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="class-conditional sample batch (OpenAI npz layout)")
    gen.add_argument("--checkpoint", required=True, help="HMAR export directory")
    gen.add_argument("--preset", required=True,
                     help="sampling preset (hmar_jax.sampling.PRESETS) or 'default'")
    gen.add_argument("--per-class", type=int, default=50, help="samples per class (50 -> 50k)")
    gen.add_argument("--out", required=True, help="npz to write (arr_0, labels)")
    gen.add_argument("--seed", type=int, default=0,
                     help=f"sampling seed, {cli.INT32_MIN}..{cli.INT32_MAX}")
    gen.add_argument("--chunk", type=int, default=1000,
                     help="samples per resumable chunk in <out>.parts/")
    gen.add_argument("--batch-size", type=int, default=64, help="sampler batch size")
    commands.add_execution_arguments(gen)
    gen.set_defaults(run=run_generate)

    met = sub.add_parser("metrics", help="IS, FID, sFID, precision, recall of a sample npz")
    met.add_argument("--samples", required=True, help="npz with uint8 arr_0 [N, H, W, 3]")
    met.add_argument("--ref", required=True,
                     help="OpenAI's reference batch, e.g. VIRTUAL_imagenet256_labeled.npz")
    met.add_argument("--inception", required=True,
                     help="export of `python -m hmar_jax.convert inception`")
    met.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    met.add_argument("--batch-size", type=int, default=64, help="Inception batch size")
    met.add_argument("--block", type=int, default=10000,
                     help="tile size of the precision/recall distances (memory ~ block^2)")
    met.add_argument("--preprocessing", choices=("tf_graph", "pytorch_fid"), default="tf_graph",
                     help="resize/normalisation of the OpenAI TF graph (default) or pytorch-fid")
    met.set_defaults(run=run_metrics)

    dig = sub.add_parser("digits", help="score digit samples written by a demo training run")
    dig.add_argument("--samples", required=True, help="npz with images (or arr_0) and labels")
    dig.add_argument("--out", default=None, help="also write the report to this JSON file")
    dig.set_defaults(run=run_digits)
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
