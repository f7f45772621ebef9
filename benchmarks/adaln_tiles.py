"""Tiling of the AdaLN backward kernels: rows per tile, tiles per program, warps.

In the H200 profile of the full training step (``results/train_profile_full_attention_saved_d16_h200.json``)
the with-add backward (``add_ln``) takes 0.49 ms per call at d16 B64, 1.6 TB/s of the
bytes it must move, and the two backward kernels together 10.7 ms of the 175 ms step (19.8
of 408 ms at d30 B32). This times both backward kernels for every combination of
``--tile-elements`` (a program's tile, ``[tile_elements / next_pow2(C), next_pow2(C)]``
float32 values), ``--max-sub-blocks`` (tiles per program, so programs per sample) and
``--num-warps``, on the training shapes, each as the mean over ``--calls`` calls
dispatched back to back (one launch is ~0.3 ms, too short to time with a sync each), and
checks each variant's gradients against the default tiling's.

  python benchmarks/adaln_tiles.py --out benchmarks/results/adaln_tiles_h200.json
  python benchmarks/adaln_tiles.py --quick          # CPU smoke run (interpret mode, tiny)
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.adaln import BYTES_PER_ELEMENT, random_inputs  # noqa: E402
from benchmarks.train_step import (  # noqa: E402
    _time_back_to_back, kernel_implementation, parse_list, standalone_header)

SHAPES = (("d16_train_b64", 64, 680, 1024), ("d30_train_b32", 32, 680, 1920))
QUICK_SHAPES = (("quick", 2, 16, 256),)


def measure(name: str, batch: int, length: int, width: int, args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from hmar_jax.pallas import adaln

    x, branch, gate, scale, shift, dh, dx_out = random_inputs(batch, length, width)
    interpret = kernel_implementation("layer_norm") == "interpret"
    _, _, mean, rstd = adaln.forward(x, branch, gate, scale, shift, eps=1e-6,
                                     out_dtype=jnp.bfloat16, interpret=interpret)
    inputs = {"ln": (x, None, None, scale, mean, rstd, dh, None),
              "add_ln": (x, branch, gate, scale, mean, rstd, dh, dx_out)}
    elements = batch * length * width
    rows, default_outputs = [], {}  # op -> the default tiling's gradients
    combos = itertools.product(parse_list(args.tile_elements, int),
                               parse_list(args.max_sub_blocks, int),
                               parse_list(args.num_warps, int))
    default = (adaln.TILE_ELEMENTS, adaln.MAX_SUB_BLOCKS, 4)
    for tile_elements, max_sub, warps in [default, *combos]:
        if not adaln.tiles(length, width, tile_elements):
            continue
        for op, operands in inputs.items():
            fn = jax.jit(lambda *a, t=tile_elements, m=max_sub, w=warps: adaln.backward(
                *a, interpret=interpret, num_warps=w, tile_elements=t, max_sub_blocks=m))
            outs = [o for o in fn(*operands) if o is not None]
            default_outputs.setdefault(op, outs)  # the first combination is the default
            error = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                        for a, b in zip(outs, default_outputs[op]))
            ms = _time_back_to_back(lambda: fn(*operands), args.calls)
            moved = BYTES_PER_ELEMENT[(op, "backward")] * elements
            tile_rows = adaln.tile_rows(width, tile_elements)
            per_program = tile_rows * adaln.sub_blocks(length, width, tile_elements, max_sub)
            row = {"shape": name, "batch": batch, "length": length, "width": width, "op": op,
                   "tile_elements": tile_elements, "max_sub_blocks": max_sub, "num_warps": warps,
                   "rows_per_tile": tile_rows, "programs_per_sample": length // per_program,
                   "ms": ms, "tb_per_s": moved / (ms * 1e-3) / 1e12,
                   "max_abs_difference_vs_default": error}
            rows.append(row)
            print(f"  {name:<14} {op:<7} tile {tile_elements:>5} sub {max_sub:>2} warps {warps:>2}"
                  f" programs/sample {row['programs_per_sample']:>4} {ms:7.3f} ms"
                  f" {row['tb_per_s']:5.2f} TB/s  diff {error:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--tile-elements", default="2048,4096,8192")
    parser.add_argument("--max-sub-blocks", default="1,2,5,10")
    parser.add_argument("--num-warps", default="4,8,16")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tiny shape, interpret mode on CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else [s for s in SHAPES if s[0] in parse_list(args.shapes)]
    if args.quick:
        args.calls, args.tile_elements, args.max_sub_blocks, args.num_warps = 1, "1024", "1,2", "4"
    result = standalone_header("adaln_tiles", args) | {"rows": []}
    for shape in shapes:
        result["rows"] += measure(*shape, args)
    best = {}
    for row in result["rows"]:
        key = (row["shape"], row["op"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    print("\nfastest per shape and op:")
    for (shape, op), row in best.items():
        print(f"  {shape:<14} {op:<7} tile {row['tile_elements']} sub {row['max_sub_blocks']} "
              f"warps {row['num_warps']}: {row['ms']:.3f} ms, {row['tb_per_s']:.2f} TB/s")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
