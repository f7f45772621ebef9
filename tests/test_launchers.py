"""The TPU launch script under a stand-in ``gcloud`` (records the command it would run on
every TPU worker). ``launch/slurm_gpu.sh`` is run under a stand-in ``srun`` in
test_multihost.py, where its 2-task training run is also the multi-process run compared
with a single-process one (one launch for both)."""

import os
import pathlib
import shlex
import subprocess

import multiprocess

ROOT = pathlib.Path(__file__).parents[1]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for gcloud: records its arguments, one per line.
printf '%s\n' "$@" > "$RECORD/gcloud_args"
"""


def test_tpu_pod_runs_one_command_on_every_worker(tmp_path):
    """The exact gcloud call: every worker, the repository's environment, the distributed
    marker, a compilation cache on the shared workdir, the overrides quoted for the remote
    shell; and --install pins jax[tpu] to requirements.txt's jax."""
    multiprocess.stand_in(tmp_path, "gcloud", FAKE_GCLOUD)
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
