"""Every speed and memory choice in one place, resolved once for the platform at hand.

The architecture (``transformer.HMARConfig``, ``tokenizer.VQVAEConfig``) says what the
network computes; ``ExecutionConfig`` says how it runs: which implementation each op uses,
the compute dtypes, the tokenizer's precision, rematerialisation, scanned or unrolled
blocks, microbatching, the optimizer moment dtype, and the inference transforms. A user
leaves it at its defaults (``"auto"``) or overrides single fields
(``--config.execution.remat=block``); the boundary (the trainer, ``pretrained.load_pretrained``,
the benchmarks) calls ``resolve(platform)`` once and hands the resolved config down. Layers
only read resolved values: nothing below the boundary sees ``"auto"`` or asks which
platform it runs on.

``"auto"`` resolves to the fastest measured setting that fits, per platform:

| field | GPU | TPU | CPU |
|---|---|---|---|
| attention | ``gpu`` (Pallas kernel) | ``tpu`` (JAX's splash attention) | ``xla`` |
| layer_norm, gelu, group_norm | ``gpu`` | ``xla`` | ``xla`` |
| compute_dtype | bfloat16 | bfloat16 | float32 |
| head_dtype | the compute dtype | the compute dtype | the compute dtype |
| tokenizer_precision | ``default`` | ``default`` | ``default`` |
| remat | ``dots_attention_saveable`` | ``dots_attention_saveable`` | ``none`` |
| scan_blocks, training | False (unrolled) | True | True |
| scan_blocks, inference | True | True | True |

Kernel fields take ``"auto"``, ``"xla"`` (the op's plain-jnp reference), ``"pallas"`` (the
platform's kernel: compiled on GPU and TPU, interpret mode on CPU) or ``"interpret"`` (the GPU
kernels in Pallas interpret mode on any platform: tests), and resolve to an
``hmar_jax.pallas.dispatch.Implementation``. The attention and layer_norm also take
``"mosaic_gpu"`` (their kernels on Pallas's Mosaic GPU backend, Hopper GPUs only; the ``"gpu"``
choice is the Triton-lowered kernels) and ``"mosaic_interpret"`` (those kernels in Mosaic GPU's
interpreter, on any platform: tests). ``"auto"`` keeps the Triton-lowered kernels on Hopper as
well, where they are the faster ones. The setting for a jax whose Pallas no longer lowers to
Triton is ``attention=mosaic_gpu,layer_norm=mosaic_gpu`` with ``gelu=xla`` and
``group_norm=xla`` (XLA's fusion of the bias + GELU beats a Mosaic GPU kernel for it): it runs
no Triton kernel. On TPU the attention's kernel is JAX's splash attention
(``hmar_jax.pallas.splash``): the kernel JAX maintains and runs on TPU pods, which takes both
scale masks and skips their empty tiles forward and backward; the other ops have no TPU kernel
and run as XLA fuses their references.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

PLATFORMS = ("cpu", "gpu", "tpu")
KERNEL_CHOICES = ("auto", "xla", "pallas", "interpret")
KERNEL_FIELDS = ("attention", "layer_norm", "gelu", "group_norm")
# Kernels on Pallas's Mosaic GPU backend (Hopper), compiled or interpreted, and the fields
# that have them.
MOSAIC_CHOICES = ("mosaic_gpu", "mosaic_interpret")
MOSAIC_FIELDS = ("attention", "layer_norm")
DTYPES = ("float32", "bfloat16")
TOKENIZER_PRECISIONS = ("highest", "default", "bfloat16")
# What each rematerialisation policy keeps for the backward (``transformer.stack``):
REMAT_POLICIES = (
    "none",                     # everything: fastest where the activations fit
    "activations_saveable",     # matmul, attention, norm and GELU outputs: no op reruns
    "dots_attention_saveable",  # matmul and attention outputs: norms and GELU rerun
    "projections_saveable",     # attention and branch outputs: qkv and fc1 matmuls rerun
    "block",                    # nothing: the whole block reruns; least memory
)
# Ops with a TPU kernel: the others take their reference there.
_TPU_KERNELS = ("attention",)
_AUTO = {
    "gpu": dict(attention="gpu", layer_norm="gpu", gelu="gpu", group_norm="gpu",
                compute_dtype="bfloat16", remat="dots_attention_saveable", scan_blocks=False),
    "tpu": dict(attention="tpu", layer_norm="xla", gelu="xla", group_norm="xla",
                compute_dtype="bfloat16", remat="dots_attention_saveable", scan_blocks=True),
    "cpu": dict(attention="xla", layer_norm="xla", gelu="xla", group_norm="xla",
                compute_dtype="float32", remat="none", scan_blocks=True),
}


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the model, the tokenizer and the training step run (module docstring).

    Attributes:
      attention: the block-sparse attention (``hmar_jax.pallas.ops``).
      layer_norm: the blocks' LayerNorm + AdaLN modulation (+ residual add)
        (``hmar_jax.pallas.adaln``).
      gelu: the FFN's bias + GELU (``hmar_jax.pallas.bias_gelu``).
      group_norm: the tokenizer's GroupNorms under ``bfloat16`` precision
        (``hmar_jax.pallas.group_norm``).
      compute_dtype: the block matmuls' operands; params, norms, softmax and logits stay
        float32.
      head_dtype: the output head's matmuls (float32 accumulation and logits either way).
      tokenizer_precision: the tokenizer's convolutions: ``highest`` (exact float32: the
        parity setting), ``default`` (the platform's fast float32: TF32 on NVIDIA GPUs, as
        PyTorch runs cuDNN convolutions) or ``bfloat16`` (bf16 weights and activations,
        one-pass GroupNorm statistics; fastest, slightly different tokens).
      remat: what the backward keeps per block (``REMAT_POLICIES``).
      scan_blocks: blocks under ``lax.scan`` (fast compile; with FSDP, one block's weights
        gathered at a time) instead of unrolled (faster steps).
      microbatches: each training step's batch as this many sequential parts with one
        update (the activation memory of batch / microbatches).
      moment_dtype: the optimizer's first moment; ``bfloat16`` saves 2 bytes per parameter.
      cast_weights: inference: store matmul weights in the compute dtype (half the memory
        in bf16, no conversion per pass; same outputs).
      unstack_blocks: inference: one weight array per block, read in place instead of
        sliced from the stack in every pass; faster batches, much longer first compile.
      platform: empty until resolved; then the platform the choices were made for.
    """

    attention: str = "auto"
    layer_norm: str = "auto"
    gelu: str = "auto"
    group_norm: str = "auto"
    compute_dtype: str = "auto"
    head_dtype: str = "auto"
    tokenizer_precision: str = "default"
    remat: str = "auto"
    scan_blocks: bool | str = "auto"
    microbatches: int = 1
    moment_dtype: str = "float32"
    cast_weights: bool = True
    unstack_blocks: bool = False
    platform: str = ""

    def __post_init__(self):
        def check(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"execution.{name}={getattr(self, name)!r} is not one of "
                                 f"{allowed}.")

        for name in KERNEL_FIELDS:
            extra = MOSAIC_CHOICES if name in MOSAIC_FIELDS else ()
            check(name, KERNEL_CHOICES + ("gpu", "tpu") + extra)
        check("compute_dtype", ("auto",) + DTYPES)
        check("head_dtype", ("auto",) + DTYPES)
        check("tokenizer_precision", TOKENIZER_PRECISIONS)
        check("remat", ("auto",) + REMAT_POLICIES)
        check("scan_blocks", ("auto", True, False))
        check("moment_dtype", DTYPES)
        check("platform", ("",) + PLATFORMS)
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"execution.microbatches must be a positive integer, got "
                             f"{self.microbatches!r}.")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "ExecutionConfig":
        """From a config section (``config.execution``); unknown keys are one clear error."""
        values = dict(values or {})
        for name in ("scan_blocks", "cast_weights", "unstack_blocks"):
            # A command-line override of a field whose config default is "auto" arrives as text.
            if isinstance(values.get(name), str) and values[name].lower() in ("true", "false"):
                values[name] = values[name].lower() == "true"
        fields = {f.name for f in dataclasses.fields(cls)} - {"platform"}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"Unknown execution setting(s) {unknown}; the settings are "
                             f"{sorted(fields)}.")
        return cls(**values)

    @property
    def is_resolved(self) -> bool:
        return bool(self.platform)

    def replace(self, **changes) -> "ExecutionConfig":
        return dataclasses.replace(self, **changes)

    def resolve(self, platform: str | None = None, *, inference: bool = False
                ) -> "ExecutionConfig":
        """The concrete choices for ``platform`` (``cpu``, ``gpu`` or ``tpu``; default: JAX's
        default backend); idempotent for the same platform. The only place that asks JAX
        which platform it runs on.

        ``inference``: for sampling (``pretrained.load_pretrained``). Blocks then stay
        scanned under ``"auto"``: the sampler runs the stack in every one of its passes, and
        unrolled that program takes minutes to compile for a few percent per batch."""
        if platform is None:
            import jax

            platform = jax.default_backend()
        if platform not in PLATFORMS:
            raise ValueError(f"Unknown platform {platform!r}; use one of {PLATFORMS}.")
        if self.is_resolved:
            if self.platform != platform:
                raise ValueError(f"This execution config was resolved for {self.platform}, "
                                 f"not {platform}.")
            return self
        auto = _AUTO[platform]
        changes: dict[str, Any] = {"platform": platform}
        for name in KERNEL_FIELDS:
            changes[name] = _resolve_kernel(name, getattr(self, name), platform, auto[name])
        compute = auto["compute_dtype"] if self.compute_dtype == "auto" else self.compute_dtype
        changes["compute_dtype"] = compute
        changes["head_dtype"] = compute if self.head_dtype == "auto" else self.head_dtype
        changes["remat"] = auto["remat"] if self.remat == "auto" else self.remat
        if self.scan_blocks != "auto":
            changes["scan_blocks"] = self.scan_blocks
        else:
            changes["scan_blocks"] = True if inference else auto["scan_blocks"]
        return dataclasses.replace(self, **changes)

    def require_resolved(self, where: str) -> "ExecutionConfig":
        """Returns self; raises if ``resolve`` has not run (a layer was handed raw choices)."""
        if not self.is_resolved:
            raise ValueError(f"{where} needs a resolved ExecutionConfig; call "
                             "execution.resolve(platform) at the boundary.")
        return self


def _resolve_kernel(name: str, choice: str, platform: str, auto: str) -> str:
    if choice == "auto":
        return auto
    if choice in ("xla", "interpret", "mosaic_interpret"):
        return choice
    if choice == "mosaic_gpu":
        if platform != "gpu":
            raise ValueError(f"execution.{name}='mosaic_gpu' cannot run on {platform}; use "
                             "'mosaic_interpret' for Mosaic GPU's interpreter.")
        return choice
    if choice in ("gpu", "tpu") and choice != platform:
        raise ValueError(f"execution.{name}={choice!r} cannot run on {platform}; use 'pallas' "
                         "for the platform's kernel.")
    if platform == "cpu":
        return "interpret"
    if platform == "tpu" and name not in _TPU_KERNELS:
        raise ValueError(f"execution.{name}={choice!r} has no TPU kernel; use 'xla' or 'auto'.")
    return platform


def resolved(platform: str | None = None, **overrides) -> ExecutionConfig:
    """``ExecutionConfig(**overrides).resolve(platform)``."""
    return ExecutionConfig(**overrides).resolve(platform)


# The plain-jnp float32 reference (the CPU resolution, with the tokenizer at exact float32):
# every kernel off, nothing rematerialised, scanned blocks. What a model or tokenizer built
# without an execution config runs, on any platform.
REFERENCE = ExecutionConfig(tokenizer_precision="highest").resolve("cpu")
