"""The FFN's bias + GELU pass: XLA's fusion against the Pallas kernel (GPU).

For each ``[M, C] x [C, 4C]`` shape the model runs, times (bf16, median of ``--iters``):

* ``xla`` elementwise: ``jax.nn.gelu(h + b)`` on a ready fc1 output ``h [M, 4C]``, jitted
  alone (what the profile shows as the separate bias + GELU pass);
* ``pallas`` elementwise: ``bias_gelu.forward`` on the same ``h``, for each ``--num-warps``;
* the same two pairs for the backward (``dh`` and ``db`` from ``dy``);
* ``fc1`` as the model runs it: ``nnx.Linear`` + GELU against matmul + kernel, forward and
  forward+backward.

Each elementwise row prints its effective bandwidth (bytes read + written / time) next
to ``--bandwidth``; each Pallas row its largest difference from the float32 expression.

  python benchmarks/bias_gelu.py --out bias_gelu.json
  python benchmarks/bias_gelu.py --quick          # CPU smoke run (interpret mode, tiny)
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    elementwise_benchmark_main, kernel_implementation, time_calls, timing_summary)

# (name, rows M, width C): d30 sampling at the 16x16 and 13x13 scales (2B = 128 rows),
# d16 training at B64 (64 x 680 tokens), d30 training at B32.
SHAPES = (("d30_sample_16x16", 128 * 256, 1920), ("d30_sample_13x13", 128 * 169, 1920),
          ("d16_train_b64", 64 * 680, 1024), ("d30_train_b32", 32 * 680, 1920))
QUICK_SHAPES = (("quick", 64, 32),)


def measure(name: str, rows: int, width: int, num_warps: list[int], iters: int,
            bandwidth: float) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from hmar_jax.pallas import bias_gelu as bg

    hidden = 4 * width
    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (rows, hidden), jnp.bfloat16)
    dy = jax.random.normal(keys[1], (rows, hidden), jnp.bfloat16)
    bias = 0.1 * jax.random.normal(keys[2], (hidden,), jnp.float32)
    x = jax.random.normal(keys[3], (rows, width), jnp.bfloat16)
    kernel = (jax.random.normal(keys[0], (width, hidden)) / width ** 0.5).astype(jnp.bfloat16)
    implementation = kernel_implementation("gelu")
    interpret = implementation == "interpret"
    exact = bg.reference_bias_gelu(h.astype(jnp.float32), bias)
    pass_bytes = {"forward": 2 * h.nbytes, "backward": 3 * h.nbytes}
    rows_out = []

    def record(kind: str, variant: str, fn, *args, error=None):
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        stats = timing_summary(time_calls(lambda: jitted(*args), 2, iters))
        row = {"shape": name, "rows": rows, "hidden": hidden, "kind": kind, "variant": variant,
               **stats}
        moved = pass_bytes.get(kind.removeprefix("elementwise_"))
        if moved:
            row["tb_per_s"] = moved / (stats["ms_median"] * 1e-3) / 1e12
        if error is not None:
            row["max_abs_error_vs_f32"] = error
        rows_out.append(row)
        rate = f"{row['tb_per_s']:5.2f} TB/s of {bandwidth}" if "tb_per_s" in row else ""
        print(f"  {name:<18} {kind:<20} {variant:<12} {stats['ms_median']:8.3f} ms  {rate}",
              flush=True)

    record("elementwise_forward", "xla", bg.reference_bias_gelu, h, bias)
    record("elementwise_backward", "xla",
           lambda h, b, dy: jax.vjp(bg.reference_bias_gelu, h, b)[1](dy), h, bias, dy)
    for warps in num_warps:
        fwd = lambda h, b, warps=warps: bg.forward(h, b, interpret=interpret, num_warps=warps)  # noqa: E731
        error = float(jnp.max(jnp.abs(jax.jit(fwd)(h, bias).astype(jnp.float32) - exact)))
        record("elementwise_forward", f"pallas_w{warps}", fwd, h, bias, error=error)
        record("elementwise_backward", f"pallas_w{warps}",
               lambda h, b, dy, warps=warps: bg.backward(h, b, dy, interpret=interpret,
                                                          num_warps=warps), h, bias, dy)

    def fc1(variant):
        def run(x, kernel, bias):
            if variant == "xla":  # nnx.Linear: bf16 matmul, bias added in bf16, then the GELU
                return jax.nn.gelu(x @ kernel + bias.astype(x.dtype), approximate=True)
            return bg.bias_gelu(x @ kernel, bias, implementation)
        return run

    for variant in ("xla", "pallas"):
        record("fc1_forward", variant, fc1(variant), x, kernel, bias)
        grad = jax.grad(lambda x, k, b, f=fc1(variant): jnp.sum(f(x, k, b).astype(jnp.float32)),
                        argnums=(0, 1, 2))
        record("fc1_forward_backward", variant, grad, x, kernel, bias)
    return rows_out


if __name__ == "__main__":
    elementwise_benchmark_main("bias_gelu", __doc__, SHAPES, QUICK_SHAPES, measure)
