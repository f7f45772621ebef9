"""The TPU launch script under a stand-in ``gcloud`` (records the command it would run on
every TPU worker), and the commands of ``make demo``. ``launch/slurm_gpu.sh`` is run under a
stand-in ``srun`` in test_multihost.py, where its 2-task training run is also the
multi-process run compared with a single-process one (one launch for both)."""

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


def test_make_demo_encodes_the_digits_once_for_both_stages(tmp_path):
    """``make demo``: the tokenizer, one token cache written with its export, both stages read
    that cache (stage 2 from stage 1's export); stage 1 draws no samples."""
    dry_run = subprocess.run(["make", "-n", "demo", f"WORKDIR={tmp_path}/demo"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
    commands = [shlex.split(c) for c in dry_run.replace("\\\n", " ").splitlines()
                if " -m hmar_jax." in c]
    modules = [c[c.index("-m") + 1] for c in commands]
    assert modules == ["hmar_jax.train_tokenizer", "hmar_jax.pretokenize", "hmar_jax.train",
                       "hmar_jax.train"]
    tokenizer, pretokenize, stage1, stage2 = map(_options, commands)
    export = f"{tmp_path}/demo/tokenizer/tokenizer"
    assert tokenizer["--workdir"] == f"{tmp_path}/demo/tokenizer"
    assert pretokenize["--config.tokenizer.export"] == export
    for stage in (stage1, stage2):
        assert stage["--config.tokenizer.export"] == export
        assert stage["--config.data.pretokenized"] == pretokenize["--out"]
    assert stage1["--config"] == "configs/demo.py"
    assert stage2["--config"] == "configs/demo.py:stage=2"
    assert stage1["--config.sampling.samples_per_class"] == "0"
    assert stage2["--config.stage2.parent"] == f"{stage1['--workdir']}/export"


def _options(words: list[str]) -> dict[str, str]:
    """A command's ``--flag value`` and ``--flag=value`` words (a bare ``--flag``: "")."""
    options = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            key, equals, value = word.partition("=")
            following = words[i + 1] if i + 1 < len(words) else "--"
            options[key] = value if equals else ("" if following.startswith("--") else following)
    return options
