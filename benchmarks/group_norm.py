"""The tokenizer encoder's GroupNorm + SiLU in bf16: flax's module, the jnp one-pass form, the Pallas kernels.

The statistics and the normalise + SiLU pass each read the activation once, so both are
bound by memory bandwidth. For each activation shape of the encoder (bf16, 32 groups,
median of ``--iters``) this times:

* ``flax``: ``nnx.GroupNorm(use_fast_variance=True)`` then ``nnx.silu``;
* ``reference``: ``hmar_jax.pallas.group_norm.reference_group_norm`` (per-channel float32
  sums of x and x^2, group statistics on ``[B, C]``, then ``silu(x a + b)``), the ``xla``
  backend;
* ``pallas``: the module's two Triton kernels (statistics, then normalise + SiLU), per
  ``--num-warps`` and per ``--tilings`` entry (tile elements x tiles per program); ``pallas_stats``
  the statistics kernel alone (one read of x).

Each row prints the effective bandwidth (two reads and a write of x over the time; one
read for ``pallas_stats``) and the largest difference from a float32 two-pass GroupNorm +
SiLU of the same input.

  python benchmarks/group_norm.py --out group_norm.json
  python benchmarks/group_norm.py --quick          # CPU smoke run, tiny shape, interpret mode
"""

from __future__ import annotations

import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    elementwise_benchmark_main, kernel_implementation, time_calls, timing_summary)

GROUPS, EPS = 32, 1e-6
# (name, batch, side, channels): the encoder's GroupNorm inputs at B64, the d16 step's batch
# (ch=160, ch_mult 1,1,2,2,4: four norms at 256 px and at 128 px, the attention and middle
# blocks at 16 px).
SHAPES = (("b64_256px_160", 64, 256, 160), ("b64_128px_160", 64, 128, 160),
          ("b64_64px_320", 64, 64, 320), ("b64_32px_320", 64, 32, 320),
          ("b64_16px_640", 64, 16, 640))
QUICK_SHAPES = (("quick", 2, 8, 64),)


def measure(name: str, batch: int, side: int, channels: int, num_warps: list[int], iters: int,
            bandwidth: float, tilings: list[tuple[int, int]]) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hmar_jax.pallas import group_norm as ops

    keys = jax.random.split(jax.random.key(0), 3)
    x = (2.0 * jax.random.normal(keys[0], (batch, side, side, channels)) + 0.5).astype(jnp.bfloat16)
    scale = (1.0 + 0.1 * jax.random.normal(keys[1], (channels,))).astype(jnp.bfloat16)
    bias = (0.1 * jax.random.normal(keys[2], (channels,))).astype(jnp.bfloat16)
    interpret = kernel_implementation("group_norm") == "interpret"

    def flax_norm(fast: bool, dtype):
        norm = nnx.GroupNorm(channels, num_groups=GROUPS, epsilon=EPS, use_fast_variance=fast,
                             param_dtype=dtype, rngs=nnx.Rngs(0))
        norm.scale[...] = scale.astype(dtype)
        norm.bias[...] = bias.astype(dtype)
        return norm

    exact_norm = flax_norm(False, jnp.float32)
    exact = jax.jit(lambda x: nnx.silu(exact_norm(x)))(x.astype(jnp.float32))
    fast_norm = flax_norm(True, jnp.bfloat16)
    flat = lambda x: x.reshape(batch, side * side, channels)  # noqa: E731
    variants = {
        "flax": ({}, lambda x: nnx.silu(fast_norm(x))),
        "reference": ({}, lambda x: ops.reference_group_norm(x, scale, bias, groups=GROUPS,
                                                             eps=EPS, silu=True)),
    }
    for warps in num_warps:
        for elements, max_tiles in tilings:
            tiling = dict(num_warps=warps, tile_elements=elements, max_tiles=max_tiles)
            variants[f"pallas_w{warps}_t{elements}x{max_tiles}"] = (tiling, functools.partial(
                lambda x, tiling: ops.group_norm_kernels(flat(x), scale, bias, GROUPS, EPS, True,
                                                         interpret, **tiling).reshape(x.shape),
                tiling=tiling))
    warps, (elements, max_tiles) = num_warps[0], tilings[0]
    stats_tiling = dict(num_warps=warps, tile_elements=elements, max_tiles=max_tiles)
    variants["pallas_stats"] = (stats_tiling, lambda x: ops.channel_sums(
        flat(x), interpret=interpret, **stats_tiling))
    rows = []
    for variant, (tiling, fn) in variants.items():
        jitted = jax.jit(fn)
        out = jax.block_until_ready(jitted(x))
        stats = timing_summary(time_calls(lambda: jitted(x), 2, iters))
        passes = 1 if variant == "pallas_stats" else 3
        error = None if variant == "pallas_stats" else float(
            jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
        row = {"shape": name, "batch": batch, "side": side, "channels": channels,
               "variant": variant, **tiling, **stats,
               "tb_per_s": passes * x.nbytes / (stats["ms_median"] * 1e-3) / 1e12,
               "max_abs_error_vs_f32": error}
        rows.append(row)
        shown = "-" if error is None else f"{error:.3g}"
        print(f"  {name:<16} {variant:<24} {stats['ms_median']:8.3f} ms  "
              f"{row['tb_per_s']:5.2f} TB/s of {bandwidth}   max |error| {shown}", flush=True)
    return rows


def parse_tilings(text: str) -> list[tuple[int, int]]:
    """``"4096x16,8192x8"`` -> ``[(4096, 16), (8192, 8)]`` (tile elements x tiles per program)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def add_arguments(parser) -> list[str]:
    parser.add_argument("--tilings", type=parse_tilings, default="4096x16,8192x16,4096x32,2048x16",
                        help="comma list of tile elements x tiles per program for the kernels "
                             "(the first is the stats-only row's)")
    return ["tilings"]


if __name__ == "__main__":
    elementwise_benchmark_main("group_norm", __doc__, SHAPES, QUICK_SHAPES, measure, add_arguments)
