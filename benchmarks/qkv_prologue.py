"""The backward of the attention's q/k/v prologue: XLA's differentiation of
``reference.hmar_qkv`` against the one-pass Pallas kernel (``hmar_jax/pallas/qkv_prologue.py``).

For each training shape (``qkv [B, L, 3, N, K]`` bf16 and the three ``[B, L, N, K]``
cotangents), times ``dqkv, dbias, dtemperature`` (median of ``--iters`` calls) and prints
the effective bandwidth (``qkv``, ``dq``, ``dk``, ``dv`` read once, ``dqkv`` written once)
next to ``--bandwidth``; each Pallas row also its largest difference in ``dqkv`` from the
XLA result.

  python benchmarks/qkv_prologue.py --out qkv_prologue.json
  python benchmarks/qkv_prologue.py --quick          # CPU smoke run (interpret mode, tiny)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    elementwise_benchmark_main, kernel_implementation, time_calls, timing_summary)

# (name, batch, tokens, heads, head dim): d16 training at B64, d30 at B32 (256 px).
SHAPES = (("d16_train_b64", 64, 680, 16, 64), ("d30_train_b32", 32, 680, 30, 64))
QUICK_SHAPES = (("quick", 2, 30, 3, 16),)


def measure(name: str, batch: int, length: int, heads: int, head_dim: int,
            num_warps: list[int], iters: int, bandwidth: float) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from hmar_jax.pallas import qkv_prologue

    keys = jax.random.split(jax.random.key(0), 4)
    qkv = jax.random.normal(keys[0], (batch, length, 3, heads, head_dim), jnp.bfloat16)
    bias = 0.1 * jax.random.normal(keys[1], (3, heads, head_dim), jnp.float32)
    temperature = jnp.linspace(1.0, 3.0, heads, dtype=jnp.float32)
    grads = [jax.random.normal(k, (batch, length, heads, head_dim), jnp.bfloat16)
             for k in jax.random.split(keys[2], 3)]
    args = (qkv, bias, temperature, *grads)
    moved = 2 * qkv.nbytes + sum(g.nbytes for g in grads)
    interpret = kernel_implementation("attention") == "interpret"
    want = jax.jit(qkv_prologue.reference_prologue_backward)(*args)
    rows = []

    def record(variant: str, fn):
        jitted = jax.jit(fn)
        got = jax.block_until_ready(jitted(*args))
        stats = timing_summary(time_calls(lambda: jitted(*args), 2, iters))
        error = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
        row = {"shape": name, "batch": batch, "tokens": length, "heads": heads,
               "head_dim": head_dim, "variant": variant, **stats,
               "tb_per_s": moved / (stats["ms_median"] * 1e-3) / 1e12,
               "max_abs_dqkv_difference_vs_xla": error}
        rows.append(row)
        print(f"  {name:<14} {variant:<14} {stats['ms_median']:8.3f} ms  "
              f"{row['tb_per_s']:5.2f} TB/s of {bandwidth}  dqkv diff {error:.2e}", flush=True)

    record("xla", qkv_prologue.reference_prologue_backward)
    for warps in num_warps:
        for sub_tiles in (2, 4, 8):
            record(f"pallas_w{warps}_s{sub_tiles}",
                   lambda *a, w=warps, s=sub_tiles: qkv_prologue.kernel_prologue_backward(
                       *a, interpret=interpret, num_warps=w, sub_tiles=s))
    return rows


if __name__ == "__main__":
    elementwise_benchmark_main("qkv_prologue", __doc__, SHAPES, QUICK_SHAPES, measure)
