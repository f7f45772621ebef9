"""Pretrained bundles: a model export, its tokenizer export and how to sample from them.

A bundle directory is what ``python -m hmar_jax.export`` writes and what the sampling CLI,
the evaluation CLI and the notebook load::

    DIR/pretrained.json    format version, provenance, the default sampling config
    DIR/model/             ``hmar`` export (params-only Orbax checkpoint + hmar_config.json)
    DIR/tokenizer/         ``tokenizer`` export (params-only Orbax checkpoint + config)

Trained runs (EMA weights when the run kept them) and converted official checkpoints use
the same layout. ``load_pretrained`` is a boundary: it resolves the execution config for
the platform once, builds the tokenizer and the transformer with it, applies the inference
transforms it asks for (:func:`cast_matmul_weights`, :func:`unstack_blocks`) and restores
onto whatever devices exist: the host's default device, or replicated/FSDP-sharded over a
given mesh.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from hmar_jax import checkpointing, sharding
from hmar_jax.atomic_io import atomic_directory
from hmar_jax.execution import ExecutionConfig
from hmar_jax.sampling import SamplingConfig
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from hmar_jax.transformer import MODEL_PRESETS, HMARConfig, HMARTransformer

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


def run_model_config(config: Mapping[str, Any], tokenizer: VQVAEConfig) -> HMARConfig:
    """The transformer a training config trains (``config`` as a mapping, e.g. the JSON a run
    stores): ``model.preset`` with ``model.overrides``, on the tokenizer's vocabulary,
    latent channels and scales. Override keys of execution settings that older configs
    carried are dropped (``HMARConfig.from_dict``)."""
    model = config["model"]
    if model["preset"] not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {model['preset']!r}; available: "
                         f"{sorted(MODEL_PRESETS)}.")
    values = dict(MODEL_PRESETS[model["preset"]]) | dict(model.get("overrides") or {})
    values.update(vocab_size=tokenizer.vocab_size, latent_channels=tokenizer.z_channels,
                  patch_nums=tuple(tokenizer.patch_nums))
    return HMARConfig.from_dict(values)


def run_sampling_config(config: Mapping[str, Any]) -> SamplingConfig:
    """The sampling settings of a training config (``config.sampling``); mask refinement only
    once stage 2 has trained the mask branch."""
    values = config["sampling"]
    return SamplingConfig(cfg=values["cfg"], top_k=values["top_k"], top_p=values["top_p"],
                          mask_schedule="auto" if config["stage"] == 2 else None,
                          mask_cfg=values["mask_cfg"])


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


def load_pretrained(directory: str | pathlib.Path, execution: ExecutionConfig | None = None, *,
                    mesh: Mesh | None = None) -> Pretrained:
    """Loads a bundle to run with ``execution``.

    Args:
      directory: a bundle written by ``save_pretrained`` / ``python -m hmar_jax.export``.
      execution: how the transformer and the tokenizer run, including the inference
        transforms ``cast_weights`` (:func:`cast_matmul_weights`) and ``unstack_blocks``
        (:func:`unstack_blocks`); default ``ExecutionConfig()``, the platform's fast path.
        Resolved here for the platform (once: everything below takes it as it is).
      mesh: place the parameters on this mesh (large arrays FSDP-sharded over its ``fsdp``
        axis, the rest replicated); default: the default device.

    Example:
      >>> pre = load_pretrained("checkpoints/hmar-d16")
      >>> images = sampling.generate_batches(pre.model, pre.vae, labels, index, seed=0,
      ...                                    config=pre.sampling)
      >>> exact = load_pretrained("checkpoints/hmar-d16", execution.REFERENCE)
    """
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    stored = manifest.get("sampling")  # checked before the weights are read
    sampling = (None if stored is None
                else sampling_from_json(stored, f"{directory / MANIFEST}: sampling"))
    execution = (execution or ExecutionConfig()).resolve(inference=True)
    model = checkpointing.load_hmar(directory / manifest["model"], execution)
    vae = checkpointing.load_tokenizer(directory / manifest["tokenizer"], execution)
    check_pair(model, vae, f"{directory}: ")
    if execution.cast_weights:
        cast_matmul_weights(model)
    if mesh is not None:
        for module in (model, vae):
            state = nnx.state(module)
            nnx.update(module, jax.device_put(state, sharding.tree_shardings(state, mesh)))
    if execution.unstack_blocks:
        unstack_blocks(model)
    return Pretrained(model, vae, sampling, manifest)


# ----- inference transforms (``ExecutionConfig.cast_weights`` / ``.unstack_blocks``) ------------
def cast_matmul_weights(module: nnx.Module) -> nnx.Module:
    """Stores every ``nnx.Linear``'s kernel and bias in that layer's compute dtype, in place.

    For inference. A Linear with ``dtype=bfloat16`` converts its float32 weights at every
    call, and the sampler calls every block once per scale and refinement step. Stored in
    bf16, the outputs are the same bit for bit (the layer would cast to that dtype anyway),
    the weights take half the memory and no pass converts them. Layers without a compute
    dtype (the heads, ``word_embed``) keep theirs. Not for training: the optimizer wants
    the float32 weights.

    Returns:
      ``module`` (modified).
    """
    for _, layer in nnx.iter_modules(module):
        if not isinstance(layer, nnx.Linear) or layer.dtype is None:
            continue
        for param in (layer.kernel, layer.bias):
            value = None if param is None else param.get_value()
            if value is None or value.dtype == jnp.dtype(layer.dtype):
                continue
            if isinstance(value, jax.ShapeDtypeStruct):  # abstract (nnx.eval_shape)
                param.set_value(jax.ShapeDtypeStruct(value.shape, jnp.dtype(layer.dtype)))
            else:
                param.set_value(value.astype(layer.dtype))
    return module


def unstack_blocks(model: HMARTransformer) -> HMARTransformer:
    """Gives every block its own weight arrays, in place. For inference.

    Trained and checkpointed models keep each stack's parameters in arrays with a leading
    layer axis (``[depth, ...]``, what ``lax.scan`` and the sharding rules want). At
    inference every pass then slices each block's weights out of those arrays, and XLA
    copies each slice before the matmul reads it. Unstacked, the blocks always run
    unrolled (``scan_blocks`` no longer applies) and read their weights in place, at the
    price of a much longer first compile: for long generation runs (the compiled sampler
    can be kept across runs with ``JAX_COMPILATION_CACHE_DIR``). Outputs are unchanged.
    Call after :func:`cast_matmul_weights` and after placing the parameters on devices;
    the model's state then has ``blocks/0/...`` paths, so save the model it came from, not
    this one.

    Returns:
      ``model`` (modified).
    """
    for name in ("blocks", "mask_blocks"):
        stack = getattr(model, name)
        if stack is None or isinstance(stack, nnx.List):
            continue
        graphdef, state = nnx.split(stack)
        count = jax.tree.leaves(state)[0].shape[0]

        def layer(a, i):  # abstract arrays (nnx.eval_shape) stay abstract
            if isinstance(a, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
            return a[i]

        setattr(model, name, nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a: layer(a, i), state))
                                       for i in range(count)]))
    return model
