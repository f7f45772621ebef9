"""HMAR training loop: stage 1 (next-scale) and stage 2 (masked refinement).

One pure, jitted ``train_step(state, vae_state, batch) -> (state, metrics)`` tokenizes the
images with the frozen tokenizer (or, with ``config.data.pretokenized``, reads the indices
from a token cache, see ``token_cache``), builds the teacher-forcing inputs, runs the model
and applies AdamW to the trainable parameters. The state is created already sharded
(``eval_shape`` first, then ``jit`` with output shardings), checkpointed with Orbax
together with the data-iterator state (every ``checkpoint_every_steps`` steps, at a stop and
at the end), and resumed automatically from ``workdir``.

A run never keeps a state that cannot continue: each step's loss and gradient norm are
checked (one step behind, so the host never waits for the device just for this, and
at once on a step that saves), a checkpoint is written only from a finite state, and on
divergence the checkpoint whose parameters produced the non-finite step is set aside, so
that the rerun the error message asks for (a lower learning rate) resumes from a state
that trained. Resuming skips checkpoints that cannot be read or hold non-finite values.

Stage 1 trains everything but the mask branch. Stage 2 starts from a stage-1 export
(``config.stage2.parent``), copies the last n blocks and the head into the mask branch,
and trains only that branch (``optim.STAGE2_TRAINABLE``); the other parameters are not
even differentiated.

The run's ``config.execution`` is resolved once here, for the platform at hand; the model,
the frozen tokenizer (``config.tokenizer.export``, trained beforehand by
``python -m hmar_jax.train_tokenizer`` or converted), the optimizer and the step are built
from that resolved config. What judges the finished model (sample grids, digits scores) are
evaluation hooks (``training.hooks``).

Several processes (``jax.distributed``, one per host) run the same loop: each reads its
rows of every global batch (``training.data``) and
``jax.make_array_from_process_local_data`` joins them into the global batch, so the
updates are those of one process with the same devices. Checkpoints are written by all
processes together (Orbax); the data position in them is the number of global batches
served, the same on every process, so one copy restores any process count. Logs,
TensorBoard, the export and the end-of-training hooks are process 0's; the others wait
for it at the end (``multihost_utils.sync_global_devices``) so that none leaves the
distributed runtime while process 0 still needs it.

Dimension letters: B batch, H/W image side, L tokens, Cv latent channels.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import threading
import zlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from hmar_jax import atomic_io, checkpointing, pretrained, sampling, sharding
from hmar_jax.cli import InputError
from hmar_jax.execution import ExecutionConfig
from hmar_jax.training import data
from hmar_jax.training import hooks
from hmar_jax.training import losses
from hmar_jax.training import metric_writers
from hmar_jax.training import optim
from hmar_jax.training import token_cache
from hmar_jax.training import tokenizer_trainer
from hmar_jax.transformer import MASK_BRANCH, HMARConfig, HMARTransformer
from hmar_jax.transformer.config import LEGACY_EXECUTION_FIELDS


RUN_CONFIG = "train_config.json"
RUN_IDENTITY = "hmar_train_config.json"
REJECTED_CHECKPOINTS = "checkpoints_rejected"
EXPORT = "export"  # the EMA model of a finished run


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``trainable``/``frozen`` are ``nnx.State`` trees."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    ema: Any


def model_config(config: ml_collections.ConfigDict, vae_config) -> HMARConfig:
    """The architecture: ``config.model`` with the tokenizer's vocabulary, latent channels
    and scales (``pretrained.run_model_config``, which export shares); execution settings
    left in ``model.overrides`` are refused here, where a user can still move them."""
    misplaced = sorted(set(config.model.overrides.to_dict()) & set(LEGACY_EXECUTION_FIELDS))
    if misplaced:
        raise InputError(f"config.model.overrides holds execution settings {misplaced}; set "
                         "them in config.execution (e.g. --config.execution.remat=block).")
    return pretrained.run_model_config(config.to_dict(), vae_config)


def resolve_execution(config: ml_collections.ConfigDict) -> ExecutionConfig:
    """``config.execution`` resolved for this platform (unknown keys or values: one error)."""
    return ExecutionConfig.from_mapping(config.execution.to_dict()).resolve()


def check_config(config: ml_collections.ConfigDict) -> None:
    """The checks that need no files, made before anything is trained or written."""
    optim.trainable_filter(config.stage)
    if config.stage == 2 and not config.stage2.parent:
        raise InputError("Stage 2 needs config.stage2.parent; set --config.stage2.parent=DIR, "
                         "a stage-1 export directory.")


def make_step(graphdef, vae_graphdef, cfg: HMARConfig, config: ml_collections.ConfigDict,
              tx: optax.GradientTransformation, schedule, *, microbatches: int = 1):
    """The jittable ``train_step(state, vae_state, inputs, labels) -> (state, metrics)``.

    ``graphdef`` and ``vae_graphdef`` were built with the run's resolved execution config.
    With ``microbatches = k > 1`` (``execution.microbatches``) the batch is split into k
    microbatches that are encoded, run forward and backward one after another
    (``lax.scan``); their mean gradient makes one optimizer update, as for the whole batch,
    with the activation memory of one microbatch. Each device keeps its own rows:
    microbatch i takes rows ``i, i + k, i + 2k, ...`` of the global batch.
    """
    layout = cfg.layout
    weights = jnp.asarray(layout.token_loss_weights(config.loss.weighting))
    stage, ema_decay = config.stage, config.ema_decay
    pretokenized = bool(config.data.pretokenized)

    def loss_and_grads(state: TrainState, vae, inputs, labels, rng):
        """Mean loss, metrics and gradients of one (micro)batch."""
        drop_rng, path_rng, mask_rng = jax.random.split(rng, 3)
        if pretokenized:
            indices = [i.astype(jnp.int32) for i in layout.split_tokens(inputs)]
        else:
            indices = [jax.lax.stop_gradient(i) for i in vae.encode_to_indices(inputs)]
        targets = token_cache.flatten_indices(indices)  # [B, L]
        x_ns = jax.lax.stop_gradient(vae.teacher_forcing_inputs(indices))  # [B, L-1, Cv]
        labels = losses.drop_labels(drop_rng, labels, config.loss.label_dropout, cfg.null_class)
        if stage == 2:
            x_mask = jax.lax.stop_gradient(vae.mask_branch_inputs(indices))
            masked = losses.sample_stage2_mask(mask_rng, layout)[None]  # [1, L-1]

        def loss_fn(trainable):
            # FSDP: gather the non-block weights here; the model gathers each block's own.
            model = nnx.merge(graphdef, *sharding.gather_outside_blocks((trainable, state.frozen)))
            if stage == 1:
                logits = model(x_ns, labels, rng=path_rng)
                return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)
            logits = model.forward_masked(x_ns, x_mask, masked, labels, rng=path_rng)
            return losses.masked_cross_entropy(logits, targets, masked)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        return dict(metrics, loss=loss), grads

    def accumulated(state: TrainState, vae, inputs, labels, rng):
        """Mean metrics and gradients over the microbatches, one at a time."""

        def rows(x):  # [B, ...] -> [k, B/k, ...], microbatch i = rows i, i + k, ...
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
            return sharding.split_like_batch(x, axis=1)

        def add(total, micro):
            inputs, labels, index = micro
            out = loss_and_grads(state, vae, inputs, labels, jax.random.fold_in(rng, index))
            return jax.tree.map(lambda t, o: t + o.astype(t.dtype) / microbatches, total, out), None

        micro = (rows(inputs), rows(labels), jnp.arange(microbatches))
        shapes = jax.eval_shape(lambda m: loss_and_grads(state, vae, *m, rng),
                                jax.tree.map(lambda x: x[0], micro)[:2])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        return jax.lax.scan(add, zeros, micro)[0]

    def train_step(state: TrainState, vae_state, inputs: jax.Array, labels: jax.Array):
        """``inputs``: images f32 ``[B, H, W, 3]`` in [-1, 1], or with
        ``config.data.pretokenized`` cached token indices int32 ``[B, L]``."""
        rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
        vae = nnx.merge(vae_graphdef, vae_state)
        if microbatches == 1:
            metrics, grads = loss_and_grads(state, vae, inputs, labels, rng)
        else:
            metrics, grads = accumulated(state, vae, inputs, labels, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema, trainable)
        # No parameter norm here: its read of the new parameters kept XLA from fusing the EMA
        # into the AdamW update (one more pass over the parameters each step); the loop logs it.
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        new_state = TrainState(state.step + 1, trainable, state.frozen, opt_state, ema)
        return new_state, metrics

    return train_step


def _copy_into_mask_branch(params: dict, cfg: HMARConfig) -> dict:
    """Stage-2 start: the mask tail begins as the last n next-scale blocks and head."""
    n = cfg.num_mask_layers
    params = dict(params)
    params["mask_blocks"] = jax.tree.map(lambda a: a[cfg.depth - n:], params["blocks"])
    params["mask_head_nm"], params["mask_head"] = params["head_nm"], params["head"]
    return params


class Trainer:
    """Builds the mesh, tokenizer, state and step from a config; ``run()`` trains."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        check_config(config)
        self.config = config
        self.execution = resolve_execution(config)
        self.workdir = pathlib.Path(workdir).absolute()
        self.mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
        self.vae = tokenizer_trainer.load_trained_tokenizer(config, self.execution)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = model_config(config, self.vae.config)
        self._check_workdir_config()
        abstract_model = nnx.eval_shape(lambda: self._new_model(0))
        self.filter = optim.trainable_filter(config.stage)
        self.graphdef, abstract_trainable, _ = nnx.split(abstract_model, self.filter, ...)
        self.tx, self.schedule = optim.from_config(config.optimizer, abstract_trainable,
                                                   config.num_train_steps,
                                                   self.execution.moment_dtype)
        self.vae_graphdef, vae_state = nnx.split(self.vae)
        self.vae_state = jax.device_put(vae_state, sharding.replicated(self.mesh))
        self.state_shardings = sharding.tree_shardings(jax.eval_shape(self._init_state), self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        step = make_step(self.graphdef, self.vae_graphdef, self.cfg, config, self.tx,
                         self.schedule, microbatches=self.execution.microbatches)
        self.train_step = jax.jit(
            step, in_shardings=(self.state_shardings, None, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_shardings, None), donate_argnums=0)
        self.param_norm = jax.jit(optax.tree.norm)  # global L2 norm of the trainable parameters
        self.all_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))
        self.manager = checkpointing.training_checkpoints(
            self.workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep,
            every_steps=config.checkpoint_every_steps)

    # ----- state ---------------------------------------------------------------------------
    def _new_model(self, seed: int) -> HMARTransformer:
        return HMARTransformer(self.cfg, self.execution, rngs=nnx.Rngs(seed))

    def _init_state(self) -> TrainState:
        model = self._new_model(self.config.seed)
        _, trainable, frozen = nnx.split(model, self.filter, ...)
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, self.tx.init(trainable),
                          jax.tree.map(jnp.copy, trainable))

    def _parent_params(self) -> dict:
        parent = checkpointing.load_hmar(self.config.stage2.parent, self.execution)
        if parent.config.architecture(ignore=("num_mask_layers",)) != self.cfg.architecture(
                ignore=("num_mask_layers",)):
            raise ValueError(f"The stage-1 parent {self.config.stage2.parent} has a different "
                             "architecture than config.model.")
        params = nnx.to_pure_dict(nnx.state(parent, nnx.Param))
        return {k: v for k, v in params.items() if k not in MASK_BRANCH}

    def initial_state(self) -> TrainState:
        state = jax.jit(self._init_state, out_shardings=self.state_shardings)()
        if self.config.stage == 2:
            model = nnx.merge(self.graphdef, state.trainable, state.frozen)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            fresh_mask_embed = params["mask_embed"]
            params = _copy_into_mask_branch(params | self._parent_params(), self.cfg)
            params["mask_embed"] = fresh_mask_embed
            full = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(full, params)
            nnx.update(model, full)
            _, trainable, frozen = nnx.split(model, self.filter, ...)
            state = TrainState(state.step, trainable, frozen, self.tx.init(trainable),
                               jax.tree.map(jnp.copy, trainable))
            state = jax.device_put(state, self.state_shardings)
        return state

    def restore_latest(self, with_data: bool = False):
        """The newest usable checkpoint's state, sharded like a fresh one (None if there is
        none); with ``with_data`` also the data-iterator state. See ``_restore_newest_usable``."""
        restored = self._restore_newest_usable(with_data)
        if restored is None:
            return None
        state, data_state, _ = restored
        return (state, data_state) if with_data else state

    def _restore_newest_usable(self, with_data: bool):
        """``(state, data_state, unusable_steps)`` of the newest checkpoint that can be read
        and holds finite values; the newer ones are skipped with a warning and listed.

        Raises:
          InputError: there are checkpoints but none is usable (naming the directory).
        """
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              jax.eval_shape(self._init_state), self.state_shardings)
        items = {"state": ocp.args.StandardRestore(target)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        step, restored, unusable = checkpointing.newest_usable(
            self.manager.all_steps(),
            lambda step: self.manager.restore(step, args=ocp.args.Composite(**items)),
            lambda restored: bool(self.all_finite(restored["state"])), self._step_directory)
        if step is not None:
            return restored["state"], restored.get("data"), unusable
        if unusable:
            raise InputError(
                f"No checkpoint in {self.manager.directory} can be resumed from (newest: step "
                f"{unusable[0][0]} {unusable[0][1]}); remove {self.manager.directory} to start "
                "the run over.")
        return None

    def _step_directory(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.manager.directory) / str(step)

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves checkpoint ``step`` out of the way of the run (to ``checkpoints_rejected/``,
        kept for inspection): a later save of the same step would otherwise collide with it."""
        rejected = self.workdir / REJECTED_CHECKPOINTS
        rejected.mkdir(exist_ok=True)
        destination = rejected / str(step)
        suffix = 1
        while destination.exists():
            destination, suffix = rejected / f"{step}.{suffix}", suffix + 1
        if jax.process_index() == 0:
            shutil.move(self._step_directory(step), destination)
        _sync_processes(f"checkpoint {step} set aside")
        self.manager.reload()
        logging.warning("Checkpoint of step %d %s; moved to %s.", step, reason, destination)

    def ema_model(self, state: TrainState) -> HMARTransformer:
        """The model with the EMA of the trainable part and the frozen rest (on the host;
        with several processes, gathered from all of them: call it on every process)."""
        return nnx.merge(self.graphdef, *_to_host((state.ema, state.frozen)))

    def sampling_model(self) -> HMARTransformer:
        """The export (``export`` wrote it), loaded as the sampler runs it: the run's execution
        choices with the blocks left to the inference resolution (scanned under ``"auto"``),
        since unrolled blocks, a training speed choice, only lengthen the sampler's compile
        (``ExecutionConfig.resolve``). What the end-of-training hooks judge."""
        choices = ExecutionConfig.from_mapping(self.config.execution.to_dict())
        execution = choices.replace(scan_blocks="auto").resolve(inference=True)
        return checkpointing.load_hmar(self.workdir / EXPORT, execution)

    def sampling_config(self) -> sampling.SamplingConfig:
        """The run's sampling settings (refinement only once stage 2 trained the mask branch)."""
        return pretrained.run_sampling_config(self.config.to_dict())

    def _run_identity(self) -> dict:
        identity = {"stage": self.config.stage, "model": self.cfg.architecture()}
        identity["model"]["patch_nums"] = list(identity["model"]["patch_nums"])
        return identity

    def _check_workdir_config(self) -> None:
        """Refuses a workdir whose run trained another model or stage (it is recorded by
        ``_record_workdir_config`` once a run's config has passed every check)."""
        path = self.workdir / RUN_IDENTITY
        if not path.exists():
            return
        stored, current = json.loads(path.read_text()), self._run_identity()
        if stored != current:
            differences = [f"stage {stored.get('stage')} there, {current['stage']} here"] \
                if stored.get("stage") != current["stage"] else []
            stored_model = stored.get("model", {})
            differences += [f"model {key} {stored_model.get(key)} there, {value} here"
                            for key, value in current["model"].items()
                            if stored_model.get(key) != value]
            raise InputError(f"{self.workdir} holds a run of another model or stage "
                             f"({'; '.join(differences[:3])}); use a new --workdir or that "
                             "run's config.")

    def _record_workdir_config(self) -> None:
        """Writes the run identity (checked on every later launch in this workdir) and the
        whole config (for `python -m hmar_jax.export --workdir` and the record)."""
        if jax.process_index() != 0:  # one writer on a shared workdir
            return
        identity = json.dumps(self._run_identity(), indent=2).encode()
        atomic_io.atomic_write(self.workdir / RUN_IDENTITY, lambda f: f.write(identity))
        whole = self.config.to_json_best_effort(indent=2).encode()
        atomic_io.atomic_write(self.workdir / RUN_CONFIG, lambda f: f.write(whole))

    # ----- data ------------------------------------------------------------------------------
    def make_iterator(self):
        """This process's rows of each global batch of the configured dataset (see
        ``hmar_jax.training.data``: one global order, whatever the process count)."""
        d = self.config.data
        count, index = jax.process_count(), jax.process_index()
        if d.pretokenized:
            tokens, labels, _ = token_cache.open_token_cache(d.pretokenized, self.vae)
            self._check_num_classes(int(labels.max()) + 1, f"data.pretokenized={d.pretokenized}")
            return token_cache.token_iterator(tokens, labels, batch_size=self.config.batch_size,
                                              seed=self.config.seed, process_index=index,
                                              process_count=count)
        dataset = data.open_dataset(d)
        if dataset.num_classes is not None:
            self._check_num_classes(dataset.num_classes, dataset.name)
        return dataset.batches(self.config.batch_size, seed=self.config.seed,
                               process_index=index, process_count=count)

    def _check_num_classes(self, num_classes: int, dataset: str) -> None:
        """Labels beyond the model's class embedding would train on garbage (and diverge)."""
        if num_classes > self.cfg.num_classes:
            raise InputError(f"{dataset} has {num_classes} classes but the model has "
                             f"num_classes={self.cfg.num_classes}; set "
                             f"--config.model.overrides.num_classes={num_classes}.")

    def _global_batch(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        make = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)  # noqa: E731
        return make(batch[_inputs_key(batch)]), make(batch["label"].astype(np.int32))

    # ----- loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        """Trains to ``config.num_train_steps`` (resuming from the newest usable checkpoint)
        and exports the EMA model to ``workdir/export``; returns the last logged metrics, with
        ``stopped_at_step`` when SIGTERM or a preemption stopped the run early.

        Raises:
          optim.TrainingDiverged: a step's loss, gradient or parameters were not finite.
        """
        stop = _StopRequest()
        try:
            return self._train(stop)
        finally:
            stop.restore()

    def _train(self, stop: "_StopRequest") -> dict[str, float]:
        config = self.config
        # Training needs the batch split evenly (restoring or exporting does not).
        sharding.check_batch_split(config.batch_size, self.execution.microbatches,
                                   self.mesh.devices.size)
        try:
            with stop.interruptible():
                iterator = self.make_iterator()
        except StopRequested:
            logging.warning("Stopped on request while opening the data; nothing was trained.")
            return {"stopped_at_step": self.manager.latest_step() or 0}
        restored = self._restore_newest_usable(with_data=True)
        if restored is None:
            state = self.initial_state()
        else:
            state, data_state, unusable = restored
            for step, reason in unusable:
                self._set_aside(step, reason)
            iterator.set_state(data_state)
            logging.info("Resumed from step %d.", int(state.step))
        self._record_workdir_config()  # the config passed every check: claim the workdir
        is_main = jax.process_index() == 0
        writer = metric_writers.create_writer(str(self.workdir / "tb"), just_logging=not is_main)
        _, periodic_actions = metric_writers.import_clu()
        progress = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer,
                                                    every_steps=config.log_every_steps)]
        if is_main and config.profile_first_step > 0:
            progress.append(periodic_actions.Profile(
                logdir=str(self.workdir / "tb"), num_profile_steps=5, profile_duration_ms=None,
                first_profile=config.profile_first_step, every_steps=None, every_secs=None))
        last: dict[str, float] = {}
        first_step = int(state.step)
        data_state = iterator.get_state()  # the data position after the last finished step
        unchecked = None  # (step, metrics) of a finished step whose finiteness is not yet known
        step_fn = self.train_step
        with jax.set_mesh(self.mesh):
            for step in range(first_step + 1, config.num_train_steps + 1):
                try:
                    with stop.interruptible():
                        batch = next(iterator)
                except StopRequested:
                    if unchecked is not None:
                        self._check_finite(*unchecked)
                    if step - 1 > first_step and self.manager.latest_step() != step - 1:
                        self._save(step - 1, state, data_state)
                    iterator.close()
                    self.manager.wait_until_finished()
                    writer.flush()
                    saved = self.manager.latest_step()
                    logging.warning("Stopped on request (SIGTERM) while waiting for the data of "
                                    "step %d; %s.", step, "nothing is saved, a rerun starts over"
                                    if saved is None else f"a rerun resumes from step {saved}")
                    return last | {"stopped_at_step": step - 1}
                data_state = iterator.get_state()
                if step == first_step + 1 and jax.process_count() > 1:
                    step_fn = self._compiled_for_all_processes(state, batch)
                if config.log_batch_fingerprints:
                    self._log_fingerprint(step, batch)
                inputs, labels = self._global_batch(batch)
                state, metrics = step_fn(state, self.vae_state, inputs, labels)
                if unchecked is not None:  # the previous step: finished, or nearly
                    self._check_finite(*unchecked)
                unchecked = (step, metrics)
                preempted = self.manager.reached_preemption(step) or stop.requested
                saving = preempted or step == config.num_train_steps or \
                    self.manager.should_save(step)
                logging_now = step % config.log_every_steps == 0 or step == config.num_train_steps
                if saving or logging_now:
                    self._check_finite(*unchecked)
                    unchecked = None
                if logging_now:
                    last = _scalar_metrics(jax.device_get(metrics))
                    last["param_norm"] = float(self.param_norm(state.trainable))
                    writer.write_scalars(step, last)
                for action in progress:
                    action(step)
                if saving:
                    self._save(step, state, data_state)
                if preempted:
                    self.manager.wait_until_finished()
                    writer.flush()
                    logging.warning("Stopped at step %d on request (preemption or SIGTERM); the "
                                    "checkpoint is saved and a rerun resumes from it.", step)
                    return last | {"stopped_at_step": step}
        self.manager.wait_until_finished()
        writer.flush()
        self.export(state)
        if is_main:
            finished = hooks.FinishedRun(self.sampling_model(), self.vae, self.workdir)
            for hook in hooks.end_of_training_hooks(config, self.sampling_config()):
                hook(finished)
        _sync_processes("end of training")
        return last

    def _compiled_for_all_processes(self, state: TrainState, batch: dict):
        """The step compiled ahead, once every process has compiled it: the processes then
        enter their first collectives together. Compile times differ between hosts, and CPU
        collectives (gloo) give up when a peer joins a new collective more than 30 s after
        the first; the coordination service's barrier waits as long as the processes live."""
        from orbax.checkpoint import multihost

        inputs, labels = (jax.ShapeDtypeStruct((self.config.batch_size, *x.shape[1:]), x.dtype,
                                               sharding=self.batch_sharding)
                          for x in (batch[_inputs_key(batch)], batch["label"].astype(np.int32)))
        compiled = self.train_step.lower(state, self.vae_state, inputs, labels).compile()
        multihost.sync_global_processes("hmar_jax.train: step compiled",
                                        processes=set(range(jax.process_count())))
        return compiled

    def _save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Checkpoints ``state`` (the state after ``step``) unless it holds a non-finite
        parameter (the step's loss and gradient are checked before this)."""
        if not bool(self.all_finite(state.trainable)):
            self._diverged(step, "non-finite parameters after the update",
                           previous_produced_it=False)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def _check_finite(self, step: int, metrics: dict) -> None:
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"],
                                                              metrics["grad_norm"])))
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            self._diverged(step, f"loss {loss:g}, gradient norm {grad_norm:g}",
                           previous_produced_it=True)

    def _diverged(self, step: int, what: str, previous_produced_it: bool) -> None:
        """Raises ``optim.TrainingDiverged`` naming the checkpoint a rerun resumes from. When the
        state of ``step - 1`` gave the non-finite loss or gradient, its checkpoint is set
        aside: resuming from it would repeat the same step (same batch, same randomness)."""
        self.manager.wait_until_finished()
        if previous_produced_it and step - 1 in self.manager.all_steps():
            self._set_aside(step - 1, f"produced the non-finite step {step}")
        good = self.manager.latest_step()
        rate = f"--config.optimizer.peak_lr (now {self.config.optimizer.peak_lr:g})"
        if good is None:
            after = f"no checkpoint is kept; lower {rate} and rerun to start over."
        else:
            after = (f"the last good checkpoint is step {good} ({self._step_directory(good)}); "
                     f"lower {rate} and rerun to resume from it.")
        raise optim.TrainingDiverged(f"Training diverged at step {step} ({what}); {after}")

    def _log_fingerprint(self, step: int, batch: dict) -> None:
        """An audit of the data each step saw (a resumed run re-logs the steps it repeats):
        appends ``step crc32(images, labels)`` of the global batch to
        ``batch_fingerprints.txt`` and ``step crc,crc,...`` (one per example, in batch
        order) to ``example_fingerprints.txt``. Called on every process (the processes'
        rows are gathered); process 0 writes."""
        inputs, labels = batch[_inputs_key(batch)], batch["label"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            inputs, labels = multihost_utils.process_allgather((inputs, labels), tiled=True)
        if jax.process_index() != 0:
            return
        inputs, labels = np.ascontiguousarray(inputs), np.ascontiguousarray(labels)
        digest = zlib.crc32(labels.tobytes(), zlib.crc32(inputs.tobytes()))
        with open(self.workdir / "batch_fingerprints.txt", "a") as f:
            f.write(f"{step} {digest:08x}\n")
        examples = ",".join(f"{example_fingerprint(x, y):08x}" for x, y in zip(inputs, labels))
        with open(self.workdir / "example_fingerprints.txt", "a") as f:
            f.write(f"{step} {examples}\n")

    def export(self, state: TrainState) -> HMARTransformer:
        """Writes the EMA weights (trainable part) plus the frozen part as an ``hmar`` export
        to ``workdir/export`` (process 0 writes; every process must call this, since the
        weights are gathered from all) and returns that model."""
        model = self.ema_model(state)
        if jax.process_index() == 0:
            checkpointing.save_hmar(self.workdir / EXPORT, model, overwrite=True,
                                    extra_metadata={"stage": self.config.stage,
                                                    "step": int(state.step), "weights": "ema"})
        return model


class StopRequested(Exception):
    """Raised by the SIGTERM handler into a wait for data (see ``_StopRequest``)."""


class _StopRequest:
    """Turns SIGTERM (what schedulers send before killing a job) into a clean stop: at the
    next step boundary, or at once while the loop waits for data (``interruptible``), where
    no step is half-done and the batch may never come (a stalled file system, or a reader
    blocked for good). A second SIGTERM ends the process at once. Multi-host preemption
    comes through Orbax instead."""

    def __init__(self):
        self.requested = False
        self._interruptible = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    @contextlib.contextmanager
    def interruptible(self):
        """A region that SIGTERM leaves by ``StopRequested`` (also if it came just before)."""
        self._interruptible = True
        try:
            if self.requested:
                raise StopRequested()
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum, frame):
        del frame
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        if self._interruptible:
            self._interruptible = False
            raise StopRequested()

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def example_fingerprint(inputs: np.ndarray, label) -> int:
    """crc32 of one example as the step reads it (model-range image or tokens, then the
    int32 label): what ``example_fingerprints.txt`` lists."""
    digest = zlib.crc32(np.ascontiguousarray(inputs).tobytes())
    return zlib.crc32(np.asarray(label, np.int32).tobytes(), digest)


def _to_host(tree: Any) -> Any:
    """A tree of (possibly sharded) global arrays as numpy arrays on this host; with several
    processes a collective over all of them (shards of other hosts are not addressable)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _sync_processes(name: str) -> None:
    """Every process waits here for all the others (nothing to do for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"hmar_jax.train: {name}")


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = float(value)
        else:
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


def _inputs_key(batch: dict) -> str:
    return "tokens" if "tokens" in batch else "image"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Entry point used by ``python -m hmar_jax.train``."""
    return Trainer(config, workdir).run()


def summary_lines(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[str]:
    """Where a finished run's results are, one line each: what each end-of-training hook of
    ``config`` wrote, then the export (paths under ``workdir`` as given)."""
    sampling_config = pretrained.run_sampling_config(config.to_dict())
    lines = [hook.describe(workdir)
             for hook in hooks.end_of_training_hooks(config, sampling_config)]
    return lines + [f"model:   {pathlib.Path(workdir) / EXPORT} (the EMA weights)"]
