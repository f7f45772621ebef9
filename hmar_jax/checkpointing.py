"""Orbax I/O for parameter exports: a params tree plus a JSON model config.

An export directory holds ``params/`` (an Orbax standard checkpoint of the module's
``nnx.Param`` tree as a pure dict) and ``<kind>_config.json``. Writes go to a
temporary sibling directory that is renamed into place only when complete, so a
crash never leaves a directory that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hmar_jax.atomic_io import atomic_directory

PARAMS_DIR = "params"


def _config_path(directory: pathlib.Path, kind: str) -> pathlib.Path:
    return directory / f"{kind}_config.json"


def _string_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; normalise so save and restore trees agree."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def save_params(directory: str | pathlib.Path, params: dict, kind: str, config_json: str,
                extra_metadata: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Writes an export directory atomically.

    Args:
      directory: destination; must not exist unless ``overwrite``.
      params: pure dict of arrays (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
      kind: model kind, e.g. ``"tokenizer"`` or ``"hmar"``; names the config file.
      config_json: the model config serialised as JSON.
      extra_metadata: optional JSON-serialisable provenance (written as metadata.json).
      overwrite: replace an existing directory.

    Returns:
      The absolute export path.
    """
    with atomic_directory(directory, overwrite) as staging:
        host_params = jax.tree.map(np.asarray, _string_keys(params))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, host_params)
        for marker in staging.rglob("commit_success.txt"):
            # Orbax's commit marker records the writer's absolute path; exports are meant to
            # be copied and shipped, so keep the marker but not the path.
            marker.write_text("Checkpoint commit was successful.")
        _config_path(staging, kind).write_text(config_json)
        if extra_metadata is not None:
            (staging / "metadata.json").write_text(json.dumps(extra_metadata, indent=2))
    return pathlib.Path(directory).absolute()


def read_config(directory: str | pathlib.Path, kind: str) -> dict:
    """Reads ``<kind>_config.json`` of an export, with a clear error if it is not one."""
    directory = pathlib.Path(directory)
    path = _config_path(directory, kind)
    if not path.is_file() or not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a {kind} export: expected {path.name} and {PARAMS_DIR}/ inside. "
            f"Create one with `python -m hmar_jax.convert` or a training run.")
    return json.loads(path.read_text())


def restore_into(directory: str | pathlib.Path, build: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module with ``build`` and loads the export's params into it.

    The module is first built abstractly (no allocation), its parameter tree is used
    as the restore target, and a mismatch in structure or shapes raises ValueError
    naming the first differing entry.
    """
    directory = pathlib.Path(directory)
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    target = _string_keys(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(directory.absolute() / PARAMS_DIR)
        stored_tree = getattr(stored, "item_metadata", stored)
        _check_same_layout(target, stored_tree, directory)
        restored = checkpointer.restore(directory.absolute() / PARAMS_DIR, target)
    params_state = nnx.state(abstract, nnx.Param)
    nnx.replace_by_pure_dict(params_state, _int_keys(restored))
    model = nnx.merge(graphdef, state)
    nnx.update(model, params_state)
    return model


def _check_same_layout(target: Any, stored: Any, directory: pathlib.Path) -> None:
    want = {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for key in sorted(want):
        if key not in have:
            raise ValueError(f"{directory}: parameter {key} is missing from the checkpoint; "
                             "the export was made for a different model config.")
        if want[key] != have[key]:
            raise ValueError(f"{directory}: parameter {key} has shape {have[key]} in the checkpoint "
                             f"but the config expects {want[key]}.")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{directory}: unexpected parameter {extra[0]} in the checkpoint "
                         f"({len(extra)} extra); the export was made for a different model config.")



TOKENIZER = "tokenizer"
HMAR = "hmar"


def save_module(directory: str | pathlib.Path, model: nnx.Module, kind: str, *,
                extra_metadata: dict | None = None, overwrite: bool = False) -> pathlib.Path:
    """Exports a module with a dataclass ``config`` (``VQVAE``, ``HMARTransformer``)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config_json = json.dumps(dataclasses.asdict(model.config), indent=2)
    return save_params(directory, params, kind, config_json, extra_metadata=extra_metadata,
                       overwrite=overwrite)


def save_tokenizer(directory: str | pathlib.Path, model, **kwargs) -> pathlib.Path:
    """Exports a ``VQVAE`` (see ``save_params`` for the layout)."""
    return save_module(directory, model, TOKENIZER, **kwargs)


def save_hmar(directory: str | pathlib.Path, model, **kwargs) -> pathlib.Path:
    """Exports an ``HMARTransformer`` (see ``save_params`` for the layout)."""
    return save_module(directory, model, HMAR, **kwargs)


def load_tokenizer(directory: str | pathlib.Path, execution=None):
    """Loads a tokenizer export written by ``save_tokenizer`` or the converter, to run with
    a resolved ``execution`` (default ``execution.REFERENCE``: exact float32, plain jnp).

    Example:
      >>> vae = load_tokenizer("checkpoints/vae_ch160v4096z32")
      >>> indices = vae.encode_to_indices(images)   # images [B, 256, 256, 3] in [-1, 1]
    """
    from hmar_jax.execution import REFERENCE
    from hmar_jax.tokenizer import VQVAE, VQVAEConfig  # local: keeps this module model-agnostic

    cfg = VQVAEConfig.from_dict(read_config(directory, TOKENIZER))
    return restore_into(directory, lambda: VQVAE(cfg, execution or REFERENCE, rngs=nnx.Rngs(0)))


def load_hmar(directory: str | pathlib.Path, execution=None):
    """Loads an ``HMARTransformer`` export, to run with a resolved ``execution`` (default
    ``execution.REFERENCE``).

    Example:
      >>> model = load_hmar("checkpoints/hmar-d16", execution.resolved())
    """
    from hmar_jax.execution import REFERENCE
    from hmar_jax.transformer import HMARConfig, HMARTransformer

    values = read_config(directory, HMAR)
    values["patch_nums"] = tuple(values["patch_nums"])
    cfg = HMARConfig.from_dict(values)
    return restore_into(directory, lambda: HMARTransformer(cfg, execution or REFERENCE,
                                                          rngs=nnx.Rngs(0)))
