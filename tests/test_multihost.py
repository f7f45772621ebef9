"""Several ``jax.distributed`` processes on one machine (CPU devices, gloo collectives):
training, checkpoints across process counts, a killed process, ``evaluate generate``.

The multi-process runs are the command lines a user launches (``python -m
hmar_jax.train``), joined through the coordinator variables ``hmar_jax.distributed``
reads; their reference is the same config trained in this (8-device) process.

Tolerance of multi-process against single-process parameters: the mesh (8 devices on the
``data`` axis), the global batch and every device's rows are the same, so the only
difference is how the gradient's cross-device sum is carried out (gloo between processes,
XLA's in-process all-reduce within one), which may add in another order: float32 rounding,
~1e-7 relative per step, which AdamW's normalised update can lift to ~1e-6 of a parameter's
size over a few steps. ``rtol=1e-5, atol=1e-6`` allows that and nothing more.
"""

import pathlib
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from hmar_jax import distributed
from hmar_jax.cli import InputError
from hmar_jax.training import data, trainer
import multiprocess
from tiny_runs import demo_config

RTOL, ATOL = 1e-5, 1e-6
# 197 held-out digits in global batches of 16: step 13 finishes the first epoch.
STEPS = 13
RUN = {"data.split": "eval", "batch_size": 16, "num_train_steps": STEPS,
       "checkpoint_every_steps": 4, "max_checkpoints_to_keep": 10,
       "log_batch_fingerprints": True, "loss.label_dropout": 0.0}


def flags(tokenizer_export: str, **changes) -> list[str]:
    """The command-line overrides of ``tiny_runs.demo_config`` with ``RUN`` and ``changes``."""
    values = {"tokenizer.export": tokenizer_export, "model.overrides.depth": 2,
              "model.overrides.width": 64, "model.overrides.num_heads": 2,
              "model.overrides.num_mask_layers": 1, "sampling.samples_per_class": 0,
              **RUN, **changes}
    return [f"--config.{key}={value}" for key, value in values.items()]


def train_command(workdir: pathlib.Path, tokenizer_export: str, **changes) -> list[str]:
    return ["-m", "hmar_jax.train", "--config", "configs/demo.py:runlocal", "--workdir",
            str(workdir), *flags(tokenizer_export, **changes)]


def checkpoint_state(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """Every array of a training checkpoint's state (parameters, moments, EMA), read onto the
    host whatever devices wrote it."""
    import orbax.checkpoint as ocp

    directory = (workdir / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(directory)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            restore_args=restore_args))
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def reference_data_state(workdir: pathlib.Path, step: int) -> dict:
    import json

    return json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def assert_same_state(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def fingerprints(workdir: pathlib.Path, name: str = "batch_fingerprints.txt") -> dict[int, str]:
    lines = (workdir / name).read_text().splitlines()
    return {int(step): rest for step, rest in (line.split() for line in lines)}


def seeded_workdir(source: pathlib.Path, step: int, destination: pathlib.Path) -> pathlib.Path:
    """A workdir holding only checkpoint ``step`` of ``source`` (and its run records)."""
    (destination / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / str(step), destination / "checkpoints" / str(step))
    for name in (trainer.RUN_IDENTITY, trainer.RUN_CONFIG):
        shutil.copy(source / name, destination / name)
    return destination


# ----- launch environment and data split (no processes) -------------------------------------
def test_launch_environment_is_read_from_the_launcher_variables():
    env = distributed.launch_environment
    assert env({}) is None and env({"SLURM_NTASKS": "1"}) is None
    assert env({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}) == "slurm"
    assert env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0", "SLURM_NTASKS": "8"}) == "coordinator"
    assert env({distributed.TPU_POD_VARIABLE: "1"}) == "tpu"
    assert env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    with pytest.raises(InputError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"):
        env({"JAX_COORDINATOR_ADDRESS": "h:1"})


@pytest.mark.parametrize("count", [2, 4])
def test_processes_read_disjoint_rows_of_one_global_order(count):
    """Each process's batches are its rows of the single-process global batches: disjoint
    shards that together read every example once per epoch, for any process count."""
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)
    labels = np.arange(40, dtype=np.int32)
    one = data.batched_iterator(images, labels, 8, seed=1)
    shards = [data.batched_iterator(images, labels, 8, seed=1, process_index=p,
                                    process_count=count) for p in range(count)]
    seen = []
    for _ in range(10):  # two epochs of 5 global batches
        whole = next(one)["label"]
        rows = [next(shard)["label"] for shard in shards]
        assert all(len(r) == 8 // count for r in rows)
        np.testing.assert_array_equal(np.concatenate(rows), whole)
        seen.append(whole)
    for epoch in (seen[:5], seen[5:]):
        np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), labels)
    assert shards[0].get_state() == one.get_state()  # the position: global batches served
    with pytest.raises(ValueError, match="batch_size 6 does not split evenly over the 4"):
        data.batched_iterator(images, labels, 6, seed=1, process_index=0, process_count=4)


# ----- training across processes ------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tokenizer_export, tmp_path_factory):
    """The run trained in this process on its 8 devices (checkpoints every 4 steps kept)."""
    workdir = tmp_path_factory.mktemp("one_process") / "run"
    trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **RUN),
                    str(workdir)).run()
    return workdir


@pytest.fixture(scope="module")
def two_processes(tokenizer_export, tmp_path_factory):
    """The same run as 2 processes x 4 devices, from the command line."""
    base = tmp_path_factory.mktemp("two_processes")
    multiprocess.run(train_command(base / "run", tokenizer_export), count=2, local_devices=4,
                     logs=base / "logs")
    return base / "run"


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(reference, two_processes):
    """2 processes x 4 devices end with the single-process run's checkpoints and export, saw
    the same global batches, and read each example once in the first epoch."""
    for step in (4, 8, 12, STEPS):
        assert_same_state(checkpoint_state(two_processes, step), checkpoint_state(reference, step))
    assert fingerprints(two_processes) == fingerprints(reference)
    assert len(fingerprints(two_processes)) == STEPS
    examples = [e for step in sorted(fingerprints(two_processes, "example_fingerprints.txt"))
                for e in fingerprints(two_processes, "example_fingerprints.txt")[step].split(",")]
    images, labels = data.digits_split(16, "eval")
    dataset = [f"{trainer.example_fingerprint(data.to_model_range({'image': x, 'label': y})['image'], y):08x}"
               for x, y in zip(images, labels)]
    assert len(set(dataset)) == len(dataset) == 197
    assert sorted(examples[:197]) == sorted(dataset)  # the first epoch: every example once
    assert set(examples[197:]) <= set(dataset)
    # Process 0 alone wrote the run's records and the export.
    assert (two_processes / "export" / "hmar_config.json").is_file()
    assert not list(two_processes.glob(".*staging*")) and not list(two_processes.glob(".export*"))


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(reference, two_processes, tokenizer_export,
                                                   tmp_path):
    """A checkpoint of 2 processes resumes in 4 processes (2 devices each) and in this single
    process, one of 4 processes and one of a single process resume in 2; each continues as
    the uninterrupted run does."""
    four = seeded_workdir(two_processes, 4, tmp_path / "four")
    multiprocess.run(train_command(four, tokenizer_export), count=4, local_devices=2,
                     logs=tmp_path / "logs_four")
    for step in (8, 12, STEPS):
        assert_same_state(checkpoint_state(four, step), checkpoint_state(reference, step))

    # Two processes resume the 4-process checkpoint of step 8 and (second workdir) the
    # single-process checkpoint of step 12, in one launch each.
    from_four = seeded_workdir(four, 8, tmp_path / "from_four")
    multiprocess.run(train_command(from_four, tokenizer_export), count=2, local_devices=4,
                     logs=tmp_path / "logs_from_four")
    assert_same_state(checkpoint_state(from_four, STEPS), checkpoint_state(reference, STEPS))
    from_one = seeded_workdir(reference, 12, tmp_path / "from_one")
    multiprocess.run(train_command(from_one, tokenizer_export), count=2, local_devices=4,
                     logs=tmp_path / "logs_from_one")
    assert_same_state(checkpoint_state(from_one, STEPS), checkpoint_state(reference, STEPS))
    assert fingerprints(from_one)[STEPS] == fingerprints(reference)[STEPS]

    # This process (8 devices) resumes the 2-process checkpoint of step 8.
    resumed = seeded_workdir(two_processes, 8, tmp_path / "one")
    config = demo_config(**{"tokenizer.export": tokenizer_export}, **RUN)
    state, data_state = trainer.Trainer(config, str(resumed)).restore_latest(with_data=True)
    assert int(state.step) == 8 and data_state == reference_data_state(reference, 8)
    trainer.Trainer(config, str(resumed)).run()
    assert_same_state(checkpoint_state(resumed, STEPS), checkpoint_state(reference, STEPS))


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_a_relaunch_resumes(reference, tokenizer_export,
                                                                   tmp_path):
    """SIGKILL of process 1 mid-run ends process 0 with an error within the coordination
    service's heartbeat limit (no hang); launching both again resumes from the last complete
    checkpoint and ends where the uninterrupted run ends."""
    workdir = tmp_path / "run"
    command = train_command(workdir, tokenizer_export, checkpoint_every_steps=2)
    group = multiprocess.launch(command, count=2, local_devices=4, logs=tmp_path / "logs")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in group.processes):
            if (workdir / "checkpoints" / "2" / "commit_success.txt").exists():
                break
            time.sleep(0.1)
        assert all(p.poll() is None for p in group.processes), group.output(0)[-3000:]
        group.processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        limit = distributed.TIMEOUTS.heartbeat + 60
        code = group.processes[0].wait(timeout=limit)
        seconds = time.monotonic() - killed
    finally:
        group.kill()
    output = group.output(0)
    assert code != 0 and seconds < limit, output[-3000:]
    print(f"process 0 stopped {seconds:.1f} s after its peer was killed (exit {code})")
    print(output[-1500:])
    # The relaunch: both processes again, to the reference's length.
    multiprocess.run(command, count=2, local_devices=4, logs=tmp_path / "logs_again")
    assert_same_state(checkpoint_state(workdir, STEPS), checkpoint_state(reference, STEPS))
