"""Several local processes joined by ``jax.distributed`` (not a test module).

Each process is a real command line (``python -m hmar_jax.train ...``) with its own forced
CPU devices; they find each other the way a cluster's processes do, through the launch
environment that ``hmar_jax.distributed`` recognises: the explicit coordinator variables
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) on a localhost
port, or SLURM's variables (see ``slurm_environment``). Cross-process collectives on CPU run
over gloo (TCP), JAX's default CPU collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
