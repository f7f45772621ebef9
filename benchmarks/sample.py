"""Sampling benchmark: wall time per batch at 256 px with random weights.

``hmar_jax.sampling.generate_compiled`` with ``SamplingConfig(cfg=1.7, top_k=1000,
top_p=0.99)`` (the hmar-d16/d30 preset) on the ch=160 VQ-VAE (``VQVAEConfig()``) and a
randomly initialised d16/d30 transformer. Modes:

* ``markov_refine``: ``mask_schedule="auto"``, the default 14-pass schedule (next-scale
  proposals, masked refinement of the 2x2 and 3x3 scales);
* ``markov``: ``mask_schedule=None``, 10 next-scale passes;
* ``var``: a model built with ``attention_pattern="block_causal"`` (VAR, no mask branch),
  sampled the same way (the sampler runs it with a KV cache; a ``NotImplementedError``
  is recorded in the row);
* ``decode``: the tokenizer decode alone, ``vae.decode_latent`` on a random
  ``f_hat [B, 16, 16, 32]``, jitted, at the execution's ``tokenizer_precision``;
* ``accuracy``: bf16 vs float32 sampling of the same weights, labels and seeds (d16 B8 by
  default; see below).

The model and tokenizer run as ``pretrained.load_pretrained`` runs them: with the
execution config ``ExecutionConfig()`` resolved for the platform, the transformer's
matmul weights stored in the compute dtype (``execution.cast_weights``). Each
``--execution KEY=VALUE[,KEY=VALUE...]`` is one variant of those settings
(``compute_dtype=float32``, ``cast_weights=false``, ``unstack_blocks=true``,
``tokenizer_precision=bfloat16``, ``attention=xla``, ...); every row runs once per variant,
and records the resolved config (``execution``).

The timed batch includes everything ``generate_compiled`` does: 10 scales of guided
next-scale passes over ``[cond; uncond]`` (2B rows), top-k/top-p filtering, the draws,
the refinement passes and the tokenizer decode to images. Every row runs in its own
subprocess (``XLA_PYTHON_CLIENT_PREALLOCATE=false``); ``1st call s`` is the first call
(trace + compile + one run), then ``--warmup`` untimed and ``--iters`` timed calls, each
synchronised with ``jax.block_until_ready``. Peak GiB = ``peak_bytes_in_use`` after the
timed calls (None on CPU).

Accuracy row: the float32 model's weights are also run with bf16 matmuls (same parameters;
only the execution's ``compute_dtype`` and ``head_dtype`` differ; the other settings are
the first ``--execution`` variant's), with the default refinement schedule. The head is initialised
larger than upstream (``init_head=1``, ``init_adaln_gamma=0.3``) so that logits are not
flat; the numbers therefore describe random weights, not a trained model. Reported: the
fraction of equal final tokens per scale (scale 0, scale 1, last; all scales in the JSON;
the tokens of a scale depend on all earlier scales, so one flipped token early changes
everything after it), the mean absolute difference of the images in [0, 1], and the
relative L2 error of the scale-0 logits (identical inputs there).

  python benchmarks/sample.py --time-budget 540 --out benchmarks/results/sample_h200.json
  python benchmarks/sample.py --batches 32 --modes markov_refine,decode,var,markov
  python benchmarks/sample.py --batches 64 --modes markov_refine,var,markov \\
      --execution compute_dtype=float32
  python benchmarks/sample.py --batches 64 --modes markov_refine --execution unstack_blocks=false \\
      --execution unstack_blocks=true
  python benchmarks/sample.py --quick --out /tmp/sample_quick.json                 # CPU smoke
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_step import (  # noqa: E402
    Runner, _compile, _memory, add_execution_flag, add_harness_flags, execution_label, fmt,
    init_on_device, maybe_profile, parse_list, peak_gib, status_text, timed, vae_config,
    worker_main, xla_memory)

SAMPLING = dict(cfg=1.7, top_k=1000, top_p=0.99)
MODES = ("markov_refine", "decode", "var", "markov", "accuracy")
PEAK_FRACTION = 0.6

# Reference points: official = upstream PyTorch, fp32/TF32, per batch of 64.
REFERENCE = {
    "sampling": SAMPLING,
    "official_precision": "fp32/TF32",
    "target_peak_fraction_of_official": PEAK_FRACTION,
    "markov_refine": {
        "d16_B64": {"target_ms": 250, "official_ms": 565, "official_peak_gib": 17.8},
        "d30_B64": {"target_ms": 600, "official_ms": 1487, "official_peak_gib": 25.7},
    },
    "var": {"d30_B64": {"official_ms": 1677, "official_peak_gib": 50.3}},
    "decode": {"B64": {"official_ms": 199}},
}


# ========================================== worker ============================================

def model_config(spec: dict, vcfg, **overrides):
    from hmar_jax.transformer import preset

    kwargs = dict(vocab_size=vcfg.vocab_size, latent_channels=vcfg.z_channels,
                  patch_nums=vcfg.patch_nums)
    if spec["mode"] == "var":
        kwargs.update(attention_pattern="block_causal", num_mask_layers=0)
    return preset(spec["model"], **(kwargs | overrides))


def sample_worker(spec: dict) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hmar_jax import sampling
    from hmar_jax.execution import ExecutionConfig
    from hmar_jax.tokenizer import VQVAE
    from hmar_jax.pretrained import cast_matmul_weights, unstack_blocks
    from hmar_jax.transformer import HMARTransformer

    mode, batch, lower_only = spec["mode"], spec["batch"], spec.get("lower_only", False)
    execution = ExecutionConfig.from_mapping(spec["execution_settings"]).resolve(inference=True)
    make_vae = lambda: VQVAE(vae_config(spec["quick"]), execution, rngs=nnx.Rngs(0))  # noqa: E731
    vae = nnx.eval_shape(make_vae) if lower_only else init_on_device(make_vae)
    vcfg = vae.config
    result = {"image_size": vcfg.image_size, "execution": dataclasses.asdict(execution)}

    if mode == "decode":
        graphdef, state = nnx.split(vae)
        side = vcfg.patch_nums[-1]
        shape = (batch, side, side, vcfg.z_channels)
        f_hat = jax.random.normal(jax.random.key(spec["seed"]), shape)
        decode = jax.jit(lambda state, f_hat: nnx.merge(graphdef, state).decode_latent(f_hat))
        compiled = _compile(result, decode, (state, f_hat), lower_only)
        if compiled is None:
            return result
        make_call = lambda executable: lambda: executable(state, f_hat)  # noqa: E731
        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib())
        maybe_profile(result, spec, decode, (state, f_hat), make_call)
        return _per_image(result, batch)

    if mode == "accuracy":
        return _accuracy(spec, vae, execution, result)

    cfg = model_config(spec, vcfg)
    result.update(L=cfg.layout.seq_len, depth=cfg.depth, width=cfg.width)
    make_model = lambda: HMARTransformer(cfg, execution, rngs=nnx.Rngs(spec["seed"]))  # noqa: E731
    model = nnx.eval_shape(make_model) if lower_only else init_on_device(make_model)
    if execution.cast_weights:  # as load_pretrained does: matmul weights in the compute dtype
        cast_matmul_weights(model)
    if execution.unstack_blocks:  # as load_pretrained does: a weight array per block
        unstack_blocks(model)
    schedule = "auto" if mode == "markov_refine" else None
    config = sampling.SamplingConfig(**SAMPLING, mask_schedule=schedule)
    rng = np.random.default_rng(spec["seed"])
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, (batch,)), jnp.int32)
    index = jnp.arange(batch, dtype=jnp.int32)
    result["passes"] = _passes(sampling, cfg, config)
    if mode == "var":  # until the sampler's KV-cache path exists, each scale sees only itself
        import inspect

        result["sampler_kv_cache_path"] = "kv_cache" in inspect.getsource(sampling.sampler)

    # The body of generate_compiled as a pure jitted function, so that XLA's buffer sizes
    # can be read from the compiled executable.
    model_graphdef, model_state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(vae)
    fn = jax.jit(lambda ms, vs, labels, index: sampling.generate(
        nnx.merge(model_graphdef, ms), nnx.merge(vae_graphdef, vs), labels, index, spec["seed"],
        config))
    args = (model_state, vae_state, labels, index)
    if lower_only:
        _compile(result, fn, args, lower_only=True)
        return result

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    result.update(xla_memory(compiled))
    # On stderr too, so that a row that fails at run time (OOM) keeps it in its log tail.
    print("compiled sampler, XLA buffers (GiB):",
          {k: round(v, 2) for k, v in result.items() if k.startswith("xla_")}, file=sys.stderr)
    make_call = lambda executable: lambda: executable(*args)  # noqa: E731
    call = make_call(compiled)
    images = jax.block_until_ready(call())
    result["compile_s"] = time.perf_counter() - t0  # first call: trace + compile + one run
    images = np.asarray(images)  # sanity of the first batch
    result.update(timed(call, spec["warmup"], spec["iters"]), peak_gib=peak_gib(),
                  image_mean=float(images.mean()), image_finite=bool(np.isfinite(images).all()),
                  image_shape=list(images.shape))
    maybe_profile(result, spec, fn, args, make_call)
    return _per_image(result, batch)


def _passes(sampling, cfg, config) -> int:
    """Transformer passes per batch (next-scale passes + refinement steps)."""
    schedules = config.mask_schedule
    if schedules == "auto":
        schedules = sampling.default_mask_schedule(cfg.patch_nums)
    if schedules is None:
        return len(cfg.patch_nums)
    return sum(len(s) for s in schedules)


def _per_image(result: dict, batch: int) -> dict:
    result["img_s"] = batch / (result["ms_median"] / 1e3)
    result["ms_per_image"] = result["ms_median"] / batch
    return result


def _accuracy(spec: dict, vae, execution, result: dict) -> dict:
    """bf16 vs float32 sampling with the same weights, labels and per-sample keys:
    ``execution`` (resolved) with both compute dtypes float32, then bfloat16."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hmar_jax import sampling
    from hmar_jax.transformer import HMARTransformer

    batch = spec["batch"]
    cfg = model_config(spec, vae.config, init_head=1.0, init_adaln_gamma=0.3)
    float32, bfloat16 = (execution.replace(compute_dtype=dtype, head_dtype=dtype)
                         for dtype in ("float32", "bfloat16"))
    make_model = lambda: HMARTransformer(cfg, float32, rngs=nnx.Rngs(spec["seed"]))  # noqa: E731
    lower_only = spec.get("lower_only", False)
    model32 = nnx.eval_shape(make_model) if lower_only else init_on_device(make_model)
    graph32, weights = nnx.split(model32)
    graph16 = nnx.graphdef(nnx.eval_shape(lambda: HMARTransformer(cfg, bfloat16,
                                                                  rngs=nnx.Rngs(0))))
    vae_graphdef, vae_state = nnx.split(vae)
    config = sampling.SamplingConfig(**SAMPLING, mask_schedule="auto")
    rng = np.random.default_rng(spec["seed"])
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, (batch,)), jnp.int32)
    index = jnp.arange(batch, dtype=jnp.int32)

    def make(graphdef):
        @jax.jit
        def run(weights, vae_state, labels, index):
            draws: dict[int, list] = {}

            def record(k, filtered, keys):  # the default draw, remembered per scale and step
                tokens = sampling.draw_tokens(keys, filtered, config.temperature)
                draws.setdefault(k, []).append(tokens)
                return tokens

            images, trace = sampling.generate(nnx.merge(graphdef, weights),
                                              nnx.merge(vae_graphdef, vae_state), labels, index,
                                              spec["seed"], config, token_sampler=record,
                                              return_trace=True)
            finals = []
            for k in sorted(draws):  # final tokens of each scale
                if f"tokens_s{k}" in trace:
                    finals.append(trace[f"tokens_s{k}"])
                    continue
                tokens = draws[k][0]  # older traces: proposals overwritten where re-masked
                for step in range(1, len(draws[k])):
                    tokens = jnp.where(trace[f"mask_s{k}_step{step}"], draws[k][step], tokens)
                finals.append(tokens)
            return images, finals, trace["ns_logits_s0"]
        return run

    if lower_only:
        for graphdef in (graph32, graph16):
            _compile(result, make(graphdef), (weights, vae_state, labels, index), lower_only=True)
        return result
    t0 = time.perf_counter()
    out32 = jax.device_get(make(graph32)(weights, vae_state, labels, index))
    out16 = jax.device_get(make(graph16)(weights, vae_state, labels, index))
    result["compile_s"] = time.perf_counter() - t0
    (img32, tok32, log32), (img16, tok16, log16) = out32, out16
    equal = [float(np.mean(np.asarray(a) == np.asarray(b))) for a, b in zip(tok16, tok32)]
    log32, log16 = np.asarray(log32, np.float64), np.asarray(log16, np.float64)
    result.update(
        equal_tokens_per_scale=equal, equal_s0=equal[0], equal_s1=equal[1], equal_last=equal[-1],
        image_mean_abs_diff=float(np.mean(np.abs(np.asarray(img16) - np.asarray(img32)))),
        logits_s0_rel_err=float(np.linalg.norm(log16 - log32) / max(np.linalg.norm(log32), 1e-30)),
        logits_s0_max_abs_diff=float(np.max(np.abs(log16 - log32))),
        logits_s0_std=float(np.std(log32)), init_head=1.0, init_adaln_gamma=0.3,
        peak_gib=peak_gib())
    return result


# ====================================== parent =================================================

def build_specs(args) -> list[dict]:
    models, batches = parse_list(args.models), parse_list(args.batches, int)
    modes, variants = parse_list(args.modes), args.execution or [{}]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    common = dict(quick=args.quick, iters=args.iters, warmup=args.warmup, seed=0,
                  lower_only=args.lower_only, profile=args.profile)
    labels = [execution_label(settings) for settings in variants]
    specs = []
    for mode in modes:
        if mode == "accuracy":
            specs.append(dict(common, model=args.accuracy_model, batch=args.accuracy_batch,
                              mode=mode, variant=labels[0], execution_settings=variants[0]))
            continue
        for batch in batches:
            for settings, label in zip(variants, labels):
                for model in [None] if mode == "decode" else models:
                    specs.append(dict(common, model=model, batch=batch, mode=mode, variant=label,
                                      execution_settings=settings))
    top = max(batches)

    def priority(s):
        group = 0 if s["mode"] == "accuracy" or s["batch"] == top else 1
        model = models.index(s["model"]) if s["model"] in models else 0
        return (group, MODES.index(s["mode"]), model, labels.index(s["variant"]), -s["batch"])

    return sorted(specs, key=priority)


HEADER = (f"{'model':>5} {'B':>4} {'dtype':>8} {'mode':>13} {'passes':>6} {'ms med':>9} "
          f"{'ms min':>9} {'img/s':>8} {'ms/img':>7} {'XLA GiB':>8} {'peak GiB':>8} {'1st call s':>10}  "
          "status  [--execution]")

DTYPE_SHORT = {"bfloat16": "bf16", "float32": "f32"}
TOKENIZER_SHORT = {"bfloat16": "bf16", "default": "tf32", "highest": "f32"}


def row_dtype(r: dict) -> str | None:
    """The row's compute dtype (the tokenizer's precision for ``decode``); None where the
    worker failed before resolving its execution config."""
    ex = r.get("execution")
    if not ex:
        return None
    if r["mode"] == "decode":
        return ex["tokenizer_precision"]
    return ex["compute_dtype"]


def format_row(r: dict) -> str:
    head = f"{str(r['model'] or '-'):>5} {r['batch']:>4} "
    if r["mode"] == "accuracy":
        if r.get("status") != "ok" or "equal_s0" not in r:
            return head + f"{'bf16/f32':>8} {'accuracy':>13}  {status_text(r)}"
        return (head + f"{'bf16/f32':>8} {'accuracy':>13}  equal tokens: scale 0 "
                f"{r['equal_s0']:.3f}, scale 1 {r['equal_s1']:.3f}, last {r['equal_last']:.3f}; "
                f"image |diff| {r['image_mean_abs_diff']:.4f}; scale-0 logits rel err "
                f"{r['logits_s0_rel_err']:.1e}  {status_text(r)}")
    ex = r.get("execution") or {}
    if r["mode"] == "decode":  # the tokenizer's own precision
        dtype = TOKENIZER_SHORT.get(row_dtype(r), "-")
    else:
        dtype = DTYPE_SHORT.get(row_dtype(r), "-")
        if ex.get("tokenizer_precision") == "bfloat16":
            dtype += "+bf16d"  # bf16 tokenizer decode
    return (head + f"{dtype:>8} {r['mode']:>13} {fmt(r.get('passes'), 'd', 6)} "
            f"{fmt(r.get('ms_median'), '.1f', 9)} {fmt(r.get('ms_min'), '.1f', 9)} "
            f"{fmt(r.get('img_s'), '.1f', 8)} {fmt(r.get('ms_per_image'), '.2f', 7)} "
            f"{fmt(r.get('xla_total_gib'), '.2f', 8)} {fmt(r.get('peak_gib'), '.2f', 8)} "
            f"{fmt(r.get('compile_s'), '.1f', 10)}  "
            f"{status_text(r)}"
            + (" (sampler has no KV-cache path: not VAR attention)"
               if r.get("sampler_kv_cache_path") is False else "") + f"  [{r['variant']}]")


def comparison(rows: list[dict]) -> list[dict]:
    entries = []
    for mode in ("markov_refine", "var", "decode"):
        for key, ref in REFERENCE[mode].items():
            batch = int(key.split("B")[-1])
            model = key.split("_B")[0] if "_B" in key else None
            candidates = [r for r in rows if r.get("status") == "ok" and "ms_median" in r
                          and r["mode"] == mode and r["batch"] == batch and r["model"] == model]
            for dtype in sorted({row_dtype(r) for r in candidates}) or [None]:
                same = [r for r in candidates if row_dtype(r) == dtype]
                best = min(same, key=lambda r: r["ms_median"]) if same else None
                entry = {"mode": mode, "config": key, "dtype": dtype, "measured": None}
                if best is not None:
                    entry["measured"] = {k: best.get(k) for k in ("ms_median", "peak_gib",
                                                                  "xla_total_gib", "variant")}
                    checks = {}
                    if "target_ms" in ref:
                        checks["ms"] = best["ms_median"] <= ref["target_ms"]
                    if "official_peak_gib" in ref and _memory(best) is not None:
                        limit = PEAK_FRACTION * ref["official_peak_gib"]
                        checks["peak_gib"] = _memory(best) <= limit
                    entry["targets_met"] = checks
                    entry["speedup_vs_official"] = ref["official_ms"] / best["ms_median"]
                entries.append(entry)
    return entries


def print_comparison(entries: list[dict]) -> None:
    print("\n== measured vs the reference targets (official: PyTorch fp32/TF32) ==")
    for e in entries:
        ref = REFERENCE[e["mode"]][e["config"]]
        title = f"{e['config'].replace('_', ' ')} {e['mode']} {e['dtype'] or ''}".strip()
        m = e["measured"]
        if m is None:
            print(f"{title}: no successful row")
            continue
        line = f"{title:<32} {m['ms_median']:8.1f} ms"
        if "target_ms" in ref:
            verdict = "MET" if e["targets_met"]["ms"] else "NOT MET"
            line += f"  target <= {ref['target_ms']} ms {verdict:8}"
        line += f"  official {ref['official_ms']} ms ({e['speedup_vs_official']:.2f}x faster)"
        if "official_peak_gib" in ref:
            limit = PEAK_FRACTION * ref["official_peak_gib"]
            verdict = ("MET" if e["targets_met"]["peak_gib"] else "NOT MET") if "peak_gib" in e[
                "targets_met"] else "n/a"
            line += (f" | memory {fmt(_memory(m), '.2f', 0)} GiB (XLA buffers; allocator peak "
                     f"{fmt(m['peak_gib'], '.2f', 0)}), target <= {limit:.1f} "
                     f"({PEAK_FRACTION} x official {ref['official_peak_gib']}) {verdict}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma list (default d16,d30; tiny with --quick)")
    parser.add_argument("--batches", default=None, help="comma list (default 64,32)")
    parser.add_argument("--modes", default=",".join(MODES), help=", ".join(MODES))
    add_execution_flag(parser, "ExecutionConfig()'s defaults, as load_pretrained runs")
    parser.add_argument("--accuracy-model", default=None, help="default d16 (tiny with --quick)")
    parser.add_argument("--accuracy-batch", type=int, default=None,
                        help="default 8 (2 with --quick)")
    add_harness_flags(parser, "benchmarks/results/sample.json", default_budget=540,
                      default_timeout=300, default_iters=5, default_warmup=1)
    args = parser.parse_args()
    if args.worker:
        worker_main(sample_worker, args.worker, args.worker_out)
        return
    args.models = args.models or ("tiny" if args.quick else "d16,d30")
    args.batches = args.batches or ("4,2" if args.quick else "64,32")
    args.accuracy_model = args.accuracy_model or ("tiny" if args.quick else "d16")
    args.accuracy_batch = args.accuracy_batch or (2 if args.quick else 8)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" /
                       ("sample_quick.json" if args.quick else "sample.json"))
    runner = Runner(pathlib.Path(__file__).resolve(), "sample", args, REFERENCE, format_row, HEADER)
    rows = runner.run(build_specs(args))
    entries = comparison(rows)
    runner.extra["comparison"] = entries
    runner.write()
    print_comparison(entries)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
