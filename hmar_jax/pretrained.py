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
from hmar_jax.tokenizer.model import VQVAE

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


def _sampling_value_problem(key: str, value: Any) -> str | None:
    """What is wrong with one stored sampling value (None if nothing): the types of
    :class:`SamplingConfig`, which the sampler reads without checking."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_int or isinstance(value, float)
    if key in ("cfg", "temperature"):
        if not is_number or (key == "temperature" and value <= 0):
            return "a positive number" if key == "temperature" else "a number"
    elif key == "top_k":
        if not is_int or value < 0:
            return "an integer >= 0 (0 disables it)"
    elif key == "top_p":
        if not is_number or not 0 <= value <= 1:
            return "a number in [0, 1] (0 or 1 disables it)"
    elif key == "mask_cfg":
        if value is not None and not is_number:
            return "a number or null"
    elif key == "mask_schedule":
        valid = value is None or value == "auto" or (
            isinstance(value, list) and value and all(
                isinstance(scale, list) and scale and all(
                    isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in scale)
                for scale in value))
        if not valid:
            return "\"auto\", null, or a list of lists of positive token counts (one per scale)"
    return None


def sampling_from_json(values: Any, where: str = "sampling") -> SamplingConfig:
    """The stored sampling config, checked key by key; ValueError naming the key and the
    fix (a hand-edited manifest otherwise fails deep inside the compiled sampler)."""
    fields = [f.name for f in dataclasses.fields(SamplingConfig)]
    if not isinstance(values, dict):
        raise ValueError(f"{where} is {type(values).__name__} {values!r}; it must be an object "
                         f"with keys among {fields}, or null.")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; the keys are {fields}. Remove or "
                         "rename them.")
    for key, value in values.items():
        expected = _sampling_value_problem(key, value)
        if expected is not None:
            raise ValueError(f"{where}.{key} is {json.dumps(value)}; it must be {expected}.")
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
    """The bundle's manifest, its structure checked; ValueError naming the key and the fix.
    The sampling config is checked by :func:`sampling_from_json` when it is loaded."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = ""
        if (directory / "checkpoints").is_dir() or (directory / "export").is_dir():
            hint = f" It looks like a training workdir: run `python -m hmar_jax.export --workdir {directory} --out OUT` first."
        raise FileNotFoundError(f"{directory} is not a pretrained bundle (no {MANIFEST}).{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); export the bundle again with "
                         "`python -m hmar_jax.export`.") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not an object; export "
                         "the bundle again with `python -m hmar_jax.export`.")
    version = manifest.get("version", 0)
    if manifest.get("format") != FORMAT or not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{path} is not a {FORMAT} manifest of version <= {VERSION}.")
    for key in ("model", "tokenizer"):
        value = manifest.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: '{key}' is {json.dumps(value)}; it must name the bundle's "
                             f"{key} folder (\"{MODEL_DIR if key == 'model' else TOKENIZER_DIR}\" "
                             "as exported).")
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
    stored = manifest.get("sampling")  # checked before the weights are read
    sampling = (None if stored is None
                else sampling_from_json(stored, f"{directory / MANIFEST}: sampling"))
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
    return Pretrained(model, vae, sampling, manifest)
