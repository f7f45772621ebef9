"""Command line: write a pretrained bundle (see ``hmar_jax.pretrained``).

From a training workdir (the newest checkpoint's EMA weights, or the run's final export
when its checkpoints were removed), with the run's tokenizer and sampling settings:

  python -m hmar_jax.export --workdir workdirs/demo/stage2 --out checkpoints/digits

From separate exports, e.g. converted official weights:

  python -m hmar_jax.convert hmar  --src hmar-d16.pth --out /tmp/hmar-d16
  python -m hmar_jax.convert vqvae --src vae_ch160v4096z32.pth --out /tmp/vae
  python -m hmar_jax.export --model /tmp/hmar-d16 --tokenizer /tmp/vae --preset hmar-d16 \\
      --out checkpoints/hmar-d16

Exit status 2 with a one-line message on any problem with the input.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from hmar_jax import checkpointing, cli, pretrained, sampling


def export_workdir(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                   overwrite: bool = False) -> pathlib.Path:
    """Bundles a training run: EMA weights of its newest checkpoint, its tokenizer and its
    sampling settings."""
    import ml_collections

    from hmar_jax.training import trainer as trainer_lib

    workdir = pathlib.Path(workdir)
    config_path = workdir / trainer_lib.RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {trainer_lib.RUN_CONFIG}); "
                                "pass the --workdir of a `python -m hmar_jax.train` run.")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    config.mesh = (("data", -1), ("fsdp", 1))  # restore onto whatever devices exist here
    tokenizer_dir = pathlib.Path(config.tokenizer.export or workdir / "tokenizer")
    checkpointing.read_config(tokenizer_dir, checkpointing.TOKENIZER)  # clear error if missing
    trainer = trainer_lib.Trainer(config, str(workdir))
    state = trainer.restore_latest()
    if state is not None:
        model, step, weights = trainer.ema_model(state), int(state.step), "ema"
    elif (workdir / "export").is_dir():
        model = checkpointing.load_hmar(workdir / "export")
        step, weights = None, "final export"
    else:
        raise FileNotFoundError(f"{workdir} holds neither checkpoints/ nor export/; the run has "
                                "not saved anything yet.")
    metadata = {"source": {"workdir": workdir.name, "stage": config.stage, "step": step,
                           "weights": weights}}
    return pretrained.save_pretrained(out, model, trainer.vae, sampling=trainer.sampling_config(),
                                      metadata=metadata, overwrite=overwrite)


def export_pair(model_dir: str | pathlib.Path, tokenizer_dir: str | pathlib.Path,
                out: str | pathlib.Path, *, preset: str | None = None,
                overwrite: bool = False) -> pathlib.Path:
    """Bundles a model export and a tokenizer export (e.g. converted official weights)."""
    model = checkpointing.load_hmar(model_dir)
    vae = checkpointing.load_tokenizer(tokenizer_dir)
    config = sampling.resolve_preset(preset) if preset else None
    metadata = {"source": {"model": pathlib.Path(model_dir).name,
                           "tokenizer": pathlib.Path(tokenizer_dir).name, "preset": preset}}
    return pretrained.save_pretrained(out, model, vae, sampling=config, metadata=metadata,
                                      overwrite=overwrite)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hmar_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="training workdir to export")
    parser.add_argument("--model", help="hmar export directory (with --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer export directory (with --model)")
    parser.add_argument("--preset", help=f"default sampling preset stored with --model/--tokenizer "
                                         f"({', '.join(sorted(sampling.PRESETS))})")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if bool(args.workdir) == bool(args.model or args.tokenizer):
        parser.error("give either --workdir, or --model and --tokenizer")
    if args.model and not args.tokenizer or args.tokenizer and not args.model:
        parser.error("--model and --tokenizer go together")
    if args.workdir and args.preset:
        parser.error("--preset is for --model/--tokenizer; a workdir stores its own sampling settings")
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preset:
        sampling.check_preset_name(args.preset)
    cli.check_writable_output(args.out, overwrite=args.overwrite)  # before loading any weights
    from hmar_jax.training import metric_writers

    metric_writers.quiet_library_logs()
    if args.workdir:
        path = export_workdir(args.workdir, args.out, overwrite=args.overwrite)
    else:
        path = export_pair(args.model, args.tokenizer, args.out, preset=args.preset,
                           overwrite=args.overwrite)
    print(f"Wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
