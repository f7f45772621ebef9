"""The rows of ``benchmarks/RESULTS.md``: two programs measured one after the other in one
invocation on one GPU, ours and the official PyTorch code, or the training command and the
benchmark step.

  python benchmarks/bench.py --rows all --upstream "$HMAR_UPSTREAM" --out benchmarks/results
  python benchmarks/bench.py --rows train_d16_b64,sample_d16_b64 --upstream "$HMAR_UPSTREAM"
  python benchmarks/bench.py --rows train_command_d16_b64   # runs no official code
  python benchmarks/results_table.py        # then regenerate RESULTS.md from the row files

``--upstream`` is a checkout of the official HMAR code (needed by the rows that run it);
``--upstream-python`` the Python that has its requirements (PyTorch, Triton), when that is
not this one. Each row (``ROWS``) runs our script (``attention.py``, ``train_step.py``,
``sample.py`` or ``train_command.py``, the configs' own execution settings) and then the
side it is measured against (``Row.other``): ``upstream.py`` with the same shapes, batch and
iteration counts, or for the training-command rows ``train_step.py`` with the same config
and batch. It writes ``<out>/<row>.json``: the row id, title, the command that reproduces
it, device, date, software versions, ``ours`` (metrics, the settings it ran with, its own
command), the other side under its key (``official``, ``benchmark_step``; named by
``compared_with``; metrics, settings, or an ``OOM`` status) and the table's labels. A row
fits a 10-minute machine: our side has ``OURS_TIMEOUT_S``, the other side
``OTHER_TIMEOUT_S``. A row whose side fails otherwise (an error, a timeout) writes no file,
and the exit status is 1.

A row with a memory cap (``Row.cap``, :class:`MemoryCap`) runs our side with JAX's allocator
limited through ``XLA_PYTHON_CLIENT_MEM_FRACTION``, so that compilation and autotuning live
inside the limit too: a fixed size (the memory of a smaller card) or a share of the other
side's measured process peak (then the other side runs first). The fraction is the cap over
the device's memory as CUDA reports it, read from ``nvidia-smi`` when the row runs (this
process starts no CUDA context); our side's record ``memory_cap`` holds the cap, the
fraction, the device's memory, the peak it derives from and the allocator limit our script
reported, which must match the cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, now, peak_bf16_tflops  # noqa: E402

OURS_TIMEOUT_S = 300
OTHER_TIMEOUT_S = 290
OK_STATUSES = ("ok", "OOM")
FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# The allocator limit our script reports may differ from the cap by this share (nvidia-smi's
# total less its reservation, in MiB, estimates CUDA's figure); beyond it the run was not
# under the cap.
CAP_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number of a row: ``key`` in the metrics dicts, ``template`` how a value reads in
    the table, ``name`` the ratio's label (None: no ratio, e.g. MFU, which follows img/s),
    ``better`` which direction wins."""

    key: str
    template: str
    better: str  # "lower" | "higher"
    name: str | None


FWD = Metric("fwd_ms", "fwd {:.3f} ms", "lower", "fwd")
FWD_BWD = Metric("fwd_bwd_ms", "fwd+bwd {:.3f} ms", "lower", "fwd+bwd")
IMG_S = Metric("img_per_s", "{:.0f} img/s", "higher", "img/s")
MFU = Metric("mfu", "MFU {:.0%}", "higher", None)
MS_BATCH = Metric("ms_per_batch", "{:.0f} ms/batch", "lower", "time")
PEAK = Metric("peak_gib_process", "{:.1f} GiB", "lower", "memory")


@dataclasses.dataclass(frozen=True)
class Side:
    """What a row measures ours against. With ``kind`` None the official code:
    ``upstream.py`` with the row's kind, ``--upstream`` and ``args``; else our script of that
    kind (``SCRIPTS``) with ``args``. ``key`` names the side in the row file, ``label`` heads
    its column of the table."""

    args: tuple[str, ...]
    key: str = "official"
    label: str = "Official"
    kind: str | None = None


@dataclasses.dataclass(frozen=True)
class MemoryCap:
    """The GPU memory our side may use, as JAX's allocator limit: ``gib`` a fixed size (a
    card's memory, taken as given), or ``of_peak`` times the process peak
    (``peak_gib_process``) that the other side measured in the same row, which then runs
    first. Exactly one of the two is set."""

    gib: float | None = None
    of_peak: float | None = None

    def __post_init__(self):
        if (self.gib is None) == (self.of_peak is None):
            raise ValueError("a memory cap is either a size in GiB or a share of the other "
                             "side's peak")

    @property
    def needs_other(self) -> bool:
        return self.of_peak is not None

    def describe(self, other: Side) -> str:
        if self.needs_other:
            return (f"ours capped at {self.of_peak:g}× the {other.key.replace('_', ' ')} "
                    "process peak")
        return f"ours capped at {self.gib:g} GiB"


@dataclasses.dataclass(frozen=True)
class Row:
    """``kind`` names our script (``SCRIPTS``) and, for an official side, the benchmark of
    ``upstream.py``; ``ours`` our script's arguments; ``other`` the side measured against it;
    ``cap`` our side's memory cap (None: the allocator's defaults). ``label`` and
    ``ratio_label`` head the table's columns of our side and of the ratios (each metric
    turned so that a ratio above 1 favours our side)."""

    title: str
    kind: str
    ours: tuple[str, ...]
    other: Side
    metrics: tuple[Metric, ...]
    label: str = "Ours"
    ratio_label: str = "Ours better by"
    cap: MemoryCap | None = None


def attention_row(batch: int, heads: int, length: int, mask: str) -> Row:
    shape = f"B{batch} H{heads} L{length}"
    return Row(f"Attention {shape} {mask.replace('_', '-')}, fwd and fwd+bwd (ours bf16 "
               "Pallas kernel, official fp16 Triton kernel)", "attention",
               ("--shapes", f"{batch}x{heads}x{length}", "--patterns", mask, "--dtypes",
                "bfloat16"),
               Side(("--shape", f"{batch},{heads},{length}", "--mask", mask)),
               (FWD, FWD_BWD))


def train_row(model: str, batch: int, res: int) -> Row:
    variant = f"variant={model}" + ("" if res == 256 else f",res={res}")
    return Row(f"Training step {model}, B{batch}, {res} px (L = {680 if res == 256 else 2240}; "
               "encode, forward, backward, AdamW, EMA)", "train",
               ("--config", f"configs/hmar_imagenet.py:{variant}", "--batch", str(batch),
                "--iters", "10", "--warmup", "2"),
               Side(("--model", model, "--batch", str(batch), "--res", str(res), "--iters", "10",
                     "--warmup", "2")),
               (IMG_S, MFU, PEAK))


def sample_row(model: str, batch: int, res: int) -> Row:
    variant = f"variant={model}" + ("" if res == 256 else f",res={res}")
    return Row(f"Sampling {model}, B{batch}, {res} px (masked refinement and tokenizer decode "
               "included)", "sample",
               ("--config", f"configs/hmar_imagenet.py:{variant}", "--batch", str(batch),
                "--iters", "5", "--warmup", "1"),
               Side(("--model", model, "--batch", str(batch), "--res", str(res), "--iters", "5",
                     "--warmup", "1")),
               (MS_BATCH, PEAK))


def train_command_row(model: str, batch: int, steps: int, images: int, workers: int) -> Row:
    """The training CLI on a folder of JPEGs (``train_command.py``) against the benchmark
    step (``train_step.py``) of the same config and batch."""
    config = ("--config", f"configs/hmar_imagenet.py:variant={model}", "--batch", str(batch))
    return Row(f"Training command {model}, B{batch}, 256 px (python -m hmar_jax.train on "
               f"{images} JPEGs, {workers} input workers, steady state of {steps} steps) against "
               "the benchmark step", "train_command",
               (*config, "--steps", str(steps), "--images", str(images), "--workers",
                str(workers)),
               Side((*config, "--iters", "20", "--warmup", "3"), key="benchmark_step",
                    label="Benchmark step (`train_step.py`)", kind="train"),
               (IMG_S,), label="Training command", ratio_label="Command over step")


def capped(row: Row, cap: MemoryCap) -> Row:
    """``row`` with our side under ``cap``, said in its title."""
    return dataclasses.replace(row, title=f"{row.title}, {cap.describe(row.other)}", cap=cap)


ROWS: dict[str, Row] = {
    "attention_l680_diagonal": attention_row(32, 30, 680, "block_diagonal"),
    "attention_l2240_diagonal": attention_row(16, 24, 2240, "block_diagonal"),
    "attention_l680_causal": attention_row(32, 30, 680, "block_causal"),
    "train_d16_b64": train_row("d16", 64, 256),
    "train_d16_b64_40gib": capped(train_row("d16", 64, 256), MemoryCap(gib=40)),
    "train_d30_b32": train_row("d30", 32, 256),
    "train_d30_b32_80gib": capped(train_row("d30", 32, 256), MemoryCap(gib=80)),
    "train_d16_512px_b16": train_row("d16", 16, 512),
    "sample_d16_b64": sample_row("d16", 64, 256),
    "sample_d16_b64_capped": capped(sample_row("d16", 64, 256), MemoryCap(of_peak=0.6)),
    "sample_d30_b64": sample_row("d30", 64, 256),
    "sample_d30_b64_capped": capped(sample_row("d30", 64, 256), MemoryCap(of_peak=0.6)),
    "sample_d16_512px_b32": sample_row("d16", 32, 512),
    "train_command_d16_b64": train_command_row("d16", 64, steps=300, images=2000, workers=16),
}
SCRIPTS = {"attention": "attention.py", "train": "train_step.py", "sample": "sample.py",
           "train_command": "train_command.py"}


def needs_upstream(row: Row) -> bool:
    return row.other.kind is None


def reproduce_command(row_id: str) -> str:
    upstream = ' --upstream "$HMAR_UPSTREAM"' if needs_upstream(ROWS[row_id]) else ""
    return f"python benchmarks/bench.py --rows {row_id}{upstream}"


def side_command(row: Row, upstream: str = '"$HMAR_UPSTREAM"',
                 python: str = "python") -> list[str]:
    """The command of the side ``row`` measures ours against."""
    if needs_upstream(row):
        return [python, "benchmarks/upstream.py", row.kind, "--upstream", upstream,
                *row.other.args]
    return [python, f"benchmarks/{SCRIPTS[row.other.kind]}", *row.other.args]


# =================================== reading both sides' JSON ==================================

def ours_side(row: Row, result: dict) -> dict:
    """``{"status", "metrics", "settings", "device", "versions"}`` from our script's JSON."""
    return script_side(row.kind, result)


def script_side(kind: str, result: dict) -> dict:
    """:func:`ours_side` of the JSON of our script of ``kind`` (``SCRIPTS``)."""
    side = {"device": result.get("device_kind"), "versions": result.get("versions")}
    if kind == "attention":
        entries = [r for r in result["rows"] if r["impl"] == "pallas"]
        if len(entries) != 1:
            return side | {"status": f"error: {len(entries)} kernel rows in the JSON, not 1"}
        (entry,) = entries
        if "error" in entry:
            return side | {"status": f"error: {entry['error']}"}
        return side | {"status": "ok",
                       "metrics": {"fwd_ms": entry["fwd_ms"], "fwd_bwd_ms": entry["fwd_bwd_ms"]},
                       "settings": {k: entry[k] for k in (
                           "shape", "pattern", "dtype", "err_out", "err_dq", "err_dk", "err_dv",
                           "floor_fwd_ms", "floor_fwd_bwd_ms")}
                       | {"kernel": "hmar_jax.pallas (GPU)", "tiles": result.get("tiles")}}
    if len(result["rows"]) != 1:
        return side | {"status": f"error: {len(result['rows'])} rows in the JSON, not 1"}
    (entry,) = result["rows"]
    if entry["status"] != "ok":
        return side | {"status": entry["status"]}
    if kind == "train_command":
        return side | {"status": "ok", "metrics": {"img_per_s": entry["img_s"]},
                       "settings": {k: entry.get(k) for k in (
                           "config", "batch", "devices", "global_batch", "steps", "workers",
                           "image_folder", "steps_per_sec", "steady_from_step", "steady_steps",
                           "steady_seconds", "intervals", "log_every_steps", "checkpoints",
                           "loss", "setup_s", "command_wall_s", "training_command",
                           "gpu_during_command")}}
    settings = {k: entry.get(k) for k in (
        "config", "model", "batch", "image_size", "L", "execution", "ms_median", "ms_all",
        "compile_s", "xla_total_gib", "peak_gib", "gpu_during_timing")}
    if kind == "train":
        metrics = {"img_per_s": entry["img_s"], "mfu": entry.get("mfu"),
                   "peak_gib_process": entry.get("process_peak_gib")}
        settings |= {k: entry.get(k) for k in ("model_tflop_per_step", "img_s_back_to_back",
                                              "loss", "stage")}
    else:
        metrics = {"ms_per_batch": entry["ms_median"],
                   "peak_gib_process": entry.get("process_peak_gib")}
        settings |= {k: entry.get(k) for k in ("sampling", "passes")}
    return side | {"status": "ok", "metrics": metrics, "settings": settings}


def official_side(row: Row, result: dict, ours: dict) -> dict:
    """``{"status", "metrics", "settings", ...}`` from ``upstream.py``'s JSON. Its MFU uses
    our FLOP count of the same architecture and step (``model_tflop_per_step``)."""
    side = {"status": result["status"], "device": result.get("device"),
            "versions": result.get("versions"), "upstream_commit": result.get("upstream_commit"),
            "settings": result.get("settings")}
    if result["status"] != "ok":
        return side | {k: result[k] for k in ("error", "requested_gib") if k in result}
    if row.kind == "attention":
        metrics = {"fwd_ms": result["fwd_ms"], "fwd_bwd_ms": result["fwd_bwd_ms"]}
    elif row.kind == "train":
        metrics = {"img_per_s": result["img_per_s"], "mfu": None,
                   "peak_gib_process": result.get("peak_gib_process")}
        flops = (ours.get("settings") or {}).get("model_tflop_per_step")
        peak = peak_bf16_tflops(side["device"])
        if flops and peak and ours["settings"].get("batch"):
            per_image = flops / ours["settings"]["batch"]
            metrics["mfu"] = result["img_per_s"] * per_image / peak
    else:
        metrics = {"ms_per_batch": result["ms_median"],
                   "peak_gib_process": result.get("peak_gib_process")}
    return side | {"metrics": metrics, "peak_gib_torch": result.get("peak_gib_torch")}


# ========================================== running ============================================

def run_side(command: list[str], out: pathlib.Path, timeout: float,
             env: dict[str, str] | None = None) -> dict | str:
    """Runs ``command`` (its output passes through) with ``env`` over this process's
    environment; its JSON, or why there is none. On a timeout the command's whole process
    group is killed: a worker it started must not hold the GPU while the other side runs."""
    print("$ " + " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *command]), flush=True)
    environment = None
    if env:
        environment = dict(os.environ, **env)
        if FRACTION_VARIABLE in env:  # JAX refuses its newer name beside this one
            environment.pop("XLA_CLIENT_MEM_FRACTION", None)
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, env=environment)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout after {timeout:.0f} s"
    if not out.exists():
        return f"exit {proc.returncode} without {out.name}"
    return json.loads(out.read_text())


def script_result(kind: str, result: dict | str) -> dict | str:
    """The side of our script of ``kind`` from its JSON (:func:`script_side`), or why there
    is none: no JSON (``run_side``'s reason), not run on a GPU, a failed row."""
    if isinstance(result, str):
        return result
    if result.get("platform") != "gpu":  # e.g. JAX without its CUDA build
        return (f"ran on {result.get('platform')!r}, not a GPU; install JAX's CUDA build "
                "(pip install \"jax[cuda13]==0.11.2\")")
    side = script_side(kind, result)
    return side if side["status"] in OK_STATUSES else side["status"]


def other_result(row: Row, result: dict, ours: dict) -> dict | str:
    """The side ``row`` measures ours against, from its JSON (:func:`official_side` or
    :func:`script_result`), or why it has none. An OOM is a result."""
    if needs_upstream(row):
        side = official_side(row, result, ours)
    else:
        side = script_result(row.other.kind, result)
        if isinstance(side, str):
            return side
    if side["status"] not in OK_STATUSES:
        return f"{side['status']}: {side.get('error', '')}"
    return side


def limit_args(kind: str, seconds: int) -> list[str]:
    """Our script's own limit, inside the runner's (``attention.py`` has none)."""
    if kind == "attention":
        return []
    if kind == "train_command":
        return ["--timeout", str(seconds)]
    return ["--timeout", str(seconds), "--time-budget", str(seconds)]


def device_memory() -> dict | str:
    """The memory of the GPU that our side will run on (the first of
    ``CUDA_VISIBLE_DEVICES``, else GPU 0) from ``nvidia-smi``, which starts no CUDA context
    in this process (:func:`parse_device_memory`); or why there is none. Drivers that do not
    know ``memory.reserved`` are asked for the total alone."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi to read the device's memory from"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = "0" if visible is None else visible.split(",")[0].strip()
    if not device:
        return "CUDA_VISIBLE_DEVICES names no GPU"
    answer = ""
    for fields in ("name,memory.total,memory.reserved", "name,memory.total"):
        try:
            proc = subprocess.run([smi, "-i", device, f"--query-gpu={fields}",
                                   "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            return f"nvidia-smi: {err}"
        if proc.returncode == 0:
            return parse_device_memory(device, proc.stdout)
        answer = (proc.stderr or proc.stdout).strip()
    return f"nvidia-smi -i {device}: {answer[:300]}"


def parse_device_memory(device: str, text: str) -> dict | str:
    """``nvidia-smi``'s ``name, memory.total[, memory.reserved]`` (MiB) -> the device, both
    numbers and ``total_gib``: the total less the driver's reservation, the memory that
    CUDA reports and that XLA takes ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of (79.2 GiB of an
    80 GB card); or why it cannot be read."""
    lines = [line for line in text.splitlines() if line.strip()]
    parts = [part.strip() for part in lines[0].split(",")] if lines else []
    try:
        total = float(parts[1])
    except (IndexError, ValueError):
        return f"nvidia-smi -i {device}: no memory.total in {text.strip()[:200]!r}"
    try:
        reserved = float(parts[2])
    except (IndexError, ValueError):  # an older driver, or "[N/A]"
        reserved = None
    return {"index": device, "name": parts[0], "total_mib": total, "reserved_mib": reserved,
            "total_gib": round((total - (reserved or 0.0)) / 1024, 3)}


def cap_settings(row: Row, device: dict, other: dict | None) -> dict | str:
    """Our side's ``memory_cap`` record: the cap in GiB (``row.cap``'s size, or its share of
    ``other``'s process peak), the device's memory (:func:`device_memory`) and the fraction
    of it that gives the cap, rounded down (at most 1: a cap at or above the device's memory
    is the whole device); or why there is none."""
    cap = row.cap
    record = {"gib": cap.gib, "of_peak": cap.of_peak, "peak_side": None, "peak_gib": None}
    if cap.needs_other:
        peak = ((other or {}).get("metrics") or {}).get("peak_gib_process")
        if not peak:
            status = (other or {}).get("status")
            return (f"{row.other.key} ({status}) measured no process peak to derive the memory "
                    "cap from")
        record |= {"gib": round(cap.of_peak * peak, 3), "peak_side": row.other.key,
                   "peak_gib": peak}
    fraction = min(1.0, math.floor(record["gib"] / device["total_gib"] * 1e4) / 1e4)
    if fraction <= 0:
        return f"a cap of {record['gib']} GiB is no fraction of {device['total_gib']} GiB"
    return record | {"fraction": fraction, "device_total_gib": device["total_gib"],
                     "nvidia_smi": {k: device[k] for k in ("index", "name", "total_mib",
                                                           "reserved_mib")},
                     "environment": {FRACTION_VARIABLE: str(fraction)}}


def confirm_cap(cap: dict, result: dict) -> dict | str:
    """``cap`` (:func:`cap_settings`) with what our script's JSON ``result`` says of it: the
    fraction in its recorded environment and its allocator's limit (``allocator_limit_gib``,
    None where it reported none), which must be the fraction of the device's memory; or why
    the run was not under the cap."""
    wanted = cap["environment"][FRACTION_VARIABLE]
    recorded = (result.get("environment") or {}).get(FRACTION_VARIABLE)
    if recorded != wanted:
        return f"ran with {FRACTION_VARIABLE}={recorded!r}, not {wanted!r}"
    limits = [r["allocator_limit_gib"] for r in result.get("rows", [])
              if r.get("allocator_limit_gib") is not None]
    expected = cap["fraction"] * cap["device_total_gib"]
    for limit in limits:
        if abs(limit - expected) > CAP_TOLERANCE * expected:
            return (f"its allocator's limit was {limit:.2f} GiB, not the cap's {expected:.2f} "
                    f"GiB ({cap['fraction']} of {cap['device_total_gib']} GiB; another "
                    "XLA_PYTHON_CLIENT_ALLOCATOR, or not the GPU that nvidia-smi read?)")
    return cap | {"allocator_limit_gib": limits[0] if limits else None}


def measure(row_id: str, upstream: str | None, upstream_python: str) -> dict | str:
    """One row's JSON, or the reason it has none. Our side runs first, unless its memory cap
    derives from the other side's peak."""
    row = ROWS[row_id]
    with tempfile.TemporaryDirectory(prefix=f"bench_{row_id}_") as tmp:
        ours_out, other_out = (pathlib.Path(tmp) / name for name in ("ours.json", "other.json"))
        if needs_upstream(row):
            other_command = side_command(row, upstream, upstream_python)
        else:
            other_command = side_command(row, python=sys.executable) + limit_args(
                row.other.kind, OTHER_TIMEOUT_S - 30)
        other_command += ["--out", str(other_out)]
        other_json = other = cap = None
        if row.cap is not None and row.cap.needs_other:
            other_json = run_side(other_command, other_out, OTHER_TIMEOUT_S)
            if isinstance(other_json, str):
                return f"{row.other.key}: {other_json}"
            other = other_result(row, other_json, {})
            if isinstance(other, str):
                return f"{row.other.key}: {other}"[:2000]
        if row.cap is not None:
            device = device_memory()
            cap = device if isinstance(device, str) else cap_settings(row, device, other)
            if isinstance(cap, str):
                return f"ours: {cap}"
        ours_json = run_side(
            [sys.executable, f"benchmarks/{SCRIPTS[row.kind]}", *row.ours,
             *limit_args(row.kind, OURS_TIMEOUT_S - 30), "--out", str(ours_out)],
            ours_out, OURS_TIMEOUT_S, env=cap["environment"] if cap else None)
        ours = script_result(row.kind, ours_json)
        if isinstance(ours, str):
            return f"ours: {ours}"
        if cap is not None:
            cap = confirm_cap(cap, ours_json)
            if isinstance(cap, str):
                return f"ours: {cap}"
            ours["memory_cap"] = cap
        if other_json is None:
            other_json = run_side(other_command, other_out, OTHER_TIMEOUT_S)
            if isinstance(other_json, str):
                return f"{row.other.key}: {other_json}"
        other = other_result(row, other_json, ours)
        if isinstance(other, str):
            return f"{row.other.key}: {other}"[:2000]
    return assemble(row_id, ours, other)


def assemble(row_id: str, ours: dict, other: dict) -> dict:
    """The row file: both sides (``ours_side`` and ``official_side`` or ``script_side``)
    with their commands (our side's with its memory fraction, where capped), the table's
    labels, and under ``compared_with`` the key of the other side."""
    row = ROWS[row_id]
    key = row.other.key
    if ours["device"] != other["device"]:
        print(f"warning: {row_id}: ours ran on {ours['device']!r}, {row.other.label} on "
              f"{other['device']!r}", flush=True)
    environment = [f"{k}={v}" for k, v in ours.get("memory_cap", {}).get("environment",
                                                                          {}).items()]
    ours = dict(ours, command=" ".join([*environment, "python",
                                        f"benchmarks/{SCRIPTS[row.kind]}", *row.ours]))
    other = dict(other, command=" ".join(side_command(row)))
    return {"row": row_id, "title": row.title, "command": reproduce_command(row_id),
            "device": ours["device"], "date": now(),
            "versions": {"ours": ours.pop("versions"), key: other.pop("versions")},
            "metrics": [dataclasses.asdict(m) for m in row.metrics],
            "labels": {"ours": row.label, "other": row.other.label, "ratio": row.ratio_label},
            "compared_with": key, "ours": ours, key: other}


def parse_rows(text: str) -> list[str]:
    names = list(ROWS) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; use 'all' or a comma list of "
                                         f"{', '.join(ROWS)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=parse_rows, required=True,
                        help=f"'all' or a comma list of {', '.join(ROWS)}")
    parser.add_argument("--upstream", default=None,
                        help="a checkout of the official HMAR code (required by the rows that "
                             "run it)")
    parser.add_argument("--upstream-python", default=sys.executable,
                        help="the Python with the official code's requirements (default: this one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                        help="directory of the row files (default benchmarks/results)")
    args = parser.parse_args(argv)
    upstream = None
    if args.upstream is not None:
        upstream = str(pathlib.Path(args.upstream).resolve())
        if not pathlib.Path(upstream).is_dir():
            parser.error(f"--upstream {args.upstream}: not a directory")
    elif any(needs_upstream(ROWS[row_id]) for row_id in args.rows):
        parser.error("--upstream is required: rows "
                     f"{', '.join(r for r in args.rows if needs_upstream(ROWS[r]))} run the "
                     "official code")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    for row_id in args.rows:
        print(f"\n===== {row_id}: {ROWS[row_id].title}", flush=True)
        result = measure(row_id, upstream, args.upstream_python)
        if isinstance(result, str):
            failed[row_id] = result
            print(f"FAILED {row_id}: {result}", flush=True)
            continue
        path = out / f"{row_id}.json"
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {path}", flush=True)
    if failed:
        print("\nrows without a result: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return 1
    print("\nnext: python benchmarks/results_table.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
