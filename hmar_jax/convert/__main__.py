"""Command line: convert upstream PyTorch checkpoints into Orbax exports.

  python -m hmar_jax.convert vqvae --src vae_ch160v4096z32.pth --out checkpoints/vae

Reads ``.pth`` files without torch (``hmar_jax.convert.torch_pickle``), validates every
key and shape, and writes an Orbax params checkpoint plus a JSON config atomically.
Exit status 2 with a one-line message on any problem with the input.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

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
    from hmar_jax.vqvae import VQVAE

    src = pathlib.Path(args.src)
    state_dict = torch_pickle.load_state_dict(src, subtree=args.subtree)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.run(args)
    except (torch_pickle.CheckpointFormatError, vqvae_convert.ConversionError,
            FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
