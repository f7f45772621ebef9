"""The tokenizer encoder's GroupNorm + SiLU in bf16: flax's module against a per-channel form.

In the d16 B64 training step's encode (H200 profile, `results/train_profile_tokenize_d16_h200.json`)
the GroupNorm statistics took 7.0 ms and the normalise + SiLU pass 6.5 ms next to 25 ms of
convolutions, about half the bandwidth such passes can reach. For each activation shape of
the encoder (bf16, 32 groups, median of ``--iters``) this times:

* ``flax``: ``nnx.GroupNorm(use_fast_variance=True)`` then ``nnx.silu``, as the bf16 encode
  runs it now;
* ``channel_sums``: per-channel sums of x and x^2 in float32 (one read), combined into the
  group statistics on the small ``[B, C]`` arrays, then ``silu(x a + b)`` with a per
  (batch, channel) scale and shift (one read, one write).

Each row prints the effective bandwidth (two reads and a write of x over the time) and
the largest difference from a float32 two-pass GroupNorm + SiLU of the same input.

  python benchmarks/group_norm.py --out benchmarks/results/group_norm_h200.json
  python benchmarks/group_norm.py --quick          # CPU smoke run, tiny shape
"""

from __future__ import annotations

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_step import (  # noqa: E402
    _time_calls, elementwise_benchmark_main, timing_summary)

GROUPS, EPS = 32, 1e-6
# (name, batch, side, channels): the encoder's GroupNorm inputs at B64, the d16 step's batch
# (ch=160, ch_mult 1,1,2,2,4: four norms at 256 px and at 128 px, the attention and middle
# blocks at 16 px).
SHAPES = (("b64_256px_160", 64, 256, 160), ("b64_128px_160", 64, 128, 160),
          ("b64_64px_320", 64, 64, 320), ("b64_32px_320", 64, 32, 320),
          ("b64_16px_640", 64, 16, 640))
QUICK_SHAPES = (("quick", 2, 8, 64),)


def channel_sums_group_norm_silu(x, scale, bias, groups: int = GROUPS, eps: float = EPS):
    """``silu(GroupNorm(x))`` for ``x [B, H, W, C]``: one read for per-channel sums, one
    read and one write for ``silu(x a + b)``; statistics in float32, output in x's dtype."""
    import jax
    import jax.numpy as jnp

    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32)
    sums = jnp.sum(x32, axis=(1, 2))                    # [B, C]
    squares = jnp.sum(x32 * x32, axis=(1, 2))           # [B, C]
    count = h * w * (c // groups)
    mean = sums.reshape(b, groups, -1).sum(-1) / count  # [B, G]
    var = jnp.maximum(squares.reshape(b, groups, -1).sum(-1) / count - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + eps)
    per_channel = lambda g: jnp.repeat(g, c // groups, axis=1)  # noqa: E731  [B, G] -> [B, C]
    a = per_channel(rstd) * scale.astype(jnp.float32)
    shift = bias.astype(jnp.float32) - per_channel(mean) * a
    return jax.nn.silu(x32 * a[:, None, None] + shift[:, None, None]).astype(x.dtype)


def measure(name: str, batch: int, side: int, channels: int, num_warps: list[int], iters: int,
            bandwidth: float) -> list[dict]:
    del num_warps  # no kernel here
    import jax
    import jax.numpy as jnp
    from flax import nnx

    keys = jax.random.split(jax.random.key(0), 3)
    x = (2.0 * jax.random.normal(keys[0], (batch, side, side, channels)) + 0.5).astype(jnp.bfloat16)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (channels,))
    bias = 0.1 * jax.random.normal(keys[2], (channels,))

    def flax_norm(fast: bool, dtype):
        norm = nnx.GroupNorm(channels, num_groups=GROUPS, epsilon=EPS, use_fast_variance=fast,
                             param_dtype=dtype, rngs=nnx.Rngs(0))
        norm.scale[...] = scale.astype(dtype)
        norm.bias[...] = bias.astype(dtype)
        return norm

    exact_norm = flax_norm(False, jnp.float32)
    exact = jax.jit(lambda x: nnx.silu(exact_norm(x)))(x.astype(jnp.float32))
    fast_norm = flax_norm(True, jnp.bfloat16)
    variants = {
        "flax": lambda x: nnx.silu(fast_norm(x)),
        "channel_sums": lambda x: channel_sums_group_norm_silu(x, scale.astype(jnp.bfloat16),
                                                               bias.astype(jnp.bfloat16)),
    }
    rows = []
    for variant, fn in variants.items():
        jitted = jax.jit(fn)
        out = jax.block_until_ready(jitted(x))
        stats = timing_summary(_time_calls(lambda: jitted(x), 2, iters))
        error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
        row = {"shape": name, "batch": batch, "side": side, "channels": channels,
               "variant": variant, **stats, "tb_per_s": 3 * x.nbytes / (stats["ms_median"] * 1e-3) / 1e12,
               "max_abs_error_vs_f32": error, "output_dtype": str(out.dtype)}
        rows.append(row)
        print(f"  {name:<16} {variant:<13} {stats['ms_median']:8.3f} ms  "
              f"{row['tb_per_s']:5.2f} TB/s of {bandwidth}   max |error| {error:.3g}", flush=True)
    return rows


if __name__ == "__main__":
    elementwise_benchmark_main("group_norm", __doc__, SHAPES, QUICK_SHAPES, measure)
