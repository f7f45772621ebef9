"""The launch scripts under stand-ins for the cluster tools: ``srun`` (starts the tasks
with SLURM's variables, as SLURM does) and ``gcloud`` (records the command it would run on
every TPU worker)."""

import os
import pathlib
import shlex
import stat
import subprocess
import sys

import numpy as np
import pytest

import multiprocess

ROOT = pathlib.Path(__file__).parents[1]

FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun: records its arguments, then runs the command once per task of
# SLURM_NTASKS on this host with the task variables SLURM sets, each task's SLURM_* and
# JAX_* environment recorded.
printf '%s\n' "$@" > "$RECORD/srun_args"
while [[ "${1:-}" == --* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=$task SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 \
    bash -c 'env | grep -E "^(SLURM_|JAX_)" | sort > "$RECORD/task$SLURM_PROCID.env"; exec "$@"' \
    srun "$@" > "$RECORD/task$task.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for gcloud: records its arguments, one per line.
printf '%s\n' "$@" > "$RECORD/gcloud_args"
"""


def stand_in(directory: pathlib.Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_tpu_pod_runs_one_command_on_every_worker(tmp_path):
    """The exact gcloud call: every worker, the repository's environment, the distributed
    marker, a compilation cache on the shared workdir, the overrides quoted for the remote
    shell; and --install pins jax[tpu] to requirements.txt's jax."""
    stand_in(tmp_path, "gcloud", FAKE_GCLOUD)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
               RECORD=str(tmp_path), REPO_DIR="/opt/hmar_jax")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the launcher's default: on the workdir
    subprocess.run(["bash", "launch/tpu_pod.sh", "pod-1", "us-central2-b", "configs/demo.py",
                    "/mnt/shared/run 1", "--config.tokenizer.export=/mnt/shared/tok",
                    "--config.data.root=/data/my images"], cwd=ROOT, env=env, check=True)
    args = (tmp_path / "gcloud_args").read_text().splitlines()
    command = ("cd /opt/hmar_jax && HMAR_JAX_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR="
               "/mnt/shared/run\\ 1/jax_cache .venv/bin/python -m hmar_jax.train --config "
               "configs/demo.py --workdir /mnt/shared/run\\ 1 "
               "--config.tokenizer.export=/mnt/shared/tok --config.data.root=/data/my\\ images")
    assert args == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b",
                    "--worker=all", "--command", command]
    # What each worker's shell makes of it: the same argv a local launch gives.
    words = shlex.split(command)
    assert words[words.index("--workdir") + 1] == "/mnt/shared/run 1"
    assert words[-1] == "--config.data.root=/data/my images"

    subprocess.run(["bash", "launch/tpu_pod.sh", "--install", "pod-1", "us-central2-b"],
                   cwd=ROOT, env=env, check=True)
    jax_version = next(line.split("==")[1].strip() for line in
                       (ROOT / "requirements.txt").read_text().splitlines()
                       if line.startswith("jax=="))
    assert (tmp_path / "gcloud_args").read_text().splitlines() == [
        "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b", "--worker=all",
        "--command", f"cd /opt/hmar_jax && .venv/bin/pip install 'jax[tpu]=={jax_version}'"]


@pytest.mark.slow
def test_slurm_launch_joins_the_tasks_into_one_run(tmp_path, tokenizer_export):
    """``sbatch launch/slurm_gpu.sh`` as SLURM runs it (2 tasks of 4 CPU devices): srun gets
    the training command, each task SLURM's variables, and the tasks train as one run
    (JAX's SLURM detection, coordinator on the step's first node and JAX_COORDINATOR_PORT)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "srun", FAKE_SRUN)
    port = multiprocess.free_port()
    env = multiprocess.cpu_environment(4)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RECORD=str(tmp_path),
               PYTHON=sys.executable, SLURM_NTASKS="2", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(ROOT), JAX_COORDINATOR_PORT=str(port))
    workdir = tmp_path / "run"
    overrides = [f"--config.tokenizer.export={tokenizer_export}", "--config.num_train_steps=2",
                 "--config.batch_size=8", "--config.model.overrides.depth=2",
                 "--config.model.overrides.width=64", "--config.model.overrides.num_mask_layers=1",
                 "--config.sampling.samples_per_class=0", "--config.log_batch_fingerprints=true"]
    script = str(ROOT / "launch" / "slurm_gpu.sh")
    result = subprocess.run(["bash", script, "configs/demo.py:runlocal", str(workdir),
                             *overrides], cwd=tmp_path, env=env, timeout=300)
    logs = "\n".join((tmp_path / f"task{i}.log").read_text()[-2000:] for i in range(2)
                     if (tmp_path / f"task{i}.log").exists())
    assert result.returncode == 0, logs
    assert (tmp_path / "srun_args").read_text().splitlines() == [
        "--kill-on-bad-exit=1", sys.executable, "-m", "hmar_jax.train", "--config",
        "configs/demo.py:runlocal", "--workdir", str(workdir), *overrides]
    for task in range(2):
        variables = dict(line.split("=", 1) for line in
                         (tmp_path / f"task{task}.env").read_text().splitlines())
        assert {k: variables[k] for k in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                                          "SLURM_STEP_NODELIST", "SLURM_JOB_ID",
                                          "JAX_COORDINATOR_PORT")} == {
            "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
            "JAX_COORDINATOR_PORT": str(port)}
        assert variables["JAX_COMPILATION_CACHE_DIR"] == os.environ.get(
            "JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
    # One run of 8 devices: the global batch of 8 gathered from both tasks, one export.
    lines = (workdir / "example_fingerprints.txt").read_text().splitlines()
    assert [len(line.split()[1].split(",")) for line in lines] == [8, 8]
    assert len(np.unique(",".join(line.split()[1] for line in lines).split(","))) == 16
    assert (workdir / "export" / "hmar_config.json").is_file()
