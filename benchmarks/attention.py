"""Attention benchmark: the block-sparse Pallas kernels vs the jnp reference vs JAX's cuDNN
attention with a dense mask (GPU).

Times the forward and forward+backward of each implementation in the same run (median of
7 samples, each the mean of 10 calls dispatched back to back), checks each against a
float32 reference (relative Frobenius error ``err_*`` and largest element error over the
largest reference element ``maxerr_*``), and states the memory-traffic floor of every
shape (each input read once, each output written once, at the GPU's HBM bandwidth) and the
achieved useful TFLOP/s (``tflops_*``) and share of that floor (``hbm_fraction_*``).

  python benchmarks/attention.py --out attention.json
  python benchmarks/attention.py --shapes 32x30x680 --patterns block_diagonal --dtypes bfloat16
  python benchmarks/attention.py --quick --out /tmp/attention_quick.json   # CPU smoke run

Implementations (``--impl``): ``reference_xla``, ``pallas`` (the kernel the execution
config resolves for ``attention=pallas``: the Triton-lowered one on a GPU, interpret mode on
CPU), ``pallas_mosaic`` (the Mosaic GPU kernel, Hopper; Mosaic GPU's interpreter on CPU)
and ``cudnn_dense_mask`` (GPU). The default is every one but ``pallas_mosaic``.
``--mosaic-tiles`` times the Mosaic kernel once per step-size/depth setting.

``--check`` compares the kernels (``--impl pallas pallas_mosaic``) with the float32
reference instead of timing them: output, log-sum-exp, dQ, dK and dV, for both masks, the
256 and 512 px scale lists and odd batch and head counts, bf16 and fp16; it exits non-zero
if any value is off by more than its tolerance. The GPU check of the Mosaic kernel:

  python benchmarks/attention.py --check --impl pallas pallas_mosaic
  python benchmarks/attention.py --shapes 32x30x680 16x24x2240 --dtypes bfloat16 \
      --impl pallas pallas_mosaic

Tile sizes are the defaults of ``hmar_jax.pallas.ops.KernelTiles`` (tuned with
``benchmarks/tune_attention.py``) and of ``hmar_jax.pallas.kernel_mosaic_gpu.MosaicTiles``.

Shapes are ``BxHxL`` with head dim 64; L = 680 / 2240 / 9451 select the 256 / 512 / 1024 px
scale lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import kernel_implementation, standalone_header, time_calls  # noqa: E402
from hmar_jax.pallas import block_sparse, kernel_gpu, kernel_mosaic_gpu, ops  # noqa: E402
from hmar_jax.pallas.reference import reference_attention  # noqa: E402
from hmar_jax.scales import PATCH_NUMS, ScaleLayout  # noqa: E402

DEFAULT_SHAPES = ("32x30x680", "64x16x680", "4x30x680", "16x24x2240", "4x30x2240")
QUICK = dict(shapes=["1x2x680"], patterns=["block_diagonal"], dtypes=["float32"])
QUICK_TIMING = dict(repeats=1, inner=1)
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
HEAD_DIM = 64
SM_SCALE = 0.5
IMPLS = ("reference_xla", "pallas", "pallas_mosaic", "cudnn_dense_mask")
DEFAULT_IMPLS = ("reference_xla", "pallas", "cudnn_dense_mask")
# --check: (B, H) per sequence length (odd counts) and the largest error allowed, relative to
# the largest reference element (the log-sum-exp: absolute, in nats).
CHECK_SHAPES = {680: (3, 5), 2240: (1, 3)}
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 2e-2}
CHECK_LSE_TOLERANCE = 1e-3


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


def mask_tflop(b: int, h: int, allowed_pairs: int) -> tuple[float, float]:
    """Useful TFLOP of the forward and of forward+backward: the two matmuls over the allowed
    (query, key) pairs only, and the backward counted as 2.5 forwards (its five matmuls),
    the convention of flash-attention kernels' TFLOP/s."""
    forward = 4 * b * h * allowed_pairs * HEAD_DIM / 1e12
    return forward, 3.5 * forward


def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def max_error(x, ref) -> float:
    """Largest element error over the largest reference element."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def mosaic_implementation() -> str:
    """``mosaic_gpu`` on a GPU, Mosaic GPU's interpreter elsewhere."""
    return "mosaic_gpu" if jax.default_backend() == "gpu" else "mosaic_interpret"


def parse_mosaic_tiles(text: str) -> kernel_mosaic_gpu.MosaicTiles:
    """``"FWD_BLOCK,FWD_STAGES,DKDV_BLOCK,DKDV_STAGES,DQ_BLOCK,DQ_STAGES"`` -> tiles."""
    values = [int(x) for x in text.split(",")]
    if len(values) != 6:
        raise argparse.ArgumentTypeError(f"--mosaic-tiles takes 6 integers, got {text!r}")
    launches = [kernel_mosaic_gpu.MosaicLaunch(*values[i:i + 2]) for i in (0, 2, 4)]
    return kernel_mosaic_gpu.MosaicTiles(*launches)


def make_impls(pattern: str, patch_nums, mask, names=DEFAULT_IMPLS, mosaic_tiles=None):
    implementation = kernel_implementation("attention")
    spec = ops.AttentionSpec(pattern, patch_nums, implementation)
    impls = {"reference_xla": lambda q, k, v: reference_attention(q, k, v, mask, sm_scale=SM_SCALE),
             "pallas": lambda q, k, v: ops.attention(q, k, v, spec, sm_scale=SM_SCALE)}
    for tiles in mosaic_tiles or [kernel_mosaic_gpu.MosaicTiles()]:
        mosaic = ops.AttentionSpec(pattern, patch_nums, mosaic_implementation(),
                                   mosaic_tiles=tiles)
        name = "pallas_mosaic" if not mosaic_tiles else "pallas_mosaic[{}]".format(
            ",".join(f"{x.block}/{x.num_stages}" for x in (tiles.forward, tiles.dkdv, tiles.dq)))
        impls[name] = lambda q, k, v, mosaic=mosaic: ops.attention(q, k, v, mosaic,
                                                                   sm_scale=SM_SCALE)
    if implementation == "gpu":
        impls["cudnn_dense_mask"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask[None, None], scale=SM_SCALE, implementation="cudnn")
    return {name: fn for name, fn in impls.items() if name.split("[")[0] in names}


def run(args) -> list[dict]:
    device = jax.devices()[0]
    kind = device.device_kind
    bandwidth = next((bw for name, bw in HBM_BYTES_PER_S.items() if name in kind), 4.8e12)
    tiles = ops.KernelTiles().forward
    mosaic_block = kernel_mosaic_gpu.MosaicTiles().forward.block
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
            mosaic_steps = kernel_mosaic_gpu.visited_steps(row_start, row_end, mosaic_block)
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
                fwd_tflop, fb_tflop = mask_tflop(b, h, int(np.asarray(mask).sum()))
                for name, impl in make_impls(pattern, patch_nums, mask, args.impl,
                                             args.mosaic_tiles).items():
                    fwd = jax.jit(impl)
                    fwd_bwd = jax.jit(lambda q, k, v, do, impl=impl: jax.vjp(impl, q, k, v)[1](do))
                    record = {"shape": shape, "B": b, "H": h, "L": length, "pattern": pattern,
                              "dtype": dtype_name, "impl": name, "gpu": kind,
                              "floor_fwd_ms": fwd_floor, "floor_fwd_bwd_ms": fb_floor,
                              "tiles_visited_fwd": visited, "tiles_total": all_tiles,
                              "mosaic_steps_fwd": mosaic_steps}
                    try:
                        out = fwd(q, k, v)
                        grads = fwd_bwd(q, k, v, do)
                        record["err_out"] = relative_error(out, ref_out)
                        record["err_dq"], record["err_dk"], record["err_dv"] = (
                            relative_error(g, r) for g, r in zip(grads, ref_grads))
                        for key, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                  (ref_out, *ref_grads)):
                            record[f"maxerr_{key}"] = max_error(got, want)
                        record["fwd_ms"] = time_ms(fwd, q, k, v, **timing)
                        record["fwd_bwd_ms"] = time_ms(fwd_bwd, q, k, v, do, **timing)
                        # achieved rates: useful TFLOP/s, and the traffic floor's share of
                        # the time (the fraction of HBM bandwidth a minimal-traffic kernel uses)
                        record["tflops_fwd"] = fwd_tflop / record["fwd_ms"] * 1e3
                        record["tflops_fwd_bwd"] = fb_tflop / record["fwd_bwd_ms"] * 1e3
                        record["hbm_fraction_fwd"] = fwd_floor / record["fwd_ms"]
                        record["hbm_fraction_fwd_bwd"] = fb_floor / record["fwd_bwd_ms"]
                    except Exception as err:  # noqa: BLE001 - a failing variant is reported, not fatal
                        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    rows.append(record)
                    print_row(record, flush=True)
                    if args.out:  # rewritten after every row: a cut-off run keeps its numbers
                        write_json(args, rows)
    return rows


def _kernel_values(name: str, q, k, v, do, ranges, block: int):
    """``(o, lse, dq, dk, dv)`` of one kernel module called directly (``--check``)."""
    row_start, row_end, col_start, col_end = ranges
    if name == "pallas_mosaic":
        module, interpret = kernel_mosaic_gpu, mosaic_implementation() == "mosaic_interpret"
        kwargs = dict(block=block)
    else:
        module, interpret = kernel_gpu, kernel_implementation("attention") == "interpret"
        kwargs = {}
    kwargs |= dict(sm_scale=SM_SCALE, interpret=interpret)
    o, lse = module.forward(q, k, v, row_start, row_end, **kwargs)
    delta = block_sparse.softmax_delta(o, do)
    dk, dv = module.backward_dkdv(q, k, v, do, lse, delta, col_start, col_end, **kwargs)
    dq = module.backward_dq(q, k, v, do, lse, delta, row_start, row_end, **kwargs)
    return o, lse, dq, dk, dv


def check(args) -> list[dict]:
    """``--check``: every kernel of ``--impl`` against the float32 reference (module
    docstring); one row per (kernel, scale list, pattern, dtype, step size)."""
    rows = []
    for length, (b, h) in CHECK_SHAPES.items():
        layout = ScaleLayout(patch_nums_for(length))
        for pattern in args.patterns:
            mask = jnp.asarray(layout.attention_mask(pattern))
            ranges = (*layout.key_ranges(pattern), *layout.query_ranges(pattern))
            for dtype_name in args.dtypes:
                dtype = jnp.dtype(dtype_name)
                keys = jax.random.split(jax.random.key(length + len(pattern) + dtype.itemsize), 4)
                q, k, v, do = [jax.random.normal(key, (b, length, h, HEAD_DIM)).astype(dtype)
                               for key in keys]
                f32 = [a.astype(jnp.float32) for a in (q, k, v)]
                ref_out, vjp = jax.vjp(
                    lambda *x: reference_attention(*x, mask, sm_scale=SM_SCALE), *f32)
                logits = jnp.einsum("bqnk,bsnk->bnqs", *f32[:2],
                                    precision="highest") * SM_SCALE
                ref_lse = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
                want = (ref_out, ref_lse, *vjp(do.astype(jnp.float32)))
                for name in args.impl:
                    if name not in ("pallas", "pallas_mosaic"):
                        continue
                    for block in (args.check_blocks if name == "pallas_mosaic" else [0]):
                        record = {"impl": name, "L": length, "B": b, "H": h, "pattern": pattern,
                                  "dtype": dtype_name, "block": block}
                        try:
                            got = jax.jit(functools.partial(_kernel_values, name, ranges=ranges,
                                                            block=block))(q, k, v, do)
                            tol = CHECK_TOLERANCE[dtype_name]
                            for key, g, w in zip(("o", "lse", "dq", "dk", "dv"), got, want):
                                g = np.asarray(g, np.float32)
                                record[f"finite_{key}"] = bool(np.isfinite(g).all())
                                record[f"maxerr_{key}"] = (
                                    float(np.abs(g - np.asarray(w)).max()) if key == "lse"
                                    else max_error(g, w))
                            record["ok"] = all(record[f"finite_{key}"] for key in "o lse dq dk dv"
                                               .split()) and record["maxerr_lse"] <= \
                                CHECK_LSE_TOLERANCE and all(record[f"maxerr_{key}"] <= tol
                                                            for key in ("o", "dq", "dk", "dv"))
                        except Exception as err:  # noqa: BLE001 - reported, then the run fails
                            record["ok"] = False
                            record["error"] = f"{type(err).__name__}: {err}"[:400]
                        rows.append(record)
                        print_check_row(record, flush=True)
    return rows


def print_check_row(r: dict, flush: bool = False) -> None:
    head = (f"{r['impl']:>14} block {r['block']:>3} L {r['L']:>4} B{r['B']} H{r['H']} "
            f"{r['pattern']:>14} {r['dtype']:>8}")
    if "error" in r:
        print(f"{head}  FAIL {r['error']}", flush=flush)
        return
    errors = "  ".join(f"{key} {r[f'maxerr_{key}']:.1e}" for key in ("o", "lse", "dq", "dk", "dv"))
    print(f"{head}  {'ok  ' if r['ok'] else 'FAIL'} max errors: {errors}", flush=flush)


def write_json(args, rows: list[dict]) -> None:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = standalone_header("attention", args) | {
        "head_dim": HEAD_DIM, "sm_scale": SM_SCALE,
        "tiles": dataclasses.asdict(ops.KernelTiles()),
        "mosaic_tiles": dataclasses.asdict(kernel_mosaic_gpu.MosaicTiles()), "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=str))


def print_row(r: dict, flush: bool = False) -> None:
    if "error" in r:
        print(f"{r['shape']:>11} {r['pattern']:>14} {r['dtype']:>8} {r['impl']:>28}  ERROR {r['error']}",
              flush=flush)
        return
    print(f"{r['shape']:>11} {r['pattern']:>14} {r['dtype']:>8} {r['impl']:>28} "
          f"fwd {r['fwd_ms']:7.3f} ms  fwd+bwd {r['fwd_bwd_ms']:7.3f} ms  "
          f"(floor {r['floor_fwd_ms']:.3f}/{r['floor_fwd_bwd_ms']:.3f}; "
          f"{r['tflops_fwd']:.0f}/{r['tflops_fwd_bwd']:.0f} TFLOP/s)  "
          f"err o {r['err_out']:.1e} dq {r['err_dq']:.1e} dk {r['err_dk']:.1e} dv {r['err_dv']:.1e}",
          flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    parser.add_argument("--patterns", nargs="+", default=["block_diagonal", "block_causal"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--impl", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS,
                        help="implementations to time (--check: the kernels to check)")
    parser.add_argument("--mosaic-tiles", nargs="+", type=parse_mosaic_tiles, default=None,
                        metavar="FB,FS,KB,KS,QB,QS",
                        help="Mosaic kernel step sizes and pipeline depths (forward, dK/dV, "
                             "dQ), one timed row each")
    parser.add_argument("--check", action="store_true",
                        help="check the kernels against the reference instead of timing")
    parser.add_argument("--check-blocks", nargs="+", type=int, default=[64, 128],
                        help="--check: the Mosaic kernel's step sizes")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape, one timed call (CPU: interpret mode)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.check:
        if args.dtypes == ["float32"] or "float32" in args.dtypes:
            parser.error("--check runs the half-precision kernels: --dtypes bfloat16 float16")
        rows = check(args)
        if args.out:
            write_json(args, rows)
        failed = [r for r in rows if not r["ok"]]
        print(f"\ncheck: {len(rows) - len(failed)} of {len(rows)} ok")
        sys.exit(1 if failed or not rows else 0)
    rows = run(args)
    print("\nsummary (ms): shape pattern dtype impl fwd fwd+bwd")
    for r in rows:
        if "fwd_ms" in r:
            print(f"{r['shape']} {r['pattern']} {r['dtype']} {r['impl']} {r['fwd_ms']:.3f} "
                  f"{r['fwd_bwd_ms']:.3f}")


if __name__ == "__main__":
    main()
