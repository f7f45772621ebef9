"""Transformer layers of VAR/HMAR: AdaLN self-attention block and AdaLN head.

Parameter names follow the upstream state_dict (``attn.mat_qkv``, ``ffn.fc1``,
``ada_lin`` ...) so conversion stays a rename plus transposes.

Dimension letters: B batch, L tokens, C width, D conditioning width, N heads,
K head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hmar_jax.pallas import ops
from hmar_jax.pallas.adaln import add_layer_norm_modulate, layer_norm, layer_norm_modulate
from hmar_jax.pallas.bias_gelu import bias_gelu
from hmar_jax.pallas.dispatch import Implementation
from hmar_jax.pallas.reference import hmar_qkv

LOG_MAX_ATTN_SCALE = math.log(100.0)  # clamp of the learnable per-head temperature
# Names of the two residual branches' outputs (attention ``proj``, FFN ``fc2``), for remat
# policies that keep them (``ExecutionConfig.remat="projections_saveable"``).
ATTENTION_PROJ_NAME = "hmar_attention_proj"
FFN_OUT_NAME = "hmar_ffn_out"
GELU_OUT_NAME = "hmar_gelu_out"  # the fc2 input
NORM_OUT_NAME = "hmar_norm_out"  # the modulated LayerNorm outputs (qkv and fc1 inputs)


@dataclasses.dataclass(frozen=True)
class InitScales:
    """Upstream initialisation (VAR ``init_weights``).

    Attributes:
      std: std of every weight matrix and embedding (``sqrt(1 / (3 C))`` upstream),
        drawn from an untruncated normal (PyTorch's trunc_normal_ cuts at +-2 absolute,
        which never binds at these stds).
      depth: number of blocks; attention and MLP output projections are divided by
        ``sqrt(2 depth)``.
      adaln: multiplier on the AdaLN scale/shift rows (and the head's AdaLN).
      adaln_gamma: multiplier on the AdaLN gamma rows.
      head: multiplier on the output head.
    """

    std: float
    depth: int
    adaln: float = 0.5
    adaln_gamma: float = 1e-5
    head: float = 0.02

    @property
    def kernel_init(self):
        return nnx.initializers.normal(self.std)


def drop_path_factor(rate: jax.Array | float, rng: jax.Array | None, batch: int
                     ) -> jax.Array | float:
    """Per-sample stochastic depth as a factor ``[B, 1]``: 1/keep for a kept sample, 0 for a
    dropped one (1.0 without rng). Multiplies a residual branch's per-sample gate."""
    if rng is None:
        return 1.0
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (batch, 1))
    return jnp.where(mask, 1.0 / jnp.maximum(keep, 1e-6), 0.0)


class SelfAttention(nnx.Module):
    """L2-normalised multi-head attention: logits ``exp(min(s_h, ln 100)) cos(q, k)``.

    ``mat_qkv`` has no bias; the effective bias is ``[q_bias | 0 | v_bias]``.
    """

    def __init__(self, width: int, num_heads: int, dtype, init: InitScales, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.mat_qkv = nnx.Linear(width, 3 * width, use_bias=False, dtype=dtype,
                                  kernel_init=init.kernel_init, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((width,), jnp.float32))
        self.v_bias = nnx.Param(jnp.zeros((width,), jnp.float32))
        self.scale_mul = nnx.Param(jnp.full((num_heads,), math.log(4.0), jnp.float32))
        self.proj = nnx.Linear(width, width, dtype=dtype, kernel_init=init.kernel_init, rngs=rngs)
        self.proj.kernel[...] = self.proj.kernel[...] / math.sqrt(2 * init.depth)

    def __call__(self, x: jax.Array, spec: ops.AttentionSpec,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, cache_start: int = 0
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention over ``x [B, L, C]``.

        With ``kv_cache = (k [B, Lmax, N, K], v [B, Lmax, N, K])`` this call's keys and
        values are written at ``cache_start`` and the queries attend to every cached
        position up to the end of this call's tokens (VAR-mode sampling).

        Returns:
          ``(out [B, L, C], updated kv_cache or None)``.
        """
        b, length, width = x.shape
        q_bias = self.q_bias[...]
        bias = jnp.stack([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]])  # k has no bias
        bias = bias.reshape(3, self.num_heads, self.head_dim)
        # The projection stays in the compute dtype; so do q, k, v and the attention.
        qkv = self.mat_qkv(x).reshape(b, length, 3, self.num_heads, self.head_dim)
        temperature = jnp.exp(jnp.minimum(self.scale_mul[...], LOG_MAX_ATTN_SCALE))  # [N]
        if kv_cache is None:  # bias, normalisation and temperature run inside the kernel
            out = ops.hmar_attention(qkv, bias, temperature, spec)
        else:
            q, k, v = hmar_qkv(qkv, bias, temperature)  # [B, L, N, K]
            cache_k = jax.lax.dynamic_update_slice_in_dim(kv_cache[0], k.astype(kv_cache[0].dtype),
                                                          cache_start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(kv_cache[1], v.astype(kv_cache[1].dtype),
                                                          cache_start, axis=1)
            end = cache_start + length
            out = ops.attention(q, cache_k[:, :end].astype(v.dtype),
                                cache_v[:, :end].astype(v.dtype), spec)
            kv_cache = (cache_k, cache_v)
        out = checkpoint_name(self.proj(out.reshape(b, length, width)), ATTENTION_PROJ_NAME)
        return out, kv_cache


class FeedForward(nnx.Module):
    """``fc2(gelu_tanh(fc1(x)))``, ``[B, L, C] -> [B, L, C]``.

    ``gelu="xla"`` is ``nnx.Linear`` then ``jax.nn.gelu``, fused by XLA; a kernel
    implementation runs fc1's matmul alone and its bias + GELU as one Pallas pass
    (``hmar_jax.pallas.bias_gelu``, float32 inside).
    """

    def __init__(self, width: int, hidden: int, dtype, init: InitScales, rngs: nnx.Rngs,
                 gelu: Implementation):
        self.gelu_implementation = gelu
        self.fc1 = nnx.Linear(width, hidden, dtype=dtype, kernel_init=init.kernel_init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=dtype, kernel_init=init.kernel_init, rngs=rngs)
        self.fc2.kernel[...] = self.fc2.kernel[...] / math.sqrt(2 * init.depth)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gelu_implementation == "xla":
            hidden = jax.nn.gelu(self.fc1(x), approximate=True)
        else:
            dtype = self.fc1.dtype or x.dtype
            h = jnp.matmul(x.astype(dtype), self.fc1.kernel[...].astype(dtype))  # [B, L, hidden]
            hidden = bias_gelu(h, self.fc1.bias[...], self.gelu_implementation)
        return checkpoint_name(self.fc2(checkpoint_name(hidden, GELU_OUT_NAME)), FFN_OUT_NAME)


class AdaLNSelfAttnBlock(nnx.Module):
    """One VAR block with per-block AdaLN.

    ``ada_lin(silu(cond))`` gives six ``[B, C]`` vectors in the order
    gamma1, gamma2, scale1, scale2, shift1, shift2::

        x = x + drop_path(attn(LN(x) (1 + scale1) + shift1) gamma1)
        x = x + drop_path(ffn(LN(x) (1 + scale2) + shift2) gamma2)

    The LayerNorms, modulations and the first residual add run as the fused ops of
    ``hmar_jax.pallas.adaln`` (``layer_norm``: XLA's fusions or the Pallas kernels).
    ``forward_deferred`` leaves the second add to the next block's first LayerNorm (the
    unrolled stack runs its blocks that way).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, cond_width: int,
                 norm_eps: float, dtype, init: InitScales, rngs: nnx.Rngs, *,
                 gelu: Implementation, layer_norm: Implementation):
        self.norm_eps = norm_eps
        self.norm_implementation = layer_norm
        self.attn = SelfAttention(width, num_heads, dtype, init, rngs)
        self.ffn = FeedForward(width, round(width * mlp_ratio), dtype, init, rngs, gelu)
        self.ada_lin = nnx.Linear(cond_width, 6 * width, dtype=dtype, kernel_init=init.kernel_init,
                                  rngs=rngs)
        row_scale = jnp.concatenate([jnp.full((2 * width,), init.adaln_gamma),
                                     jnp.full((4 * width,), init.adaln)])  # gammas, then s/beta
        self.ada_lin.kernel[...] = self.ada_lin.kernel[...] * row_scale

    def modulation(self, cond: jax.Array) -> jax.Array:
        """``ada_lin(silu(cond))``: ``cond [B, D]`` -> float32 ``[B, 6 C]``."""
        return self.ada_lin(jax.nn.silu(cond)).astype(jnp.float32)

    def __call__(self, x: jax.Array, cond: jax.Array, spec: ops.AttentionSpec, *,
                 drop_rate: jax.Array | float = 0.0, rng: jax.Array | None = None,
                 kv_cache=None, cache_start: int = 0, modulation: jax.Array | None = None):
        """``x [B, L, C]``, ``cond [B, D]`` -> ``(x [B, L, C], kv_cache)``.

        ``modulation`` (``[B, 6 C]``, ``self.modulation(cond)`` computed earlier) skips
        ``ada_lin``: a sampler computes it once per batch instead of once per pass.
        """
        x, kv_cache, pending = self.forward_deferred(
            x, cond, spec, drop_rate=drop_rate, rng=rng, kv_cache=kv_cache,
            cache_start=cache_start, modulation=modulation)
        return finish_residual(x, pending), kv_cache

    def forward_deferred(self, x: jax.Array, cond: jax.Array, spec: ops.AttentionSpec, *,
                         pending: tuple[jax.Array, jax.Array] | None = None,
                         drop_rate: jax.Array | float = 0.0, rng: jax.Array | None = None,
                         kv_cache=None, cache_start: int = 0,
                         modulation: jax.Array | None = None):
        """The block with its last residual add left to the next block.

        ``pending``: the previous block's unfinished add, ``(branch [B, L, C], gate [B, C])``
        with the stream ``x + branch * gate``; it runs inside this block's first LayerNorm
        (``add_layer_norm_modulate``: with the Pallas kernels one float32 read and write of
        the residual stream less per block, forward and backward). Returns ``(x, kv_cache,
        pending)``, this block's FFN branch and gate pending; ``finish_residual`` adds them
        after the last block. Same values as ``__call__`` block after block.
        """
        b, _, width = x.shape
        if modulation is None:
            modulation = self.modulation(cond)
        modulation = modulation.reshape(b, 6, width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = [modulation[:, i] for i in range(6)]
        rng_attn, rng_ffn = (None, None) if rng is None else tuple(jax.random.split(rng))
        compute = self.attn.mat_qkv.dtype  # the matmuls' input dtype (they would cast anyway)
        norm = dict(eps=self.norm_eps, out_dtype=compute or x.dtype,
                    implementation=self.norm_implementation)
        if pending is None:
            h = layer_norm_modulate(x, scale1, shift1, **norm)
        else:
            x, h = add_layer_norm_modulate(x, *pending, scale1, shift1, **norm)
        h, kv_cache = self.attn(checkpoint_name(h, NORM_OUT_NAME), spec, kv_cache, cache_start)
        gate1 = gamma1 * drop_path_factor(drop_rate, rng_attn, b)
        x, h = add_layer_norm_modulate(x, h, gate1, scale2, shift2, **norm)
        gate2 = gamma2 * drop_path_factor(drop_rate, rng_ffn, b)
        return x, kv_cache, (self.ffn(checkpoint_name(h, NORM_OUT_NAME)), gate2)


def finish_residual(x: jax.Array, pending: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """``x + branch * gate`` of a block's deferred add (``[B, L, C]``, gate ``[B, C]``), in
    ``x``'s dtype; ``x`` when nothing is pending."""
    if pending is None:
        return x
    branch, gate = pending
    return x + (branch * gate[:, None]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_in_dtype(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """``x @ kernel`` (``[..., C] x [C, V]``) on ``dtype`` operands with float32 accumulation
    and a float32 result; the backward's two matmuls take ``dtype`` operands too (the
    float32 cotangent cast once), and the gradients come back in the inputs' dtypes."""
    return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_in_dtype_fwd(x, kernel, dtype):
    low_x, low_kernel = x.astype(dtype), kernel.astype(dtype)
    out = jnp.dot(low_x, low_kernel, preferred_element_type=jnp.float32)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))  # the inputs' dtypes
    return out, (low_x, low_kernel, dtypes)


def _matmul_in_dtype_bwd(dtype, residuals, cotangent):
    low_x, low_kernel, (x_like, kernel_like) = residuals
    low_cotangent = cotangent.astype(dtype)
    dx = jnp.dot(low_cotangent, low_kernel.T, preferred_element_type=jnp.float32)
    width, vocab = low_kernel.shape
    dkernel = jnp.dot(low_x.reshape(-1, width).T, low_cotangent.reshape(-1, vocab),
                      preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dkernel.astype(kernel_like.dtype)


matmul_in_dtype.defvjp(_matmul_in_dtype_fwd, _matmul_in_dtype_bwd)


class Head(nnx.Linear):
    """The output head ``[B, L, C] -> [B, L, V]``: ``nnx.Linear`` (float32 parameters and
    logits) whose matmul runs on ``matmul_dtype`` operands (``ExecutionConfig.head_dtype``)."""

    def __init__(self, in_features: int, out_features: int, *, matmul_dtype: str = "float32",
                 **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.matmul_dtype = matmul_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.matmul_dtype == "float32":
            return super().__call__(x)
        logits = matmul_in_dtype(x, self.kernel[...], jnp.dtype(self.matmul_dtype))
        return logits + self.bias[...].astype(jnp.float32)


class AdaLNBeforeHead(nnx.Module):
    """``LN(x) (1 + scale) + shift`` with ``[scale, shift] = ada_lin(silu(cond))``, in float32."""

    def __init__(self, width: int, cond_width: int, norm_eps: float, init: InitScales,
                 rngs: nnx.Rngs):
        self.norm_eps = norm_eps
        self.ada_lin = nnx.Linear(cond_width, 2 * width, kernel_init=init.kernel_init, rngs=rngs)
        self.ada_lin.kernel[...] = self.ada_lin.kernel[...] * init.adaln

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """``x [B, L, C]``, ``cond [B, D]`` -> float32 ``[B, L, C]``."""
        b, _, width = x.shape
        scale, shift = jnp.split(
            self.ada_lin(jax.nn.silu(cond.astype(jnp.float32))).reshape(b, 1, 2 * width), 2, axis=-1)
        return layer_norm(x, self.norm_eps) * (1 + scale) + shift
