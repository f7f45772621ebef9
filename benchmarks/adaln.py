"""AdaLN's LayerNorm + modulation (and residual add): XLA's fusions against the Pallas kernels.

For each ``[B, L, C]`` shape the model runs, times (median of ``--iters``) the two ops of
``hmar_jax.pallas.adaln`` alone, forward and backward:

* ``ln``: ``h = LN(x) (1 + scale) + shift`` (a block's first norm), ``x`` float32, ``h`` bf16;
* ``add_ln``: ``x' = x + branch gate``, ``h = LN(x') (1 + scale) + shift`` (the second norm,
  after the attention's residual add), ``branch`` and ``h`` bf16;

as ``xla`` (the jnp reference, jitted alone), ``pallas`` (the Triton-lowered kernels) for each
``--num-warps`` and, with ``--mosaic``, the Mosaic GPU kernels (``adaln_mosaic_gpu``). Each
row prints its effective bandwidth (bytes the op must read and write / time) and each
Pallas row its largest difference from the reference.

  python benchmarks/adaln.py --out adaln.json
  python benchmarks/adaln.py --mosaic --out adaln_mosaic.json   # Hopper: both kernel families
  python benchmarks/adaln.py --quick          # CPU smoke run (interpret mode, tiny)
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    elementwise_benchmark_main, kernel_implementation, time_calls, timing_summary)

# (name, B, L, C): d16 training at B64, d30 training at B32, d30 sampling at 16x16 (2B = 128).
SHAPES = (("d16_train_b64", 64, 680, 1024), ("d30_train_b32", 32, 680, 1920),
          ("d30_sample_16x16", 128, 256, 1920))
QUICK_SHAPES = (("quick", 2, 16, 256),)
# Bytes per element each op must move: float32 residual stream, bf16 branch / h / dh.
BYTES_PER_ELEMENT = {("ln", "forward"): 4 + 2, ("ln", "backward"): 4 + 2 + 4,
                     ("add_ln", "forward"): 4 + 2 + 4 + 2,
                     ("add_ln", "backward"): 4 + 2 + 2 + 4 + 4 + 2}


def random_inputs(batch: int, length: int, width: int):
    """``(x, branch, gate, scale, shift, dh, dx_out)`` as the blocks pass them: the float32
    residual stream ``x`` and ``dx_out`` ``[B, L, C]``, bf16 ``branch`` and ``dh``, float32
    ``[B, C]`` modulation vectors."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 8)
    shape, vec = (batch, length, width), (batch, width)
    x = jax.random.normal(keys[0], shape, jnp.float32)
    branch = jax.random.normal(keys[1], shape, jnp.bfloat16)
    gate, scale, shift = (0.3 * jax.random.normal(k, vec, jnp.float32) for k in keys[2:5])
    dh = jax.random.normal(keys[5], shape, jnp.bfloat16)
    dx_out = jax.random.normal(keys[6], shape, jnp.float32)
    return x, branch, gate, scale, shift, dh, dx_out


def measure(name: str, batch: int, length: int, width: int, num_warps: list[int], iters: int,
            bandwidth: float, mosaic: bool = False) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from hmar_jax.pallas import adaln

    x, branch, gate, scale, shift, dh, dx_out = random_inputs(batch, length, width)
    interpret = kernel_implementation("layer_norm") == "interpret"
    norm = dict(eps=1e-6, out_dtype=jnp.bfloat16)
    elements = batch * length * width
    rows_out = []

    def record(op: str, direction: str, variant: str, fn, *args, error=None):
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        stats = timing_summary(time_calls(lambda: jitted(*args), 2, iters))
        moved = BYTES_PER_ELEMENT[(op, direction)] * elements
        row = {"shape": name, "batch": batch, "length": length, "width": width, "op": op,
               "direction": direction, "variant": variant, **stats,
               "tb_per_s": moved / (stats["ms_median"] * 1e-3) / 1e12}
        if error is not None:
            row["max_abs_error_vs_reference"] = error
        rows_out.append(row)
        print(f"  {name:<18} {op:<7} {direction:<9} {variant:<16} {stats['ms_median']:8.3f} ms"
              f"  {row['tb_per_s']:5.2f} TB/s of {bandwidth}"
              + (f"  err {error:.2e}" if error is not None else ""), flush=True)

    ln_ref = lambda x, s, b: adaln.reference_layer_norm_modulate(x, s, b, **norm)  # noqa: E731
    add_ref = lambda x, r, g, s, b: adaln.reference_add_layer_norm_modulate(  # noqa: E731
        x, r, g, s, b, **norm)
    record("ln", "forward", "xla", ln_ref, x, scale, shift)
    record("ln", "backward", "xla", lambda *a: jax.vjp(ln_ref, *a)[1](dh), x, scale, shift)
    record("add_ln", "forward", "xla", add_ref, x, branch, gate, scale, shift)
    record("add_ln", "backward", "xla", lambda *a: jax.vjp(add_ref, *a)[1]((dx_out, dh)),
           x, branch, gate, scale, shift)
    h_ref = ln_ref(x, scale, shift).astype(jnp.float32)
    x_ref, h2_ref = add_ref(x, branch, gate, scale, shift)
    _, dbranch_ref, *_ = jax.vjp(add_ref, x, branch, gate, scale, shift)[1]((dx_out, dh))
    variants = {f"pallas_w{warps}": (
        functools.partial(adaln.forward, interpret=interpret, num_warps=warps),
        functools.partial(adaln.backward, interpret=interpret, num_warps=warps))
        for warps in num_warps}
    if mosaic:
        from hmar_jax.pallas import adaln_mosaic_gpu

        on_gpu = jax.default_backend() == "gpu"
        variants["mosaic_gpu" if on_gpu else "mosaic_interpret"] = (
            functools.partial(adaln_mosaic_gpu.forward, interpret=not on_gpu),
            functools.partial(adaln_mosaic_gpu.backward, interpret=not on_gpu))
    for variant, (forward, backward) in variants.items():
        def ln_fwd(x, s, b, forward=forward):
            return forward(x, None, None, s, b, **norm)

        def add_fwd(x, r, g, s, b, forward=forward):
            return forward(x, r, g, s, b, **norm)

        _, h, mean, rstd = jax.jit(ln_fwd)(x, scale, shift)
        error = float(jnp.max(jnp.abs(h.astype(jnp.float32) - h_ref)))
        record("ln", "forward", variant, ln_fwd, x, scale, shift, error=error)
        record("ln", "backward", variant, lambda *a, backward=backward: backward(*a, None),
               x, None, None, scale, mean, rstd, dh)
        x2, h2, mean2, rstd2 = jax.jit(add_fwd)(x, branch, gate, scale, shift)
        error = float(max(jnp.max(jnp.abs(x2 - x_ref)),
                          jnp.max(jnp.abs(h2.astype(jnp.float32) - h2_ref.astype(jnp.float32)))))
        record("add_ln", "forward", variant, add_fwd, x, branch, gate, scale, shift,
               error=error)
        dbranch = jax.jit(backward)(x, branch, gate, scale, mean2, rstd2, dh, dx_out)[1]
        error = float(jnp.max(jnp.abs(dbranch.astype(jnp.float32)
                                      - dbranch_ref.astype(jnp.float32))))
        record("add_ln", "backward", variant, backward, x, branch, gate, scale, mean2,
               rstd2, dh, dx_out, error=error)
    return rows_out


def add_arguments(parser: argparse.ArgumentParser) -> list[str]:
    parser.add_argument("--mosaic", action="store_true",
                        help="also the Mosaic GPU kernels (Hopper; its interpreter on CPU)")
    return ["mosaic"]


if __name__ == "__main__":
    elementwise_benchmark_main("adaln", __doc__, SHAPES, QUICK_SHAPES, measure, add_arguments)
