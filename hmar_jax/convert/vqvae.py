"""VAR VQ-VAE state_dict (``vae_ch160v4096z32.pth``) -> ``hmar_jax.tokenizer.model.VQVAE`` params.

The NNX module tree mirrors the PyTorch module tree, so a key converts by
splitting on dots and renaming the leaf:

| PyTorch leaf                        | NNX leaf    | layout change            |
|-------------------------------------|-------------|--------------------------|
| conv ``weight`` [O, I, kh, kw]      | ``kernel``  | -> [kh, kw, I, O]        |
| GroupNorm ``weight`` [C]            | ``scale``   | none                     |
| ``quantize.embedding.weight`` [V,Cv]| ``embedding`` | none                   |
| any ``bias``                        | ``bias``    | none                     |

The config is inferred from the shapes (width, multipliers, blocks, vocab, phi count);
``patch_nums``, ``norm_groups`` and ``quant_resi`` are not stored upstream and come
from arguments. Every key and shape is then checked against the layout the inferred
config expects before anything is written.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flax import nnx

from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig

# Buffers upstream saves; checked for presence/shape only and regenerated, never loaded.
BUFFERS = ("quantize.ema_vocab_hit_SV",)
_TRANSFORMER_MARKERS = ("class_emb.weight", "pos_1LC", "blocks.0.attn.mat_qkv.weight",
                        "base_blocks.0.attn.mat_qkv.weight")


class ConversionError(ValueError):
    """A state_dict does not match the layout the converter expects."""


def tensor_shape(state_dict: dict[str, Any], key: str, ndim: int, model: str) -> tuple[int, ...]:
    """The shape of ``state_dict[key]``, which a converter reads the architecture from:
    refused unless present with ``ndim`` nonzero sizes, so that a damaged file stops with
    a message instead of an inferred config of zero widths."""
    if key not in state_dict:
        raise ConversionError(f"missing key '{key}'; the file is truncated or not a {model} "
                              "checkpoint.")
    shape = tuple(int(n) for n in state_dict[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise ConversionError(f"key '{key}' has shape {shape}, not {ndim} nonzero sizes; the file "
                              f"is corrupt or not a {model} checkpoint.")
    return shape


def shape_problems(state_dict: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]],
                   order=None) -> list[str]:
    """``missing key`` / ``has shape`` messages for the expected keys (sorted by ``order``);
    unexpected keys are each converter's own business."""
    problems = []
    for key in sorted(expected, key=order):
        if key not in state_dict:
            problems.append(f"missing key '{key}'")
        elif tuple(state_dict[key].shape) != expected[key]:
            problems.append(f"key '{key}' has shape {tuple(state_dict[key].shape)}, "
                            f"expected {expected[key]}")
    return problems


def nested_params(state_dict: dict[str, np.ndarray], layout: dict[str, tuple[tuple[Any, ...], Any]],
                  kernel_layout) -> dict:
    """The NNX params pure dict: every ``layout`` key's tensor as float32 at its nnx path,
    ``kernel`` leaves passed through ``kernel_layout`` (torch -> flax axis order)."""
    params: dict = {}
    for key, (path, _) in layout.items():
        value = np.asarray(state_dict[key], dtype=np.float32)
        if path[-1] == "kernel":
            value = kernel_layout(value)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return params


def _nnx_path(key: str, ndim: int) -> tuple[Any, ...]:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    leaf = parts[-1]
    if key == "quantize.embedding.weight":
        parts[-1] = "embedding"
    elif leaf == "weight":
        parts[-1] = "kernel" if ndim == 4 else "scale"
    return tuple(parts)


def _torch_key(path: tuple[Any, ...]) -> str:
    names = [str(p) for p in path]
    if names[-1] in ("kernel", "scale", "embedding"):
        names[-1] = "weight"
    return ".".join(names)


def _torch_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def infer_config(state_dict: dict[str, np.ndarray], patch_nums, norm_groups: int = 32,
                 quant_resi: float = 0.5) -> VQVAEConfig:
    """Reads the architecture of a VAR VQ-VAE from its state_dict shapes (only the shapes:
    the values are read after the whole layout was checked against the result)."""
    _reject_foreign(state_dict)
    ch, in_channels = tensor_shape(state_dict, "encoder.conv_in.weight", 4, "VQ-VAE")[:2]
    levels = sorted({int(m.group(1)) for k in state_dict
                     if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ConversionError("No 'encoder.down.<i>.' keys found: this state_dict has no encoder levels.")
    ch_mult = tuple(tensor_shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight", 4, "VQ-VAE")[0]
                    // ch for i in levels)
    if 0 in ch_mult:
        raise ConversionError(f"encoder level widths {ch_mult} (times {ch}) include 0; the file is "
                              "corrupt or not a VAR VQ-VAE checkpoint.")
    num_res_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("encoder.down.0.block.")})
    num_phi = len({k.split(".")[3] for k in state_dict if k.startswith("quantize.quant_resi.qresi_ls.")})
    if num_phi < 2:
        raise ConversionError(
            "Only the partially shared phi layout ('quantize.quant_resi.qresi_ls.<j>', "
            f"share_quant_resi >= 2) is supported; found {num_phi} such convs.")
    vocab, z_channels = tensor_shape(state_dict, "quantize.embedding.weight", 2, "VQ-VAE")
    return VQVAEConfig(
        vocab_size=int(vocab), z_channels=int(z_channels), ch=int(ch), ch_mult=ch_mult,
        num_res_blocks=num_res_blocks, in_channels=int(in_channels),
        using_sa=f"encoder.down.{levels[-1]}.attn.0.norm.weight" in state_dict,
        using_mid_sa="encoder.mid.attn_1.norm.weight" in state_dict,
        norm_groups=norm_groups, quant_resi=quant_resi, share_quant_resi=num_phi,
        patch_nums=patch_nums)


def _reject_foreign(state_dict: dict[str, np.ndarray]) -> None:
    found = [m for m in _TRANSFORMER_MARKERS if m in state_dict]
    if found:
        raise ConversionError(
            f"This is a VAR/HMAR transformer checkpoint (it has '{found[0]}'), not a VQ-VAE; "
            "convert it with `python -m hmar_jax.convert hmar` or `... var`.")
    for key in ("encoder.conv_in.weight", "quantize.embedding.weight"):
        if key not in state_dict:
            sample = ", ".join(sorted(state_dict)[:5]) or "(none)"
            raise ConversionError(
                f"Not a VAR VQ-VAE state_dict: key '{key}' is missing (first keys: {sample}). "
                "If this is a training checkpoint, select the nested state_dict with --subtree.")


def expected_layout(cfg: VQVAEConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """``{torch key: (nnx path, torch-layout shape)}`` for every parameter of ``cfg``."""
    abstract = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
    layout = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        layout[_torch_key(path)] = (path, _torch_shape(path, tuple(var.shape)))
    return layout


def convert_state_dict(state_dict: dict[str, np.ndarray], cfg: VQVAEConfig) -> dict:
    """Validates a VQ-VAE state_dict against ``cfg`` and returns the NNX params pure dict.

    Raises:
      ConversionError: naming the first missing key, unexpected key or wrong shape.
    """
    layout = expected_layout(cfg)
    problems = shape_problems(state_dict, {k: shape for k, (_, shape) in layout.items()})
    extra = sorted(set(state_dict) - set(layout) - set(BUFFERS))
    problems += [f"unexpected key '{k}'" for k in extra]
    if problems:
        raise ConversionError(
            f"VQ-VAE state_dict does not match the expected layout ({len(problems)} problem(s)); "
            f"first: {problems[0]}. The file may be truncated, from a different model, or "
            "need other --patch-nums/--norm-groups.")
    return nested_params(state_dict, layout, lambda w: w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
