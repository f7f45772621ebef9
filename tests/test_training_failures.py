"""Training that cannot go on stops in bounded time with one message and a workdir that
resumes: divergence, unusable checkpoints, data that never comes, bad config and input."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.training import optim
from hmar_jax.training import trainer
from tiny_runs import demo_config

ROOT = pathlib.Path(__file__).parents[1]
TINY_MODEL_FLAGS = ["--config.model.overrides.depth=2", "--config.model.overrides.width=64",
                    "--config.model.overrides.num_mask_layers=1", "--config.batch_size=8",
                    "--config.sampling.samples_per_class=0"]
# A learning rate that climbs (warm-up) to non-finite gradients a few steps in, saving every
# 2 steps; the rerun the error message asks for uses the demo's rate.
DIVERGING = {"optimizer.peak_lr": 1000.0, "optimizer.warmup_steps": 30, "num_train_steps": 10,
             "max_checkpoints_to_keep": 5, "log_batch_fingerprints": True}
LOWER_RATE = {**DIVERGING, "optimizer.peak_lr": 1e-3}


def checkpoint_steps(workdir: pathlib.Path, folder: str = "checkpoints") -> list[int]:
    directory = workdir / folder
    return sorted(int(p.name) for p in directory.iterdir()) if directory.exists() else []


def checkpoint_is_finite(workdir: pathlib.Path, step: int) -> bool:
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def fingerprint_steps(workdir: pathlib.Path) -> list[int]:
    return [int(line.split()[0])
            for line in (workdir / "batch_fingerprints.txt").read_text().splitlines()]


def params_of(export: pathlib.Path) -> list[np.ndarray]:
    model = checkpointing.load_hmar(export)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def diverged_then_resumed(tokenizer_export, tmp_path_factory):
    """A run that diverges, what it left, and its rerun at a lower rate in the same workdir."""
    workdir = tmp_path_factory.mktemp("diverging") / "run"
    with pytest.raises(optim.TrainingDiverged) as error:
        trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **DIVERGING),
                        str(workdir)).run()
    left = types.SimpleNamespace(
        message=str(error.value), checkpoints=checkpoint_steps(workdir),
        finite={s: checkpoint_is_finite(workdir, s) for s in checkpoint_steps(workdir)},
        rejected=checkpoint_steps(workdir, trainer.REJECTED_CHECKPOINTS),
        steps_run=len(fingerprint_steps(workdir)))
    metrics = trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **LOWER_RATE),
                              str(workdir)).run()
    return types.SimpleNamespace(workdir=workdir, left=left, metrics=metrics)


@pytest.mark.slow  # its fixture: two tiny runs, each compiling its own step
def test_divergence_saves_no_non_finite_state_and_names_the_last_good_step(
        diverged_then_resumed):
    left = diverged_then_resumed.left
    match = re.search(
        r"Training diverged at step (\d+) \(loss \S+, gradient norm nan\); the last good "
        r"checkpoint is step (\d+) \(.*/checkpoints/\2\); lower --config\.optimizer\.peak_lr "
        r"\(now 1000\) and rerun to resume from it\.", left.message)
    assert match, left.message
    diverged_at, good = int(match[1]), int(match[2])
    assert left.checkpoints and all(left.finite.values()), left.finite
    assert good == max(left.checkpoints) and 2 <= good < diverged_at
    # The checkpoint whose parameters produced the non-finite step was set aside: resuming
    # from it would repeat that step exactly.
    assert left.rejected == ([diverged_at - 1] if (diverged_at - 1) % 2 == 0 else [])
    assert left.steps_run == diverged_at + 1  # checked one step behind, as it ran


@pytest.mark.slow
def test_a_lower_rate_resumes_from_the_last_good_checkpoint(diverged_then_resumed):
    run = diverged_then_resumed
    good = max(run.left.checkpoints)
    assert fingerprint_steps(run.workdir)[run.left.steps_run:] == list(range(good + 1, 11))
    assert np.isfinite(run.metrics["loss"]) and max(checkpoint_steps(run.workdir)) == 10
    assert all(checkpoint_is_finite(run.workdir, s) for s in checkpoint_steps(run.workdir))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
        diverged_then_resumed, tokenizer_export, tmp_path, caplog):
    """Emptied files in the newest step directory: the run resumes from the step before
    (warning), sets the broken one aside and ends with the same parameters."""
    workdir = tmp_path / "run"
    shutil.copytree(diverged_then_resumed.workdir, workdir)
    for path in (workdir / "checkpoints" / "10").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **LOWER_RATE),
                    str(workdir)).run()
    assert f"Checkpoint {workdir}/checkpoints/10 cannot be read" in caplog.text
    assert fingerprint_steps(workdir)[-2:] == [9, 10]  # resumed from step 8
    assert 10 in checkpoint_steps(workdir, trainer.REJECTED_CHECKPOINTS)
    for a, b in zip(params_of(diverged_then_resumed.workdir / "export"),
                    params_of(workdir / "export")):
        np.testing.assert_array_equal(a, b)


def test_a_non_finite_checkpoint_is_skipped_on_restore(diverged_then_resumed, tokenizer_export,
                                                       tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(diverged_then_resumed.workdir, workdir)
    config = demo_config(**{"tokenizer.export": tokenizer_export}, **LOWER_RATE)
    run = trainer.Trainer(config, str(workdir))
    state, data_state = run.restore_latest(with_data=True)
    poisoned = jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x,
                            state)
    run.manager.save(12, args=ocp.args.Composite(state=ocp.args.StandardSave(poisoned),
                                                 data=ocp.args.JsonSave(data_state)), force=True)
    run.manager.wait_until_finished()
    assert int(trainer.Trainer(config, str(workdir)).restore_latest().step) == 10
    assert f"Checkpoint {workdir}/checkpoints/12 holds non-finite values" in caplog.text
    for step in checkpoint_steps(workdir):  # only the poisoned one left: one clear message
        if step != 12:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    with pytest.raises(ValueError, match=r"No checkpoint in .*checkpoints can be resumed from "
                                         r"\(newest: step 12 holds non-finite values\); remove"):
        trainer.Trainer(config, str(workdir)).restore_latest()


def test_a_failed_launch_leaves_the_workdir_unclaimed(tokenizer_export, tmp_path):
    """Rejected launches write no run identity, so the corrected command is accepted; an
    image folder with more classes than the model is refused before training."""
    from PIL import Image

    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="config.stage must be 1 or 2, got 3"):
        trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export, "stage": 3}),
                        str(workdir))
    for name in range(12):
        (tmp_path / "images" / f"class{name:02d}").mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 10 * name, np.uint8)).save(
            tmp_path / "images" / f"class{name:02d}" / "0.png")
    twelve = demo_config(**{"tokenizer.export": tokenizer_export, "data.name": "image_folder",
                            "data.root": str(tmp_path / "images")})
    with pytest.raises(ValueError, match=r"data\.root=.*images has 12 classes but the model has "
                                         r"num_classes=10; set --config\.model\.overrides\."
                                         r"num_classes=12\."):
        trainer.Trainer(twelve, str(workdir)).run()
    assert not (workdir / trainer.RUN_IDENTITY).exists()
    assert not (workdir / trainer.RUN_CONFIG).exists()
    trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}), str(workdir))


# ----- command lines ---------------------------------------------------------------------
def _error_line(returncode: int, stderr: str) -> str:
    """The one ``error:`` line of a run refused for its input (exit 2, nothing else but log
    lines, no traceback printed)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert "Traceback" not in stderr.replace(errors[0], ""), stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def refused_launches(tokenizer_export, tmp_path_factory):
    """Command lines with bad input, run side by side: ``{name: (exit status, stderr,
    seconds)}``."""
    tmp = tmp_path_factory.mktemp("launches")
    for name in ("cat", "dog"):
        (tmp / "unreadable" / name).mkdir(parents=True)
        for i in range(3):
            (tmp / "unreadable" / name / f"{i}.jpg").write_bytes(b"")
    trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export,
                                   "model.overrides.width": 128}),
                    str(tmp / "other_model"))._record_workdir_config()
    train = [sys.executable, "-m", "hmar_jax.train", "--config", "configs/demo.py:runlocal",
             f"--config.tokenizer.export={tokenizer_export}", *TINY_MODEL_FLAGS]
    commands = {
        "train_unknown_key": [*train, "--workdir", str(tmp / "a"), "--config.nonexistent=3"],
        "tokenizer_unknown_key": [sys.executable, "-m", "hmar_jax.train_tokenizer", "--config",
                                  "configs/tokenizer_digits.py:runlocal", "--workdir",
                                  str(tmp / "b"), "--config.nonexistent=3"],
        "tokenizer_config_argument": [sys.executable, "-m", "hmar_jax.train_tokenizer",
                                      "--config", "configs/tokenizer_digits.py:fast",
                                      "--workdir", str(tmp / "c")],
        "pretokenize_unknown_key": [sys.executable, "-m", "hmar_jax.pretokenize", "--config",
                                    "configs/demo.py", "--out", str(tmp / "d" / "tokens"),
                                    "--config.nonexistent=3"],
        "missing_tokenizer": [sys.executable, "-m", "hmar_jax.train", "--config",
                              "configs/demo.py:runlocal", "--workdir", str(tmp / "g")],
        "pretokenize_missing_tokenizer": [sys.executable, "-m", "hmar_jax.pretokenize",
                                          "--config", "configs/demo.py", "--out",
                                          str(tmp / "h" / "tokens")],
        "execution_value": [*train, "--workdir", str(tmp / "i"), "--config.execution.remat=fast"],
        "unreadable_images": [*train, "--workdir", str(tmp / "e"),
                              "--config.data.name=image_folder",
                              f"--config.data.root={tmp / 'unreadable'}"],
        "other_model": [*train, "--workdir", str(tmp / "other_model")],
        "digits_split": [*train, "--workdir", str(tmp / "f"), "--config.data.split=test"],
    }
    started, logs, processes = time.monotonic(), {}, {}
    for name, command in commands.items():
        logs[name] = open(tmp / f"{name}.stderr", "w+")
        processes[name] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                           stderr=logs[name], text=True)
    results = {}
    for name, process in processes.items():
        try:
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        logs[name].seek(0)
        results[name] = (returncode, logs[name].read(), time.monotonic() - started)
        logs[name].close()
    return results


@pytest.mark.parametrize("name, message", [
    ("train_unknown_key", r"--config\.nonexistent: the config has no key 'nonexistent'"),
    ("tokenizer_unknown_key", r"--config\.nonexistent: the config has no key 'nonexistent'"),
    ("pretokenize_unknown_key", r"--config\.nonexistent: the config has no key 'nonexistent'"),
    ("tokenizer_config_argument", r"tokenizer_digits\.py:fast: Unknown config argument 'fast'; "
                                  r"known: \['runlocal'\]\."),
    ("unreadable_images", r"None of 6 images sampled from .*unreadable can be read"),
    ("other_model", r"holds a run of another model or stage \(model width 128 there, 64 here\); "
                    r"use a new --workdir"),
    ("digits_split", r"Unknown digits split 'test'"),
    ("missing_tokenizer", r"config\.tokenizer\.export is not set; train one with `python -m "
                          r"hmar_jax\.train_tokenizer --config configs/tokenizer_digits\.py "
                          r"--workdir DIR` and pass --config\.tokenizer\.export=DIR/tokenizer"),
    ("pretokenize_missing_tokenizer", r"config\.tokenizer\.export is not set; train one with "
                                      r"`python -m hmar_jax\.train_tokenizer"),
    ("execution_value", r"execution\.remat='fast' is not one of")])
def test_bad_input_is_one_line_and_exit_2(refused_launches, name, message):
    returncode, stderr, seconds = refused_launches[name]
    line = _error_line(returncode, stderr)
    assert re.search(message, line), line
    assert "Traceback" not in line and 'File "' not in line
    assert seconds < 120


def test_sigterm_stops_a_run_whose_data_never_comes(tokenizer_export, tmp_path):
    """The only other image is a FIFO nobody writes: the first batch never comes and no step
    completes. SIGTERM still ends the run at once, with exit status 0 and nothing saved."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "a" / "0.png")
    fifo = tmp_path / "images" / "b" / "0.png"
    os.mkfifo(fifo)
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "hmar_jax.train", "--config", "configs/demo.py:runlocal",
               "--workdir", str(workdir), f"--config.tokenizer.export={tokenizer_export}",
               "--config.data.name=image_folder", f"--config.data.root={tmp_path / 'images'}",
               *TINY_MODEL_FLAGS]
    with open(tmp_path / "stderr", "w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        writer = None
        try:
            deadline = time.monotonic() + 120
            while writer is None and time.monotonic() < deadline and process.poll() is None:
                try:  # succeeds once the run has the FIFO open for reading
                    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    time.sleep(0.1)
            assert writer is not None, "the run never started reading its data"
            time.sleep(1.0)  # the reader now waits in read(): no data, a writer present
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
            seconds = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                process.kill()
            if writer is not None:
                os.close(writer)
        log.seek(0)
        stderr = log.read()
    assert returncode == 0 and seconds < 30, stderr[-2000:]
    assert "Stopped on request (SIGTERM) while waiting for the data of step 1" in stderr
    assert checkpoint_steps(workdir) == []


def test_a_missing_tokenizer_is_refused_with_the_command_that_makes_one(tmp_path):
    """The trainer never trains a tokenizer: without an export it names the command and the
    flag, and leaves no workdir behind."""
    for export in ("", str(tmp_path / "nothing_here")):
        with pytest.raises(ValueError, match=r"train one with `python -m hmar_jax\.train_tokenizer "
                                             r"--config configs/tokenizer_digits\.py --workdir "
                                             r"DIR` and pass --config\.tokenizer\.export="
                                             r"DIR/tokenizer"):
            trainer.Trainer(demo_config(**{"tokenizer.export": export}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_bad_execution_section_is_one_clear_error(tokenizer_export, tmp_path):
    config = demo_config(**{"tokenizer.export": tokenizer_export})
    config.execution.remat_policy = "block"  # not a setting
    with pytest.raises(ValueError, match=r"Unknown execution setting\(s\) \['remat_policy'\]; "
                                         r"the settings are \["):
        trainer.Trainer(config, str(tmp_path / "run"))
    for key, value, message in [("remat", "fast", r"execution\.remat='fast' is not one of"),
                                ("moment_dtype", "float16", r"execution\.moment_dtype='float16'"),
                                ("attention", "cudnn", r"execution\.attention='cudnn'")]:
        config = demo_config(**{"tokenizer.export": tokenizer_export, f"execution.{key}": value})
        with pytest.raises(ValueError, match=message):
            trainer.Trainer(config, str(tmp_path / "run"))
    # A runtime setting left in the architecture section is named, with where it belongs.
    config = demo_config(**{"tokenizer.export": tokenizer_export})
    config.model.overrides.remat = "block"
    with pytest.raises(ValueError, match=r"config\.model\.overrides holds execution settings "
                                         r"\['remat'\]; set them in config\.execution"):
        trainer.Trainer(config, str(tmp_path / "run"))


def test_importing_the_commands_defines_no_flag():
    """Every absl command defines its flags when it runs (cli.run_absl), so importing them
    all in one process (tests, notebooks, another tool) leaves absl's flags untouched."""
    script = """
from absl import flags
before = set(flags.FLAGS)
import hmar_jax.train, hmar_jax.train_tokenizer, hmar_jax.pretokenize, hmar_jax.evaluate.__main__
print(sorted(set(flags.FLAGS) - before))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                            capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout
