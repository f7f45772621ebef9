"""3x3 convolution rate of the tokenizer decoder's largest layers (GPU).

Times ``lax.conv_general_dilated`` at the decoder's 256x256 resolution (batch 64 by
default, ``CB`` overrides) for 160 channels and, for comparison, 128/192/256 channels,
NCHW, float32 and the 3-channel output conv; prints TFLOP/s per shape.

  python benchmarks/conv_rate.py --out benchmarks/results/conv_rate_h200.json
"""
import argparse
import json
import os
import re
import time

import jax
import jax.numpy as jnp

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default=None, help="JSON file for the results")
args = parser.parse_args()

def bench(fn, *args, iters=10):
    c = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(c(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); jax.block_until_ready(c(*args)); ts.append(time.perf_counter() - t)
    ts.sort()
    return 1e3 * ts[len(ts) // 2], c.as_text()

rows = {}
B, S = int(os.environ.get("CB", 64)), 256
for cin, cout, dt, layout in [(160, 160, "bf16", "NHWC"), (192, 192, "bf16", "NHWC"), (256, 256, "bf16", "NHWC"),
                              (128, 128, "bf16", "NHWC"), (160, 160, "bf16", "NCHW"), (160, 160, "f32", "NHWC"),
                              (160, 3, "bf16", "NHWC"), (160, 8, "bf16", "NHWC")]:
    dtype = jnp.bfloat16 if dt == "bf16" else jnp.float32
    k = jax.random.split(jax.random.key(0))
    if layout == "NHWC":
        x = jax.random.normal(k[0], (B, S, S, cin), dtype); dn = ("NHWC", "HWIO", "NHWC")
    else:
        x = jax.random.normal(k[0], (B, cin, S, S), dtype); dn = ("NCHW", "OIHW", "NCHW")
    w = jax.random.normal(k[1], (3, 3, cin, cout) if layout == "NHWC" else (cout, cin, 3, 3), dtype) * 0.05
    fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
    try:
        ms, text = bench(fn, x, w)
        flop = 2 * B * S * S * cin * cout * 9
        name = f"{cin}->{cout} {dt} {layout}"
        rows[name] = {"ms": ms, "tflops": flop / ms / 1e9,
                      "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))}
    except Exception as e:  # noqa: BLE001 (a failing shape becomes a row)
        rows[f"{cin}->{cout} {dt} {layout}"] = {"error": repr(e)[:200]}
    print(list(rows.items())[-1], flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "rows": rows}, f, indent=1)
