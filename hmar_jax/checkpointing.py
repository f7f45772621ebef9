"""Orbax I/O for parameter exports (a params tree plus a JSON model config), and reading
parts of training checkpoints.

An export directory holds ``params/`` (an Orbax standard checkpoint of the module's
``nnx.Param`` tree as a pure dict) and ``<kind>_config.json``. Writes go to a
temporary sibling directory that is renamed into place only when complete, so a
crash never leaves a directory that looks finished.

A training run's checkpoints (an Orbax ``CheckpointManager`` directory of numbered steps)
are read by :func:`newest_usable_entries`: only the entries asked for (e.g. the EMA
weights), so exporting needs neither the optimizer nor the code that built it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
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

    With several processes only the caller writes (the others must not write the same
    directory); the parameters must be host arrays, gathered beforehand.
    """
    with atomic_directory(directory, overwrite) as staging:
        host_params = jax.tree.map(np.asarray, _string_keys(params))
        alone = _this_process_only()
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, host_params)
        for marker in staging.rglob("commit_success.txt"):
            # Orbax's commit marker records the writer's absolute path; exports are meant to
            # be copied and shipped, so keep the marker but not the path.
            marker.write_text("Checkpoint commit was successful.")
        _config_path(staging, kind).write_text(config_json)
        if extra_metadata is not None:
            (staging / "metadata.json").write_text(json.dumps(extra_metadata, indent=2))
    return pathlib.Path(directory).absolute()


def training_checkpoints(directory: str | pathlib.Path, *, max_to_keep: int,
                         every_steps: int) -> ocp.CheckpointManager:
    """A training run's checkpoint manager: it keeps the newest ``max_to_keep`` and saves
    every ``every_steps`` steps and when the cluster announces a preemption. Orbax's default
    policy would also save the first step of a fresh run, a full write of the state that no
    resume needs (the trainers also save at a stop and at the end, explicitly)."""
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_decision_policy=policy))


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax options for I/O that this process does alone: an export holds host arrays
    that one process writes (process 0 of a multi-process run, which gathered them), and
    Orbax would otherwise wait at barriers for processes that never come."""
    index = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=index, active_processes={index})


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
    naming the first differing entry. Each process reads the export alone (an export is a
    file to load, like a tokenizer's, not a collective step of a multi-process run).
    """
    directory = pathlib.Path(directory)
    abstract = nnx.eval_shape(build)
    target = _param_shapes(abstract)
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as checkpointer:
        stored = checkpointer.metadata(directory.absolute() / PARAMS_DIR)
        stored_tree = getattr(stored, "item_metadata", stored)
        _check_same_layout(target, stored_tree, directory)
        restored = checkpointer.restore(directory.absolute() / PARAMS_DIR, target)
    return _filled(abstract, restored)


def module_from_params(build: Callable[[], nnx.Module], params: dict,
                       where: str | pathlib.Path) -> nnx.Module:
    """Builds a module with ``build`` (abstractly: nothing allocated twice) holding ``params``
    (a pure dict of arrays, as ``nnx.to_pure_dict`` gives); a mismatch in structure or
    shapes raises ValueError naming ``where`` and the first differing entry."""
    abstract = nnx.eval_shape(build)
    _check_same_layout(_param_shapes(abstract), _string_keys(params), pathlib.Path(where))
    return _filled(abstract, params)


def _param_shapes(abstract: nnx.Module) -> dict:
    target = _string_keys(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)


def _filled(abstract: nnx.Module, params: dict) -> nnx.Module:
    graphdef, state = nnx.split(abstract)
    params_state = nnx.state(abstract, nnx.Param)
    nnx.replace_by_pure_dict(params_state, _int_keys(params))
    model = nnx.merge(graphdef, state)
    nnx.update(model, params_state)
    return model


def _unwrap_variables(tree: Any) -> Any:
    """``{"value": leaf}`` (how an ``nnx.State`` leaf is stored) -> ``leaf``, throughout."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _unwrap_variables(v) for k, v in tree.items()}
    return tree


def read_entries(directory: str | pathlib.Path, names: Sequence[str]) -> dict[str, Any]:
    """The named top-level entries of an Orbax PyTree checkpoint (e.g. ``ema`` of a training
    state), read onto the host as numpy arrays, as pure dicts (``nnx.State`` leaves
    unwrapped). The other entries (an optimizer's moments) are not read.

    Raises:
      ValueError: an entry is not in the checkpoint (naming the entries it has).
    """
    directory = pathlib.Path(directory).absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(directory)
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        missing = [name for name in names if name not in tree]
        if missing:
            raise ValueError(f"{directory} has no entry {missing[0]!r} (it has "
                             f"{sorted(tree)}); it was not written by this trainer.")
        wanted = {name: tree[name] for name in names}
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    return {name: _unwrap_variables(dict(restored[name])) for name in names}


def newest_usable(steps: Sequence[int], read: Callable[[int], Any],
                  is_finite: Callable[[Any], bool], where: Callable[[int], Any]
                  ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """The newest step whose checkpoint ``read(step)`` can read and ``is_finite``; newer
    unusable steps are skipped with a warning naming ``where(step)``. The one rule by which
    resuming a run and exporting from it choose a checkpoint.

    Returns:
      ``(step, read(step), unusable)`` with ``unusable`` the skipped ``(step, reason)``
      pairs, newest first; ``step`` is None (and the value too) when no step is usable.
    """
    unusable = []
    for step in sorted(steps, reverse=True):
        try:
            value = read(step)
        except Exception as err:  # noqa: BLE001 - any read failure makes the step unusable
            reason = f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            if is_finite(value):
                return step, value, unusable
            reason = "holds non-finite values"
        logging.warning("Checkpoint %s %s; trying the previous one.", where(step), reason)
        unusable.append((step, reason))
    return None, None, unusable


def newest_usable_entries(directory: str | pathlib.Path, item: str, names: Sequence[str]
                          ) -> tuple[int, dict[str, Any]] | None:
    """``(step, entries)`` from the newest step of a ``CheckpointManager`` directory whose
    ``item`` can be read and holds finite values (:func:`read_entries`, :func:`newest_usable`).
    None if there is no step.

    Raises:
      ValueError: there are steps but none is usable (naming the newest and why).
    """
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step, entries, unusable = newest_usable(
        manager.all_steps(), lambda step: read_entries(directory / str(step) / item, names),
        lambda entries: all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(entries)),
        lambda step: directory / str(step))
    if step is not None:
        return step, entries
    if unusable:
        raise ValueError(f"No checkpoint in {directory} can be read (newest: step "
                         f"{unusable[0][0]} {unusable[0][1]}).")
    return None


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
    ``pretrained.load_pretrained`` resolves the platform's fast path and passes it here.

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
    ``execution.REFERENCE``). The weights stay as stored (float32, stacked per layer): the
    inference transforms are ``pretrained.load_pretrained``'s.

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
