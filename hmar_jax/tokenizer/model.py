"""VAR's multi-scale residual VQ-VAE tokenizer in Flax NNX.

Image <-> per-scale token indices <-> the transformer's teacher-forcing inputs.
The module tree and attribute names follow the upstream PyTorch state_dict
(``encoder.down.2.block.0.conv1`` ...), so checkpoint conversion is a mechanical
rename plus layout transposes (see ``hmar_jax.convert.vqvae``).

Layouts are NHWC (images ``[B, H, W, 3]`` in [-1, 1], latents ``[B, P, P, Cv]``).

Dimension letters:
  B batch, H/W image side, P latent side (= last patch_num), Cv latent channels,
  V codebook size, S scales, p_k side of scale k, L = sum p_k^2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.tokenizer import resample
from hmar_jax.execution import REFERENCE, ExecutionConfig
from hmar_jax.frozen_config import config_from_dict
from hmar_jax.pallas import group_norm as group_norm_ops
from hmar_jax.scales import ScaleLayout, resolve_patch_nums

HIGHEST = jax.lax.Precision.HIGHEST


def _to_dtype(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if isinstance(a, jax.Array | np.ndarray)
                        and jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _with_precision(method):
    """Runs a VQVAE method's convolutions and matmuls at the tokenizer's precision
    (``ExecutionConfig.tokenizer_precision``); for ``bfloat16`` on a bf16 copy of the
    weights and inputs, returning float32, with the GroupNorms' mean and variance from one
    pass (``E[x^2] - E[x]^2`` in float32, one read of the activations; the other precisions
    keep PyTorch's two-pass variance), computed by ``hmar_jax.pallas.group_norm`` with the
    resolved ``group_norm`` implementation."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        if self.precision == "bfloat16":
            if getattr(self, "_bf16_copy", False):  # already inside a cast call
                return method(self, *args, **kwargs)
            graphdef, state = nnx.split(self)
            copy = nnx.merge(graphdef, _to_dtype(state, jnp.bfloat16))
            object.__setattr__(copy, "_bf16_copy", True)
            for _, module in nnx.iter_modules(copy):
                if isinstance(module, GroupNorm):  # one read for both statistics
                    module.use_fast_variance = True
                    module.implementation = self.group_norm_implementation
            out = method(copy, *_to_dtype(args, jnp.bfloat16), **_to_dtype(kwargs, jnp.bfloat16))
            return _to_dtype(out, jnp.float32)
        precision = "highest" if self.precision == "highest" else None
        with jax.default_matmul_precision(precision):
            return method(self, *args, **kwargs)

    return wrapped


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """Hyper-parameters of the tokenizer. The defaults are the released ch=160 model.

    Attributes:
      vocab_size: V, codebook entries.
      z_channels: Cv, latent channels.
      ch: base width of encoder and decoder.
      ch_mult: width multiplier per resolution level; the down-sampling factor is
        ``2 ** (len(ch_mult) - 1)``.
      num_res_blocks: resnet blocks per encoder level (the decoder has one more).
      using_sa: self-attention at the lowest-resolution level.
      using_mid_sa: self-attention in the middle block.
      in_channels: image channels.
      norm_groups: GroupNorm groups (every width must be divisible by it).
      quant_resi: phi mixing ratio, ``phi(h) = (1 - r) h + r conv(h)``.
      share_quant_resi: number of phi convs shared across scales (0: one per scale).
      beta: commitment-loss weight (tokenizer training only).
      patch_nums: side of every scale, coarse to fine.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    in_channels: int = 3
    norm_groups: int = 32
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    beta: float = 0.25
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", resolve_patch_nums(self.patch_nums))
        widths = {self.ch * m for m in self.ch_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(f"VQVAEConfig: widths {bad} are not divisible by "
                             f"norm_groups={self.norm_groups}; change ch or norm_groups.")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]

    @property
    def layout(self) -> ScaleLayout:
        return ScaleLayout(self.patch_nums, self.share_quant_resi)

    @property
    def num_phi(self) -> int:
        return self.share_quant_resi or len(self.patch_nums)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VQVAEConfig":
        """From a stored config; execution settings that exports used to carry are dropped."""
        return config_from_dict(cls, {k: v for k, v in values.items()
                                      if k not in ("precision", "norm_backend")})


PATCH_MATMUL_MAX_CHANNELS = 4  # Conv: inputs this narrow (the image) run as a patch matmul


class Conv(nnx.Conv):
    """``nnx.Conv`` (``[B, H, W, Cin] -> [B, H', W', Cout]``); a stride-1 convolution of an
    input with at most ``PATCH_MATMUL_MAX_CHANNELS`` channels (the encoder's ``conv_in`` on
    RGB) runs as one matmul of its ``[B, H, W, k k Cin]`` patches with the kernel reshaped to
    ``[k k Cin, Cout]``: the same sums, in another order. cuDNN handles a 3-channel input
    far below the bandwidth its large output needs; one matmul does not."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw, cin, cout = self.kernel.shape
        unit = lambda v: v is None or v == 1 or tuple(v) == (1, 1)  # noqa: E731
        if (cin > PATCH_MATMUL_MAX_CHANNELS or kh * kw == 1 or not unit(self.strides)
                or not unit(self.kernel_dilation) or not unit(self.input_dilation)
                or self.feature_group_count != 1 or isinstance(self.padding, str)):
            return super().__call__(x)
        padded = jnp.pad(x, ((0, 0), *self.padding, (0, 0)))
        height, width = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
        patches = jnp.concatenate([padded[:, dy:dy + height, dx:dx + width]
                                   for dy in range(kh) for dx in range(kw)], axis=-1)
        kernel = self.kernel[...].reshape(kh * kw * cin, cout)  # rows ordered (dy, dx, c)
        y = jnp.dot(patches, kernel.astype(jnp.result_type(patches, kernel)),
                    precision=self.precision)
        return y if self.bias is None else y + self.bias[...]


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, stride: int = 1, padding=None) -> Conv:
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad,
                rngs=rngs)  # precision: VQVAE._precision


class GroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` (``[B, H, W, C]``) with the SiLU that follows it as an option.

    With one-pass statistics (the ``bfloat16`` copy, see ``_with_precision``) it runs
    ``hmar_jax.pallas.group_norm`` with ``implementation``; otherwise flax's module."""

    implementation: str = "xla"

    def __call__(self, x: jax.Array, *, silu: bool = False) -> jax.Array:
        if self.use_fast_variance:
            return group_norm_ops.group_norm(x, self.scale[...], self.bias[...],
                                             groups=self.num_groups, eps=self.epsilon,
                                             silu=silu, implementation=self.implementation)
        y = super().__call__(x)
        return nnx.silu(y) if silu else y


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> GroupNorm:
    # Two-pass variance (use_fast_variance=False) to match PyTorch's GroupNorm.
    return GroupNorm(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                     rngs=rngs)


class ResnetBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``, ``[B, H, W, C]``."""

    def __init__(self, cin: int, cout: int, groups: int, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cin, groups, rngs)
        self.conv1 = _conv(cin, cout, 3, rngs)
        self.norm2 = _group_norm(cout, groups, rngs)
        self.conv2 = _conv(cout, cout, 3, rngs)
        self.nin_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with a residual, ``[B, H, W, C]``."""

    def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
        self.norm = _group_norm(channels, groups, rngs)
        self.qkv = _conv(channels, 3 * channels, 1, rngs)
        self.proj_out = _conv(channels, channels, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv: ``[B, H, W, C] -> [B, H/2, W/2, C]``."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: resnet blocks, optional attention after each, optional resampler."""

    def __init__(self, widths: Sequence[tuple[int, int]], with_attention: bool,
                 resampler: nnx.Module | None, groups: int, rngs: nnx.Rngs,
                 resampler_name: str):
        self.block = nnx.List([ResnetBlock(i, o, groups, rngs) for i, o in widths])
        self.attn = nnx.List([AttnBlock(o, groups, rngs) for _, o in widths] if with_attention else [])
        self._resampler_name = resampler_name
        setattr(self, resampler_name, resampler)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resampler = getattr(self, self._resampler_name)
        return x if resampler is None else resampler(x)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, with_attention: bool, groups: int, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, groups, rngs)
        self.attn_1 = AttnBlock(channels, groups, rngs) if with_attention else None
        self.block_2 = ResnetBlock(channels, channels, groups, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nnx.Module):
    """``[B, H, W, 3] -> [B, H/f, W/f, Cv]`` with f the down-sampling factor."""

    def __init__(self, cfg: VQVAEConfig, rngs: nnx.Rngs):
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, rngs)
        levels, cin = [], cfg.ch
        for i, cout in enumerate(widths):
            last = i == len(widths) - 1
            pairs = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            levels.append(Level(pairs, last and cfg.using_sa,
                                None if last else Downsample(cout, rngs), g, rngs, "downsample"))
            cin = cout
        self.down = nnx.List(levels)
        self.mid = MidBlock(cin, cfg.using_mid_sa, g, rngs)
        self.norm_out = _group_norm(cin, g, rngs)
        self.conv_out = _conv(cin, cfg.z_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.norm_out(self.mid(h), silu=True))


class Decoder(nnx.Module):
    """``[B, P, P, Cv] -> [B, f P, f P, 3]`` (unclamped). ``up[i]`` runs from i = last to 0."""

    def __init__(self, cfg: VQVAEConfig, rngs: nnx.Rngs):
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = _conv(cfg.z_channels, cin, 3, rngs)
        self.mid = MidBlock(cin, cfg.using_mid_sa, g, rngs)
        levels = [None] * len(widths)
        for i in reversed(range(len(widths))):
            cout = widths[i]
            pairs = [(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)]
            levels[i] = Level(pairs, i == len(widths) - 1 and cfg.using_sa,
                              Upsample(cout, rngs) if i else None, g, rngs, "upsample")
            cin = cout
        self.up = nnx.List(levels)
        self.norm_out = _group_norm(cin, g, rngs)
        self.conv_out = _conv(cin, cfg.in_channels, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h, silu=True))


class ResidualRefiner(nnx.Module):
    """phi_j(h) = (1 - r) h + r conv_j(h): the per-scale refinement convs ("quant_resi")."""

    def __init__(self, channels: int, count: int, ratio: float, rngs: nnx.Rngs):
        self.qresi_ls = nnx.List([_conv(channels, channels, 3, rngs) for _ in range(count)])
        self.ratio = ratio

    def __call__(self, h: jax.Array, index: int) -> jax.Array:
        return (1 - self.ratio) * h + self.ratio * self.qresi_ls[index](h)


class Quantizer(nnx.Module):
    """Codebook plus phi convs; the multi-scale logic lives on ``VQVAE``."""

    def __init__(self, cfg: VQVAEConfig, rngs: nnx.Rngs):
        v, c = cfg.vocab_size, cfg.z_channels
        self.embedding = nnx.Embed(v, c, embedding_init=nnx.initializers.uniform(2.0 / v),
                                   rngs=rngs)
        self.embedding.embedding[...] = self.embedding.embedding[...] - 1.0 / v  # U(-1/V, 1/V)
        self.quant_resi = ResidualRefiner(c, cfg.num_phi, cfg.quant_resi, rngs)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared-L2 nearest codebook entry, computed in float32 at highest precision.

    Args:
      z: ``[..., Cv]`` vectors.
      codebook: ``[V, Cv]``.

    Returns:
      int32 ``[...]`` indices.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    dist = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(codebook * codebook, axis=-1)
            - 2.0 * jnp.einsum("...c,vc->...v", z, codebook, precision=HIGHEST))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


class VQVAE(nnx.Module):
    """Multi-scale residual VQ-VAE (VAR).

    ``execution`` (resolved, ``hmar_jax.execution``) sets the precision of the convolutions
    and the GroupNorm implementation; the default is exact float32 with plain jnp.

    Example:
      >>> cfg = VQVAEConfig(vocab_size=64, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
      >>> vae = VQVAE(cfg, rngs=nnx.Rngs(0))
      >>> idx = vae.encode_to_indices(jnp.zeros((2, 8, 8, 3)))     # [B,1,1], [B,2,2], [B,4,4]
      >>> vae.decode_from_indices(idx).shape
      (2, 8, 8, 3)
    """

    def __init__(self, cfg: VQVAEConfig, execution: ExecutionConfig = REFERENCE, *,
                 rngs: nnx.Rngs):
        self.config = cfg
        execution.require_resolved("VQVAE")
        self.precision = execution.tokenizer_precision
        self.group_norm_implementation = execution.group_norm
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.quantize = Quantizer(cfg, rngs)
        self.quant_conv = _conv(cfg.z_channels, cfg.z_channels, 3, rngs)
        self.post_quant_conv = _conv(cfg.z_channels, cfg.z_channels, 3, rngs)

    # ----- image <-> latent ---------------------------------------------------------
    def check_images(self, images: jax.Array) -> None:
        size, c = self.config.image_size, self.config.in_channels
        if images.ndim != 4 or images.shape[1:] != (size, size, c):
            hint = (" It looks like NCHW; transpose to NHWC with x.transpose(0, 2, 3, 1)."
                    if images.ndim == 4 and images.shape[1] == c and images.shape[-1] == size else "")
            raise ValueError(
                f"Expected images of shape [B, {size}, {size}, {c}] (NHWC, values in [-1, 1]) "
                f"for patch_nums {self.config.patch_nums}, got {tuple(images.shape)}.{hint}")

    @_with_precision
    def encode_latent(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` in [-1, 1] -> continuous latent f ``[B, P, P, Cv]``."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    @_with_precision
    def decode_latent(self, f_hat: jax.Array) -> jax.Array:
        """f_hat ``[B, P, P, Cv]`` -> images ``[B, H, W, 3]`` clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

    # ----- per-scale pieces -----------------------------------------------------------
    def lookup(self, idx: jax.Array) -> jax.Array:
        """Codebook rows: int ``[B, p, p]`` -> ``[B, p, p, Cv]``."""
        return jnp.take(self.quantize.embedding.embedding[...], idx, axis=0)

    @_with_precision
    def scale_residual(self, k: int, h: jax.Array) -> jax.Array:
        """phi_k(bicubic(h, P)): scale k's contribution to f_hat, ``[B, p_k, p_k, Cv] -> [B, P, P, Cv]``."""
        up = resample.resize(h, self.config.patch_nums[-1], "bicubic")
        return self.quantize.quant_resi(up, self.config.layout.phi[k])

    def scale_input(self, k: int, f_hat: jax.Array) -> jax.Array:
        """area(f_hat, p_k): ``[B, P, P, Cv] -> [B, p_k, p_k, Cv]``."""
        return resample.resize(f_hat, self.config.patch_nums[k], "area")

    def add_scale(self, k: int, f_hat: jax.Array | None, codes: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
        """One step of the residual recurrence every encoder, decoder and sampler shares:
        ``(f_hat + h, h)`` with ``h = phi_k(bicubic(codes, P))``.

        Args:
          k: scale index.
          f_hat: the cumulative reconstruction of scales before k ``[B, P, P, Cv]``; None
            before scale 0.
          codes: scale k's codebook rows ``[B, p_k, p_k, Cv]`` (``lookup``).

        Returns:
          ``(f_hat after scale k, h)``, both ``[B, P, P, Cv]``.
        """
        h = self.scale_residual(k, codes)
        return (h if f_hat is None else f_hat + h), h

    def cumulative_reconstructions(self, indices: Sequence[jax.Array]) -> list[jax.Array]:
        """The cumulative reconstruction after each of the given leading scales 0..n-1:
        n arrays ``[B, P, P, Cv]`` from n index maps ``[B, p_k, p_k]``."""
        f_hats, f_hat = [], None
        for k, idx in enumerate(indices):
            f_hat, _ = self.add_scale(k, f_hat, self.lookup(idx))
            f_hats.append(f_hat)
        return f_hats

    # ----- quantisation -----------------------------------------------------------------
    def quantize_latent(self, f: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        """Residual multi-scale quantisation of a latent.

        Args:
          f: ``[B, P, P, Cv]``.

        Returns:
          ``(indices, f_hats)``: S int32 arrays ``[B, p_k, p_k]`` and the S cumulative
          reconstructions ``[B, P, P, Cv]`` after scales 0..k.
        """
        residual, f_hat = f, None
        indices, f_hats = [], []
        for k in range(len(self.config.patch_nums)):
            idx = nearest_code(self.scale_input(k, residual), self.quantize.embedding.embedding[...])
            f_hat, h = self.add_scale(k, f_hat, self.lookup(idx))
            residual = residual - h
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def encode_to_indices(self, images: jax.Array) -> list[jax.Array]:
        """Images ``[B, H, W, 3]`` -> S int32 index maps ``[B, p_k, p_k]``."""
        return self.quantize_latent(self.encode_latent(images))[0]

    def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
        """S index maps -> the cumulative reconstruction f_hat ``[B, P, P, Cv]``."""
        self._check_indices(indices)
        return self.cumulative_reconstructions(indices)[-1]

    def decode_from_indices(self, indices: Sequence[jax.Array]) -> jax.Array:
        """S index maps -> images ``[B, H, W, 3]`` in [-1, 1]."""
        return self.decode_latent(self.indices_to_fhat(indices))

    def teacher_forcing_inputs(self, indices: Sequence[jax.Array]) -> jax.Array:
        """Next-scale inputs ``x [B, L - 1, Cv]`` (VAR ``idxBl_to_var_input``).

        Rows of scale k >= 1 hold ``area(F_{k-1}, p_k)`` flattened row-major, where
        ``F_{k-1}`` is the cumulative reconstruction of all scales before k.
        """
        self._check_indices(indices)
        f_hats = self.cumulative_reconstructions(indices[:-1])  # F_0 .. F_{S-2}
        rows = [self._flatten(self.scale_input(k, f_hats[k - 1])) for k in range(1, len(indices))]
        return jnp.concatenate(rows, axis=1)

    def mask_branch_inputs(self, indices: Sequence[jax.Array]) -> jax.Array:
        """Mask-branch inputs ``[B, L - 1, Cv]`` (HMAR ``idxBl_to_mask_input``).

        Rows of scale k >= 1 hold ``area(phi_k(bicubic(E[idx_k], P)), p_k)``: the scale's
        own contribution, not accumulated.
        """
        self._check_indices(indices)
        rows = [self._flatten(self.scale_input(k, self.scale_residual(k, self.lookup(indices[k]))))
                for k in range(1, len(indices))]
        return jnp.concatenate(rows, axis=1)

    # ----- training forward ---------------------------------------------------------------
    @_with_precision
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array], list[jax.Array]]:
        """Reconstruction forward for tokenizer training.

        Args:
          images: ``[B, H, W, 3]`` in [-1, 1].

        Returns:
          ``(reconstruction [B, H, W, 3] unclamped, vq_loss scalar, indices, scale_inputs)``.
          The vq loss is the upstream mean over scales of
          ``beta * |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2``; the decoder sees f_hat
          through a straight-through estimator. ``scale_inputs`` are the residuals that
          were quantised at each scale, ``[B, p_k, p_k, Cv]`` (for dead-code restarts).
        """
        f = self.encode_latent(images)
        f_target = jax.lax.stop_gradient(f)
        residual, f_hat = f_target, None
        vq_loss, indices, scale_inputs = 0.0, [], []
        codebook = self.quantize.embedding.embedding[...]
        for k in range(len(self.config.patch_nums)):
            z = self.scale_input(k, residual)
            idx = nearest_code(jax.lax.stop_gradient(z), codebook)
            f_hat, h = self.add_scale(k, f_hat, jnp.take(codebook, idx, axis=0))
            residual = residual - h
            vq_loss += (self.config.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
                        + jnp.mean((f_hat - f_target) ** 2))
            indices.append(idx)
            scale_inputs.append(z)
        vq_loss /= len(self.config.patch_nums)
        f_hat_st = jax.lax.stop_gradient(f_hat - f) + f
        reconstruction = self.decoder(self.post_quant_conv(f_hat_st))
        return reconstruction, vq_loss, indices, scale_inputs

    # ----- helpers --------------------------------------------------------------------------
    @staticmethod
    def _flatten(x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1, x.shape[-1])  # [B, p*p, Cv], row-major

    def _check_indices(self, indices: Sequence[jax.Array]) -> None:
        sides = tuple(int(i.shape[-1]) for i in indices)
        if sides != self.config.patch_nums or any(i.shape[-2] != i.shape[-1] for i in indices):
            raise ValueError(
                f"Expected {len(self.config.patch_nums)} index maps [B, p_k, p_k] with p_k = "
                f"{self.config.patch_nums}, got shapes {[tuple(i.shape) for i in indices]}. "
                "Use ScaleLayout.split_tokens to split a flat [B, L] array.")
