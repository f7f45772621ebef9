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


# What export reads of a training workdir (``hmar_jax.training.trainer`` writes it): the run's
# config as JSON, and an Orbax CheckpointManager directory whose steps hold the TrainState
# under ``state``: the EMA of the trainable parameters under ``ema``, the rest under ``frozen``.
RUN_CONFIG = "train_config.json"
CHECKPOINTS, STATE_ITEM, EMA, FROZEN = "checkpoints", "state", "ema", "frozen"
FINAL_EXPORT = "export"


def _merged(a: dict, b: dict) -> dict:
    """Nested dicts ``a`` and ``b`` as one (``b`` wins where both hold a leaf)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def export_workdir(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                   overwrite: bool = False) -> pathlib.Path:
    """Bundles a training run: EMA weights of its newest usable checkpoint (or the run's
    final export when its checkpoints were removed), its tokenizer and its sampling
    settings.

    Reads the run's stored config and only the EMA and frozen parameters of the checkpoint
    (not the optimizer state), so neither the training code nor the training data is
    needed, and the weights are restored onto whatever device exists here.
    """
    from flax import nnx

    from hmar_jax.transformer import HMARTransformer

    workdir = pathlib.Path(workdir)
    config_path = workdir / RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {RUN_CONFIG}); "
                                "pass the --workdir of a `python -m hmar_jax.train` run.")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); it is written by "
                         "`python -m hmar_jax.train`.") from None
    tokenizer_dir = pathlib.Path(config["tokenizer"]["export"] or workdir / "tokenizer")
    vae = checkpointing.load_tokenizer(tokenizer_dir)  # clear error if missing
    cfg = pretrained.run_model_config(config, vae.config)
    restored = checkpointing.newest_usable_entries(workdir / CHECKPOINTS, STATE_ITEM,
                                                   (EMA, FROZEN))
    if restored is not None:
        step, entries = restored
        params = _merged(entries[FROZEN], entries[EMA])
        model = checkpointing.module_from_params(
            lambda: HMARTransformer(cfg, rngs=nnx.Rngs(0)), params,
            workdir / CHECKPOINTS / str(step))
        weights = "ema"
    elif (workdir / FINAL_EXPORT).is_dir():
        model = checkpointing.load_hmar(workdir / FINAL_EXPORT)
        step, weights = None, "final export"
    else:
        raise FileNotFoundError(f"{workdir} holds neither {CHECKPOINTS}/ nor {FINAL_EXPORT}/; "
                                "the run has not saved anything yet.")
    metadata = {"source": {"workdir": workdir.name, "stage": config["stage"], "step": step,
                           "weights": weights}}
    return pretrained.save_pretrained(out, model, vae,
                                      sampling=pretrained.run_sampling_config(config),
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
