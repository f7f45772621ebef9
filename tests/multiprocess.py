"""Several local processes joined by ``jax.distributed`` (not a test module).

Each process is a real command line (``python -m hmar_jax.train ...``, or this file's
``restore`` command, which restores a training checkpoint with the trainer's own code and
trains nothing) with its own forced CPU devices; they find each other the way a cluster's
processes do, through the launch environment that ``hmar_jax.distributed`` recognises: the
explicit coordinator variables (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) on a localhost port, or SLURM's variables (``FAKE_SRUN`` sets them as
srun does). Cross-process collectives on CPU run over gloo (TCP), JAX's default CPU
collectives.

Compiled programs: the persistent compilation cache the suite sets up is inherited, but JAX
reads and writes it from process 0 only (the other processes' cache keys include their own
place in the topology), so every launch of several processes compiles its programs once
more on processes 1 and up; the tests keep the number of such launches small.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parents[1]


def free_port() -> int:
    """A localhost TCP port nobody listens on now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_environment(local_devices: int, base: dict | None = None) -> dict:
    """The inherited environment with ``local_devices`` forced CPU devices (the test
    session's own device count removed from ``XLA_FLAGS``); the compilation cache the suite
    set up (``JAX_COMPILATION_CACHE_DIR``) is kept, so the processes share compiled steps."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_ID",
                "SLURM_STEP_NODELIST", "HMAR_JAX_DISTRIBUTED"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def coordinator_environment(index: int, count: int, port: int, local_devices: int) -> dict:
    """Process ``index`` of ``count`` of an explicit-coordinator launch on localhost."""
    env = cpu_environment(local_devices)
    if count > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    return env


@dataclasses.dataclass
class Group:
    """Processes started together; ``logs[i]`` is process i's combined output file."""

    processes: list[subprocess.Popen]
    logs: list[pathlib.Path]
    started: float

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; the ones still running at ``timeout`` seconds after
        the start are killed (status -9) so that no test leaves processes behind."""
        codes = []
        for process in self.processes:
            remaining = max(0.1, timeout - (time.monotonic() - self.started))
            try:
                codes.append(process.wait(timeout=remaining))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill()
        return [p.returncode if c is None else c for p, c in zip(self.processes, codes)]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()

    def output(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")


def launch(args: list[str], *, count: int, local_devices: int, logs: pathlib.Path,
           environments: list[dict] | None = None) -> Group:
    """Starts ``python <args>`` ``count`` times, process i with ``environments[i]`` (default:
    the explicit coordinator on a free port), output to ``logs/process<i>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    if environments is None:
        port = free_port()
        environments = [coordinator_environment(i, count, port, local_devices)
                        for i in range(count)]
    processes, paths = [], []
    for index, env in enumerate(environments):
        path = logs / f"process{index}.log"
        with open(path, "w") as log:
            processes.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
        paths.append(path)
    return Group(processes, paths, time.monotonic())


def run(args: list[str], *, count: int, local_devices: int, logs: pathlib.Path,
        timeout: float = 300) -> Group:
    """``launch`` and wait; raises with every process's output tail unless all exit 0."""
    group = launch(args, count=count, local_devices=local_devices, logs=logs)
    codes = group.wait(timeout)
    if any(codes):
        tails = "\n".join(f"--- process {i} (exit {c}):\n{group.output(i)[-3000:]}"
                          for i, c in enumerate(codes))
        raise AssertionError(f"{count} processes of {' '.join(args[:3])} failed:\n{tails}")
    return group


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


def stand_in(directory: pathlib.Path, name: str, text: str) -> pathlib.Path:
    """An executable script ``directory/name`` holding ``text``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | 0o100)
    return path


def flat_state(tree) -> dict:
    """``{path: leaf}`` of a state tree, the path its keys joined by ``/``
    (``trainable/blocks/attn/proj/kernel/value``): the same names for the trainer's
    ``TrainState`` and for the nested dicts a checkpoint holds."""
    import jax

    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_command(workdirs: list[pathlib.Path], out: pathlib.Path, changes: dict, *,
                    save_to: pathlib.Path | None = None) -> list[str]:
    """Arguments of this file's ``restore`` command (see ``restore_main``)."""
    command = [str(pathlib.Path(__file__)), "restore", "--out", str(out),
               "--changes", json.dumps(changes), *map(str, workdirs)]
    return command + (["--save-to", str(save_to)] if save_to is not None else [])


def restore_main(argv: list[str]) -> None:
    """``restore --out DIR --changes JSON WORKDIR... [--save-to WORKDIR]``: in every process
    of the launch, builds the trainer of ``tiny_runs.demo_config(**changes)`` on each
    WORKDIR and restores its newest checkpoint (``Trainer.restore_latest``; no step is
    compiled). Process 0 writes ``DIR/<i>.npz`` (every state array, gathered from all
    processes, named as ``flat_state`` names them) and ``DIR/<i>.json`` (step, data-iterator
    state). With ``--save-to``, the first WORKDIR's restored state is saved again there by these
    processes, as the trainer saves its checkpoints."""
    parser = argparse.ArgumentParser(prog="multiprocess.py restore")
    parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--changes", required=True, type=json.loads)
    parser.add_argument("--save-to", type=pathlib.Path)
    args = parser.parse_args(argv)

    from hmar_jax import distributed

    distributed.initialize_if_multi_process()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from hmar_jax.training import trainer
    from tiny_runs import demo_config

    config = demo_config(**args.changes)
    for index, workdir in enumerate(args.workdirs):
        state, data_state = trainer.Trainer(config, str(workdir)).restore_latest(with_data=True)
        if index == 0 and args.save_to is not None:
            writer = trainer.Trainer(config, str(args.save_to))
            writer._save(int(state.step), state, data_state)
            writer.manager.wait_until_finished()
        arrays = multihost_utils.process_allgather(flat_state(state), tiled=True)
        if jax.process_index() == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            np.savez(args.out / f"{index}.npz", **arrays)
            (args.out / f"{index}.json").write_text(json.dumps(
                {"step": int(state.step), "data": data_state}))
    multihost_utils.sync_global_devices("multiprocess.py restore: done")


if __name__ == "__main__":
    if sys.argv[1:2] != ["restore"]:
        sys.exit("usage: multiprocess.py restore ... (see restore_main)")
    restore_main(sys.argv[2:])
