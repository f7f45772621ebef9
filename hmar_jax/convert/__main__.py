"""Command line: convert upstream PyTorch checkpoints into Orbax exports.

  python -m hmar_jax.convert vqvae --src vae_ch160v4096z32.pth --out checkpoints/vae
  python -m hmar_jax.convert hmar  --src hmar-d16.pth --out checkpoints/hmar-d16
  python -m hmar_jax.convert var   --src var_d16.pth --out checkpoints/var-d16
  python -m hmar_jax.convert assemble --stage1 DIR --stage2 DIR --out DIR
  python -m hmar_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --out DIR

Reads ``.pth`` files without torch (``hmar_jax.convert.torch_pickle``), validates every
key and shape, and writes an Orbax params checkpoint plus a JSON config atomically.
The output location is checked before the source is read, and tensors are read only after
their shapes matched the expected layout, so a wrong or hostile file costs neither time
nor memory. Exit status 2 with a one-line message on any problem with the input.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import sys

from hmar_jax import cli
from hmar_jax.convert import hmar as hmar_convert
from hmar_jax.convert import inception as inception_convert
from hmar_jax.convert import torch_pickle
from hmar_jax.convert import vqvae as vqvae_convert


def _sha256_prefix(path: pathlib.Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def convert_vqvae(args: argparse.Namespace) -> pathlib.Path:
    """Converts a VAR VQ-VAE ``.pth`` into a tokenizer export; returns the export path."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.tokenizer.model import VQVAE

    src = pathlib.Path(args.src)
    with torch_pickle.open_state_dict(src, subtree=args.subtree) as state_dict:
        cfg = vqvae_convert.infer_config(state_dict, args.patch_nums, norm_groups=args.norm_groups,
                                         quant_resi=args.quant_resi)
        params = vqvae_convert.convert_state_dict(state_dict, cfg)
    model = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    metadata = {"source_file": src.name, "source_sha256_prefix": _sha256_prefix(src),
                "converter": "hmar_jax.convert vqvae"}
    return checkpointing.save_tokenizer(args.out, model, extra_metadata=metadata,
                                        overwrite=args.overwrite)


def _depth_from_name(name: str) -> int | None:
    match = re.search(r"(?:^|[-_])d(\d+)(?=[-_.]|$)", name)
    return int(match.group(1)) if match else None


def _transformer_format(state_dict: dict, src: pathlib.Path, kind: str) -> str:
    """The file's format, refused unless it is the one ``convert <kind>`` reads."""
    fmt = hmar_convert.detect_format(state_dict)
    if fmt != kind:
        hint = ("use `python -m hmar_jax.convert var` (add --pattern block_diagonal for HMAR "
                "stage-1 weights)" if fmt == "var" else "use `python -m hmar_jax.convert hmar`")
        found = "VAR/NSP-format (blocks.*, head.*)" if fmt == "var" else "HMAR combined (base_blocks.*)"
        raise vqvae_convert.ConversionError(
            f"{src.name} is a {found} checkpoint, not what `convert {kind}` reads; {hint}.")
    return fmt


def convert_transformer(args: argparse.Namespace) -> pathlib.Path:
    """Converts an HMAR combined or VAR/NSP ``.pth`` into an ``hmar`` export."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.transformer import HMARTransformer

    src = pathlib.Path(args.src)
    with torch_pickle.open_state_dict(src, subtree=args.subtree) as state_dict:
        fmt = _transformer_format(state_dict, src, args.kind)
        expected_depth, source = args.depth, "--depth"
        if expected_depth is None and (named := _depth_from_name(src.name)) is not None:
            expected_depth, source = named, f"The file name {src.name!r}"
        cfg = hmar_convert.infer_config(state_dict, fmt, args.patch_nums,
                                        expected_depth=expected_depth, depth_source=source,
                                        attention_pattern=getattr(args, "pattern", None))
        params = hmar_convert.convert_state_dict(state_dict, cfg, fmt)
    model = nnx.eval_shape(lambda: HMARTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    metadata = {"source_file": src.name, "source_sha256_prefix": _sha256_prefix(src),
                "source_format": fmt, "converter": f"hmar_jax.convert {args.kind}"}
    return checkpointing.save_hmar(args.out, nnx.merge(graphdef, state), extra_metadata=metadata,
                                   overwrite=args.overwrite)


def assemble(args: argparse.Namespace) -> pathlib.Path:
    """Combines a stage-1 export (next-scale branch) and a stage-2 export (mask branch)."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.transformer import MASK_BRANCH

    stage1 = checkpointing.load_hmar(args.stage1)
    stage2 = checkpointing.load_hmar(args.stage2)
    if stage2.mask_blocks is None:
        raise ValueError(f"{args.stage2} has no mask branch (num_mask_layers=0); it is not a "
                         "stage-2 export.")
    if stage1.config.architecture(ignore=("num_mask_layers",)) != stage2.config.architecture(
            ignore=("num_mask_layers",)):
        raise ValueError(f"{args.stage1} and {args.stage2} were made for different model "
                         "architectures; assemble exports of the same run.")
    shared = nnx.to_pure_dict(nnx.state(stage1, nnx.Param))
    state = nnx.state(stage2, nnx.Param)
    merged = {name: value if name in MASK_BRANCH else shared[name]
              for name, value in nnx.to_pure_dict(state).items()}
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(stage2, state)
    return checkpointing.save_hmar(args.out, stage2, overwrite=args.overwrite,
                                   extra_metadata={"assembled_from": [str(args.stage1),
                                                                      str(args.stage2)]})


def convert_inception(args: argparse.Namespace) -> pathlib.Path:
    """Converts pytorch-fid's FID Inception ``.pth`` into an ``inception`` export."""
    src = pathlib.Path(args.src)
    if not src.is_file():
        raise FileNotFoundError(inception_convert.missing_weights_message(src))
    metadata = {"source_file": src.name, "source_sha256_prefix": _sha256_prefix(src),
                "converter": "hmar_jax.convert inception"}
    return inception_convert.convert(src, args.out, overwrite=args.overwrite,
                                     extra_metadata=metadata)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hmar_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    vq = sub.add_parser("vqvae", help="VAR multi-scale VQ-VAE (vae_ch160v4096z32.pth)")
    vq.add_argument("--src", required=True, help="PyTorch .pth file (torch.save zip format)")
    vq.add_argument("--out", required=True, help="export directory to create")
    vq.add_argument("--patch-nums", default="256",
                    help="scale sides: a preset (256, 512, 1024) or a list such as 1,2,3,4")
    vq.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (upstream: 32)")
    vq.add_argument("--quant-resi", type=float, default=0.5, help="phi mixing ratio (upstream: 0.5)")
    vq.add_argument("--subtree", default=None,
                    help="slash-separated path to a nested state_dict, e.g. trainer/vae_local")
    vq.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    vq.set_defaults(run=convert_vqvae)
    for kind, help_text in (("hmar", "released HMAR combined file (hmar-d16.pth ... hmar-d30.pth)"),
                            ("var", "VAR file (var_d16.pth ...) or HMAR stage-1 (NSP) weights")):
        cmd = sub.add_parser(kind, help=help_text)
        cmd.add_argument("--src", required=True, help="PyTorch .pth file")
        cmd.add_argument("--out", required=True, help="export directory to create")
        cmd.add_argument("--patch-nums", default="256", help="scale sides (preset or list)")
        cmd.add_argument("--depth", type=int, default=None,
                         help="expected depth; checked against the file (default: from a dNN "
                              "in the file name, if any)")
        cmd.add_argument("--subtree", default=None,
                         help="slash-separated path to a nested state_dict, e.g. "
                              "trainer/transformer_wo_ddp")
        cmd.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        if kind == "var":
            cmd.add_argument("--pattern", choices=("block_causal", "block_diagonal"),
                             default="block_causal",
                             help="attention the weights were trained with: block_causal for "
                                  "VAR files, block_diagonal for HMAR stage-1 files")
        cmd.set_defaults(run=convert_transformer)
    combine = sub.add_parser("assemble", help="combine own stage-1 and stage-2 exports")
    combine.add_argument("--stage1", required=True, help="stage-1 export (next-scale branch)")
    combine.add_argument("--stage2", required=True, help="stage-2 export (mask branch)")
    combine.add_argument("--out", required=True, help="export directory to create")
    combine.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    combine.set_defaults(run=assemble)
    fid = sub.add_parser("inception", help="FID Inception-v3 (pt_inception-2015-12-05-6726825d.pth)")
    fid.add_argument("--src", required=True,
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (from its GitHub "
                          "release; never downloaded here)")
    fid.add_argument("--out", required=True, help="export directory to create")
    fid.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fid.set_defaults(run=convert_inception)
    return parser


def _convert(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_writable_output(args.out, overwrite=args.overwrite)
    print(f"wrote {args.run(args)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one conversion; bad input is one ``error: ...`` line on stderr and exit status 2."""
    return cli.run(_convert, argv)


if __name__ == "__main__":
    sys.exit(main())
