"""Sampling benchmark: wall time per batch of ``hmar_jax.sampling.generate``, as a config runs it.

``--config`` is an experiment config, read as ``python -m hmar_jax.train`` reads it; the
model and the image size come from it, and ``config.execution`` is resolved for inference
as ``pretrained.load_pretrained`` resolves it (the inference transforms ``cast_weights``
and ``unstack_blocks`` included). Weights are randomly initialised; the tokenizer is the
VQ-VAE of ``VQVAEConfig()`` on the config's scales. The sampling settings are the preset
of the released checkpoint of the config's model size (``hmar-d16``, ...; ``hmar-d16``'s for
sizes without one). Modes:

* ``markov_refine``: the default refinement schedule (next-scale proposals, masked
  refinement of the 2x2 and 3x3 scales; 14 transformer passes at 256 px);
* ``markov``: next-scale passes only (``mask_schedule=None``);
* ``var``: the model built with ``attention_pattern="block_causal"`` (VAR, no mask branch),
  which the sampler runs with a KV cache;
* ``decode``: the tokenizer decode alone, ``vae.decode_latent`` on a random
  ``f_hat [B, p, p, Cv]``, at the execution's ``tokenizer_precision``.

The timed batch is everything ``generate`` does: the guided passes over ``[cond; uncond]``
(2B rows), top-k/top-p filtering, the draws, the refinement passes and the tokenizer
decode to images. Each row runs in its own process (``harness.Runner``): ``1st call s`` is
the first call (trace + compile + one run), then ``--warmup`` untimed and ``--iters`` timed
calls; per row the median ms per batch, images/s, XLA's buffer sizes, the allocator peak
and the process's peak GPU memory.

  python benchmarks/sample.py --config configs/hmar_imagenet.py:variant=d16 --batch 64
  python benchmarks/sample.py --config configs/hmar_imagenet.py:variant=d30 --batch 32,64 \\
      --modes markov_refine,markov,var,decode --execution compute_dtype=float32
  python benchmarks/sample.py --config configs/hmar_imagenet.py:runlocal --quick   # CPU

Each ``--execution KEY=VALUE[,KEY=VALUE...]`` is one variant (``unstack_blocks=true``,
``cast_weights=false``, ``tokenizer_precision=bfloat16``, ...) over the config's
``config.execution``; every batch and mode runs once per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    add_runner_flags, build_specs, compile_timed, fmt, init_on_device, maybe_profile,
    parse_list, peak_gib, run_benchmark, run_config, status_text, timed, tokenizer_config,
    xla_memory)

MODES = ("markov_refine", "markov", "var", "decode")


def sampling_config(model_preset: str, mode: str):
    """The released preset of ``model_preset`` (``hmar-d16``'s where there is none) with
    the mode's refinement schedule."""
    from hmar_jax.sampling import PRESETS

    preset = PRESETS.get(f"hmar-{model_preset}", PRESETS["hmar-d16"])
    return dataclasses.replace(preset, mask_schedule="auto" if mode == "markov_refine" else None)


def sample_worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hmar_jax import sampling
    from hmar_jax.execution import ExecutionConfig
    from hmar_jax.pretrained import cast_matmul_weights, run_model_config, unstack_blocks
    from hmar_jax.tokenizer import VQVAE
    from hmar_jax.transformer import HMARTransformer

    mode, batch, lower_only = spec["mode"], spec["batch"], spec["lower_only"]
    config = run_config(spec)
    # As load_pretrained resolves it: once, for inference on this platform.
    execution = ExecutionConfig.from_mapping(config.execution.to_dict()).resolve(inference=True)
    make_vae = lambda: VQVAE(tokenizer_config(config, spec["quick"]), execution,  # noqa: E731
                             rngs=nnx.Rngs(0))
    vae = nnx.eval_shape(make_vae) if lower_only else init_on_device(make_vae)
    vcfg = vae.config
    result = {"image_size": vcfg.image_size, "execution": dataclasses.asdict(execution),
              "model": config.model.preset}

    if mode == "decode":
        graphdef, state = nnx.split(vae)
        side = vcfg.patch_nums[-1]
        f_hat = jax.random.normal(jax.random.key(spec["seed"]), (batch, side, side,
                                                                 vcfg.z_channels))
        decode = jax.jit(lambda state, f_hat: nnx.merge(graphdef, state).decode_latent(f_hat))
        compiled = compile_timed(result, decode, (state, f_hat), lower_only)
        if compiled is None:
            return result
        make_call = lambda executable: lambda: executable(state, f_hat)  # noqa: E731
        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib())
        maybe_profile(result, spec, decode, (state, f_hat), make_call)
        return per_image(result, batch)

    cfg = run_model_config(config.to_dict(), vcfg)
    if mode == "var":
        cfg = dataclasses.replace(cfg, attention_pattern="block_causal", num_mask_layers=0)
    make_model = lambda: HMARTransformer(cfg, execution, rngs=nnx.Rngs(spec["seed"]))  # noqa: E731
    model = nnx.eval_shape(make_model) if lower_only else init_on_device(make_model)
    if execution.cast_weights:  # as load_pretrained does
        cast_matmul_weights(model)
    if execution.unstack_blocks:
        unstack_blocks(model)
    sampler = sampling_config(config.model.preset, mode)
    rng = np.random.default_rng(spec["seed"])
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, (batch,)), jnp.int32)
    index = jnp.arange(batch, dtype=jnp.int32)
    result.update(L=cfg.layout.seq_len, depth=cfg.depth, width=cfg.width,
                  passes=passes(sampling, cfg, sampler), sampling=dataclasses.asdict(sampler))

    # generate as one pure jitted function, so that XLA's buffer sizes can be read from
    # the compiled executable.
    model_graphdef, model_state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(vae)
    fn = jax.jit(lambda ms, vs, labels, index: sampling.generate(
        nnx.merge(model_graphdef, ms), nnx.merge(vae_graphdef, vs), labels, index, spec["seed"],
        sampler))
    args = (model_state, vae_state, labels, index)
    if lower_only:
        compile_timed(result, fn, args, lower_only=True)
        return result
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    result.update(xla_memory(compiled))
    # On stderr too, so that a row that fails at run time (OOM) keeps it in its log tail.
    print("compiled sampler, XLA buffers (GiB):",
          {k: round(v, 2) for k, v in result.items() if k.startswith("xla_")}, file=sys.stderr)
    make_call = lambda executable: lambda: executable(*args)  # noqa: E731
    call = make_call(compiled)
    images = np.asarray(jax.block_until_ready(call()))
    result["compile_s"] = time.perf_counter() - t0  # first call: trace + compile + one run
    if not np.isfinite(images).all():
        raise FloatingPointError("the sampler returned non-finite pixels")
    result.update(timed(call, spec["warmup"], spec["iters"]), peak_gib=peak_gib(),
                  image_shape=list(images.shape))
    maybe_profile(result, spec, fn, args, make_call)
    return per_image(result, batch)


def passes(sampling, cfg, config) -> int:
    """Transformer passes per batch (next-scale passes + refinement steps)."""
    schedules = config.mask_schedule
    if schedules == "auto":
        schedules = sampling.default_mask_schedule(cfg.patch_nums)
    if schedules is None:
        return len(cfg.patch_nums)
    return sum(len(s) for s in schedules)


def per_image(result: dict, batch: int) -> dict:
    result["img_s"] = batch / (result["ms_median"] / 1e3)
    result["ms_per_image"] = result["ms_median"] / batch
    return result


HEADER = (f"{'model':>5} {'B':>4} {'dtype':>8} {'mode':>13} {'passes':>6} {'ms med':>9} "
          f"{'ms min':>9} {'img/s':>8} {'XLA GiB':>8} {'peak GiB':>8} {'proc GiB':>8} "
          f"{'1st call s':>10}  status  [--execution]")


def format_row(r: dict) -> str:
    ex = r.get("execution") or {}
    dtype = ex.get("tokenizer_precision" if r["mode"] == "decode" else "compute_dtype", "-")
    return (f"{r.get('model', '-'):>5} {r['batch']:>4} {dtype:>8} {r['mode']:>13} "
            f"{fmt(r.get('passes'), 'd', 6)} {fmt(r.get('ms_median'), '.1f', 9)} "
            f"{fmt(r.get('ms_min'), '.1f', 9)} {fmt(r.get('img_s'), '.1f', 8)} "
            f"{fmt(r.get('xla_total_gib'), '.2f', 8)} {fmt(r.get('peak_gib'), '.2f', 8)} "
            f"{fmt(r.get('process_peak_gib'), '.2f', 8)} {fmt(r.get('compile_s'), '.1f', 10)}  "
            f"{status_text(r)}  [{r['variant']}]")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", type=parse_list,
                        default=["markov_refine"],
                        help=f"comma list of {', '.join(MODES)} (default markov_refine)")
    add_runner_flags(parser, what="the sampler", timeout=300, iters=5, warmup=1)
    run_benchmark(parser, argv, __file__, "sample", sample_worker,
                  lambda args: build_specs(args, MODES), format_row, HEADER)


if __name__ == "__main__":
    main()
