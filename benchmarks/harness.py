"""The benchmarks' measuring tools, shared by every script in ``benchmarks/``.

* Command line: ``--config FILE.py[:ARG]`` read as ``python -m hmar_jax.train`` reads it,
  ``--execution KEY=VALUE,...`` variants over its ``config.execution``, the runner's flags.
* Rows in subprocesses: :class:`Runner` runs each configuration in a fresh Python process
  (clean peak memory; an OOM, a crash or a timeout becomes a row instead of ending the run)
  and rewrites the JSON after every row.
* Timing: :func:`time_calls` (synchronised calls, or ``inner`` calls back to back per
  sample), :func:`timed` (medians, with the GPU's clocks while the calls ran),
  :func:`compile_timed` and XLA's buffer sizes (:func:`xla_memory`).
* :class:`GpuMonitor`: ``nvidia-smi`` sampled in the background: SM clock, power and
  clock-limit reasons per GPU, and the growth of used memory (a process's peak, which
  counts what the allocator statistics miss: the CUDA context, library workspaces).
* Profiling (``--profile``): the device time of a compiled call per op category and per
  op, and where the device sat idle.

Nothing here imports JAX at module level: the parent process of a :class:`Runner` never
initialises a backend, so each worker has the accelerator to itself.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2.0 ** 30

# Dense bf16 matmul peak per device kind, for MFU (the first name found in the device kind
# wins, so the PCIe H100 comes before the SXM one).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))

# Environment variables that change what XLA compiles or how it allocates; kept in the JSON.
RECORDED_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "TF_GPU_ALLOCATOR", "CUDA_VISIBLE_DEVICES")


# ======================================= command line ==========================================

def parse_list(text: str, kind=str) -> list:
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_execution(text: str) -> dict:
    """``--execution`` value -> settings: ``"remat=block,scan_blocks=false"`` ->
    ``{"remat": "block", "scan_blocks": False}`` (true/false as booleans, integers as
    ints), checked against ``hmar_jax.execution.ExecutionConfig``."""
    from hmar_jax.execution import ExecutionConfig

    settings = {}
    for item in parse_list(text):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r} (e.g. "
                                             "remat=block,scan_blocks=false)")
        if value.lower() in ("true", "false"):
            settings[key] = value.lower() == "true"
        else:
            settings[key] = int(value) if value.isdigit() else value
    try:
        ExecutionConfig.from_mapping(settings)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return settings


def execution_label(settings: dict) -> str:
    """The row's ``--execution`` settings as text; ``config`` for none (the config's own)."""
    return ",".join(f"{key}={value}" for key, value in settings.items()) or "config"


def load_config(text: str):
    """``FILE.py[:ARG]`` -> the file's ``get_config(ARG)`` (``get_config()`` without ``:``),
    the syntax of ``--config`` in ``python -m hmar_jax.train``."""
    path, sep, arg = text.partition(":")
    if not pathlib.Path(path).is_file():
        raise SystemExit(f"--config {text}: no config file {path}")
    spec = importlib.util.spec_from_file_location(f"benchmark_config_{pathlib.Path(path).stem}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def check_runner_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The parent's checks of :func:`add_runner_flags`' options: ``--config`` loads (made
    relative to the repository root, where the workers run) and ``--batch`` is given."""
    args.config = absolute_config(args.config)
    if args.batch is None:
        if not args.quick:
            parser.error("--batch is required, e.g. --batch 64")
        args.batch = [2]


def absolute_config(text: str) -> str:
    """``--config`` with its file relative to the repository root, where the workers run
    (absolute if outside it), checked by loading it once: a bad config fails before any
    row runs."""
    if not text:
        raise SystemExit("--config is required, e.g. --config configs/hmar_imagenet.py:variant=d16")
    path, sep, arg = text.partition(":")
    file = pathlib.Path(path).resolve()
    load_config(str(file) + sep + arg)
    if file.is_relative_to(REPO):
        file = file.relative_to(REPO)
    return str(file) + sep + arg


def run_config(spec: dict):
    """A row's config: ``spec["config"]`` with ``spec["execution_settings"]`` laid over its
    ``config.execution``; with ``spec["quick"]`` the ``tiny`` model (10 classes, one mask
    layer) in place of the config's."""
    import ml_collections

    config = load_config(spec["config"])
    # A new section rather than field updates: ConfigDict keeps each field's type, and a
    # setting may change it ("auto" -> False).
    config.execution = ml_collections.ConfigDict(config.execution.to_dict()
                                                | spec["execution_settings"])
    if spec["quick"]:
        config.model.preset = "tiny"
        overrides = config.model.overrides.to_dict() | dict(num_mask_layers=1, num_classes=10)
        config.model.overrides = ml_collections.ConfigDict(overrides)
    return config


def tokenizer_config(config, quick: bool):
    """``VQVAEConfig()`` (the released ch=160 VQ-VAE) on the scales of
    ``config.data.image_size``; with ``quick`` a 16 px tokenizer with patch_nums
    (1, 2, 3, 4)."""
    from hmar_jax.scales import PATCH_NUMS
    from hmar_jax.tokenizer import VQVAEConfig

    if quick:
        return VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2),
                           num_res_blocks=1, using_sa=False, norm_groups=4,
                           patch_nums=(1, 2, 3, 4))
    return VQVAEConfig(patch_nums=PATCH_NUMS[config.data.image_size])


def build_specs(args, modes: tuple[str, ...], **fields) -> list[dict]:
    """One spec per mode, batch and ``--execution`` variant (in that order), with the
    runner's settings and ``fields``."""
    for mode in args.modes:
        if mode not in modes:
            raise SystemExit(f"unknown mode {mode!r}; use {', '.join(modes)}")
    common = dict(config=args.config, quick=args.quick, iters=args.iters, warmup=args.warmup,
                  seed=0, lower_only=args.lower_only, profile=args.profile, **fields)
    return [dict(common, mode=mode, batch=batch, variant=execution_label(settings),
                 execution_settings=settings)
            for mode in args.modes for batch in args.batch
            for settings in args.execution or [{}]]


def add_runner_flags(parser: argparse.ArgumentParser, *, what: str, timeout: float,
                     iters: int, warmup: int) -> None:
    """The flags of the scripts that run their rows through :class:`Runner`."""
    parser.add_argument("--batch", type=lambda text: parse_list(text, int), default=None,
                        help="comma list of batch sizes (per device), each gets its rows "
                             "(required; 2 with --quick)")
    parser.add_argument("--config", metavar="FILE.py[:ARG]",
                        help="experiment config (required), as for python -m hmar_jax.train (e.g. "
                             "configs/hmar_imagenet.py:variant=d16); its config.execution "
                             f"says how {what} runs")
    parser.add_argument("--execution", action="append", type=parse_execution, default=None,
                        metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="one execution variant: hmar_jax.execution.ExecutionConfig fields "
                             "over the config's config.execution; repeat it to compare "
                             "variants, each gets its rows (default: the config's own)")
    parser.add_argument("--out", default=None, help="JSON file, rewritten after every row")
    parser.add_argument("--time-budget", type=float, default=540.0,
                        help="overall seconds; rows not started by then are skipped")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help="seconds per row (compilation included)")
    parser.add_argument("--iters", type=int, default=iters, help="timed calls")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls after compiling")
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run: the tiny model on a 16 px tokenizer (patch_nums "
                             "1,2,3,4), same code path")
    parser.add_argument("--lower-only", action="store_true",
                        help="trace and lower each row without compiling or running it (a check "
                             "of the full-size program on any machine)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, trace two more calls and store the device time per "
                             "op category and the costliest ops")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)


# ================================= environment and devices ====================================

def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "jax-cuda12-plugin", "jax-cuda13-plugin",
                 "jax-cuda12-pjrt", "jax-cuda13-pjrt"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if not name.startswith("jax-cuda"):
                out[name] = None
    return out


def device_info() -> dict:
    """Worker side: the devices this process sees."""
    import jax

    devices = jax.devices()
    return {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "device_count": len(devices)}


def recorded_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k in RECORDED_ENV}


def peak_bf16_tflops(device_kind: str | None) -> float | None:
    """Dense bf16 peak of ``device_kind``; None for a device not in the table (no MFU)."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if device_kind and name in device_kind:
            return tflops
    return None


def kernel_implementation(op: str) -> str:
    """The platform's Pallas kernel for ``op`` (an ``ExecutionConfig`` kernel field) as the
    execution config resolves ``"pallas"``: ``"gpu"`` on a GPU, ``"interpret"`` on CPU."""
    from hmar_jax.execution import ExecutionConfig

    return getattr(ExecutionConfig(**{op: "pallas"}).resolve(), op)


def standalone_header(benchmark: str, args: argparse.Namespace) -> dict:
    """The JSON header of a single-process benchmark (the kernel scripts)."""
    return {"benchmark": benchmark, **device_info(), "versions": versions(),
            "date": now(), "command": command_line(), "settings": vars(args),
            "environment": recorded_environment()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> list[str]:
    return ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]


def init_on_device(ctor):
    """Builds an nnx module with its initialisers run inside one jit (fast for big models)."""
    import jax
    from flax import nnx

    graphdef = nnx.graphdef(nnx.eval_shape(ctor))
    state = jax.jit(lambda: nnx.state(ctor()))()
    return nnx.merge(graphdef, state)


# ========================================== timing =============================================

def time_calls(call, warmup: int, repeats: int, inner: int = 1) -> list[float]:
    """ms per call: ``repeats`` samples, each ``inner`` calls dispatched back to back with one
    sync at the end, after ``warmup`` synchronised calls. ``inner=1`` times each call alone
    (its dispatch included); a larger ``inner`` lets the host dispatch call i+1 while the
    device runs call i, as a training loop does, and spreads the sync over short kernels."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return times


def timing_summary(times_ms: list[float]) -> dict:
    return {"ms_median": statistics.median(times_ms), "ms_min": min(times_ms),
            "ms_all": [round(t, 3) for t in times_ms]}


def timed(call, warmup: int, iters: int, back_to_back: bool = False) -> dict:
    """:func:`timing_summary` of ``iters`` synchronised calls after ``warmup`` (with
    ``back_to_back`` also ``ms_back_to_back``: the mean of ``iters`` calls with one sync) and
    ``gpu_during_timing``: the GPUs' clocks and power while they ran (empty without
    ``nvidia-smi``). A GPU at its power limit lowers its clock, so the same program runs
    slower when it draws more power: the clocks tell two runs apart."""
    with GpuMonitor() as monitor:
        result = timing_summary(time_calls(call, warmup, iters))
        if back_to_back:
            result["ms_back_to_back"] = time_calls(call, 0, 1, inner=iters)[0]
    result["gpu_during_timing"] = monitor.summary()
    return result


def compile_timed(result: dict, jitted, args: tuple, lower_only: bool):
    """``jitted.lower(*args).compile()``, its seconds and buffer sizes into ``result``; None
    when only lowering (then ``result["lower_s"]``)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    if lower_only:
        result["lower_s"] = time.perf_counter() - t0
        return None
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t0
    result.update(xla_memory(compiled))
    return compiled


def xla_memory(compiled) -> dict:
    """The executable's buffers from XLA's buffer assignment, in GiB, and ``xla_total_gib`` =
    arguments + outputs + temporaries - aliased (donated): the device memory one call needs,
    without the scratch of compile-time autotuning that the allocator peak also counts;
    {} where XLA reports nothing."""
    try:
        m = compiled.memory_analysis()
        sizes = {"xla_argument_gib": m.argument_size_in_bytes / GIB,
                 "xla_output_gib": m.output_size_in_bytes / GIB,
                 "xla_temp_gib": m.temp_size_in_bytes / GIB,
                 "xla_alias_gib": m.alias_size_in_bytes / GIB}
    except Exception:  # noqa: BLE001 - optional diagnostics
        return {}
    sizes["xla_total_gib"] = (sizes["xla_argument_gib"] + sizes["xla_output_gib"]
                              + sizes["xla_temp_gib"] - sizes["xla_alias_gib"])
    return sizes


def peak_gib(devices=None) -> float | None:
    """Largest allocator ``peak_bytes_in_use`` over ``devices`` (default: the first) in GiB;
    None where the backend keeps no statistics (CPU)."""
    import jax

    peaks = []
    for device in devices or jax.devices()[:1]:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / GIB if peaks else None


def allocator_limit_gib() -> float | None:
    """The first device's allocator limit (``bytes_limit``) in GiB: on a GPU,
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default when unset) of the device's memory as
    CUDA reports it, whether or not the allocator preallocates. None where the backend
    keeps no statistics (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None
    return round(stats["bytes_limit"] / GIB, 3)


# ===================================== rows in subprocesses ====================================

def is_oom(text: str) -> bool:
    lowered = text.lower()
    return "resource_exhausted" in lowered or "out of memory" in lowered or "oom" in lowered.split()


def worker_main(worker, spec_json: str, out_path: str) -> None:
    """Runs ``worker(spec) -> dict`` and writes the row (or its failure) as JSON, with the
    devices it saw and its allocator's limit (``allocator_limit_gib``)."""
    spec = json.loads(spec_json)
    try:
        row = {"status": "ok", **worker(spec)}
    except Exception as err:  # noqa: BLE001 - every failure becomes a row
        message = f"{type(err).__name__}: {err}"
        row = {"status": "OOM" if is_oom(message) else f"error: {message}"[:400]}
        traceback.print_exc()
    try:
        row.update(device_info())
        limit = allocator_limit_gib()
        if limit is not None:
            row["allocator_limit_gib"] = limit
    except Exception:  # noqa: BLE001 - the row stands without it
        pass
    pathlib.Path(out_path).write_text(json.dumps(row))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter and runtime teardown: the row is written


def _tail(text, limit: int = 1500) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


def run_subprocess(script: pathlib.Path, spec: dict, timeout: float) -> dict:
    """One row in a fresh Python process (``--worker``); always returns a row. The process's
    peak GPU memory (``process_peak_gib``) is read from ``nvidia-smi`` while it runs."""
    with tempfile.TemporaryDirectory(prefix="hmar_bench_") as tmp:
        out = pathlib.Path(tmp) / "row.json"
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", str(out)]
        with GpuMonitor() as monitor:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                      timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired as err:
                return {"status": f"timeout after {timeout:.0f} s", "log_tail": _tail(err.stderr)}
        if out.exists():
            row = json.loads(out.read_text())
            if row.get("status") != "ok":
                row["log_tail"] = _tail(proc.stderr)
            row["process_peak_gib"] = monitor.memory_growth_gib()
            return row
        log = (proc.stderr or "") + (proc.stdout or "")
        if is_oom(log):
            status = "OOM"
        elif proc.returncode in (-9, 137):
            status = f"error: killed (exit {proc.returncode}; host memory?)"
        else:
            last = [line for line in log.strip().splitlines() if line.strip()][-1:] or [""]
            status = f"error: exit {proc.returncode}: {last[0][:300]}"
        return {"status": status, "log_tail": _tail(log)}


def run_benchmark(parser: argparse.ArgumentParser, argv, script: str, benchmark: str, worker,
                  specs, format_row, header: str, finish_row=None) -> None:
    """A benchmark's ``main``: with ``--worker``, one row in this process (``worker_main``);
    otherwise ``specs(args)``'s rows through a ``Runner``, exiting non-zero when none
    succeeded."""
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(worker, args.worker, args.worker_out)
        return
    check_runner_args(parser, args)
    rows = Runner(script, benchmark, args, format_row, header).run(specs(args), finish_row)
    if args.out:
        print(f"\nwrote {args.out}")
    if not any(r.get("status") == "ok" for r in rows):
        sys.exit(1)


class Runner:
    """Runs specs one subprocess each under a per-row timeout and an overall budget,
    printing every row (and the log tail of a failed one) and rewriting the JSON after each.

    ``script`` is the benchmark's own file, run with ``--worker``; ``format_row(row)`` is one
    table line, ``header`` the table's first."""

    def __init__(self, script: str, benchmark: str, args: argparse.Namespace, format_row,
                 header: str):
        self.script, self.benchmark, self.args = pathlib.Path(script).resolve(), benchmark, args
        self.format_row, self.header = format_row, header
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.command = command_line()
        self.started = now()

    def run(self, specs: list[dict], finish_row=None) -> list[dict]:
        print(f"{len(specs)} rows, time budget {self.args.time_budget:.0f} s, "
              f"per-row timeout {self.args.timeout:.0f} s", flush=True)
        print(self.header, flush=True)
        start = time.monotonic()
        for spec in specs:
            remaining = self.args.time_budget - (time.monotonic() - start)
            if remaining <= 0:
                row = dict(spec, status="skipped (time budget)")
            else:
                t0 = time.monotonic()
                limit = min(self.args.timeout, remaining)
                result = run_subprocess(self.script, spec, limit)
                if result["status"].startswith("timeout") and limit < self.args.timeout:
                    result["status"] += " (time budget)"
                row = dict(spec, **result, wall_s=round(time.monotonic() - t0, 1))
                for key in ("device_kind", "platform", "device_count"):
                    if row.get(key) is not None:
                        self.meta.setdefault(key, row[key])
            if finish_row is not None:
                finish_row(row, self.rows)
            self.rows.append(row)
            print(self.format_row(row), flush=True)
            if row.get("gpu_during_timing"):
                print(format_gpu_summary(row["gpu_during_timing"]), flush=True)
            if row.get("device_profile"):
                print(format_profile(row["device_profile"]), flush=True)
            if row.get("log_tail"):
                print("    | " + row["log_tail"].strip().replace("\n", "\n    | "), flush=True)
            self.write()
        return self.rows

    def write(self) -> None:
        if not self.args.out:
            return
        path = pathlib.Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(self.args).items() if k not in ("worker", "worker_out")}
        payload = {"benchmark": self.benchmark, **self.meta, "versions": versions(),
                   "date": self.started, "command": self.command,
                   "environment": recorded_environment(), "settings": settings,
                   "rows": self.rows}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(path)


def status_text(row: dict) -> str:
    if row.get("status") == "ok" and row.get("lower_s") is not None:
        return f"ok (lowered only, {row['lower_s']:.1f} s)"
    return row.get("status", "?")


def fmt(value, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


def elementwise_benchmark_main(benchmark: str, doc: str, shapes: tuple, quick_shapes: tuple,
                               measure, add_arguments=None) -> None:
    """Command line of the per-shape kernel benchmarks (``adaln.py``, ``bias_gelu.py``,
    ``group_norm.py``, ``qkv_prologue.py``): ``measure(*shape, num_warps, iters, bandwidth,
    **extra)`` returns a shape's rows; ``add_arguments(parser)`` adds a benchmark's own
    options and returns their names, passed to ``measure`` as ``extra``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(s[0] for s in shapes),
                        help="comma list of " + ", ".join(s[0] for s in shapes))
    parser.add_argument("--num-warps", default="4,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--bandwidth", type=float, default=4.8, help="HBM TB/s, for the print")
    parser.add_argument("--quick", action="store_true", help="tiny shape, interpret mode on CPU")
    parser.add_argument("--out", default=None)
    extra_names = add_arguments(parser) if add_arguments else []
    args = parser.parse_args()
    extra = {name: getattr(args, name) for name in extra_names}
    chosen = quick_shapes if args.quick else [s for s in shapes if s[0] in parse_list(args.shapes)]
    if args.quick:
        args.iters = 2
    result = standalone_header(benchmark, args) | {"rows": []}
    for shape in chosen:
        result["rows"] += measure(*shape, parse_list(args.num_warps, int), args.iters,
                                  args.bandwidth, **extra)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


# ========================================= GPU monitor =========================================

GPU_FIELDS = ("index", "clocks.sm", "clocks.max.sm", "power.draw", "power.limit",
              "temperature.gpu", "clocks_event_reasons.active", "memory.used")
# Bits of ``clocks_event_reasons.active`` (NVML's clocks event reasons).
CLOCK_REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal_slowdown": 0x20,
                 "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80}


def _visible_gpus() -> set[str] | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    indices = {part.strip() for part in visible.split(",") if part.strip()}
    return indices if indices and all(i.isdigit() for i in indices) else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "Not Supported"
        return None


def _per_gpu(lines: list[str], indices: set[str] | None) -> dict[str, list[list[str]]]:
    per_gpu: dict[str, list[list[str]]] = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(GPU_FIELDS) or (indices and parts[0] not in indices):
            continue
        per_gpu.setdefault(parts[0], []).append(parts)
    return per_gpu


def summarize_gpu(lines: list[str], indices: set[str] | None = None) -> dict:
    """Per GPU: sample count, SM clock (median, min, max and the GPU's maximum) in MHz,
    power (mean, max, limit) in W, max temperature, max used memory in MiB and the fraction
    of samples with each clock-limit reason set. ``lines``: ``nvidia-smi
    --format=csv,noheader,nounits`` rows of ``GPU_FIELDS``."""
    summary = {}
    for index, rows in sorted(_per_gpu(lines, indices).items()):
        clocks = [c for c in (_number(r[1]) for r in rows) if c is not None]
        power = [p for p in (_number(r[3]) for r in rows) if p is not None]
        temps = [t for t in (_number(r[5]) for r in rows) if t is not None]
        reasons = [int(r[6], 16) for r in rows if r[6].lower().startswith("0x")]
        memory = [m for m in (_number(r[7]) for r in rows) if m is not None]
        entry = {"samples": len(rows)}
        if clocks:
            entry.update(sm_mhz_median=statistics.median(clocks), sm_mhz_min=min(clocks),
                         sm_mhz_max=max(clocks), sm_mhz_gpu_max=_number(rows[0][2]))
        if power:
            entry.update(power_w_mean=round(statistics.fmean(power), 1), power_w_max=max(power),
                         power_w_limit=_number(rows[0][4]))
        if temps:
            entry["temperature_c_max"] = max(temps)
        if memory:
            entry["memory_used_mib_max"] = max(memory)
        if reasons:
            entry["fraction_of_samples"] = {
                name: round(sum(bool(r & bit) for r in reasons) / len(reasons), 3)
                for name, bit in CLOCK_REASONS.items()}
        summary[f"gpu{index}"] = entry
    return summary


def format_gpu_summary(summary: dict) -> str:
    """One short line for the benchmark tables; '' for an empty summary."""
    parts = []
    for gpu, entry in summary.items():
        if "sm_mhz_median" not in entry:
            continue
        capped = entry.get("fraction_of_samples", {}).get("sw_power_cap")
        parts.append(f"{gpu}: SM {entry['sm_mhz_median']:.0f} MHz median "
                     f"({entry['sm_mhz_min']:.0f}-{entry['sm_mhz_max']:.0f}, max "
                     f"{entry.get('sm_mhz_gpu_max') or 0:.0f}), "
                     f"{entry.get('power_w_mean', 0):.0f} W mean of "
                     f"{entry.get('power_w_limit') or 0:.0f}"
                     + (f", power-capped in {capped:.0%} of samples" if capped is not None else ""))
    return "    gpu while timed: " + "; ".join(parts) if parts else ""


class GpuMonitor:
    """Samples ``GPU_FIELDS`` with ``nvidia-smi`` every ``interval_ms`` while the ``with``
    block runs, after one reading taken on entry (the baseline of
    :meth:`memory_growth_gib`). Without ``nvidia-smi`` (CPU, TPU) or when it fails, the
    summaries are empty and nothing else changes. GPUs are those of
    ``CUDA_VISIBLE_DEVICES`` when it lists indices, else all."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self._process = None
        self._file = None
        self._baseline: list[str] = []
        self._lines: list[str] = []

    def __enter__(self) -> "GpuMonitor":
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        query = [smi, f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits"]
        try:
            self._baseline = subprocess.run(query, capture_output=True, text=True,
                                            timeout=30).stdout.splitlines()
            self._file = tempfile.TemporaryFile(mode="w+")
            self._process = subprocess.Popen(query + [f"--loop-ms={self.interval_ms}"],
                                             stdout=self._file, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            self._process = None
        return self

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._file is not None:
            self._file.seek(0)
            self._lines = self._file.read().splitlines()
            self._file.close()

    def summary(self) -> dict:
        return summarize_gpu(self._lines, _visible_gpus())

    def memory_growth_gib(self) -> float | None:
        """The largest rise of a GPU's used memory above its reading on entry, in GiB: with
        the GPU to itself, the peak device memory of the process that ran inside the block
        (CUDA context, allocator pools and library workspaces included). None without
        readings."""
        indices = _visible_gpus()
        base = {i: _number(rows[0][7]) for i, rows in _per_gpu(self._baseline, indices).items()}
        growth = []
        for index, rows in _per_gpu(self._baseline + self._lines, indices).items():
            used = [m for m in (_number(r[7]) for r in rows) if m is not None]
            if used and base.get(index) is not None:
                growth.append((max(used) - base[index]) / 1024)
        return round(max(growth), 3) if growth else None


# ========================================== profiling ==========================================

# XLA's GPU command buffers (CUDA graphs) hide the kernels from the profiler: the profiled
# executable is compiled a second time without them (the timed one keeps them).
PROFILE_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}
_ATTENTION = re.compile(r"hmar_block_sparse|attention|flash|fmha|sdpa", re.I)
_COLLECTIVE = re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective", re.I)
_MATMUL_KERNEL = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul", re.I)
_CONV_KERNEL = re.compile(r"conv(?!ert)|cudnn", re.I)
_COPY_KERNEL = re.compile(r"memcpy|memset", re.I)
_SKIPPED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "XLA TraceMe")
GAP_BUCKETS_US = (5, 20, 100, 1000)


def maybe_profile(result: dict, spec: dict, jitted, args: tuple, make_call) -> None:
    """With ``--profile``: ``result["device_profile"]``, :func:`profile_calls` of
    ``jitted(*args)`` compiled without command buffers. ``make_call(executable)`` returns the
    zero-argument call that the timing used."""
    if not spec.get("profile"):
        return
    import jax

    try:
        executable = jitted.lower(*args).compile(compiler_options=PROFILE_COMPILER_OPTIONS)
        call = make_call(executable)
        jax.block_until_ready(call())  # warm-up (autotuning, first-call allocations)
        result["device_profile"] = profile_calls(call, 2, executable.as_text())
    except Exception as err:  # noqa: BLE001 - diagnostics must not lose the timed row
        result["device_profile"] = {"error": f"{type(err).__name__}: {err}"[:300]}


def profile_calls(call, calls: int = 2, hlo_text: str | None = None, top: int = 60) -> dict:
    """Traces ``calls`` synchronised calls of ``call`` under ``jax.profiler.trace`` and sums
    the device events (kernels, copies) per XLA instruction, read back with
    ``jax.profiler.ProfileData``. Per call: device ms (the sum over streams), ms per
    category (attention, matmul, convolution, sort, collective, copy, elementwise; from the
    kernel name and the instruction's ``op_name`` in ``hlo_text``), the costliest
    instructions and ``op_name`` groups, and the idle-time ``timeline``."""
    import jax

    with tempfile.TemporaryDirectory(prefix="hmar_profile_") as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(calls):
                jax.block_until_ready(call())
        summary = summarize_profile(logdir, calls, hlo_text, top)
        try:
            summary["timeline"] = idle_gaps(logdir, calls)
        except Exception as err:  # noqa: BLE001 - the breakdown stands without it
            summary["timeline"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return summary


def _op_names(hlo_text: str | None) -> dict[str, str]:
    """``{instruction name: op_name metadata}`` from compiled HLO text."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"", re.M)
    names: dict[str, str] = {}
    for match in pattern.finditer(hlo_text or ""):
        names.setdefault(match.group(1), match.group(2))
    return names


def _instruction_lines(hlo_text: str | None, width: int = 300) -> dict[str, str]:
    """``{instruction name: its HLO line}`` without layouts and metadata."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", re.M)
    lines: dict[str, str] = {}
    for match in pattern.finditer(hlo_text or ""):
        text = re.sub(r",\s*(metadata|backend_config|frontend_attributes)=.*$", "", match.group(2))
        lines.setdefault(match.group(1), re.sub(r"(?<=\])\{[\d,]*\}", "", text)[:width])
    return lines


def categorize(kernel: str, instruction: str, op_name: str, hlo: str = "") -> str:
    """One category per instruction: names first, then the op_name of the fused root.
    ``hlo`` settles cuBLAS calls whose first kernel is a workspace memset and whose op_name
    is a transpose (the weight-gradient matmuls of a backward)."""
    names = f"{kernel} {instruction}"
    if _ATTENTION.search(names):
        return "attention"
    if _COLLECTIVE.search(names):
        return "collective"
    if (op_name.endswith("dot_general") or re.match(r"(dot|gemm|cublas)", instruction)
            or _MATMUL_KERNEL.search(names) or "__cublas" in hlo):
        return "matmul"
    if op_name.endswith("conv_general_dilated") or _CONV_KERNEL.search(names):
        return "convolution"
    if re.search(r"\bsort\b|top_k|argsort", op_name) or "sort" in instruction:
        return "sort"
    if _COPY_KERNEL.search(names):
        return "copy"
    return "elementwise"


def _stat(event, key):
    for name, value in event.stats:
        if name == key:
            return value
    return None


def _planes(logdir: str):
    import jax

    for path in pathlib.Path(logdir).rglob("*.xplane.pb"):
        yield from jax.profiler.ProfileData.from_file(str(path)).planes


def _device_events(logdir: str):
    """``(kernel name, hlo instruction or None, duration ns)`` of every device event; on CPU
    (no device planes) the host events that carry an ``hlo_op`` stand in."""
    host_ops, device_ops = [], []
    for plane in _planes(logdir):
        device = plane.name.startswith("/device:")
        if not device and plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if any(skip in line.name for skip in _SKIPPED_LINES):
                continue
            for event in line.events:
                item = (event.name, _stat(event, "hlo_op"), float(event.duration_ns))
                if device:
                    device_ops.append(item)
                elif item[1] is not None:
                    host_ops.append(item)
    return device_ops or host_ops


def summarize_profile(logdir: str, calls: int, hlo_text: str | None = None,
                      top: int = 60) -> dict:
    op_names, hlo_lines = _op_names(hlo_text), _instruction_lines(hlo_text)
    per_key: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, "", ""])
    for kernel, instruction, ns in _device_events(logdir):
        entry = per_key[instruction or kernel]
        entry[0] += ns
        entry[1] += 1
        entry[2] = entry[2] or kernel
        entry[3] = entry[3] or op_names.get(instruction or "", "")
    if not per_key:
        return {"device_events": 0}
    categories: dict[str, float] = collections.defaultdict(float)
    rows = []
    for key, (ns, count, kernel, op_name) in per_key.items():
        category = categorize(kernel, key, op_name, hlo_lines.get(key, ""))
        categories[category] += ns
        rows.append({"op": key, "category": category, "ms_per_call": ns / 1e6 / calls,
                     "launches_per_call": count / calls, "kernel": kernel[:120],
                     "op_name": op_name[-160:], "hlo": hlo_lines.get(key, "")})
    rows.sort(key=lambda r: -r["ms_per_call"])
    # Every block runs the same source lines, so one op_name sums an op over all blocks.
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        group = groups.setdefault((row["category"], row["op_name"]), {
            "category": row["category"], "op_name": row["op_name"], "ms_per_call": 0.0,
            "instructions": 0})
        group["ms_per_call"] += row["ms_per_call"]
        group["instructions"] += 1
    return {"device_ms_per_call": sum(categories.values()) / 1e6 / calls,
            "launches_per_call": sum(r["launches_per_call"] for r in rows),
            "category_ms_per_call": {k: v / 1e6 / calls for k, v in
                                     sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_ops": rows[:top],
            "by_op_name": sorted(groups.values(), key=lambda g: -g["ms_per_call"])[:top]}


def _host_events_at(host_events: list, at_ns: float, limit: int = 4) -> list[str]:
    """The shortest host events (name, microseconds) running at ``at_ns``."""
    running = [(end - start, name) for start, end, name in host_events if start <= at_ns <= end]
    return [f"{name[:50]} ({ns / 1e3:.0f}us)" for ns, name in sorted(running)[:limit]]


def idle_gaps(logdir: str, calls: int, top: int = 15) -> dict:
    """Where the device sat idle. The kernels of all streams of a device are merged into
    busy intervals from the first kernel to the last; the rest is idle: launch gaps, host
    synchronisation, host work between calls. Per device: span, busy and idle ms per call,
    idle time and gap count per size bucket (us), and the ``top`` longest gaps with the
    instructions around them, where they fell (ms from the first kernel) and the shortest
    host events running in their middle."""
    planes = list(_planes(logdir))
    host_events = [(e.start_ns, e.end_ns, e.name) for plane in planes
                   if plane.name == "/host:CPU" for line in plane.lines for e in line.events]
    devices = []
    for plane in planes:
        if not plane.name.startswith("/device:"):
            continue
        kernels = sorted((e.start_ns, e.end_ns, _stat(e, "hlo_op") or e.name)
                         for line in plane.lines
                         if not any(skip in line.name for skip in _SKIPPED_LINES)
                         for e in line.events)
        if not kernels:
            continue
        busy, gaps = 0.0, []
        cur_start, cur_end, cur_name = kernels[0]
        for k_start, k_end, name in kernels[1:]:
            if k_start > cur_end:
                busy += cur_end - cur_start
                gaps.append((k_start - cur_end, cur_name, name, cur_end))
                cur_start = k_start
            if k_end >= cur_end:
                cur_end, cur_name = k_end, name
        busy += cur_end - cur_start
        first, span = kernels[0][0], cur_end - kernels[0][0]
        buckets, lower = {}, 0
        for upper in GAP_BUCKETS_US + (float("inf"),):
            inside = [g[0] for g in gaps if lower * 1e3 <= g[0] < upper * 1e3]
            buckets[f"{lower}-{upper}us"] = {"count_per_call": len(inside) / calls,
                                             "ms_per_call": sum(inside) / 1e6 / calls}
            lower = upper
        gaps.sort(key=lambda g: -g[0])
        devices.append({
            "device": plane.name, "span_ms_per_call": span / 1e6 / calls,
            "busy_ms_per_call": busy / 1e6 / calls,
            "idle_ms_per_call": (span - busy) / 1e6 / calls, "gap_buckets": buckets,
            "longest_gaps": [{"us": g[0] / 1e3, "at_ms": (g[3] - first) / 1e6,
                              "after": g[1][:60], "before": g[2][:60],
                              "host_busy_with": _host_events_at(host_events, g[3] + g[0] / 2)}
                             for g in gaps[:top]]})
    return {"devices": devices}


def format_profile(profile: dict, top: int = 30) -> str:
    """A few indented lines for the benchmark tables."""
    if not profile or "device_ms_per_call" not in profile:
        return "    profile: no device events" + (f" ({profile.get('error')})"
                                                   if profile and profile.get("error") else "")
    split = ", ".join(f"{k} {v:.1f}" for k, v in profile["category_ms_per_call"].items())
    lines = [f"    profile: device {profile['device_ms_per_call']:.1f} ms/call, "
             f"{profile['launches_per_call']:.0f} launches/call; {split}"]
    for run in profile.get("timeline", {}).get("devices", []):
        idle = ", ".join(f"{name} {b['ms_per_call']:.2f} ms in {b['count_per_call']:.0f}"
                         for name, b in run["gap_buckets"].items())
        lines.append(f"    timeline per call: span {run['span_ms_per_call']:.1f} ms, busy "
                     f"{run['busy_ms_per_call']:.1f}, idle {run['idle_ms_per_call']:.1f} "
                     f"(gaps {idle})")
    for row in profile["top_ops"][:top]:
        lines.append(f"      {row['ms_per_call']:8.2f} ms x{row['launches_per_call']:<5.0f} "
                     f"{row['category']:>11} {row['op'][:40]:<40} {row['op_name'][-90:]}")
    return "\n".join(lines)
