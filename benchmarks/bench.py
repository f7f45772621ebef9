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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, now, peak_bf16_tflops  # noqa: E402

OURS_TIMEOUT_S = 300
OTHER_TIMEOUT_S = 290
OK_STATUSES = ("ok", "OOM")


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
class Row:
    """``kind`` names our script (``SCRIPTS``) and, for an official side, the benchmark of
    ``upstream.py``; ``ours`` our script's arguments; ``other`` the side measured against it.
    ``label`` and ``ratio_label`` head the table's columns of our side and of the ratios
    (each metric turned so that a ratio above 1 favours our side)."""

    title: str
    kind: str
    ours: tuple[str, ...]
    other: Side
    metrics: tuple[Metric, ...]
    label: str = "Ours"
    ratio_label: str = "Ours better by"


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


ROWS: dict[str, Row] = {
    "attention_l680_diagonal": attention_row(32, 30, 680, "block_diagonal"),
    "attention_l2240_diagonal": attention_row(16, 24, 2240, "block_diagonal"),
    "attention_l680_causal": attention_row(32, 30, 680, "block_causal"),
    "train_d16_b64": train_row("d16", 64, 256),
    "train_d30_b32": train_row("d30", 32, 256),
    "train_d16_512px_b16": train_row("d16", 16, 512),
    "sample_d16_b64": sample_row("d16", 64, 256),
    "sample_d30_b64": sample_row("d30", 64, 256),
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

def run_side(command: list[str], out: pathlib.Path, timeout: float) -> dict | str:
    """Runs ``command`` (its output passes through); its JSON, or why there is none. On a
    timeout the command's whole process group is killed: a worker it started must not hold
    the GPU while the other side runs."""
    print("$ " + " ".join(command), flush=True)
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True)
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


def limit_args(kind: str, seconds: int) -> list[str]:
    """Our script's own limit, inside the runner's (``attention.py`` has none)."""
    if kind == "attention":
        return []
    if kind == "train_command":
        return ["--timeout", str(seconds)]
    return ["--timeout", str(seconds), "--time-budget", str(seconds)]


def measure(row_id: str, upstream: str | None, upstream_python: str) -> dict | str:
    """One row's JSON, or the reason it has none."""
    row = ROWS[row_id]
    with tempfile.TemporaryDirectory(prefix=f"bench_{row_id}_") as tmp:
        ours_out, other_out = (pathlib.Path(tmp) / name for name in ("ours.json", "other.json"))
        ours = script_result(row.kind, run_side(
            [sys.executable, f"benchmarks/{SCRIPTS[row.kind]}", *row.ours,
             *limit_args(row.kind, OURS_TIMEOUT_S - 30), "--out", str(ours_out)],
            ours_out, OURS_TIMEOUT_S))
        if isinstance(ours, str):
            return f"ours: {ours}"
        if needs_upstream(row):
            command = side_command(row, upstream, upstream_python)
        else:
            command = side_command(row, python=sys.executable) + limit_args(
                row.other.kind, OTHER_TIMEOUT_S - 30)
        other_json = run_side(command + ["--out", str(other_out)], other_out, OTHER_TIMEOUT_S)
        if isinstance(other_json, str):
            return f"{row.other.key}: {other_json}"
        if needs_upstream(row):
            other = official_side(row, other_json, ours)
        else:
            other = script_result(row.other.kind, other_json)
            if isinstance(other, str):
                return f"{row.other.key}: {other}"
        if other["status"] not in OK_STATUSES:
            return f"{row.other.key}: {other['status']}: {other.get('error', '')}"[:2000]
    return assemble(row_id, ours, other)


def assemble(row_id: str, ours: dict, other: dict) -> dict:
    """The row file: both sides (``ours_side`` and ``official_side`` or ``script_side``)
    with their commands, the table's labels, and under ``compared_with`` the key of the
    other side."""
    row = ROWS[row_id]
    key = row.other.key
    if ours["device"] != other["device"]:
        print(f"warning: {row_id}: ours ran on {ours['device']!r}, {row.other.label} on "
              f"{other['device']!r}", flush=True)
    ours = dict(ours, command=" ".join(["python", f"benchmarks/{SCRIPTS[row.kind]}", *row.ours]))
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
