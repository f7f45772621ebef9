"""Tile sweep for the three GPU attention kernels (forward, dK/dV, dQ), each timed alone.

  python benchmarks/tune_attention.py --shapes 32x30x680 16x24x2240 --out tune.json
  python benchmarks/tune_attention.py --quick --shapes 1x2x680 --patterns block_diagonal \\
      --dtype float32                      # CPU smoke run (interpret mode)

Every variant is checked against the reference before it is timed; the best launch per
kernel, shape and pattern is printed last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.attention import QUICK_TIMING, patch_nums_for, relative_error, time_ms  # noqa: E402
from benchmarks.harness import kernel_implementation  # noqa: E402
from hmar_jax.pallas import block_sparse, kernel_gpu  # noqa: E402
from hmar_jax.pallas.reference import reference_attention  # noqa: E402
from hmar_jax.scales import ScaleLayout  # noqa: E402

FORWARD = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
           (64, 128, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
           (128, 32, 4, 2), (16, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2)]
DKDV = [(64, 64, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2),
        (32, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (64, 64, 8, 2),
        (64, 64, 4, 3), (128, 64, 8, 2)]
DQ = FORWARD
QUICK = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)]


def sweep(shape: str, pattern: str, dtype, quick: bool = False) -> list[dict]:
    b, h, length = map(int, shape.split("x"))
    layout = ScaleLayout(patch_nums_for(length))
    mask = jnp.asarray(layout.attention_mask(pattern))
    row_start, row_end = layout.key_ranges(pattern)
    col_start, col_end = layout.query_ranges(pattern)
    keys = jax.random.split(jax.random.key(length + h), 4)
    q, k, v, do = [(0.5 * jax.random.normal(key, (b, length, h, 64))).astype(dtype) for key in keys]
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    ref_o, vjp = jax.vjp(lambda *x: reference_attention(*x, mask, sm_scale=0.5), *f32)
    ref_dq, ref_dk, ref_dv = vjp(do.astype(jnp.float32))
    interpret = kernel_implementation("attention") == "interpret"  # CPU: the quick check
    o, lse = kernel_gpu.forward(q, k, v, row_start, row_end, sm_scale=0.5, interpret=interpret)
    delta = block_sparse.softmax_delta(o, do)
    rows = []

    def record(kernel, launch, fn, outputs, refs):
        bq, bk, warps, stages = launch
        row = {"shape": shape, "pattern": pattern, "dtype": jnp.dtype(dtype).name,
               "kernel": kernel, "block_q": bq, "block_k": bk, "num_warps": warps,
               "num_stages": stages}
        try:
            got = fn()
            row["error"] = max(relative_error(g, r) for g, r in zip(outputs(got), refs))
            row["ms"] = time_ms(fn, **(QUICK_TIMING if quick else {}))
        except Exception as err:  # noqa: BLE001 - report and continue the sweep
            row["failure"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    for launch in QUICK if quick else FORWARD:
        kw = dict(zip(("block_q", "block_k", "num_warps", "num_stages"), launch),
                  interpret=interpret)
        fn = jax.jit(lambda: kernel_gpu.forward(q, k, v, row_start, row_end, sm_scale=0.5, **kw))
        record("forward", launch, fn, lambda out: out[:1], [ref_o])
    for launch in QUICK if quick else DKDV:
        kw = dict(zip(("block_q", "block_k", "num_warps", "num_stages"), launch),
                  interpret=interpret)
        fn = jax.jit(lambda: kernel_gpu.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end,
                                                      sm_scale=0.5, **kw))
        record("dkdv", launch, fn, lambda out: out, [ref_dk, ref_dv])
    for launch in QUICK if quick else DQ:
        kw = dict(zip(("block_q", "block_k", "num_warps", "num_stages"), launch),
                  interpret=interpret)
        fn = jax.jit(lambda: kernel_gpu.backward_dq(q, k, v, do, lse, delta, row_start, row_end,
                                                    sm_scale=0.5, **kw))
        record("dq", launch, fn, lambda out: [out], [ref_dq])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["32x30x680", "16x24x2240"])
    parser.add_argument("--patterns", nargs="+", default=["block_diagonal", "block_causal"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true",
                        help="five launches per kernel, each timed once")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        for pattern in args.patterns:
            rows += sweep(shape, pattern, jnp.dtype(args.dtype), args.quick)
    print("\nbest per kernel:")
    for key in sorted({(r["shape"], r["pattern"], r["kernel"]) for r in rows}):
        ok = [r for r in rows if (r["shape"], r["pattern"], r["kernel"]) == key and "ms" in r
              and r["error"] < 2e-2]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"{key[0]:>11} {key[1]:>14} {key[2]:>8}: {best['ms']:.3f} ms "
                  f"({best['block_q']},{best['block_k']},{best['num_warps']},{best['num_stages']})"
                  f"  err {best['error']:.1e}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
