"""The transformer's architecture: ``HMARConfig`` and the named model sizes.

The config says what the network is (sizes, scales, attention pattern, init); how it runs
(kernels, dtypes, remat, scan) is ``hmar_jax.execution.ExecutionConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hmar_jax.frozen_config import config_from_dict
from hmar_jax.scales import ScaleLayout, resolve_patch_nums

# Execution settings that earlier exports stored with the architecture; read and ignored.
LEGACY_EXECUTION_FIELDS = ("attention_backend", "attention_prologue_backend", "gelu_backend",
                           "norm_backend", "dtype", "head_dtype", "scan_blocks", "remat")


@dataclasses.dataclass(frozen=True)
class HMARConfig:
    """Frozen hyper-parameters of the transformer.

    Attributes:
      depth: number of blocks d.
      width: C; defaults to 64 d (upstream ties width to depth).
      num_heads: N; defaults to d (head dim 64).
      mlp_ratio: MLP hidden width / C.
      num_classes: class labels 0..num_classes-1; label ``num_classes`` is the null
        (unconditional) class.
      vocab_size: V, tokenizer codebook size.
      latent_channels: Cv, tokenizer latent channels.
      patch_nums: scale sides, coarse to fine.
      num_mask_layers: n, blocks of the masked-refinement tail (0: next-scale only).
      attention_pattern: ``block_diagonal`` (HMAR) or ``block_causal`` (VAR).
      drop_path_rate: maximum stochastic-depth rate (linear over blocks); defaults to
        ``0.1 d / 24``.
      norm_eps: LayerNorm epsilon.
      init_adaln, init_adaln_gamma, init_head: upstream init multipliers.
    """

    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    vocab_size: int = 4096
    latent_channels: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_mask_layers: int = 8
    attention_pattern: str = "block_diagonal"
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("patch_nums", resolve_patch_nums(self.patch_nums))
        if self.width is None:
            set_("width", 64 * self.depth)
        if self.num_heads is None:
            set_("num_heads", self.depth)
        if self.drop_path_rate is None:
            set_("drop_path_rate", 0.1 * self.depth / 24)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        if not 0 <= self.num_mask_layers <= self.depth:
            raise ValueError(f"num_mask_layers must be in [0, depth={self.depth}], "
                             f"got {self.num_mask_layers}.")
        if self.attention_pattern not in ("block_diagonal", "block_causal"):
            raise ValueError(f"Unknown attention_pattern {self.attention_pattern!r}; use "
                             "'block_diagonal' (HMAR) or 'block_causal' (VAR).")

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_base_layers(self) -> int:
        return self.depth - self.num_mask_layers

    @property
    def init_std(self) -> float:
        return math.sqrt(1.0 / self.width / 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # A training-time regulariser: it changes neither the parameters nor the function.
    TRAINING_FIELDS = ("drop_path_rate",)

    def architecture(self, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields that define the parameters and the function."""
        return {k: v for k, v in self.to_dict().items()
                if k not in self.TRAINING_FIELDS and k not in ignore}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HMARConfig":
        """From a stored config; execution settings that exports used to carry are dropped."""
        return config_from_dict(cls, {k: v for k, v in values.items()
                                      if k not in LEGACY_EXECUTION_FIELDS})

    def replace(self, **changes) -> "HMARConfig":
        return dataclasses.replace(self, **changes)


# Upstream sizes (width 64 d, heads d) and the gamma init per depth from the HMAR configs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "d16": dict(depth=16, init_adaln_gamma=1e-3),
    "d20": dict(depth=20, init_adaln_gamma=1e-3),
    "d24": dict(depth=24, init_adaln_gamma=1e-4),
    "d30": dict(depth=30, init_adaln_gamma=1e-5),
    # CPU-sized variant for tests and notebooks.
    "tiny": dict(depth=2, width=64, num_heads=2, num_classes=10, vocab_size=64,
                 latent_channels=8, patch_nums=(1, 2, 3, 4), num_mask_layers=1),
}


def preset(name: str, **overrides) -> HMARConfig:
    """``HMARConfig`` of a named size (``d16``/``d20``/``d24``/``d30``/``tiny``)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available: {sorted(MODEL_PRESETS)}.")
    return HMARConfig(**(MODEL_PRESETS[name] | overrides))
