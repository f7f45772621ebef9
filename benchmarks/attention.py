"""Attention benchmark: the block-sparse Pallas kernel vs the jnp reference vs JAX's cuDNN
attention with a dense mask (GPU).

Times the forward and forward+backward of each implementation in the same run (median of
7 samples, each the mean of 10 calls dispatched back to back), checks each against a
float32 reference, and states the memory-traffic floor of every shape (each input read
once, each output written once, at the GPU's HBM bandwidth).

  python benchmarks/attention.py --out attention.json
  python benchmarks/attention.py --shapes 32x30x680 --patterns block_diagonal --dtypes bfloat16
  python benchmarks/attention.py --quick --out /tmp/attention_quick.json   # CPU smoke run

The kernel runs as the execution config resolves ``attention=pallas``: compiled on a GPU,
in interpret mode on CPU.

Tile sizes are the defaults of ``hmar_jax.pallas.ops.KernelTiles`` (tuned with
``benchmarks/tune_attention.py``).

Shapes are ``BxHxL`` with head dim 64; L = 680 / 2240 / 9451 select the 256 / 512 / 1024 px
scale lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import kernel_implementation, standalone_header, time_calls  # noqa: E402
from hmar_jax.pallas import kernel_gpu, ops  # noqa: E402
from hmar_jax.pallas.reference import reference_attention  # noqa: E402
from hmar_jax.scales import PATCH_NUMS, ScaleLayout  # noqa: E402

DEFAULT_SHAPES = ("32x30x680", "64x16x680", "4x30x680", "16x24x2240", "4x30x2240")
QUICK = dict(shapes=["1x2x680"], patterns=["block_diagonal"], dtypes=["float32"])
QUICK_TIMING = dict(repeats=1, inner=1)
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
HEAD_DIM = 64
SM_SCALE = 0.5


def patch_nums_for(length: int) -> tuple[int, ...]:
    for patch_nums in PATCH_NUMS.values():
        if ScaleLayout(patch_nums).seq_len == length:
            return patch_nums
    raise ValueError(f"No scale list has L = {length}.")


def time_ms(fn, *args, repeats: int = 7, inner: int = 10) -> float:
    """Median ms per call of ``fn(*args)``: ``repeats`` samples of ``inner`` calls back to
    back (a kernel of a few hundred microseconds is too short to time with a sync each)."""
    return statistics.median(time_calls(lambda: fn(*args), 3, repeats, inner))


def traffic_floor_ms(b: int, h: int, length: int, itemsize: int, bandwidth: float) -> tuple[float, float]:
    """Forward and forward+backward HBM floors: q,k,v read + o, lse written; backward reads
    q, k, v, o, do, lse and writes dq, dk, dv."""
    tensor = b * h * length * HEAD_DIM * itemsize
    stats = b * h * length * 4
    forward = 4 * tensor + stats
    backward = 5 * tensor + stats + 3 * tensor
    return forward / bandwidth * 1e3, (forward + backward) / bandwidth * 1e3


def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_impls(pattern: str, patch_nums, mask):
    implementation = kernel_implementation("attention")
    spec = ops.AttentionSpec(pattern, patch_nums, implementation)
    impls = {"reference_xla": lambda q, k, v: reference_attention(q, k, v, mask, sm_scale=SM_SCALE),
             "pallas": lambda q, k, v: ops.attention(q, k, v, spec, sm_scale=SM_SCALE)}
    if implementation == "gpu":
        impls["cudnn_dense_mask"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask[None, None], scale=SM_SCALE, implementation="cudnn")
    return impls


def run(args) -> list[dict]:
    device = jax.devices()[0]
    kind = device.device_kind
    bandwidth = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), 4.8e12)
    tiles = ops.KernelTiles().forward
    timing = QUICK_TIMING if args.quick else {}
    rows = []
    for shape in args.shapes:
        b, h, length = map(int, shape.split("x"))
        patch_nums = patch_nums_for(length)
        for pattern in args.patterns:
            layout = ScaleLayout(patch_nums)
            mask = jnp.asarray(layout.attention_mask(pattern))
            row_start, row_end = layout.key_ranges(pattern)
            visited = kernel_gpu.visited_tiles(row_start, row_end, tiles.block_q, tiles.block_k)
            all_tiles = -(-length // tiles.block_q) * -(-length // tiles.block_k)
            for dtype_name in args.dtypes:
                dtype = jnp.dtype(dtype_name)
                keys = jax.random.split(jax.random.key(b * 1000 + h + length), 4)
                q, k, v, do = [(0.5 * jax.random.normal(key, (b, length, h, HEAD_DIM))).astype(dtype)
                               for key in keys]
                ref_fn = jax.jit(lambda q, k, v, do: jax.vjp(
                    lambda *x: reference_attention(*x, mask, sm_scale=SM_SCALE),
                    *(a.astype(jnp.float32) for a in (q, k, v)))[1](do.astype(jnp.float32)))
                ref_out = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), mask, sm_scale=SM_SCALE)
                ref_grads = ref_fn(q, k, v, do)
                fwd_floor, fb_floor = traffic_floor_ms(b, h, length, dtype.itemsize, bandwidth)
                for name, impl in make_impls(pattern, patch_nums, mask).items():
                    fwd = jax.jit(impl)
                    fwd_bwd = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(impl, q, k, v)[1](do))
                    record = {"shape": shape, "B": b, "H": h, "L": length, "pattern": pattern,
                              "dtype": dtype_name, "impl": name, "gpu": kind,
                              "floor_fwd_ms": fwd_floor, "floor_fwd_bwd_ms": fb_floor,
                              "tiles_visited_fwd": visited, "tiles_total": all_tiles}
                    try:
                        out = fwd(q, k, v)
                        grads = fwd_bwd(q, k, v, do)
                        record["err_out"] = relative_error(out, ref_out)
                        record["err_dq"], record["err_dk"], record["err_dv"] = (
                            relative_error(g, r) for g, r in zip(grads, ref_grads))
                        record["fwd_ms"] = time_ms(fwd, q, k, v, **timing)
                        record["fwd_bwd_ms"] = time_ms(fwd_bwd, q, k, v, do, **timing)
                    except Exception as err:  # noqa: BLE001 - a failing variant is reported, not fatal
                        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    rows.append(record)
                    print_row(record, flush=True)
                    if args.out:  # rewritten after every row: a cut-off run keeps its numbers
                        write_json(args, rows)
    return rows


def write_json(args, rows: list[dict]) -> None:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = standalone_header("attention", args) | {
        "head_dim": HEAD_DIM, "sm_scale": SM_SCALE,
        "tiles": dataclasses.asdict(ops.KernelTiles()), "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=str))


def print_row(r: dict, flush: bool = False) -> None:
    if "error" in r:
        print(f"{r['shape']:>11} {r['pattern']:>14} {r['dtype']:>8} {r['impl']:>28}  ERROR {r['error']}",
              flush=flush)
        return
    print(f"{r['shape']:>11} {r['pattern']:>14} {r['dtype']:>8} {r['impl']:>28} "
          f"fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwd_bwd_ms']:7.3f} ms  "
          f"(floor {r['floor_fwd_ms']:.3f}/{r['floor_fwd_bwd_ms']:.3f})  "
          f"err o {r['err_out']:.1e} dq {r['err_dq']:.1e} dk {r['err_dk']:.1e} dv {r['err_dv']:.1e}",
          flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--patterns", nargs="+", default=["block_diagonal", "block_causal"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true",
                        help="one small shape, one timed call (CPU: interpret mode)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    rows = run(args)
    print("\nsummary (ms): shape pattern dtype impl fwd fwd+bwd")
    for r in rows:
        if "fwd_ms" in r:
            print(f"{r['shape']} {r['pattern']} {r['dtype']} {r['impl']} {r['fwd_ms']:.3f} "
                  f"{r['fwd_bwd_ms']:.3f}")


if __name__ == "__main__":
    main()
