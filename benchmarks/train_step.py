"""Training-step benchmark: the trainer's step on random data, as a config runs it.

``--config`` is an experiment config, read as ``python -m hmar_jax.train`` reads it; the
model, the recipe (optimizer, loss, stage), the image size, the mesh and ``config.execution``
come from it, and with no ``--execution`` option the step runs exactly the execution a
training run of that config resolves on this platform. Weights are randomly initialised;
the tokenizer is the VQ-VAE of ``VQVAEConfig()`` (ch=160, V = 4096, Cv = 32) on the
config's scales (L = 680 at 256 px, 2240 at 512 px). Modes:

* ``full``: ``hmar_jax.training.trainer.make_step`` with the trainer's optimizer and donated
  state: tokenizer encode, teacher-forcing inputs, forward, loss, backward, clipping,
  AdamW, EMA. Inputs are random uint8 images mapped to [-1, 1] as the data pipeline does
  (once, outside the step) and random labels.
* ``full_pretokenized``: the same step as training from a token cache runs it
  (``config.data.pretokenized``): random token indices ``[B, L]`` instead of images, so
  no tokenizer encode.
* ``fwdbwd``: ``jax.value_and_grad`` of the stage-1 loss w.r.t. the stage-1 parameters on
  random teacher-forcing inputs ``x [B, L-1, Cv]`` and targets (no optimizer, no
  tokenizer; stochastic depth on, as in training).
* ``tokenize``: the step's tokenizer part alone (encode to indices + teacher-forcing inputs).

Each row runs in its own process (``harness.Runner``): compile seconds, then ``--warmup``
and ``--iters`` synchronised calls; median and min ms, images/s (and, for the full step,
images/s of steps dispatched back to back, as the training loop runs them), model
TFLOP/s ``6 B L (12 C^2 depth + C V) / t`` per device, MFU against the device's dense bf16
peak, XLA's buffer sizes, the allocator peak, the process's peak GPU memory and the loss.

  python benchmarks/train_step.py --config configs/hmar_imagenet.py:variant=d16 --batch 64
  python benchmarks/train_step.py --config configs/hmar_imagenet.py:variant=d30 --batch 32 \\
      --execution remat=block --execution remat=block,scan_blocks=true
  python benchmarks/train_step.py --config configs/hmar_imagenet.py:variant=d16 --batch 64 \\
      --devices 1,2                    # scaling over the GPUs of one host (config.mesh)
  python benchmarks/train_step.py --config configs/hmar_imagenet.py:runlocal --quick  # CPU

Each ``--execution KEY=VALUE[,KEY=VALUE...]`` is one variant: those
``hmar_jax.execution.ExecutionConfig`` fields over the config's ``config.execution``; every
batch and mode runs once per variant. ``--devices 1,N`` times the full step on N devices
with the batch per device (the global batch N times it) on the config's mesh with its -1
axis filled by N (data parallel, or FSDP for the configs that shard parameters); the
efficiency is img/s(N) / (N img/s(1)).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    add_runner_flags, build_specs, compile_timed, fmt, init_on_device, maybe_profile,
    parse_list, peak_bf16_tflops, peak_gib, run_benchmark, run_config, status_text, timed,
    tokenizer_config)

MODES = ("full", "full_pretokenized", "fwdbwd", "tokenize")


# ==================================== model / recipe setup ====================================

def model_flops(cfg, batch: int) -> float:
    """Training FLOPs per step: 6 B L (12 C^2 depth + C V)."""
    c, length = cfg.width, cfg.layout.seq_len
    return 6.0 * batch * length * (12 * c * c * cfg.depth + c * cfg.vocab_size)


# ========================================== worker ============================================

def train_worker(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hmar_jax import sharding
    from hmar_jax.tokenizer import VQVAE
    from hmar_jax.training import losses, optim
    from hmar_jax.training.trainer import TrainState, make_step, model_config, resolve_execution
    from hmar_jax.transformer import HMARTransformer

    mode, n_dev, batch = spec["mode"], spec["devices"], spec["batch"]
    if len(jax.devices()) < n_dev:
        raise RuntimeError(f"{n_dev} devices requested, {len(jax.devices())} available")
    devices = jax.devices()[:n_dev]
    global_batch = batch * n_dev
    config = run_config(spec)
    execution = resolve_execution(config)  # as the trainer does: once, for this platform
    lower_only = spec["lower_only"]
    make_vae = lambda: VQVAE(tokenizer_config(config, spec["quick"]), execution,  # noqa: E731
                             rngs=nnx.Rngs(0))
    vae = nnx.eval_shape(make_vae) if lower_only else init_on_device(make_vae)
    cfg = model_config(config, vae.config)
    layout = cfg.layout
    rng = np.random.default_rng(spec["seed"])
    side = vae.config.image_size
    images = rng.integers(0, 256, (global_batch, side, side, 3), dtype=np.uint8)
    images = images.astype(np.float32) / 127.5 - 1.0  # as hmar_jax.training.data does
    labels = rng.integers(0, cfg.num_classes, (global_batch,)).astype(np.int32)
    result = {"execution": dataclasses.asdict(execution), "model": config.model.preset,
              "L": layout.seq_len, "width": cfg.width, "depth": cfg.depth,
              "vocab": cfg.vocab_size, "global_batch": global_batch, "image_size": side,
              "stage": config.stage}

    if mode == "tokenize":
        vae_graphdef, vae_state = nnx.split(vae)

        def tokenize(vae_state, images):
            model = nnx.merge(vae_graphdef, vae_state)
            return model.teacher_forcing_inputs(model.encode_to_indices(images))

        args = (vae_state, jnp.asarray(images))
        tokenize = jax.jit(tokenize)
        compiled = compile_timed(result, tokenize, args, lower_only)
        if compiled is None:
            return result
        make_call = lambda executable: lambda: executable(*args)  # noqa: E731
        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib(devices))
        maybe_profile(result, spec, tokenize, args, make_call)
        return throughput(result, None, global_batch, n_dev)

    filt = optim.trainable_filter(1 if mode == "fwdbwd" else config.stage)
    abstract_model = nnx.eval_shape(lambda: HMARTransformer(cfg, execution, rngs=nnx.Rngs(0)))
    graphdef, abstract_trainable, _ = nnx.split(abstract_model, filt, ...)
    result["params_trainable"] = int(sum(np.prod(a.shape)
                                         for a in jax.tree.leaves(abstract_trainable)))
    flops = model_flops(cfg, global_batch)

    if mode == "fwdbwd":
        if n_dev != 1:
            raise ValueError("fwdbwd runs on one device; use --devices with mode full")
        weights = jnp.asarray(layout.token_loss_weights(config.loss.weighting))

        @jax.jit
        def init():
            model = HMARTransformer(cfg, execution, rngs=nnx.Rngs(config.seed))
            _, trainable, frozen = nnx.split(model, filt, ...)
            return trainable, frozen

        trainable, frozen = jax.eval_shape(init) if lower_only else init()
        keys = jax.random.split(jax.random.key(spec["seed"]), 3)
        x = jax.random.normal(keys[0], (batch, layout.seq_len - 1, cfg.latent_channels))
        targets = jax.random.randint(keys[1], (batch, layout.seq_len), 0, cfg.vocab_size)

        def fwdbwd(trainable, frozen, x, labels, targets, path_rng):
            def loss_fn(trainable):
                model = nnx.merge(graphdef, trainable, frozen)
                logits = model(x, labels, rng=path_rng)
                return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)

            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            return loss, grads

        args = (trainable, frozen, x, jnp.asarray(labels), targets, keys[2])
        fwdbwd = jax.jit(fwdbwd)
        compiled = compile_timed(result, fwdbwd, args, lower_only)
        if compiled is None:
            return result
        out = {}

        def make_call(executable):
            def call():
                out.clear()  # free the previous gradients first: one gradient tree alive at a time
                out["v"] = executable(*args)
                return out["v"]
            return call

        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib(devices), loss=float(out["v"][0]))
        maybe_profile(result, spec, fwdbwd, args, make_call)
        return throughput(result, flops, global_batch, n_dev)

    if mode not in ("full", "full_pretokenized"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "full_pretokenized":  # the step reads token indices (config.data.pretokenized)
        config.data.pretokenized = "random tokens (benchmark)"
        images = rng.integers(0, cfg.vocab_size, (global_batch, layout.seq_len)).astype(np.int32)
    # The pieces of the Trainer's set-up, without data, checkpoints or workdir.
    mesh = sharding.make_mesh(tuple(tuple(axis) for axis in config.mesh), devices=devices)
    result["mesh"] = dict(mesh.shape)
    tx, schedule = optim.from_config(config.optimizer, abstract_trainable, config.num_train_steps,
                                     execution.moment_dtype)
    vae_graphdef, vae_state = nnx.split(vae)
    if not lower_only:
        vae_state = jax.device_put(vae_state, sharding.replicated(mesh))
    del vae

    def init_state() -> TrainState:
        model = HMARTransformer(cfg, execution, rngs=nnx.Rngs(config.seed))
        _, trainable, frozen = nnx.split(model, filt, ...)
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                          jax.tree.map(jnp.copy, trainable))

    state_shardings = sharding.tree_shardings(jax.eval_shape(init_state), mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_step(graphdef, vae_graphdef, cfg, config, tx, schedule,
                     microbatches=execution.microbatches)
    train_step = jax.jit(step, in_shardings=(state_shardings, None, batch_sharding, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    holder = {"state": (jax.eval_shape(init_state) if lower_only
                        else jax.jit(init_state, out_shardings=state_shardings)())}
    images_dev = jax.device_put(images, batch_sharding)
    labels_dev = jax.device_put(labels, batch_sharding)
    del images
    with jax.set_mesh(mesh):
        compiled = compile_timed(result, train_step,
                                 (holder["state"], vae_state, images_dev, labels_dev), lower_only)
        if compiled is None:
            return result
        if n_dev > 1:
            result["hlo_collectives"] = collectives(compiled)

        def make_call(executable):
            def call():
                holder["state"], holder["metrics"] = executable(holder["state"], vae_state,
                                                                images_dev, labels_dev)
                return holder["metrics"]["loss"]
            return call

        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"],
                            back_to_back=True))
        peak = peak_gib(devices)
        maybe_profile(result, spec, train_step,
                      (holder["state"], vae_state, images_dev, labels_dev), make_call)
    result.update(peak_gib=peak, loss=float(holder["metrics"]["loss"]),
                  grad_norm=float(holder["metrics"]["grad_norm"]))
    return throughput(result, flops, global_batch, n_dev)


def collectives(compiled) -> dict | None:
    """Static counts of collective ops in the compiled step. Data parallelism needs only
    all-reduces (gradients, metrics); an all-gather can mean that an op the partitioner
    cannot split (e.g. a kernel's custom call) ran on the whole batch on every device."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - optional diagnostics
        return None
    names = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {name: len(re.findall(rf"\s{name}(?:-start)?\(", text)) for name in names}


def throughput(result: dict, flops: float | None, global_batch: int, n_dev: int) -> dict:
    import jax

    seconds = result["ms_median"] / 1e3
    result["img_s"] = global_batch / seconds
    if result.get("ms_back_to_back"):
        result["img_s_back_to_back"] = global_batch / (result["ms_back_to_back"] / 1e3)
    if flops is not None:
        result["model_tflop_per_step"] = flops / 1e12
        result["tflops"] = flops / seconds / 1e12 / n_dev  # per device
        peak = peak_bf16_tflops(jax.devices()[0].device_kind)
        result["mfu"] = result["tflops"] / peak if peak else None
    return result


# ====================================== parent =================================================

def specs(args) -> list[dict]:
    """``harness.build_specs``, the full-step rows once per ``--devices`` count."""
    devices = sorted(set(parse_list(args.devices, int)) | {1})
    from hmar_jax.sharding import check_batch_split

    rows = []
    for spec in build_specs(args, MODES):
        for n in devices if spec["mode"].startswith("full") else [1]:
            try:  # each device runs the batch
                check_batch_split(spec["batch"] * n, spec["execution_settings"].get(
                    "microbatches", 1), n)
            except ValueError as err:
                raise SystemExit(f"--execution {spec['variant']}, batch {spec['batch']} on "
                                 f"{n} devices: {err}") from None
            rows.append(dict(spec, devices=n))
    return rows


HEADER = (f"{'model':>5} {'B':>6} {'dev':>3} {'mode':>17} {'attn':>9} {'remat':>23} {'scan':>4} "
          f"{'ms med':>8} {'img/s':>8} {'b2b img/s':>9} {'MFU':>6} {'XLA GiB':>8} "
          f"{'proc GiB':>8} {'comp s':>7} {'loss':>7} {'eff':>5}  status  [--execution]")


def format_row(r: dict) -> str:
    """One table line; the execution columns show the resolved config (``-`` where the
    worker failed before resolving it)."""
    ex = r.get("execution") or {}
    microbatches = (ex or r["execution_settings"]).get("microbatches", 1)
    passes = microbatches > 1 and r["mode"].startswith("full")  # the other modes take no parts
    batch = f"{r['batch']}/{microbatches}" if passes else r["batch"]
    scan = ("y" if ex["scan_blocks"] else "n") if ex else "-"
    return (f"{r.get('model', '-'):>5} {batch:>6} {r['devices']:>3} {r['mode']:>17} "
            f"{ex.get('attention', '-'):>9} {ex.get('remat', '-'):>23} {scan:>4} "
            f"{fmt(r.get('ms_median'), '.1f', 8)} {fmt(r.get('img_s'), '.1f', 8)} "
            f"{fmt(r.get('img_s_back_to_back'), '.1f', 9)} {fmt(r.get('mfu'), '.1%', 6)} "
            f"{fmt(r.get('xla_total_gib'), '.2f', 8)} {fmt(r.get('process_peak_gib'), '.2f', 8)} "
            f"{fmt(r.get('compile_s'), '.1f', 7)} {fmt(r.get('loss'), '.3f', 7)} "
            f"{fmt(r.get('efficiency'), '.2f', 5)}  {status_text(r)}  [{r['variant']}]")


def add_efficiency(row: dict, rows: list[dict]) -> None:
    """Scaling efficiency of an N-device row against its 1-device twin."""
    if row.get("status") != "ok" or "img_s" not in row or row["devices"] == 1:
        return
    for other in rows:
        if (other.get("status") == "ok" and "img_s" in other and other["devices"] == 1
                and all(other[k] == row[k] for k in ("batch", "mode", "variant"))):
            row["efficiency"] = row["img_s"] / (row["devices"] * other["img_s"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", type=parse_list, default=["full"],
                        help=f"comma list of {', '.join(MODES)} (default full)")
    parser.add_argument("--devices", default="1",
                        help="device counts of the full step, e.g. 1,2 (1 is always added)")
    add_runner_flags(parser, what="the step", timeout=300, iters=10, warmup=2)
    run_benchmark(parser, argv, __file__, "train_step", train_worker, specs, format_row, HEADER,
                  finish_row=add_efficiency)


if __name__ == "__main__":
    main()
