"""Pretrained bundles: a model export, its tokenizer export and how to sample from them.

A bundle directory is what ``python -m hmar_jax.export`` writes and what the sampling CLI,
the evaluation CLI and the notebook load::

    DIR/pretrained.json    format version, provenance, the default sampling config
    DIR/model/             ``hmar`` export (params-only Orbax checkpoint + hmar_config.json)
    DIR/tokenizer/         ``tokenizer`` export (params-only Orbax checkpoint + config)

Trained runs (EMA weights when the run kept them) and converted official checkpoints use
the same layout. ``load_pretrained`` restores onto whatever devices exist: the host's
default device, or replicated/FSDP-sharded over a given mesh.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from hmar_jax import checkpointing, sharding
from hmar_jax import transformer as hmar_model
from hmar_jax.atomic_io import atomic_directory
from hmar_jax.transformer import HMARTransformer, cast_matmul_weights
from hmar_jax.sampling import SamplingConfig
from hmar_jax.vqvae import VQVAE

FORMAT = "hmar_jax.pretrained"
VERSION = 1
MANIFEST = "pretrained.json"
MODEL_DIR, TOKENIZER_DIR = "model", "tokenizer"


@dataclasses.dataclass
class Pretrained:
    """A loaded bundle.

    Attributes:
      model: the transformer.
      vae: its tokenizer.
      sampling: the bundle's default sampling config (None if it stores none).
      metadata: the manifest (provenance: source, step, weights).
    """

    model: HMARTransformer
    vae: VQVAE
    sampling: SamplingConfig | None
    metadata: dict[str, Any]


def sampling_to_json(config: SamplingConfig) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    if isinstance(config.mask_schedule, tuple):
        values["mask_schedule"] = [list(s) for s in config.mask_schedule]
    return values


def sampling_from_json(values: dict[str, Any]) -> SamplingConfig:
    values = dict(values)
    if isinstance(values.get("mask_schedule"), list):
        values["mask_schedule"] = tuple(tuple(s) for s in values["mask_schedule"])
    return SamplingConfig(**values)


def check_pair(model: HMARTransformer, vae: VQVAE, where: str = "") -> None:
    """Raises ValueError if the tokenizer cannot feed the model."""
    m, v = model.config, vae.config
    problems = []
    if m.vocab_size != v.vocab_size:
        problems.append(f"vocabulary {m.vocab_size} vs tokenizer {v.vocab_size}")
    if m.latent_channels != v.z_channels:
        problems.append(f"latent channels {m.latent_channels} vs tokenizer {v.z_channels}")
    if tuple(m.patch_nums) != tuple(v.patch_nums):
        problems.append(f"scales {tuple(m.patch_nums)} vs tokenizer {tuple(v.patch_nums)}")
    if problems:
        raise ValueError(f"{where}The tokenizer does not match the model ({'; '.join(problems)}); "
                         "pair the model with the tokenizer it was trained with.")


def save_pretrained(directory: str | pathlib.Path, model: HMARTransformer, vae: VQVAE, *,
                    sampling: SamplingConfig | None = None, metadata: dict | None = None,
                    overwrite: bool = False) -> pathlib.Path:
    """Writes a bundle atomically (staged next to ``directory``, renamed when complete).

    Args:
      directory: destination; must not exist unless ``overwrite``.
      model, vae: the pair to export (params only).
      sampling: default sampling config stored in the manifest.
      metadata: JSON-serialisable provenance merged into the manifest.
    """
    check_pair(model, vae)
    with atomic_directory(directory, overwrite) as staging:
        checkpointing.save_hmar(staging / MODEL_DIR, model)
        checkpointing.save_tokenizer(staging / TOKENIZER_DIR, vae)
        manifest = {"format": FORMAT, "version": VERSION, "model": MODEL_DIR,
                    "tokenizer": TOKENIZER_DIR,
                    "sampling": None if sampling is None else sampling_to_json(sampling)}
        manifest |= metadata or {}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return pathlib.Path(directory).absolute()


def read_manifest(directory: str | pathlib.Path) -> dict[str, Any]:
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = ""
        if (directory / "checkpoints").is_dir() or (directory / "export").is_dir():
            hint = f" It looks like a training workdir: run `python -m hmar_jax.export --workdir {directory} --out OUT` first."
        raise FileNotFoundError(f"{directory} is not a pretrained bundle (no {MANIFEST}).{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise ValueError(f"{path} is not a {FORMAT} manifest of version <= {VERSION}.")
    return manifest


def load_pretrained(directory: str | pathlib.Path, *, mesh: Mesh | None = None,
                    tokenizer_precision: str = "default", cast_weights: bool = True,
                    unstack_blocks: bool = False, **model_overrides) -> Pretrained:
    """Loads a bundle.

    Args:
      directory: a bundle written by ``save_pretrained`` / ``python -m hmar_jax.export``.
      mesh: place the parameters on this mesh (large arrays FSDP-sharded over its ``fsdp``
        axis, the rest replicated); default: the default device.
      tokenizer_precision: ``default`` (the platform's fast float32, e.g. TF32 on NVIDIA
        GPUs, as PyTorch decodes) or ``highest`` (exact float32).
      cast_weights: store the transformer's matmul weights in its compute dtype
        (``model.cast_matmul_weights``: same samples, half the weight memory and no
        per-pass conversion for a bf16 model); False keeps the float32 weights (to
        fine-tune them).
      unstack_blocks: give every block its own weight arrays (``model.unstack_blocks``):
        the sampler's blocks then run unrolled and read their weights in place. Faster
        batches (d30 B64 on an H200: 574.5 instead of 603 ms) for a much longer first
        compile (174 instead of 39 s), so for long generation runs; the compiled sampler
        can be kept across runs with ``JAX_COMPILATION_CACHE_DIR``.
      model_overrides: runtime-only model settings, e.g. ``dtype="float32"``,
        ``attention_backend="reference"``.

    Example:
      >>> pre = load_pretrained("checkpoints/hmar-d16")
      >>> images = sampling.generate_batches(pre.model, pre.vae, labels, index, seed=0,
      ...                                    config=pre.sampling)
    """
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    model = checkpointing.load_hmar(directory / manifest["model"], **model_overrides)
    vae = checkpointing.load_tokenizer(directory / manifest["tokenizer"],
                                       precision=tokenizer_precision)
    check_pair(model, vae, f"{directory}: ")
    if cast_weights:
        cast_matmul_weights(model)
    if mesh is not None:
        for module in (model, vae):
            state = nnx.state(module)
            nnx.update(module, jax.device_put(state, sharding.tree_shardings(state, mesh)))
    if unstack_blocks:
        hmar_model.unstack_blocks(model)
    sampling = manifest.get("sampling")
    return Pretrained(model, vae, None if sampling is None else sampling_from_json(sampling),
                      manifest)
