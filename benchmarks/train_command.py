"""Training-command benchmark: ``python -m hmar_jax.train`` on a folder of JPEG images, its
throughput read from its own log.

``train_step.py`` times the trainer's step alone, on arrays already on the device. This
script runs what a user runs: the training CLI with the config's input pipeline (grain
workers decoding and cropping JPEGs), every batch's transfer to the devices, the loop's
logging and finiteness checks, and the config's checkpoint cadence. In a temporary
directory it writes

* ``images/<class>/<name>.jpg``: ``--images`` JPEGs in ``CLASSES`` class folders, of
  ImageNet's sizes (long side 400-600 px, mostly landscape 4:3) and file sizes (a smooth
  random colour field plus noise, quality 90: about 100 KB at 500x375);
* ``tokenizer/``: random weights of the config's tokenizer architecture
  (``harness.tokenizer_config``: the released VQ-VAE on the config's scales), exported by a
  worker process that also reports the devices; the parent never starts a JAX backend;

and then runs, with everything else as the config has it,

  python -m hmar_jax.train --config CONFIG --workdir <tmp>/workdir \\
      --config.data.name=image_folder --config.data.root=<tmp>/images \\
      --config.tokenizer.export=<tmp>/tokenizer --config.batch_size=<B x devices> \\
      --config.num_train_steps=N [--config.data.num_workers=W]

The command uses every visible device; ``--batch`` is per device, as in ``train_step.py``.

Throughput: CLU's ``ReportProgress`` (in the trainer) logs ``[step] steps_per_sec=X``
through the metric writer every ``config.log_every_steps`` steps and at least once a
minute: the steps since its previous report over the host's seconds between the two. At a
logging step the loop reads that step's metrics, so a report comes after the step has
finished on the device. The first report's interval starts at the first step, right after
compilation, and holds the first executions, the first checkpoint and the first logging
step's own compilations: it is left out. The steady state is the rest: img/s = global
batch x steps / seconds over those intervals. ``--steps`` must give at least two logging
intervals.

  python benchmarks/train_command.py --config configs/hmar_imagenet.py:variant=d16 --batch 64 \\
      --steps 300 --images 2000 --workers 16 --out train_command.json
  python benchmarks/train_command.py --quick        # CPU smoke run

``--quick`` runs ``configs/hmar_imagenet.py:runlocal`` (or ``--config``, which must then be
small enough) on a 16 px tokenizer (patch_nums 1-4) with 2 images per device, 12 steps and
24 images, compiled without LLVM's optimisation passes as the test suite does
(compilation is most of a run this small).

The JSON (``--out``) has ``train_step.py``'s layout with one row: devices, versions, date,
this script's command and settings; the row's status, img/s and steps/s of the steady state
with the steps and seconds it covers, every logged interval, the last logged loss, the
cadences that applied (logging; checkpoints, with the steps the cadence saves within the
run and those the workdir holds at the end), the image folder, set-up and command seconds,
the GPUs' clocks over the whole command, and the exact training command (the temporary
directory written ``<tmp>``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    REPO, GpuMonitor, absolute_config, command_line, init_on_device, is_oom, load_config, now,
    recorded_environment, run_subprocess, tokenizer_config, versions, worker_main)

CLASSES = 8
QUICK_CONFIG = "configs/hmar_imagenet.py:runlocal"
QUICK_DEFAULTS = {"batch": 2, "steps": 12, "images": 24}
DEFAULT_IMAGES = 2000
JPEG_QUALITY = 90
NOISE_STD = 20.0  # with the smooth field: about 100 KB per 500x375 image at quality 90
ASPECTS = (4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3)  # width / height
QUICK_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# A ReportProgress line of the metric writer: "[120] steps_per_sec=4.41".
STEPS_PER_SEC = re.compile(r"\[(\d+)\] (?:.*[ ,])?steps_per_sec=([^,\s]+)")
LOSS = re.compile(r"\[(\d+)\] (?:.*[ ,])?loss=([^,\s]+)")


# ======================================== the inputs ===========================================

def write_image(root: str, index: int, classes: int, seed: int) -> tuple[int, int, int]:
    """Writes image ``index`` to ``root/class_<index mod classes>/<index>.jpg``: a bicubic
    upsampling of a coarse random colour grid (one cell per ~40 px) plus Gaussian noise, at
    a random ImageNet-like size. Returns ``(width, height, file bytes)``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng((seed, index))
    long_side = int(rng.integers(400, 601))
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    if aspect >= 1:
        width, height = long_side, round(long_side / aspect)
    else:
        width, height = round(long_side * aspect), long_side
    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                       np.float32)  # [H, W, 3]
    noise = rng.normal(0.0, NOISE_STD, (height, width, 3)).astype(np.float32)
    pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
    path = pathlib.Path(root) / f"class_{index % classes:02d}" / f"{index:06d}.jpg"
    Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
    return width, height, path.stat().st_size


def write_image_folder(root: pathlib.Path, count: int, classes: int = CLASSES,
                       seed: int = 0) -> dict:
    """``count`` JPEGs in ``root/<class>/`` (:func:`write_image`), written by a process pool;
    returns the folder's summary."""
    for label in range(classes):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    indices = range(count)
    processes = min(os.cpu_count() or 1, max(1, count // 64))
    args = ([str(root)] * count, indices, [classes] * count, [seed] * count)
    if processes == 1:
        written = list(map(write_image, *args))
    else:  # spawn: the children start clean, whatever this process has imported
        with concurrent.futures.ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            written = list(pool.map(write_image, *args, chunksize=16))
    widths, heights, sizes = zip(*written)
    return {"images": count, "classes": classes,
            "mean_width": sum(widths) / count, "mean_height": sum(heights) / count,
            "mean_kib": sum(sizes) / count / 1024}


def export_worker(spec: dict) -> dict:
    """Worker process: exports random weights of the config's tokenizer to
    ``spec["export"]``; returns the tokenizer's image size (the device fields are added by
    ``harness.worker_main``)."""
    from flax import nnx

    from hmar_jax import checkpointing
    from hmar_jax.tokenizer import VQVAE

    vae_config = tokenizer_config(load_config(spec["config"]), spec["quick"])
    vae = init_on_device(lambda: VQVAE(vae_config, rngs=nnx.Rngs(0)))
    checkpointing.save_tokenizer(spec["export"], vae)
    return {"tokenizer_image_size": vae_config.image_size}


# ===================================== the command's log =======================================

def logged_rates(lines: list[str]) -> list[tuple[int, float]]:
    """``(step, steps_per_sec)`` of every ``ReportProgress`` report in the log, in order."""
    return [(int(m.group(1)), float(m.group(2)))
            for m in map(STEPS_PER_SEC.search, lines) if m]


def last_loss(lines: list[str]) -> float | None:
    """The loss of the last metrics line in the log."""
    found = [float(m.group(2)) for m in map(LOSS.search, lines) if m]
    return found[-1] if found else None


def steady_state(reports: list[tuple[int, float]], first_step: int, global_batch: int) -> dict:
    """Every reported interval and the steady state: the intervals after the first, their
    steps over their seconds (each interval's steps / its rate).

    Raises:
      ValueError: fewer than two reports (no interval after the first).
    """
    intervals, start = [], first_step
    for step, rate in reports:
        intervals.append({"from_step": start, "to_step": step, "steps_per_sec": rate,
                          "seconds": (step - start) / rate, "img_s": rate * global_batch})
        start = step
    steady = intervals[1:]
    if not steady:
        raise ValueError(f"{len(reports)} steps_per_sec report(s) in the log; the steady state "
                         "needs two (raise --steps)")
    steps = steady[-1]["to_step"] - steady[0]["from_step"]
    seconds = sum(i["seconds"] for i in steady)
    return {"img_s": global_batch * steps / seconds, "steps_per_sec": steps / seconds,
            "steady_from_step": steady[0]["from_step"], "steady_steps": steps,
            "steady_seconds": seconds, "intervals": intervals}


def checkpoint_cadence(config, steps: int, steady_from: int | None, kept: list[int]) -> dict:
    """The checkpoint cadence that applied: ``config.checkpoint_every_steps``, the steps it
    saves within the run (the final step saves anyway, after the last report), those of
    them in the steady state (from ``steady_from``), and ``kept``: the steps the workdir
    holds at the end (the newest ``config.max_checkpoints_to_keep``, whatever saved them)."""
    every = config.checkpoint_every_steps
    periodic = list(range(every, steps, every))
    cadence = {"every_steps": every, "periodic_steps": periodic,
               "periodic_in_steady_state": [s for s in periodic
                                            if steady_from is not None and s >= steady_from],
               "kept_in_workdir": kept}
    if not periodic:
        cadence["note"] = (f"--steps {steps} is within config.checkpoint_every_steps = {every}: "
                           f"the cadence saves nothing during the run; the workdir holds steps "
                           f"{kept}")
    return cadence


def saved_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# ======================================== running ==============================================

def training_command(config: str, tmp: pathlib.Path, global_batch: int, steps: int,
                     workers: int | None, image_size: int | None) -> list[str]:
    """The CLI's arguments after ``python``."""
    command = ["-m", "hmar_jax.train", "--config", config, "--workdir", str(tmp / "workdir"),
               "--config.data.name=image_folder", f"--config.data.root={tmp / 'images'}",
               f"--config.tokenizer.export={tmp / 'tokenizer'}",
               f"--config.batch_size={global_batch}", f"--config.num_train_steps={steps}"]
    if workers is not None:
        command.append(f"--config.data.num_workers={workers}")
    if image_size is not None:
        command.append(f"--config.data.image_size={image_size}")
    return command


def run_command(command: list[str], timeout: float) -> tuple[int | None, list[str]]:
    """Runs ``command`` from the repository root in its own process group, its output passed
    through and kept; ``(exit status or None after a timeout, output lines)``. On a timeout or
    an interruption the whole group is killed: the grain workers must not outlive it."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return returncode, lines


def failure_status(returncode: int | None, lines: list[str], timeout: float) -> str:
    if returncode is None:
        return f"timeout after {timeout:.0f} s"
    text = "".join(lines)
    if is_oom(text):
        return "OOM"
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    return f"error: exit {returncode}: {last[0][:300]}"


def measure(args: argparse.Namespace, config, header: dict) -> dict:
    """The row: image folder, tokenizer export, the command and its log."""
    start = time.monotonic()
    remaining = lambda: args.timeout - (time.monotonic() - start)  # noqa: E731
    row: dict = {"config": args.config, "batch": args.batch, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="hmar_train_command_") as name:
        tmp = pathlib.Path(name)
        row["image_folder"] = write_image_folder(tmp / "images", args.images)
        row["images_s"] = time.monotonic() - start
        prepared = run_subprocess(pathlib.Path(__file__), {
            "config": args.config, "quick": args.quick, "export": str(tmp / "tokenizer")},
            remaining())
        for key in ("device_kind", "platform", "device_count"):
            header[key] = prepared.get(key)
        if prepared["status"] != "ok":
            return row | {"status": f"tokenizer export: {prepared['status']}",
                          "log_tail": prepared.get("log_tail", "")}
        row["setup_s"] = time.monotonic() - start
        devices = prepared["device_count"]
        global_batch = args.batch * devices
        image_size = prepared["tokenizer_image_size"]
        workers = args.workers if args.workers is not None else config.data.num_workers
        command = training_command(
            args.config, tmp, global_batch, args.steps, args.workers,
            image_size if image_size != config.data.image_size else None)
        row |= {"devices": devices, "global_batch": global_batch, "workers": workers,
                "log_every_steps": config.log_every_steps,
                "training_command": shlex.join(["python", *command]).replace(str(tmp), "<tmp>")}
        limit = remaining()
        print("$ " + row["training_command"], flush=True)
        t0 = time.monotonic()
        with GpuMonitor() as monitor:
            returncode, lines = run_command([sys.executable, *command], limit)
        row["command_wall_s"] = time.monotonic() - t0
        row["gpu_during_command"] = monitor.summary()
        kept = saved_steps(tmp / "workdir")
    if returncode != 0:
        return row | {"status": failure_status(returncode, lines, limit),
                      "checkpoints": checkpoint_cadence(config, args.steps, None, kept),
                      "log_tail": "".join(lines)[-3000:]}
    try:
        rates = steady_state(logged_rates(lines), first_step=1, global_batch=global_batch)
    except ValueError as err:
        return row | {"status": f"error: {err}", "log_tail": "".join(lines)[-3000:]}
    return row | rates | {
        "status": "ok", "loss": last_loss(lines), "wall_s": time.monotonic() - start,
        "checkpoints": checkpoint_cadence(config, args.steps, rates["steady_from_step"], kept)}


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.py[:ARG]",
                        help="experiment config, as for python -m hmar_jax.train (required; "
                             f"{QUICK_CONFIG} with --quick)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per device; the global batch is this times the devices "
                             "(required; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps, at least two logging intervals "
                             "(2 x config.log_every_steps) (required; 12 with --quick)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"JPEGs in the image folder (default {DEFAULT_IMAGES}; 24 with "
                             "--quick)")
    parser.add_argument("--workers", type=int, default=None,
                        help="grain worker processes (config.data.num_workers; default: the "
                             "config's)")
    parser.add_argument("--timeout", type=float, default=540.0,
                        help="seconds for the whole run, image folder and export included")
    parser.add_argument("--out", default=None, help="JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: a tiny config on a 16 px tokenizer")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(export_worker, args.worker, args.worker_out)
        return
    if args.quick:
        args.config = args.config or str(REPO / QUICK_CONFIG)  # from any directory
        flags = os.environ.get("XLA_FLAGS", "")
        if QUICK_COMPILE_FLAG not in flags:  # the export worker's and the command's
            os.environ["XLA_FLAGS"] = f"{flags} {QUICK_COMPILE_FLAG}".strip()
        for key, value in QUICK_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.images = args.images or DEFAULT_IMAGES
    for key in ("batch", "steps"):
        if getattr(args, key) is None:
            parser.error(f"--{key} is required (e.g. --batch 64 --steps 300)")
    if args.images < CLASSES:
        parser.error(f"--images must be at least {CLASSES}, one per class")
    args.config = absolute_config(args.config)
    path, sep, arg = args.config.partition(":")
    config = load_config(str(REPO / path) + sep + arg)
    if args.steps < 2 * config.log_every_steps:
        parser.error(f"--steps {args.steps} gives fewer than two logging intervals "
                     f"(config.log_every_steps = {config.log_every_steps}); use at least "
                     f"{2 * config.log_every_steps}")
    # A SIGTERM ends the run through the finally blocks: the command's process group is
    # killed and the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    header = {"benchmark": "train_command", "device_kind": None, "platform": None,
              "device_count": None, "versions": versions(), "date": now(),
              "command": command_line(), "environment": recorded_environment(),
              "settings": {k: v for k, v in vars(args).items()
                           if k not in ("worker", "worker_out")}}
    row = measure(args, config, header)
    write_json(args.out, header | {"rows": [row]})
    if row["status"] == "ok":
        print(f"\n{row['img_s']:.1f} img/s ({row['steps_per_sec']:.3f} steps/s x "
              f"{row['global_batch']}) over steps {row['steady_from_step']}-{args.steps}, "
              f"{row['steady_seconds']:.1f} s; the command ran {row['command_wall_s']:.0f} s",
              flush=True)
    else:
        print(f"\n{row['status']}", flush=True)
    if args.out:
        print(f"wrote {args.out}")
    sys.exit(0 if row["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
