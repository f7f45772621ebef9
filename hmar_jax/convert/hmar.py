"""HMAR / VAR transformer state_dicts -> ``hmar_jax.transformer.HMARTransformer`` params.

Two upstream formats:

* **HMAR combined** (``hmar-d{16,20,24,30}.pth``): ``base_blocks.{0..d-n-1}``,
  ``ns_blocks.{0..n-1}``, ``mask_blocks.{0..n-1}``, ``ns_head(_nm)``, ``mask_head(_nm)``,
  ``mask_embed``, ``word_embed_bias``.
* **VAR / NSP** (``var_d*.pth``, HMAR stage-1 training weights): ``blocks.{0..d-1}``,
  ``head(_nm)``, ``word_embed.bias``. VAR files were trained block-causal and load as VAR
  mode; HMAR stage-1 files carry the same keys and load with ``block_diagonal``.

Our tree stacks blocks on a leading layer axis: ``blocks[i]`` is ``base_blocks.i`` for
i < d - n and ``ns_blocks.{i - (d - n)}`` after; ``mask_blocks[j]`` is ``mask_blocks.j``.

| upstream suffix                | ours                     | change            |
|--------------------------------|--------------------------|-------------------|
| Linear ``weight`` [out, in]    | ``kernel`` [in, out]     | transpose         |
| ``attn.scale_mul_1H11`` [1,N,1,1] | ``attn.scale_mul`` [N] | reshape           |
| ``ada_lin.1.*`` (after SiLU)   | ``ada_lin.*``            | transpose         |
| ``pos_start`` [1,1,C], ``pos_1LC`` [1,L,C] | ``pos_start`` [C], ``pos_embed`` [L,C] | reshape |
| ``class_emb.weight``, ``lvl_embed.weight`` | ``.embedding`` | none         |
| ``mask_embed.weight`` [1, C]   | ``mask_embed`` [C]       | reshape           |

Buffers (``lvl_1L``, ``attn_bias_for_masking``, ``*.attn.zero_k_bias``) are checked for
shape and dropped; they are regenerated from ``patch_nums``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from hmar_jax.convert.vqvae import ConversionError, shape_problems, tensor_shape
from hmar_jax.transformer import MODEL_PRESETS, HMARConfig
from hmar_jax.scales import resolve_patch_nums

BLOCK_SUFFIXES = ("attn.scale_mul_1H11", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias",
                  "attn.mat_qkv.weight", "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight",
                  "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias", "ada_lin.1.weight",
                  "ada_lin.1.bias")
BUFFER_SUFFIXES = ("lvl_1L", "attn_bias_for_masking", "attn.zero_k_bias")
FORMATS = ("hmar", "var")


def _block_shapes(c: int, heads: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"attn.scale_mul_1H11": (1, heads, 1, 1), "attn.q_bias": (c,), "attn.v_bias": (c,),
            "attn.zero_k_bias": (c,), "attn.mat_qkv.weight": (3 * c, c),
            "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "ffn.fc1.weight": (hidden, c),
            "ffn.fc1.bias": (hidden,), "ffn.fc2.weight": (c, hidden), "ffn.fc2.bias": (c,),
            "ada_lin.1.weight": (6 * c, c), "ada_lin.1.bias": (6 * c,)}


def _indices(state_dict: dict, prefix: str) -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def detect_format(state_dict: dict[str, np.ndarray]) -> str:
    """``hmar`` (combined), ``var`` (VAR/NSP) or a ConversionError for anything else."""
    if "base_blocks.0.attn.mat_qkv.weight" in state_dict or "ns_head.weight" in state_dict:
        return "hmar"
    if "blocks.0.attn.mat_qkv.weight" in state_dict and "mask_embed.weight" not in state_dict:
        return "var"
    if "blocks.0.attn.mat_qkv.weight" in state_dict:
        raise ConversionError(
            "This is a stage-2 MaskedPrediction checkpoint (blocks.* plus mask_embed); combine it "
            "with its stage-1 weights into the HMAR format first, or train stage 2 with hmar_jax.")
    if "encoder.conv_in.weight" in state_dict:
        raise ConversionError("This is a VQ-VAE checkpoint; convert it with "
                              "`python -m hmar_jax.convert vqvae`.")
    sample = ", ".join(sorted(state_dict)[:5]) or "(none)"
    raise ConversionError(f"Not an HMAR or VAR transformer state_dict (first keys: {sample}). "
                          "If this is a training checkpoint, select the nested state_dict with "
                          "--subtree trainer/transformer_wo_ddp.")


def infer_config(state_dict: dict[str, np.ndarray], fmt: str, patch_nums, *,
                 expected_depth: int | None = None, depth_source: str = "--depth",
                 attention_pattern: str | None = None) -> HMARConfig:
    """Reads depth, n, width, heads, vocab and classes from the keys and shapes (only the
    shapes: the values are read after the whole layout was checked against the result)."""
    if fmt == "hmar":
        base, ns, mask = (_indices(state_dict, p) for p in ("base_blocks", "ns_blocks", "mask_blocks"))
        if len(ns) != len(mask):
            raise ConversionError(f"The file has {len(ns)} ns_blocks but {len(mask)} mask_blocks; "
                                  "both tails must have n blocks. The file is truncated or not an "
                                  "HMAR combined checkpoint.")
        depth, num_mask_layers = len(base) + len(ns), len(mask)
        first_block, head = f"base_blocks.{base[0] if base else 0}", "ns_head"
        if not base:
            first_block = "ns_blocks.0"
    else:
        depth, num_mask_layers = len(_indices(state_dict, "blocks")), 0
        first_block, head = "blocks.0", "head"
    if expected_depth is not None and expected_depth != depth:
        detail = (f"{len(base)} base + {len(ns)} ns blocks" if fmt == "hmar" else f"{depth} blocks")
        raise ConversionError(f"{depth_source} says depth {expected_depth}, but the file holds a "
                              f"depth-{depth} model ({detail}). Use the matching file or --depth.")
    model = fmt.upper()
    classes, width = tensor_shape(state_dict, "class_emb.weight", 2, model)
    heads = tensor_shape(state_dict, f"{first_block}.attn.scale_mul_1H11", 4, model)[1]
    hidden = tensor_shape(state_dict, f"{first_block}.ffn.fc1.weight", 2, model)[0]
    vocab = tensor_shape(state_dict, f"{head}.weight", 2, model)[0]
    latent = tensor_shape(state_dict, "word_embed.weight", 2, model)[1]
    length = tensor_shape(state_dict, "pos_1LC", 3, model)[1]
    patch_nums = resolve_patch_nums(patch_nums)
    if length != sum(p * p for p in patch_nums):
        raise ConversionError(f"pos_1LC has {length} tokens but patch_nums {patch_nums} give "
                              f"{sum(p * p for p in patch_nums)}; pass the matching --patch-nums.")
    if fmt == "var":
        pattern = attention_pattern or "block_causal"
    else:
        pattern = attention_pattern or "block_diagonal"
    gamma = MODEL_PRESETS.get(f"d{depth}", {}).get("init_adaln_gamma", 1e-5)
    return HMARConfig(depth=depth, width=int(width), num_heads=int(heads),
                      mlp_ratio=hidden / width, num_classes=int(classes) - 1, vocab_size=int(vocab),
                      latent_channels=int(latent), patch_nums=patch_nums,
                      num_mask_layers=num_mask_layers, attention_pattern=pattern,
                      init_adaln_gamma=gamma)


def expected_shapes(cfg: HMARConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Every key (parameters and buffers) of the upstream format for ``cfg``, with shapes."""
    c, length, v = cfg.width, cfg.layout.seq_len, cfg.vocab_size
    block = _block_shapes(c, cfg.num_heads, round(c * cfg.mlp_ratio))
    shapes = {"pos_start": (1, 1, c), "pos_1LC": (1, length, c), "lvl_1L": (1, length),
              "attn_bias_for_masking": (1, 1, length, length),
              "class_emb.weight": (cfg.num_classes + 1, c),
              "lvl_embed.weight": (cfg.layout.num_scales, c), "word_embed.weight": (c, cfg.latent_channels)}
    if fmt == "hmar":
        prefixes = ([f"base_blocks.{i}" for i in range(cfg.num_base_layers)]
                    + [f"ns_blocks.{j}" for j in range(cfg.num_mask_layers)]
                    + [f"mask_blocks.{j}" for j in range(cfg.num_mask_layers)])
        heads = ("ns_head", "mask_head")
        shapes |= {"word_embed_bias": (c,), "mask_embed.weight": (1, c)}
    else:
        prefixes, heads = [f"blocks.{i}" for i in range(cfg.depth)], ("head",)
        shapes["word_embed.bias"] = (c,)
    for prefix in prefixes:
        shapes |= {f"{prefix}.{s}": shape for s, shape in block.items()}
    for head in heads:
        shapes |= {f"{head}_nm.ada_lin.1.weight": (2 * c, c), f"{head}_nm.ada_lin.1.bias": (2 * c,),
                   f"{head}.weight": (v, c), f"{head}.bias": (v,)}
    return shapes


def _validate(state_dict: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], fmt: str):
    problems = shape_problems(state_dict, expected, order=_natural)
    problems += [f"unexpected key '{k}'" for k in sorted(set(state_dict) - set(expected), key=_natural)]
    if problems:
        raise ConversionError(f"{fmt.upper()} state_dict does not match the expected layout "
                              f"({len(problems)} problem(s)); first: {problems[0]}. The file may be "
                              "truncated or from a different model.")


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _block_params(state_dict: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    get = lambda suffix: np.asarray(state_dict[f"{prefix}.{suffix}"], np.float32)  # noqa: E731
    return {
        "attn": {"mat_qkv": {"kernel": get("attn.mat_qkv.weight").T},
                 "q_bias": get("attn.q_bias"), "v_bias": get("attn.v_bias"),
                 "scale_mul": get("attn.scale_mul_1H11").reshape(-1),
                 "proj": {"kernel": get("attn.proj.weight").T, "bias": get("attn.proj.bias")}},
        "ffn": {"fc1": {"kernel": get("ffn.fc1.weight").T, "bias": get("ffn.fc1.bias")},
                "fc2": {"kernel": get("ffn.fc2.weight").T, "bias": get("ffn.fc2.bias")}},
        "ada_lin": {"kernel": get("ada_lin.1.weight").T, "bias": get("ada_lin.1.bias")},
    }


def _stack(blocks: list[dict]) -> dict:
    if isinstance(blocks[0], dict):
        return {key: _stack([b[key] for b in blocks]) for key in blocks[0]}
    return np.stack(blocks)


def _head_params(state_dict: dict[str, np.ndarray], name: str) -> tuple[dict, dict]:
    get = lambda key: np.asarray(state_dict[key], np.float32)  # noqa: E731
    norm = {"ada_lin": {"kernel": get(f"{name}_nm.ada_lin.1.weight").T,
                        "bias": get(f"{name}_nm.ada_lin.1.bias")}}
    return norm, {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}


def convert_state_dict(state_dict: dict[str, np.ndarray], cfg: HMARConfig, fmt: str) -> dict:
    """Validates ``state_dict`` against ``cfg`` and returns our params pure dict."""
    _validate(state_dict, expected_shapes(cfg, fmt), fmt)
    get = lambda key: np.asarray(state_dict[key], np.float32)  # noqa: E731
    c = cfg.width
    params: dict[str, Any] = {
        "class_emb": {"embedding": get("class_emb.weight")},
        "lvl_embed": {"embedding": get("lvl_embed.weight")},
        "pos_start": get("pos_start").reshape(c),
        "pos_embed": get("pos_1LC").reshape(-1, c),
        "word_embed": {"kernel": get("word_embed.weight").T},
    }
    if fmt == "hmar":
        names = ([f"base_blocks.{i}" for i in range(cfg.num_base_layers)]
                 + [f"ns_blocks.{j}" for j in range(cfg.num_mask_layers)])
        params["word_embed_bias"] = get("word_embed_bias")
        params["head_nm"], params["head"] = _head_params(state_dict, "ns_head")
        params["mask_head_nm"], params["mask_head"] = _head_params(state_dict, "mask_head")
        params["mask_blocks"] = _stack([_block_params(state_dict, f"mask_blocks.{j}")
                                        for j in range(cfg.num_mask_layers)])
        params["mask_embed"] = get("mask_embed.weight").reshape(c)
    else:
        names = [f"blocks.{i}" for i in range(cfg.depth)]
        params["word_embed_bias"] = get("word_embed.bias")
        params["head_nm"], params["head"] = _head_params(state_dict, "head")
    params["blocks"] = _stack([_block_params(state_dict, name) for name in names])
    return params
