"""Several ``jax.distributed`` processes on one machine (CPU devices, gloo collectives):
training (launched through ``launch/slurm_gpu.sh`` under a stand-in ``srun``), a killed
process and the relaunch, checkpoints across process counts, ``evaluate generate``.

The multi-process runs are the command lines a user launches (``python -m hmar_jax.train``,
``python -m hmar_jax.evaluate generate``), joined through the variables
``hmar_jax.distributed`` reads; the training reference is the same config trained in this
(8-device) process. One run of each kind serves every test of this module: the launches
are the expensive part (each process starts JAX, and processes other than 0 compile their
programs again, see ``multiprocess``).

Tolerance of multi-process against single-process parameters: the mesh (8 devices on the
``data`` axis), the global batch and every device's rows are the same, so the only
difference is how the gradient's cross-device sum is carried out (gloo between processes,
XLA's in-process all-reduce within one), which may add in another order: float32 rounding,
~1e-7 relative per step, which AdamW's normalised update can lift to ~1e-6 of a parameter's
size over a few steps. ``rtol=1e-5, atol=1e-6`` allows that and nothing more. Restoring
moves arrays without arithmetic, so restored states are compared bit for bit.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from hmar_jax import distributed
from hmar_jax.cli import InputError
from hmar_jax.training import data, trainer
import multiprocess
from tiny_runs import demo_config, tiny_bundle

ROOT = pathlib.Path(__file__).parents[1]

RTOL, ATOL = 1e-5, 1e-6
# 197 held-out digits in global batches of 64: the first epoch ends in step 4, the run in the
# second epoch; checkpoints every 2 steps leave the killed run 4 steps to be killed in.
STEPS, EVERY = 6, 2
# The smallest model the demo config takes (one block) over a tokenizer of four scales: the
# launches compile its programs several times (see ``multiprocess``).
RUN = {"model.overrides.depth": 1, "data.split": "eval", "batch_size": 64,
       "num_train_steps": STEPS, "checkpoint_every_steps": EVERY, "max_checkpoints_to_keep": 10,
       "log_batch_fingerprints": True, "loss.label_dropout": 0.0}


def flags(tokenizer_export: str, **changes) -> list[str]:
    """The command-line overrides of ``tiny_runs.demo_config`` with ``RUN`` and ``changes``."""
    values = {"tokenizer.export": tokenizer_export, "model.overrides.width": 64,
              "model.overrides.num_heads": 2, "model.overrides.num_mask_layers": 1,
              "sampling.samples_per_class": 0, **RUN, **changes}
    return [f"--config.{key}={value}" for key, value in values.items()]


def train_command(workdir: pathlib.Path, tokenizer_export: str, **changes) -> list[str]:
    return ["-m", "hmar_jax.train", "--config", "configs/demo.py:runlocal", "--workdir",
            str(workdir), *flags(tokenizer_export, **changes)]


def checkpoint_state(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a training checkpoint's state (parameters, moments, EMA) by its path
    (``multiprocess.flat_state``), read onto the host whatever devices wrote it."""
    import orbax.checkpoint as ocp

    directory = (workdir / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(directory)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            restore_args=restore_args))
    return {k: np.asarray(v) for k, v in multiprocess.flat_state(restored).items()}


def checkpoint_data_state(workdir: pathlib.Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


def assert_identical_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
        assert np.asarray(got[key]).dtype == want[key].dtype, key


def restored_state(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays ``multiprocess.restore_main`` wrote."""
    with np.load(path) as restored:
        return {key: restored[key] for key in restored.files}


def fingerprints(workdir: pathlib.Path, name: str = "batch_fingerprints.txt") -> dict[int, str]:
    """``step -> fingerprint`` (a step logged twice, before and after a resume: the last)."""
    lines = (workdir / name).read_text().splitlines()
    return {int(step): rest for step, rest in (line.split() for line in lines)}


def seeded_workdir(source: pathlib.Path, step: int, destination: pathlib.Path) -> pathlib.Path:
    """A workdir holding only checkpoint ``step`` of ``source``."""
    (destination / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / str(step), destination / "checkpoints" / str(step))
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
def tokenizer_export(tmp_path_factory) -> str:
    """A random tokenizer export for 16 px digits with four scales (1, 2, 4, 8)."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                      using_sa=False, norm_groups=4, patch_nums=(1, 2, 4, 8))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    checkpointing.save_tokenizer(path, VQVAE(cfg, rngs=nnx.Rngs(0)))
    return str(path)


@dataclasses.dataclass
class Runs:
    """The module's training runs of ``RUN``.

    ``reference``: trained in this process on its 8 devices. ``workdir``: the same run as 2
    processes x 4 devices, launched with the coordinator variables, process 1 SIGKILLed
    once checkpoint ``EVERY`` is complete, then relaunched to the end by
    ``launch/slurm_gpu.sh`` under the stand-in ``srun`` (``multiprocess.FAKE_SRUN``), 2
    tasks of 4 CPU devices; ``record`` holds srun's arguments, each task's environment and
    output (``task<i>.log``). ``record / "four_processes"``: checkpoint ``EVERY`` of the
    2-process run restored by 4 processes x 2 devices (``multiprocess.restore_main``) and
    saved again by them; what they restored is in ``record / "restored_by_four"``.

    The reference trains while the 2 processes compile, and the 4 processes restore while
    process 0 waits for the coordination service to notice its dead peer: time in which
    the 2 processes leave the CPU idle.
    """

    reference: pathlib.Path
    workdir: pathlib.Path
    record: pathlib.Path
    killed: bool  # process 1 was killed while both ran
    exit_code: int | None  # process 0's, after its peer was killed
    seconds: float  # from the kill to process 0's end
    output: str  # process 0's, before the relaunch


@pytest.fixture(scope="module")
def runs(tokenizer_export, tmp_path_factory) -> Runs:
    record = tmp_path_factory.mktemp("two_processes")
    workdir = record / "run"
    group = multiprocess.launch(train_command(workdir, tokenizer_export), count=2,
                                local_devices=4, logs=record / "killed")
    outcome = {"killed": False, "exit_code": None, "seconds": float("inf")}

    def kill_when_checkpointed():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in group.processes):
            if (workdir / "checkpoints" / str(EVERY) / "commit_success.txt").exists():
                break
            time.sleep(0.02)
        if not all(p.poll() is None for p in group.processes):
            return
        group.processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        outcome["killed"] = True
        try:
            outcome["exit_code"] = group.processes[0].wait(
                timeout=distributed.TIMEOUTS.heartbeat + 60)
        except subprocess.TimeoutExpired:
            return
        outcome["seconds"] = time.monotonic() - killed

    watcher = threading.Thread(target=kill_when_checkpointed)
    watcher.start()
    four = None
    try:
        reference = tmp_path_factory.mktemp("one_process") / "run"
        trainer.Trainer(demo_config(**{"tokenizer.export": tokenizer_export}, **RUN),
                        str(reference)).run()
        while watcher.is_alive() and not outcome["killed"]:
            time.sleep(0.05)
        if outcome["killed"]:  # checkpoint EVERY is complete: 4 processes restore it
            four = multiprocess.launch(multiprocess.restore_command(
                [seeded_workdir(workdir, EVERY, record / "from_two")], record / "restored_by_four",
                {"tokenizer.export": tokenizer_export, **RUN}, save_to=record / "four_processes"),
                count=4, local_devices=2, logs=record / "logs_four")
    finally:
        watcher.join()
        group.kill()
        if four is not None:
            codes = four.wait(timeout=300)
            assert not any(codes), "\n".join(four.output(i)[-2000:] for i in range(4))

    multiprocess.stand_in(record / "bin", "srun", multiprocess.FAKE_SRUN)
    env = multiprocess.cpu_environment(4)
    env.update(PATH=f"{record / 'bin'}{os.pathsep}{env['PATH']}", RECORD=str(record),
               PYTHON=sys.executable, SLURM_NTASKS="2", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(ROOT), JAX_COORDINATOR_PORT=str(multiprocess.free_port()))
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sh"),
                             "configs/demo.py:runlocal", str(workdir),
                             *flags(tokenizer_export)], cwd=record, env=env, timeout=300)
    logs = "\n".join((record / f"task{i}.log").read_text()[-2000:] for i in range(2)
                     if (record / f"task{i}.log").exists())
    assert result.returncode == 0, logs
    return Runs(reference, workdir, record, output=group.output(0), **outcome)


@pytest.fixture(scope="module")
def reference(runs) -> pathlib.Path:
    return runs.reference


@pytest.mark.slow
def test_a_killed_process_stops_the_others_and_a_relaunch_resumes(runs, reference):
    """SIGKILL of process 1 mid-run ends process 0 with an error within the coordination
    service's heartbeat limit (no hang, no export); launching both again resumes from the
    last complete checkpoint and ends where the uninterrupted run ends."""
    run = runs
    assert run.killed, run.output[-3000:]
    print(f"process 0 stopped {run.seconds:.1f} s after its peer was killed "
          f"(exit {run.exit_code})")
    assert run.exit_code != 0 and run.seconds < distributed.TIMEOUTS.heartbeat + 60, \
        run.output[-3000:]
    # Either the coordination service reports the silent peer, or a collective that lost
    # its peer aborts the process first; both end it with an error message.
    assert any(message in run.output for message in (
        "stopped sending heartbeats", "Fatal Python error")), run.output[-3000:]
    relaunch = (run.record / "task0.log").read_text()
    resumed = [int(line.rsplit(" ", 1)[1].rstrip(".")) for line in relaunch.splitlines()
               if "Resumed from step" in line]
    assert len(resumed) == 1 and resumed[0] in range(EVERY, STEPS, EVERY), relaunch[-3000:]
    assert_same_state(checkpoint_state(run.workdir, STEPS), checkpoint_state(reference, STEPS))


@pytest.mark.slow
def test_slurm_launch_joins_the_tasks_into_one_run(runs, tokenizer_export):
    """srun gets the training command, each task SLURM's variables (JAX's SLURM detection:
    coordinator on the step's first node, JAX_COORDINATOR_PORT) and the inherited
    compilation cache, and the tasks train as one run of 8 devices."""
    workdir, record = runs.workdir, runs.record
    assert (record / "srun_args").read_text().splitlines() == [
        "--kill-on-bad-exit=1", sys.executable, "-m", "hmar_jax.train", "--config",
        "configs/demo.py:runlocal", "--workdir", str(workdir), *flags(tokenizer_export)]
    port = None
    for task in range(2):
        variables = dict(line.split("=", 1) for line in
                         (record / f"task{task}.env").read_text().splitlines())
        port = port or variables["JAX_COORDINATOR_PORT"]
        assert {k: variables[k] for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                                          "SLURM_STEP_NODELIST", "SLURM_JOB_ID",
                                          "JAX_COORDINATOR_PORT")} == {
            "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
            "JAX_COORDINATOR_PORT": port}
        assert variables["JAX_COMPILATION_CACHE_DIR"] == os.environ.get(
            "JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
    # One run: each step's global batch of 64 gathered from both tasks, one export.
    lines = (workdir / "example_fingerprints.txt").read_text().splitlines()
    assert {len(line.split()[1].split(",")) for line in lines} == {64}
    assert (workdir / "export" / "hmar_config.json").is_file()
    assert not list(workdir.glob(".*staging*")) and not list(workdir.glob(".export*"))


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(reference, runs):
    """The 2-process run (with its relaunch) wrote the single-process run's checkpoints, saw
    the same global batches, and read each example once in the first epoch (a step run
    again after the relaunch counts once: its last record)."""
    two_processes = runs.workdir
    saved = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(EVERY, STEPS + 1, EVERY))  # the interval's steps, not step 1
    for step in range(EVERY, STEPS + 1, EVERY):
        assert_same_state(checkpoint_state(two_processes, step), checkpoint_state(reference, step))
        assert checkpoint_data_state(two_processes, step) == checkpoint_data_state(reference, step)
    assert fingerprints(two_processes) == fingerprints(reference)
    assert sorted(fingerprints(two_processes)) == list(range(1, STEPS + 1))
    per_step = fingerprints(two_processes, "example_fingerprints.txt")
    examples = [e for step in sorted(per_step) for e in per_step[step].split(",")]
    images, labels = data.digits_split(16, "eval")
    model_range = data.to_model_range({"image": images, "label": labels})["image"]
    dataset = [f"{trainer.example_fingerprint(x, y):08x}" for x, y in zip(model_range, labels)]
    assert len(set(dataset)) == len(dataset) == 197 and len(examples) == 64 * STEPS
    assert sorted(examples[:197]) == sorted(dataset)  # the first epoch: every example once
    assert set(examples[197:]) <= set(dataset)


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(runs, tokenizer_export, tmp_path):
    """The trainer's restore (``Trainer.restore_latest``, no step compiled) of a checkpoint
    written by 2 processes, in 4 processes (2 devices each) and in this single process; of
    one written by 4 processes and one written by this process, in 2 processes. Each gives
    the checkpoint's arrays exactly and the data position of the uninterrupted run."""
    changes = {"tokenizer.export": tokenizer_export, **RUN}
    want = checkpoint_state(runs.workdir, EVERY)
    want_data = checkpoint_data_state(runs.reference, EVERY)
    assert_same_state(want, checkpoint_state(runs.reference, EVERY))

    # 4 processes restored the 2-process checkpoint and saved it again (a 4-process write).
    four = runs.record / "four_processes"
    assert_identical_state(restored_state(runs.record / "restored_by_four" / "0.npz"), want)
    assert json.loads((runs.record / "restored_by_four" / "0.json").read_text()) == {
        "step": EVERY, "data": want_data}
    assert_identical_state(checkpoint_state(four, EVERY), want)
    assert checkpoint_data_state(four, EVERY) == want_data

    # 2 processes restore the 4-process checkpoint and the single-process one.
    multiprocess.run(multiprocess.restore_command(
        [four, seeded_workdir(runs.reference, EVERY, tmp_path / "from_one")], tmp_path / "out",
        changes), count=2, local_devices=4, logs=tmp_path / "logs")
    for index, source in enumerate((runs.workdir, runs.reference)):
        assert_identical_state(restored_state(tmp_path / "out" / f"{index}.npz"),
                               checkpoint_state(source, EVERY))
        assert json.loads((tmp_path / "out" / f"{index}.json").read_text()) == {
            "step": EVERY, "data": want_data}

    # This process (8 devices) restores the 2-process checkpoint.
    state, data_state = trainer.Trainer(demo_config(**changes), str(
        seeded_workdir(runs.workdir, EVERY, tmp_path / "from_two"))).restore_latest(
        with_data=True)
    assert int(state.step) == EVERY and data_state == want_data
    assert_identical_state(jax.device_get(multiprocess.flat_state(state)), want)


# ----- evaluate generate across processes ---------------------------------------------------
@pytest.mark.slow
def test_generate_over_two_processes_writes_the_single_process_batch(tmp_path):
    """``python -m hmar_jax.evaluate generate`` as 2 processes x 4 devices (a chunk each,
    process 0 packs) writes the npz that this single process (8 devices) writes, byte for
    byte: every sample's randomness comes from (seed, class, index), and with batches of 4
    samples each device samples one per call, the same per-device program in both runs."""
    from hmar_jax.evaluate.__main__ import main as evaluate_main

    bundle = tiny_bundle(tmp_path / "bundle")

    arguments = ["generate", "--checkpoint", str(bundle), "--preset", "default",
                 "--per-class", "2", "--chunk", "10", "--batch-size", "4"]
    multiprocess.run(["-m", "hmar_jax.evaluate", *arguments, "--out", str(tmp_path / "two.npz")],
                     count=2, local_devices=4, logs=tmp_path / "logs")
    assert evaluate_main([*arguments, "--out", str(tmp_path / "one.npz")]) == 0
    one, two = (dict(np.load(tmp_path / f"{name}.npz")) for name in ("one", "two"))
    assert one["arr_0"].shape == (20, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert len({image.tobytes() for image in one["arr_0"]}) == 20  # every sample differs
    np.testing.assert_array_equal(two["labels"], np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    assert not list(tmp_path.glob("*.parts"))
