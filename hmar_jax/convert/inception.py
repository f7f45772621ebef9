"""FID Inception ``.pth`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) -> Orbax.

``python -m hmar_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --out DIR``

The NNX tree of :class:`hmar_jax.evaluate.inception.InceptionV3` mirrors the PyTorch
module tree, so each key converts by splitting on dots and renaming the leaf:

| PyTorch leaf                      | NNX leaf  | layout change            |
|-----------------------------------|-----------|--------------------------|
| conv ``weight`` [O, I, kh, kw]    | ``kernel``| -> [kh, kw, I, O]        |
| bn ``weight`` / ``bias`` [C]      | ``scale`` / ``bias`` | none          |
| bn ``running_mean`` / ``running_var`` [C] | ``mean`` / ``var`` | none    |
| ``fc.weight`` [1008, 2048]        | ``fc.kernel`` | -> [2048, 1008]      |
| ``fc.bias`` [1008]                | ``fc.bias``   | none                 |

``*.bn.num_batches_tracked`` buffers may be present or not (files saved from a plain
dict, e.g. torch-fidelity's copy of the same weights, lack them); they are checked for
shape and dropped. Any other missing, unexpected or misshapen key stops the conversion
with one message. Nothing is ever downloaded: the weights file is the user's to supply.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from flax import nnx

from hmar_jax.convert.vqvae import ConversionError, nested_params, shape_problems
from hmar_jax.evaluate import inception

_LEAF_TO_TORCH = {"scale": "weight", "mean": "running_mean", "var": "running_var",
                  "kernel": "weight", "bias": "bias"}
_OPTIONAL_BUFFER = "num_batches_tracked"


def missing_weights_message(path: str | pathlib.Path) -> str:
    """Where the weights come from, for a path that does not exist."""
    return (f"Inception weights not found at {path}. Download {inception.WEIGHTS_FILE} from "
            f"the pytorch-fid GitHub release ({inception.WEIGHTS_URL}) and pass its path with "
            "--src; nothing is downloaded automatically.")


def _torch_key(path: tuple[Any, ...]) -> str:
    return ".".join([*map(str, path[:-1]), _LEAF_TO_TORCH[path[-1]]])


def _torch_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":  # fc: [in, out] -> [out, in]
        return (shape[1], shape[0])
    return tuple(shape)


def expected_layout() -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """``{torch key: (nnx path, torch-layout shape)}`` for every parameter."""
    abstract = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    return {_torch_key(path): (path, _torch_shape(path, tuple(var.shape)))
            for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _describe_foreign(state_dict: dict[str, np.ndarray]) -> str | None:
    """A specific hint when the file is a well-known different Inception."""
    fc = state_dict.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in state_dict) or (
            fc is not None and tuple(fc.shape) == (1000, 2048)):
        return ("This looks like torchvision's ImageNet Inception-v3 (1000 classes, auxiliary "
                "head), not the FID Inception ported from the 2015-12-05 TensorFlow graph; "
                f"FID needs {inception.WEIGHTS_FILE} ({inception.WEIGHTS_URL}).")
    if "Conv2d_1a_3x3.conv.weight" not in state_dict:
        sample = ", ".join(sorted(state_dict)[:5]) or "(none)"
        return (f"Not an Inception-v3 state_dict: key 'Conv2d_1a_3x3.conv.weight' is missing "
                f"(first keys: {sample}). Expected {inception.WEIGHTS_FILE} "
                f"({inception.WEIGHTS_URL}).")
    return None


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """Validates the state_dict and returns the NNX params as a pure dict.

    Raises:
      ConversionError: naming the first missing, unexpected or misshapen key.
    """
    if (hint := _describe_foreign(state_dict)) is not None:
        raise ConversionError(hint)
    layout = expected_layout()
    problems = shape_problems(state_dict, {k: shape for k, (_, shape) in layout.items()})
    for key in sorted(set(state_dict) - set(layout)):
        prefix, _, leaf = key.rpartition(".")
        if leaf == _OPTIONAL_BUFFER and f"{prefix}.running_mean" in layout:
            if np.shape(state_dict[key]) not in ((), (1,)):
                problems.append(f"key '{key}' has shape {np.shape(state_dict[key])}, expected ()")
        else:
            problems.append(f"unexpected key '{key}'")
    if problems:
        raise ConversionError(
            f"Inception state_dict does not match the FID Inception layout ({len(problems)} "
            f"problem(s)); first: {problems[0]}. Expected pytorch-fid's "
            f"{inception.WEIGHTS_FILE}; the file may be truncated or a different network.")
    # conv OIHW -> HWIO; fc [out, in] -> [in, out]
    return nested_params(state_dict, layout,
                         lambda w: w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T)


def convert(src: str | pathlib.Path, out: str | pathlib.Path, *, overwrite: bool = False,
            extra_metadata: dict | None = None) -> pathlib.Path:
    """Reads the ``.pth`` (torch-free), validates it and writes an ``inception`` export.

    Raises:
      FileNotFoundError: ``src`` does not exist (the message says where to get it).
      ConversionError, CheckpointFormatError: the file is not the FID Inception.
      FileExistsError: ``out`` exists and not ``overwrite``.
    """
    from hmar_jax import checkpointing
    from hmar_jax.convert import torch_pickle

    src = pathlib.Path(src)
    if not src.is_file():
        raise FileNotFoundError(missing_weights_message(src))
    with torch_pickle.open_state_dict(src) as state_dict:
        params = convert_state_dict(state_dict)
    return checkpointing.save_params(out, params, inception.KIND, inception.config_json(),
                                     extra_metadata=extra_metadata, overwrite=overwrite)
