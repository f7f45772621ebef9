"""Trainer: stage-2 freeze, end-of-run summary, sharded == single-device, SIGTERM stop, config
guards (the SIGKILL-and-resume run is in test_multihost)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hmar_jax import checkpointing, execution, sharding
from hmar_jax.execution import ExecutionConfig
from hmar_jax.training import optim
from hmar_jax.training import trainer
from hmar_jax.transformer import is_mask_branch
from tiny_runs import demo_config


def params_of(workdir) -> dict:
    model = checkpointing.load_hmar(pathlib.Path(workdir) / "export")
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_stage2_trains_only_the_mask_branch(tmp_path, tokenizer_export):
    stage1 = demo_config(**{"tokenizer.export": tokenizer_export, "num_train_steps": 2})
    trainer.Trainer(stage1, str(tmp_path / "s1")).run()
    stage2 = demo_config(**{"tokenizer.export": tokenizer_export, "num_train_steps": 3, "stage": 2,
                            "stage2.parent": str(tmp_path / "s1" / "export"),
                            "ema_decay": 0.0, "sampling.samples_per_class": 2})
    run = trainer.Trainer(stage2, str(tmp_path / "s2"))
    start = run.initial_state()
    start_model = nnx.merge(run.graphdef, jax.device_get(start.trainable), jax.device_get(start.frozen))
    start_params = nnx.to_pure_dict(nnx.state(start_model, nnx.Param))
    parent = params_of(tmp_path / "s1")
    # The mask tail starts as the last n next-scale blocks and the next-scale head.
    np.testing.assert_array_equal(np.asarray(start_params["mask_blocks"]["ffn"]["fc1"]["kernel"][0]),
                                  np.asarray(parent["blocks"]["ffn"]["fc1"]["kernel"][-1]))
    run.run()
    final = params_of(tmp_path / "s2")
    changed = set()
    for (path, old), (_, new) in zip(jax.tree_util.tree_flatten_with_path(start_params)[0],
                                     jax.tree_util.tree_flatten_with_path(final)[0]):
        if not np.array_equal(np.asarray(old), np.asarray(new)):
            changed.add(tuple(p.key for p in path))
    assert changed and all(is_mask_branch(p) for p in changed)
    for key in ("blocks", "head", "class_emb", "pos_embed"):
        for a, b in zip(jax.tree.leaves(parent[key]), jax.tree.leaves(final[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The run ends with a class-conditional grid (a row per class) and the samples as npz.
    samples = np.load(tmp_path / "s2" / "samples.npz")
    assert samples["images"].shape == (20, 16, 16, 3) and samples["images"].dtype == np.uint8
    np.testing.assert_array_equal(samples["labels"], np.repeat(np.arange(10), 2))
    assert (tmp_path / "s2" / "samples.png").is_file()
    # ... scored, as the lines the command prints at the end say.
    report = json.loads((tmp_path / "s2" / "samples_eval.json").read_text())
    samples_line, scores_line, model_line = trainer.summary_lines(stage2, tmp_path / "s2")
    assert f"{report['accuracy']:.1%} of 20 samples classified as their class" in scores_line
    assert model_line.startswith(f"model:   {tmp_path / 's2' / 'export'} ")


def test_a_finished_run_names_where_its_results_are(tmp_path):
    """What ``python -m hmar_jax.train`` prints at the end: the sample grid and the digits
    scores when the config asks for them, then the export; paths as the workdir was given."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "samples_eval.json").write_text(json.dumps({
        "accuracy": 0.972, "num_samples": 1000, "frechet_distance": 9.2824,
        "frechet_distance_real_held_out": 11.3639}))
    config = demo_config(**{"sampling.samples_per_class": 100})
    assert trainer.summary_lines(config, workdir) == [
        f"samples: {workdir}/samples.png (a row of 10 per class; all 100 per class in samples.npz)",
        f"scores:  {workdir}/samples_eval.json: 97.2% of 1000 samples classified as their class, "
        "Frechet distance 9.28 (real held-out digits: 11.36)",
        f"model:   {workdir}/export (the EMA weights)"]
    assert trainer.summary_lines(demo_config(), "runs/a") == [
        "model:   runs/a/export (the EMA weights)"]
    folder = demo_config(**{"sampling.samples_per_class": 2, "data.name": "image_folder"})
    assert [line.split(":")[0] for line in trainer.summary_lines(folder, "runs/b")] == [
        "samples", "model"]


# The sharded steps below and their single-device reference: batch 16 without label
# dropout, so that two microbatches of 8 make the same update as one pass.
STEP_CHANGES = {"loss.label_dropout": 0.0, "batch_size": 16}


@pytest.fixture(scope="module")
def single_device_step(tokenizer_export, tmp_path_factory):
    """Loss, grad norm and updated parameters of the first demo batch stepped on one
    device, unsharded: the reference of every mesh below (the same config, data order and
    initial state)."""
    run = trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **STEP_CHANGES),
                          str(tmp_path_factory.mktemp("single")))
    batch = next(run.make_iterator())
    step = trainer.make_step(run.graphdef, run.vae_graphdef, run.cfg, run.config, run.tx, run.schedule)
    with jax.default_device(jax.devices()[0]):
        state, metrics = jax.jit(step)(jax.device_get(run.initial_state()),
                                       jax.device_get(run.vae_state),
                                       np.asarray(batch["image"]), np.asarray(batch["label"]))
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.trainable)


@pytest.mark.parametrize("mesh, microbatches", [
    ((("data", 8), ("fsdp", 1)), 1),
    ((("data", 4), ("fsdp", 2)), 2),  # two sequential halves, mean gradient
    ((("data", 2), ("fsdp", 4)), 1)])
@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path, tokenizer_export, mesh, microbatches,
                                            single_device_step):
    """One step on a forced 8-device mesh (data x FSDP; on 4x2 in two microbatches) gives
    the loss, gradient norm and parameters of the unsharded single-device step."""
    config = demo_config(**{"tokenizer.export": tokenizer_export, "mesh": mesh,
                            "execution.microbatches": microbatches}, **STEP_CHANGES)
    run = trainer.Trainer(config, str(tmp_path))
    assert run.mesh.devices.size == 8
    images, labels = run._global_batch(next(run.make_iterator()))
    # Built outside the mesh context, as the training loop builds it: on the 8 x 1 mesh the
    # same program as every other run's initial state.
    initial = run.initial_state()
    with jax.set_mesh(run.mesh):
        state, metrics = run.train_step(initial, run.vae_state, images, labels)
    if dict(mesh)["fsdp"] > 1:
        spec = state.trainable["blocks"]["ffn"]["fc1"]["kernel"][...].sharding.spec
        assert "fsdp" in tuple(spec)  # the big matrices are sharded, not replicated
    loss, grad_norm, params = single_device_step
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)
    for got, want in zip(jax.tree.leaves(jax.device_get(state.trainable)), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_microbatches_that_do_not_split_are_refused(tmp_path, tokenizer_export):
    changes = {"tokenizer.export": tokenizer_export, **STEP_CHANGES}
    with pytest.raises(ValueError, match="must split evenly over the 8 devices"):
        trainer.Trainer(demo_config(**changes, **{"execution.microbatches": 4}),
                        str(tmp_path / "uneven")).run()
    with pytest.raises(ValueError, match="divide batch_size=16"):
        trainer.Trainer(demo_config(**changes, **{"execution.microbatches": 3}),
                        str(tmp_path / "odd")).run()


def test_workdir_of_another_model_is_refused(tmp_path, tokenizer_export):
    """The workdir is claimed (``_record_workdir_config``, which ``run`` calls once the config
    passed every check) for one model and stage; another is refused, naming the difference."""
    trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}),
                    str(tmp_path))._record_workdir_config()
    other = demo_config(**{"tokenizer.export": tokenizer_export, "model.overrides.width": 128})
    with pytest.raises(ValueError, match="another model or stage .*model width 64 there, 128 here"):
        trainer.Trainer(other, str(tmp_path))


def test_weight_decay_groups_and_schedule():
    params = {"blocks": {"attn": {"q_bias": 0, "mat_qkv": {"kernel": 0}}, "ffn": {"fc1": {"bias": 0}}},
              "lvl_embed": {"embedding": 0}, "class_emb": {"embedding": 0}, "mask_embed": 0,
              "pos_embed": 0}
    mask = optim.decay_mask(params)
    assert mask["blocks"]["attn"]["mat_qkv"]["kernel"] and mask["class_emb"]["embedding"]
    assert mask["mask_embed"]
    assert not (mask["blocks"]["attn"]["q_bias"] or mask["blocks"]["ffn"]["fc1"]["bias"]
                or mask["lvl_embed"]["embedding"] or mask["pos_embed"])
    schedule = optim.lin0_schedule(1.0, total_steps=1001, warmup_steps=100)
    assert float(schedule(0)) == pytest.approx(0.005)
    assert float(schedule(100)) == pytest.approx(1.0)
    assert float(schedule(140)) == pytest.approx(1.0)  # held for 5% after warm-up
    assert float(schedule(1000)) == pytest.approx(0.1, abs=1e-3)
    decay = optim.cosine_weight_decay(0.05, 0.08, total_steps=101)
    assert float(decay(0)) == pytest.approx(0.05) and float(decay(100)) == pytest.approx(0.08)
    assert float(decay(50)) == pytest.approx(0.065)


def test_bfloat16_first_moment_keeps_the_update_close():
    import ml_collections

    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "bias": jnp.zeros((8,))}
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3 * p) + 0.01, params)
    opt = ml_collections.ConfigDict(dict(peak_lr=1e-3, warmup_steps=0, end_fraction=0.1,
                                         weight_decay=0.05, weight_decay_end=0.05, grad_clip=2.0,
                                         b1=0.9, b2=0.95))
    updates = {}
    for mu_dtype in execution.DTYPES:
        tx, _ = optim.from_config(opt, params, total_steps=10, moment_dtype=mu_dtype)
        state = tx.init(params)
        adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu")][0]
        assert {leaf.dtype for leaf in jax.tree.leaves(adam.mu)} == {jnp.dtype(mu_dtype)}
        assert {leaf.dtype for leaf in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}
        for _ in range(3):
            updates[mu_dtype], state = tx.update(grads, state, params)
    for name in params:
        np.testing.assert_allclose(updates["bfloat16"][name], updates["float32"][name],
                                   rtol=1e-2, atol=1e-8)
    with pytest.raises(ValueError, match="execution.moment_dtype"):
        ExecutionConfig(moment_dtype="float16")


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((("data", 16), ("fsdp", 1)))
    with pytest.raises(ValueError, match="At most one"):
        sharding.make_mesh((("data", -1), ("fsdp", -1)))
    assert sharding.make_mesh((("data", -1), ("fsdp", 2))).shape == {"data": 4, "fsdp": 2}


@pytest.mark.slow
def test_trains_on_an_image_folder(tmp_path, tokenizer_export):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (24, 20 + i, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    config = demo_config(**{"tokenizer.export": tokenizer_export, "data.name": "image_folder",
                            "data.root": str(tmp_path / "images"), "num_train_steps": 2})
    run = trainer.Trainer(config, str(tmp_path / "run"))
    metrics = run.run()
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0 and "ce_per_scale/5" in metrics
    # The logged parameter norm is that of the trained (not the EMA) parameters.
    trained = run.restore_latest().trainable
    assert metrics["param_norm"] == pytest.approx(float(optax.tree.norm(trained)), rel=1e-6)
    with pytest.raises(ValueError, match="Unknown data.name"):
        trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export, "data.name": "mnist"}),
                        str(tmp_path / "bad")).make_iterator()


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_checkpoint(tmp_path, tokenizer_export):
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "hmar_jax.train", "--config", "configs/demo.py:runlocal",
               "--workdir", str(workdir), f"--config.tokenizer.export={tokenizer_export}",
               "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
               "--config.log_batch_fingerprints=True", "--config.model.overrides.depth=2",
               "--config.model.overrides.width=64", "--config.model.overrides.num_mask_layers=1",
               "--config.batch_size=8"]
    process = subprocess.Popen(command, cwd=pathlib.Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = workdir / "batch_fingerprints.txt"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and len(log.read_text().split()) >= 6):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0  # a clean exit, not a kill
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert 3 <= max(steps) < 400  # saved at the stop, off the 1000-step interval
    assert not (workdir / "export").exists()


def test_the_run_is_built_from_its_resolved_execution_config(tmp_path, tokenizer_export):
    """config.execution is resolved once: the model, the tokenizer, the optimizer moments and
    the step's microbatches follow it."""
    config = demo_config(**{"tokenizer.export": tokenizer_export, "execution.moment_dtype":
                            "bfloat16", "execution.microbatches": 2, "execution.remat": "block",
                            "execution.tokenizer_precision": "highest"})
    run = trainer.Trainer(config, str(tmp_path))
    assert run.execution == execution.resolved("cpu", moment_dtype="bfloat16", microbatches=2,
                                               remat="block", tokenizer_precision="highest")
    assert run.vae.precision == "highest"
    model = nnx.eval_shape(lambda: run._new_model(0))
    assert model.execution == run.execution
    state = jax.eval_shape(run._init_state)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    assert {leaf.dtype for leaf in jax.tree.leaves(adam.mu)} == {jnp.dtype("bfloat16")}


def test_the_hooks_sample_the_export_with_scanned_blocks(tmp_path, tokenizer_export):
    """A run that trains with its blocks unrolled (faster steps; the demo's choice): what the
    end-of-training hooks sample is the export with the blocks scanned (a shorter sampler
    compile), as inference resolves them, the other execution choices and the weights
    unchanged."""
    run = trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export,
                                         "execution.scan_blocks": "false"}), str(tmp_path))
    exported = run.export(run.initial_state())
    model = run.sampling_model()
    assert run.execution.scan_blocks is False
    assert model.execution == run.execution.replace(scan_blocks=True)
    for a, b in zip(jax.tree.leaves(nnx.state(exported, nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clu_imports_whatever_imported_it_before(tmp_path):
    """CLU is reached through metric_writers.import_clu, which works after another module
    tried (and, without TensorFlow, failed) to import clu.metric_writers first; importing
    metric_writers itself loads nothing of CLU."""
    import subprocess
    import sys

    script = f"""
import sys
try:
    import clu.metric_writers
except ImportError:
    pass
from hmar_jax.training import metric_writers
writer = metric_writers.create_writer({str(tmp_path)!r})
writer.write_scalars(1, {{"loss": 1.0}})
writer.flush()
_, periodic_actions = metric_writers.import_clu()
periodic_actions.ReportProgress(num_train_steps=2, writer=writer)(1)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=pathlib.Path(__file__).parents[1])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    fresh = subprocess.run([sys.executable, "-c", "import sys\nfrom hmar_jax.training import "
                            "metric_writers\nprint(sorted(m for m in sys.modules if m.startswith('clu')))"],
                           check=True, capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).parents[1])
    assert fresh.stdout.strip() == "[]"
