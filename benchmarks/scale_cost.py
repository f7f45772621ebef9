"""Where the sampler's time goes, scale by scale (a diagnostic of ``sample.py``).

Times each pass of the Markov sampler alone, jitted on its own, with random weights:
the next-scale forward of every scale k (``forward_scale(k, ...)`` on ``[cond; uncond]``,
2B rows), the mask-branch forward of the scales the default schedule refines, and the
guidance + top-k/top-p filter of each scale's logits. Each row also gives the two floors of
that pass on the GPU: its matmul FLOPs at ``--peak-tflops`` and one read of the weights
it touches at ``--bandwidth``. A pass far above both floors is paying fixed costs
(launches, slicing the stacked weights); the sum over the schedule is compared with the
whole compiled sampler in ``sample.py``. The model runs as ``sample.py`` runs it: the
execution config's defaults resolved for the platform, or each ``--execution`` variant.

  python benchmarks/scale_cost.py --model d30 --batch 64 --execution cast_weights=false \
      --execution cast_weights=true --out benchmarks/results/scale_cost_h200.json
  python benchmarks/scale_cost.py --quick --out /tmp/scale_cost.json       # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_step import (  # noqa: E402
    _time_calls, add_execution_flag, execution_label, init_on_device, standalone_header,
    timing_summary, vae_config)

SAMPLING = dict(cfg=1.7, top_k=1000, top_p=0.99)


def pass_floors(cfg, rows: int, tokens: int, layers: int, peak_tflops: float,
                bandwidth_tbs: float, weight_bytes_each: int) -> dict:
    """Lower bounds of one pass over ``layers`` blocks on ``rows`` sequences of ``tokens``
    with weights of ``weight_bytes_each`` bytes."""
    width, depth_bytes = cfg.width, weight_bytes_each
    block_params = 12 * width * width + 6 * width * width  # attn+ffn, ada_lin
    flops = 2 * rows * tokens * layers * 12 * width * width + 2 * rows * tokens * width * cfg.vocab_size
    weight_bytes = layers * block_params * depth_bytes + width * cfg.vocab_size * depth_bytes
    return {"flops_floor_ms": flops / (peak_tflops * 1e12) * 1e3,
            "weights_floor_ms": weight_bytes / (bandwidth_tbs * 1e12) * 1e3}


def measure(model_name: str, batch: int, execution, iters: int, quick: bool,
            peak_tflops: float, bandwidth_tbs: float) -> list[dict]:
    """The rows of one model built with ``execution`` (resolved)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hmar_jax import sampling
    from hmar_jax.pretrained import cast_matmul_weights, unstack_blocks
    from hmar_jax.sampling import sampler
    from hmar_jax.transformer import HMARTransformer, preset

    vcfg = vae_config(quick)
    overrides = dict(depth=2, width=64, num_heads=2, num_mask_layers=1) if quick else {}
    cfg = preset(model_name, vocab_size=vcfg.vocab_size, latent_channels=vcfg.z_channels,
                 patch_nums=vcfg.patch_nums, **overrides)
    model = init_on_device(lambda: HMARTransformer(cfg, execution, rngs=nnx.Rngs(0)))
    if execution.cast_weights:  # as load_pretrained does
        cast_matmul_weights(model)
    if execution.unstack_blocks:
        unstack_blocks(model)
    weight_bytes_each = jnp.dtype(execution.compute_dtype).itemsize
    graphdef, state = nnx.split(model)
    schedules = sampling.default_mask_schedule(cfg.patch_nums)
    labels = jnp.arange(2 * batch, dtype=jnp.int32) % cfg.num_classes
    key = jax.random.key(0)
    rows = []

    def timed(name: str, fn, *args, **info):
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        first = time.perf_counter() - t0
        times = _time_calls(lambda: jitted(*args), 1, iters)
        row = {"pass": name, "first_call_s": round(first, 2), **info, **timing_summary(times)}
        rows.append(row)
        print(f"  {name:<12} k={info.get('scale', '-'):>2} tokens={info.get('tokens', '-'):>4} "
              f"{row['ms_median']:8.2f} ms  floors: flops {info.get('flops_floor_ms', 0):6.2f} "
              f"weights {info.get('weights_floor_ms', 0):6.2f}", flush=True)

    for k, side in enumerate(cfg.patch_nums):
        tokens = side * side
        x_ns = None if k == 0 else jax.random.normal(key, (2 * batch, tokens, cfg.latent_channels))

        def next_scale(state, labels, x_ns, k=k):
            return nnx.merge(graphdef, state).forward_scale(k, labels, x_ns)

        floors = pass_floors(cfg, 2 * batch, tokens, cfg.depth, peak_tflops, bandwidth_tbs,
                             weight_bytes_each)
        timed("next_scale", next_scale, state, labels, x_ns, scale=k, tokens=tokens, **floors)
        logits = jax.random.normal(key, (2 * batch, tokens, cfg.vocab_size), jnp.float32)

        def guide_filter(logits):
            guided = sampler._guide(logits, SAMPLING["cfg"])
            return sampling.filter_logits(guided, SAMPLING["top_k"], SAMPLING["top_p"])

        timed("filter", guide_filter, logits, scale=k, tokens=tokens)
        refinements = len(schedules[k]) - 1
        if refinements and tokens > 1 and cfg.num_mask_layers:
            masked = jax.random.bernoulli(key, 0.5, (2 * batch, tokens))

            def mask_pass(state, labels, x_ns, masked, k=k):
                return nnx.merge(graphdef, state).forward_scale(k, labels, x_ns, x_mask=x_ns,
                                                                masked=masked)

            timed("mask", mask_pass, state, labels, x_ns, masked, scale=k, tokens=tokens,
                  refinements=refinements, **floors)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="d30")
    parser.add_argument("--batch", type=int, default=64, help="images (the passes run 2B rows)")
    add_execution_flag(parser, "ExecutionConfig()'s defaults, as load_pretrained runs")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak")
    parser.add_argument("--bandwidth", type=float, default=4.8, help="HBM TB/s")
    parser.add_argument("--quick", action="store_true", help="tiny model for a CPU smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch, args.iters = "d16", 2, 2
    import dataclasses

    from hmar_jax.execution import ExecutionConfig

    result = standalone_header("scale_cost", args) | {"runs": []}
    for settings in args.execution or [{}]:
        execution = ExecutionConfig.from_mapping(settings).resolve(inference=True)
        print(f"{args.model} B{args.batch} --execution {execution_label(settings)}", flush=True)
        rows = measure(args.model, args.batch, execution, args.iters, args.quick,
                       args.peak_tflops, args.bandwidth)
        total = sum(r["ms_median"] * r.get("refinements", 1) for r in rows)
        print(f"  schedule total (passes x refinements, filters included): {total:.1f} ms")
        result["runs"].append({"variant": execution_label(settings),
                               "execution": dataclasses.asdict(execution), "rows": rows,
                               "schedule_total_ms": total})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
