"""Training the multi-scale VQ-VAE tokenizer (neither upstream repo released this).

Loss per step: ``|decoder(f_hat) - x|^2`` (straight-through into the encoder) plus the
upstream vq loss, the mean over scales of ``beta |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2``
(commitment, and codebook/phi fitting). Codes that fall out of use are restarted: an
EMA of each code's share of assignments is kept, and every ``restart_every`` steps the
codes below ``dead_fraction / V`` are re-seeded with residual vectors drawn from the
current batch (the vectors the quantiser was actually asked to match).

Tokenizer training is its own command (``python -m hmar_jax.train_tokenizer``); the HMAR
trainer and ``pretokenize`` load its export (``load_trained_tokenizer``) and never train one.

Dimension letters: B batch, H/W image side, P latent side, Cv latent channels,
V codebook size.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.cli import InputError
from hmar_jax.execution import ExecutionConfig
from hmar_jax.sampling import visualize
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from hmar_jax.training import data
from hmar_jax.training import metric_writers
from hmar_jax.training import optim

TRAIN_COMMAND = ("python -m hmar_jax.train_tokenizer --config configs/tokenizer_digits.py "
                 "--workdir DIR")


def load_trained_tokenizer(config: ml_collections.ConfigDict, execution: ExecutionConfig
                           ) -> VQVAE:
    """The frozen tokenizer of an HMAR training config: the export ``config.tokenizer.export``
    (trained by this module's command or converted), built to run with the resolved
    ``execution``, checked against ``config.data.image_size``.

    Raises:
      InputError: no export there (naming the commands that make one), or another image size.
    """
    path = config.tokenizer.export
    if not path or not (pathlib.Path(path) / f"{checkpointing.TOKENIZER}_config.json").is_file():
        where = f"config.tokenizer.export={path} is not a tokenizer export" if path else \
            "config.tokenizer.export is not set"
        raise InputError(f"{where}; train one with `{TRAIN_COMMAND}` and pass "
                         "--config.tokenizer.export=DIR/tokenizer (or convert one with "
                         "`python -m hmar_jax.convert vqvae`).")
    vae = checkpointing.load_tokenizer(path, execution)
    if vae.config.image_size != config.data.image_size:
        raise InputError(f"The tokenizer {path} takes {vae.config.image_size} px images but "
                         f"data.image_size={config.data.image_size}; set "
                         f"--config.data.image_size={vae.config.image_size}.")
    return vae


class CodeUsage(nnx.Variable):
    """EMA of each code's share of assignments, ``[V]`` (sums to about 1)."""


class CodeUsageTracker(nnx.Module):
    def __init__(self, vocab_size: int):
        self.share = CodeUsage(jnp.full((vocab_size,), 1.0 / vocab_size, jnp.float32))


def tokenizer_config(config: ml_collections.ConfigDict) -> VQVAEConfig:
    cfg = VQVAEConfig.from_dict(config.tokenizer.to_dict())
    if cfg.image_size != config.data.image_size:
        raise ValueError(
            f"data.image_size={config.data.image_size} but the tokenizer maps "
            f"{cfg.image_size} px images to its last scale {cfg.patch_nums[-1]}; set "
            f"data.image_size={cfg.image_size} or change tokenizer.ch_mult/patch_nums.")
    return cfg


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.num_train_steps,
        end_value=config.learning_rate * 0.01)
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                     optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=config.weight_decay))
    return tx, schedule


def make_train_step(config: ml_collections.ConfigDict, schedule):
    codebook_cfg = config.codebook
    stop_restarts = int(codebook_cfg.stop_restarts_at * config.num_train_steps)

    @nnx.jit
    def train_step(model: VQVAE, optimizer: nnx.Optimizer, usage: CodeUsageTracker,
                   images: jax.Array, step: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """One update on ``images [B, H, W, 3]``; returns scalar metrics."""

        def loss_fn(model):
            reconstruction, vq_loss, indices, scale_inputs = model(images)
            rec_loss = jnp.mean((reconstruction - images) ** 2)
            return rec_loss + vq_loss, (rec_loss, vq_loss, indices, scale_inputs)

        (loss, (rec_loss, vq_loss, indices, scale_inputs)), grads = nnx.value_and_grad(
            loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)

        vocab = model.config.vocab_size
        flat_idx = jnp.concatenate([i.reshape(-1) for i in indices])
        counts = jnp.zeros((vocab,), jnp.float32).at[flat_idx].add(1.0)
        share = counts / counts.sum()
        ema = codebook_cfg.usage_decay * usage.share[...] + (1 - codebook_cfg.usage_decay) * share

        dead = ema < codebook_cfg.dead_fraction / vocab
        restart_now = ((codebook_cfg.restart_every > 0) & (step > 0) & (step < stop_restarts)
                       & (step % max(codebook_cfg.restart_every, 1) == 0))
        replace = dead & restart_now
        pool = jnp.concatenate([z.reshape(-1, z.shape[-1]) for z in scale_inputs])  # [N, Cv]
        picks = jax.random.randint(rng, (vocab,), 0, pool.shape[0])
        codebook = model.quantize.embedding.embedding
        codebook[...] = jnp.where(replace[:, None], pool[picks], codebook[...])
        usage.share[...] = jnp.where(replace, 1.0 / vocab, ema)

        safe_log = jnp.log(jnp.where(share > 0, share, 1.0))
        perplexity = jnp.exp(-jnp.sum(share * safe_log))  # of this batch's code distribution
        return {"loss": loss, "reconstruction_mse": rec_loss, "vq_loss": vq_loss,
                "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(step),
                "dead_codes": jnp.sum(dead), "restarted_codes": jnp.sum(replace),
                "batch_code_perplexity": perplexity}

    return train_step


def evaluate(model: VQVAE, images: np.ndarray, batch_size: int) -> dict[str, Any]:
    """Reconstruction error and codebook usage over ``images`` (uint8 [N, H, W, 3])."""
    encode = nnx.jit(lambda m, x: m.encode_to_indices(x))
    decode = nnx.jit(lambda m, idx: m.decode_from_indices(idx))
    squared_error, count, per_scale = 0.0, 0, [set() for _ in model.config.patch_nums]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
        indices = encode(model, batch)
        reconstruction = np.asarray(decode(model, indices))
        squared_error += float(np.sum((reconstruction - batch) ** 2))
        count += batch.size
        for k, idx in enumerate(indices):
            per_scale[k].update(np.asarray(idx).reshape(-1).tolist())
    mse = squared_error / count
    used = set().union(*per_scale)
    return {"reconstruction_mse": mse, "psnr_db": float(10 * np.log10(4.0 / mse)),
            "codebook_usage": len(used) / model.config.vocab_size, "codes_used": len(used),
            "codes_used_per_scale": [len(s) for s in per_scale]}


def write_reconstruction_grid(model: VQVAE, images: np.ndarray, path: pathlib.Path) -> None:
    """Row 0: originals; row k + 1: decoded f_hat after scales 0..k (the last row is the
    full reconstruction)."""
    batch = jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)

    @nnx.jit  # one compile: run eagerly, every op of the encoder and decoder compiles alone
    def reconstructions(model, batch):  # S x [B, H, W, 3]
        _, f_hats = model.quantize_latent(model.encode_latent(batch))
        return [model.decode_latent(f) for f in f_hats]

    rows = [np.asarray(batch)] + [np.asarray(r) for r in reconstructions(model, batch)]
    visualize.save_grid(path, rows, upscale=4)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the tokenizer, exports it to ``workdir/tokenizer`` and returns eval metrics."""
    workdir_path = pathlib.Path(workdir).absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    if config.data.name != "digits":
        raise ValueError(f"Unknown data.name {config.data.name!r}; the tokenizer trainer "
                         "currently supports the embedded 'digits'.")
    cfg = tokenizer_config(config)
    train_images, train_labels = data.digits_split(config.data.image_size, "train")
    eval_images, _ = data.digits_split(config.data.image_size, "eval")

    execution = ExecutionConfig.from_mapping(config.execution).resolve()
    model = VQVAE(cfg, execution, rngs=nnx.Rngs(config.seed))
    tx, schedule = make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    usage = CodeUsageTracker(cfg.vocab_size)
    iterator = data.batched_iterator(train_images, train_labels, config.batch_size, config.seed)

    manager = checkpointing.training_checkpoints(
        workdir_path / "tokenizer_ckpt", max_to_keep=config.max_checkpoints_to_keep,
        every_steps=config.checkpoint_every_steps)
    first_step = 0
    if manager.latest_step() is not None:
        first_step = manager.latest_step()
        abstract = nnx.state((model, optimizer, usage))
        restored = manager.restore(first_step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        nnx.update((model, optimizer, usage), restored["state"])
        iterator.set_state(restored["data"])
        logging.info("Resumed tokenizer training from step %d.", first_step)

    _, periodic_actions = metric_writers.import_clu()
    writer = metric_writers.create_writer(str(workdir_path / "tokenizer_tb"))
    writer.write_hparams(config.to_dict() | {"tokenizer": cfg.to_json()})
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer, every_steps=config.log_every_steps)
    train_step = make_train_step(config, schedule)
    base_rng = jax.random.key(config.seed)
    history = []
    for step in range(first_step + 1, config.num_train_steps + 1):
        batch = next(iterator)
        metrics = train_step(model, optimizer, usage, jnp.asarray(batch["image"]),
                             jnp.asarray(step), jax.random.fold_in(base_rng, step))
        logging_now = step % config.log_every_steps == 0 or step == config.num_train_steps
        saving = step == config.num_train_steps or manager.should_save(step)
        if saving or logging_now:
            metrics = jax.device_get(metrics)
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                manager.wait_until_finished()
                good = manager.latest_step()
                rate = f"--config.learning_rate (now {config.learning_rate:g})"
                after = (f"lower {rate} and rerun" if good is None else
                         f"the last checkpoint is step {good}; lower {rate} and rerun to "
                         "resume from it")
                raise optim.TrainingDiverged(
                    f"Tokenizer training diverged at step {step} (loss {metrics['loss']:g}, "
                    f"gradient norm {metrics['grad_norm']:g}); {after}.")
        if logging_now:
            writer.write_scalars(step, metrics)
            history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        report(step)
        if saving:  # the state after a step checked finite just above
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(nnx.state((model, optimizer, usage))),
                data=ocp.args.JsonSave(iterator.get_state())), force=True)
    manager.wait_until_finished()
    writer.flush()

    results = evaluate(model, eval_images, config.eval_batch_size)
    results["train_steps"] = config.num_train_steps
    results["final_train_metrics"] = history[-1] if history else None
    write_reconstruction_grid(model, eval_images[:config.grid_examples],
                              workdir_path / "tokenizer_reconstructions.png")
    checkpointing.save_tokenizer(workdir_path / "tokenizer", model, overwrite=True,
                                 extra_metadata={"trained_by": "hmar_jax.train_tokenizer",
                                                 "eval": results})
    (workdir_path / "tokenizer_metrics.json").write_text(json.dumps(results, indent=2))
    writer.write_scalars(config.num_train_steps, {
        "eval/reconstruction_mse": results["reconstruction_mse"],
        "eval/codebook_usage": results["codebook_usage"]})
    writer.close()
    return results
