"""Block-sparse attention on TPU through JAX's splash attention kernel.

``jax.experimental.pallas.ops.tpu.splash_attention`` is JAX's maintained TPU flash
attention. It takes a static mask, splits it into ``block_q x block_kv`` tiles on the host
and skips every empty tile in the forward and in both backward kernels (dK/dV and dQ);
tiles that are only partly legal are masked elementwise. HMAR's block-diagonal mask, VAR's
block-causal mask and the unmasked ``full`` pattern are handed to it as a ``NumpyMask``
per head (not as ``SegmentIds``: splash plans which tiles to skip from the static mask
alone, while segment ids are compared inside every visited tile and skip none), and
splash's own ``custom_vjp`` gives the gradients. This module adds only
what our callers need around it: the ``[B, L, N, K]`` layout, the logit scale, and the
padding of the sequence to a multiple of the tile.

**Padding.** Both sequence lengths are padded with zero rows to a multiple of the tile
and the padded outputs are dropped. A real query never sees a padded key. A padded query
attends the padded keys (or, where the keys needed no padding, every key), so no row of
the mask is empty; its output is discarded, so its cotangent is zero and it adds nothing to
any gradient.

**Tiles** (``block_size``): 256 x 256 for sequences longer than 256 tokens, else 128 x
128 (splash needs key tiles that are multiples of 128, the TPU's lane width). The grid
has a fixed cost per step (its DMA and bookkeeping, a fraction of a microsecond), while a
256 x 256 tile at head dim 64 is about that much work, so smaller tiles would spend the
kernel in per-step overhead; larger ones would compute mostly masked-out logits and pad
further. 256 is also the MXU width of the newest TPUs and a multiple of the older ones' 128.
For the released scale lists:

| scale list | L | padded | block-diagonal tiles | block-causal tiles |
|---|---|---|---|---|
| 256 px | 680 | 768 | 7 of 9 | 8 of 9 |
| 512 px | 2240 | 2304 | 39 of 81 | 60 of 81 |

(at 256 px, 128 x 128 tiles would visit 20 of 36 block-diagonal tiles: 30 % fewer
logits for three times the grid steps.) The backward kernels use the same tiles; dQ has
its own kernel, so it is accumulated in float32 inside the kernel rather than summed
from per-key-tile partials in the input dtype.

Dimension letters: B batch, Lq/Lk query/key tokens, N heads, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from hmar_jax.scales import ScaleLayout

# splash's forward kernel under differentiation (it then also writes the log-sum-exp
# residual), for remat policies that keep its output.
FORWARD_KERNEL_NAME = "splash_mha_fwd_residuals"
LANES = 128  # key tiles are multiples of this


def block_size(length: int) -> int:
    """The square tile (query and key rows) for a sequence of ``length`` tokens (module
    docstring)."""
    return 256 if length > 256 else LANES


def _padded(length: int, block: int) -> int:
    return -(-length // block) * block


@functools.lru_cache(maxsize=32)
def padded_mask(pattern: str, patch_nums: tuple[int, ...], len_q: int, len_k: int
                ) -> np.ndarray:
    """bool ``[Lq', Lk']``: the pattern's mask padded to the tile (module docstring)."""
    block = block_size(max(len_q, len_k))
    mask = np.zeros((_padded(len_q, block), _padded(len_k, block)), bool)
    if pattern == "full":
        mask[:len_q, :len_k] = True
    else:
        mask[:len_q, :len_k] = ScaleLayout(patch_nums).attention_mask(pattern)
    mask[len_q:, len_k:] = True
    if mask.shape[1] == len_k:
        mask[len_q:] = True
    return mask


@functools.lru_cache(maxsize=32)
def _kernel(pattern: str, patch_nums: tuple[int, ...], len_q: int, len_k: int, heads: int,
            save_residuals: bool, interpret: bool):
    """The splash kernel for one mask and head count: its tile tables are built on the host
    once and held as concrete arrays (built outside any trace, so a cached kernel can serve
    every later trace as constants)."""
    mask = padded_mask(pattern, patch_nums, len_q, len_k)
    block = block_size(max(len_q, len_k))
    blocks = splash_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                   block_q_dkv=block, block_kv_dkv=block,
                                   block_kv_dkv_compute=block, block_q_dq=block,
                                   block_kv_dq=block)
    head_masks = splash_lib.MultiHeadMask([splash_lib.NumpyMask(mask)] * heads)
    with jax.ensure_compile_time_eval():
        return splash_lib.make_splash_mha_single_device(head_masks, block_sizes=blocks,
                                                        save_residuals=save_residuals,
                                                        interpret=interpret)


def _call(q, k, v, pattern, patch_nums, sm_scale, save_residuals, interpret):
    """Runs the kernel on ``[B, L, N, K]`` inputs; returns padded ``[B, N, Lq', K]`` output
    (and ``[B, N, Lq']`` log-sum-exp with ``save_residuals``)."""
    batch, len_q, heads, _ = q.shape
    len_k = k.shape[1]
    kernel = _kernel(pattern, tuple(patch_nums), len_q, len_k, heads, save_residuals,
                     interpret)
    len_qp, len_kp = padded_mask(pattern, tuple(patch_nums), len_q, len_k).shape
    if sm_scale != 1.0:
        q = q * jnp.asarray(sm_scale, q.dtype)

    def heads_major(x, length):  # [B, L, N, K] -> [B, N, L', K]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

    return jax.vmap(kernel)(heads_major(q, len_qp), heads_major(k, len_kp),
                            heads_major(v, len_kp))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, pattern: str,
              patch_nums: tuple[int, ...], sm_scale: float = 1.0,
              interpret: bool = False) -> jax.Array:
    """``softmax(sm_scale q k^T + mask) v`` by splash attention, differentiable in q, k, v.

    Args:
      q: ``[B, Lq, N, K]``.
      k, v: ``[B, Lk, N, K]``, q's dtype; Lq = Lk = L of ``patch_nums`` unless ``pattern``
        is ``full``.
      pattern: ``block_diagonal``, ``block_causal`` or ``full``.
      patch_nums: the scales of the sequence (ignored for ``full``).
      sm_scale: logit multiplier, applied to q in its dtype (HMAR: 1).
      interpret: run the Pallas kernels in interpret mode (CPU tests).

    Returns:
      ``[B, Lq, N, K]`` in q's dtype.
    """
    out = _call(q, k, v, pattern, patch_nums, sm_scale, False, interpret)
    return jnp.swapaxes(out[:, :, :q.shape[1]], 1, 2)


def attention_and_lse(q: jax.Array, k: jax.Array, v: jax.Array, *, pattern: str,
                      patch_nums: tuple[int, ...], sm_scale: float = 1.0,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``attention``'s forward with the log-sum-exp of each row's logits, the residual
    splash's backward kernels read (not differentiable).

    Returns:
      ``[B, Lq, N, K]`` in q's dtype and float32 ``[B, N, Lq]``.
    """
    out, (lse,) = _call(q, k, v, pattern, patch_nums, sm_scale, True, interpret)
    length = q.shape[1]
    return jnp.swapaxes(out[:, :, :length], 1, 2), lse[:, :, :length]
