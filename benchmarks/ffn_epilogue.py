"""Does XLA fuse the FFN's bias + GELU into the cuBLASLt matmul epilogue? (GPU)

Times fc1 (+ bias + tanh-GELU) and the whole FFN at the d30 sampler's 16x16 shape
(``[128 x 256, 1920] x [1920, 7680]``, bf16) in several formulations (3-D dot as
``nnx.Linear`` writes it, 2-D dot, ``jax.nn.gelu`` vs the explicit tanh form, float32
output) and their gradients, and reads the ``epilogue`` the compiled HLO's cuBLASLt
calls carry. Run it under different ``XLA_FLAGS`` to compare.

  python benchmarks/ffn_epilogue.py --out benchmarks/results/ffn_epilogue_h200.json
"""
import argparse
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default=None, help="JSON file for the results")
args = parser.parse_args()

bf16, f32 = jnp.bfloat16, jnp.float32
M, C, H = 32768, 1920, 7680
B = 128
k = jax.random.split(jax.random.key(0), 5)
x = jax.random.normal(k[0], (M, C), bf16)
w1 = (jax.random.normal(k[1], (C, H), f32) * 0.02)
b1 = jax.random.normal(k[2], (H,), f32) * 0.1
w2 = (jax.random.normal(k[3], (H, C), f32) * 0.02)
b2 = jax.random.normal(k[4], (C,), f32) * 0.1

def manual_gelu(y):
    return 0.5 * y * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y * y * y)))

def flax3d(x, w1, b1):
    x3 = x.reshape(B, -1, C)
    y = jax.lax.dot_general(x3, w1.astype(bf16), (((2,), (0,)), ((), ())))
    y = y + b1.astype(bf16).reshape(1, 1, H)
    return jax.nn.gelu(y, approximate=True)

def flat_jaxgelu(x, w1, b1):
    return jax.nn.gelu(x @ w1.astype(bf16) + b1.astype(bf16), approximate=True)

def flat_manual(x, w1, b1):
    return manual_gelu(x @ w1.astype(bf16) + b1.astype(bf16))

def flat_bias_only(x, w1, b1):
    return x @ w1.astype(bf16) + b1.astype(bf16)

def flat_gelu_nobias(x, w1, b1):
    return jax.nn.gelu(x @ w1.astype(bf16), approximate=True)

def flat_f32(x, w1, b1):
    y = jnp.dot(x, w1.astype(bf16), preferred_element_type=f32) + b1
    return jax.nn.gelu(y, approximate=True).astype(bf16)

def matmul_only(x, w1, b1):
    return x @ w1.astype(bf16)

def ffn3d(x, w1, b1):
    h = flax3d(x, w1, b1)
    return (h @ w2.astype(bf16) + b2.astype(bf16).reshape(1, 1, C))

def ffn_flat(x, w1, b1):
    h = flat_jaxgelu(x, w1, b1)
    return h @ w2.astype(bf16) + b2.astype(bf16)

variants = dict(flax3d=flax3d, flat_jaxgelu=flat_jaxgelu, flat_manual=flat_manual,
                flat_bias_only=flat_bias_only, flat_gelu_nobias=flat_gelu_nobias,
                flat_f32=flat_f32, matmul_only=matmul_only, ffn3d=ffn3d, ffn_flat=ffn_flat)

def grad_of(fn):
    def loss(x, w1, b1):
        return jnp.sum(fn(x, w1, b1).astype(f32) * 1e-3)
    return jax.grad(loss, argnums=(0, 1, 2))

for name in list(variants):
    if name in ("flax3d", "flat_jaxgelu", "flat_manual", "flat_f32", "ffn3d", "ffn_flat"):
        variants["grad_" + name] = grad_of(variants[name])

def bench(fn, iters=20):
    jitted = jax.jit(fn)
    compiled = jitted.lower(x, w1, b1).compile()
    text = compiled.as_text()
    epilogues = sorted(set(re.findall(r'"epilogue":"(\w+)"', text)))
    n_fusions = len(re.findall(r"^\s*(?:ROOT )?%?\S+ = \S+ fusion\(", text, re.M))
    out = compiled(x, w1, b1); jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t = time.perf_counter(); jax.block_until_ready(compiled(x, w1, b1)); ts.append(time.perf_counter() - t)
    ts.sort()
    return {"ms": 1e3 * ts[len(ts) // 2], "epilogues": epilogues, "fusions": n_fusions}

ref = jax.jit(flax3d)(x, w1, b1).astype(f32).reshape(M, H)
rows = {}
for name, fn in variants.items():
    try:
        r = bench(fn)
        if not name.startswith(("grad_", "ffn", "matmul", "flat_bias", "flat_gelu_nobias")):
            r["max_abs_diff_vs_flax3d"] = float(jnp.max(jnp.abs(jax.jit(fn)(x, w1, b1).astype(f32).reshape(M, H) - ref)))
    except Exception as e:  # noqa: BLE001 (a failing variant becomes a row)
        r = {"error": repr(e)[:300]}
    rows[name] = r
    print(f"{name:24s} {r}", flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, f, indent=1)
