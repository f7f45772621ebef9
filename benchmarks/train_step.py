"""Stage-1 training-step benchmark: the real trainer step and forward+backward.

Random init, 256 px (patch_nums 1..16, L = 680, V = 4096, Cv = 32, the ch=160 VQ-VAE of
``VQVAEConfig()``), run as the ImageNet config's ``config.execution`` resolves for the
platform (on GPUs: bf16 compute, the Pallas kernels, unrolled blocks). Modes:

* ``full``: ``hmar_jax.training.trainer.make_step`` with the Trainer's optimizer (AdamW with the
  upstream decay groups, clipping 2.0, EMA, the ImageNet recipe of
  ``configs/hmar_imagenet.py``) and donated state: tokenizer encode, teacher-forcing inputs,
  forward, loss, backward, clip, AdamW, EMA. Inputs are random uint8 images mapped to
  [-1, 1] as the data pipeline does (once, outside the step) and random labels.
* ``full_pretokenized``: the same step with ``config.data.pretokenized`` set: it takes
  random token indices ``[B, L]`` instead of images (no tokenizer encode; teacher-forcing
  inputs, forward, loss, backward, clip, AdamW, EMA), as training from a token cache
  (``python -m hmar_jax.pretokenize``) runs.
* ``fwdbwd``: ``jax.value_and_grad`` of the stage-1 loss w.r.t. the trainable parameters
  on precomputed teacher-forcing inputs ``x [B, L-1, 32]`` and targets (no optimizer, no
  tokenizer; stochastic depth on, as in training).
* ``tokenize``: the step's tokenizer part alone (encode to indices + teacher-forcing inputs).

Every configuration runs in its own subprocess (clean peak memory; an OOM or a crash
becomes a row), with ``XLA_PYTHON_CLIENT_PREALLOCATE=false``. Per row: compile seconds
(``lower().compile()``), then ``--warmup`` calls, then ``--iters`` calls each synchronised
with ``jax.block_until_ready``; median and min ms, images/s, model TFLOP/s
``6 B L (12 C^2 depth + C V) / t``, MFU against 790 TFLOP/s (H200 bf16 dense), peak GiB
(``memory_stats()['peak_bytes_in_use']`` after the timed calls; None on CPU) and the loss.
The JSON (``--out``) is rewritten after every row.

  python benchmarks/train_step.py --time-budget 540 --out benchmarks/results/train_step_h200.json
  python benchmarks/train_step.py --pairs d16x64,d30x32 --modes full --execution remat=none \\
      --execution remat=block --execution remat=block,scan_blocks=true --time-budget 540
  python benchmarks/train_step.py --pairs d16x64 --modes full --devices 1,2    # x2 machine
  python benchmarks/train_step.py --quick --out /tmp/train_step_quick.json       # CPU smoke

Each ``--execution KEY=VALUE[,KEY=VALUE...]`` is one execution variant: those
``hmar_jax.execution.ExecutionConfig`` fields set over the config's ``config.execution``
(``--execution attention=xla,compute_dtype=float32``, ``--execution microbatches=2``,
``--execution moment_dtype=bfloat16``, ``--execution tokenizer_precision=bfloat16``). Every
pair and mode runs once per variant; without the option once, with the config's settings
as a training run resolves them on this platform. Each worker resolves its variant once,
and its row records the resolved config (``execution``). ``--devices 1,N`` is
data-parallel weak scaling: the batch is per device, the global batch N times it, the full
step is jitted over a ``data`` mesh of N devices; efficiency = img/s(N) / (N img/s(1)).
``--parallelism fsdp`` shards parameters, gradients and optimizer state over the N
devices instead (an ``fsdp`` mesh axis of size N); the batch is split the same way.

This file also holds the subprocess harness used by ``benchmarks/sample.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_monitor import GpuMonitor, format_summary  # noqa: E402 (needs REPO)

PEAK_TFLOPS = 790.0  # H200 bf16 dense
GIB = 2.0 ** 30
KEY_PAIRS = (("d16", 64), ("d30", 32))  # the rows that come first
MODES = ("full", "full_pretokenized", "fwdbwd", "tokenize")

# Reference points: targets and the upstream PyTorch step (per single GPU). img/s = images per second; GiB = peak memory.
REFERENCE = {
    "peak_tflops_bf16_dense": PEAK_TFLOPS,
    "full": {
        "d16_B64": {"target_img_s": 370, "target_peak_gib": 0.5 * 53, "official_img_s": 147,
                    "official_peak_gib": 53},
        "d30_B32": {"target_img_s": 80, "target_mfu": 0.50, "target_peak_gib": 0.5 * 108,
                    "official_img_s": 45, "official_peak_gib": 108},
    },
    "fwdbwd": {
        "d16_B64": {"official_img_s": 225},
        "d30_B32": {"official_img_s": 52},
    },
    # A plain-jnp + cuDNN attention + remat model (its mode is not stated).
    "plain_jnp_cudnn_remat": {
        "d16_B64": {"img_s": 329, "peak_gib": 7.4},
        "d30_B32": {"img_s": 62, "peak_gib": 27},
    },
}


# =============================== harness (shared with sample.py) ==============================

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
    """The row's ``--execution`` settings as text; ``defaults`` for none."""
    return ",".join(f"{key}={value}" for key, value in settings.items()) or "defaults"


def add_execution_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--execution", action="append", type=parse_execution, default=None,
                        metavar="KEY=VALUE[,KEY=VALUE...]",
                        help=f"one execution variant (hmar_jax.execution.ExecutionConfig "
                             f"fields over {what}); repeat it to compare variants, each gets "
                             "its rows; default: one run as the platform resolves the defaults")


# Environment variables that change what XLA compiles or how it allocates; kept in the JSON.
RECORDED_ENV = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "TF_GPU_ALLOCATOR", "CUDA_VISIBLE_DEVICES")


def recorded_environment() -> dict:
    return {k: v for k, v in os.environ.items() if k in RECORDED_ENV}


def standalone_header(benchmark: str, args: argparse.Namespace) -> dict:
    """The JSON header of a single-process diagnostic (devices seen by this process)."""
    return {"benchmark": benchmark, **device_info(), "versions": versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(args),
            "environment": recorded_environment()}


def elementwise_benchmark_main(benchmark: str, doc: str, shapes: tuple, quick_shapes: tuple,
                               measure, add_arguments=None) -> None:
    """Command line of the per-shape kernel benchmarks (``bias_gelu.py``, ``adaln.py``):
    ``measure(*shape[1:], num_warps, iters, bandwidth, **extra)`` returns a shape's rows;
    ``add_arguments(parser)`` adds a benchmark's own options and returns their ``dest``
    names, passed to ``measure`` as ``extra``."""
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


def kernel_implementation(op: str) -> str:
    """The platform's Pallas kernel for ``op`` (an ``ExecutionConfig`` kernel field) as the
    execution config resolves ``"pallas"``: ``"gpu"`` on a GPU, ``"interpret"`` on CPU (the
    kernel benchmarks' quick modes)."""
    from hmar_jax.execution import ExecutionConfig

    return getattr(ExecutionConfig(**{op: "pallas"}).resolve(), op)


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
            "device_count": len(devices), "jax_version": jax.__version__,
            "jaxlib_version": importlib.metadata.version("jaxlib")}


def peak_gib(devices=None) -> float | None:
    """Largest ``peak_bytes_in_use`` over ``devices`` (default: the first) in GiB; None when
    the backend keeps no statistics (CPU)."""
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


def timing_summary(times_ms: list[float]) -> dict:
    return {"ms_median": statistics.median(times_ms), "ms_min": min(times_ms),
            "ms_all": [round(t, 3) for t in times_ms]}


def is_oom(text: str) -> bool:
    lowered = text.lower()
    return "resource_exhausted" in lowered or "out of memory" in lowered or "oom" in lowered.split()


def worker_main(worker, spec_json: str, out_path: str) -> None:
    """Runs ``worker(spec) -> dict`` and writes the row (or the failure) as JSON."""
    spec = json.loads(spec_json)
    try:
        row = {"status": "ok", **worker(spec)}
    except NotImplementedError as err:
        row = {"status": f"not implemented: {err}"[:300]}
        traceback.print_exc()
    except Exception as err:  # noqa: BLE001 - every failure becomes a row
        message = f"{type(err).__name__}: {err}"
        row = {"status": "OOM" if is_oom(message) else f"error: {message}"[:400]}
        traceback.print_exc()
    try:
        row.update(device_info())
    except Exception:  # noqa: BLE001
        pass
    pathlib.Path(out_path).write_text(json.dumps(row))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter/runtime teardown: the row is written


def _tail(text, limit: int = 1500) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


def run_subprocess(script: pathlib.Path, spec: dict, timeout: float) -> dict:
    """One configuration in a fresh Python process; always returns a row."""
    with tempfile.TemporaryDirectory(prefix="hmar_bench_") as tmp:
        out = pathlib.Path(tmp) / "row.json"
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired as err:
            return {"status": f"timeout after {timeout:.0f} s", "log_tail": _tail(err.stderr)}
        if out.exists():
            row = json.loads(out.read_text())
            if row.get("status") != "ok":
                row["log_tail"] = _tail(proc.stderr)
            return row
        log = (proc.stderr or "") + (proc.stdout or "")
        if is_oom(log) or proc.returncode in (-9, 137):
            status = "OOM" if is_oom(log) else f"error: killed (exit {proc.returncode}, host OOM?)"
        else:
            last = [line for line in log.strip().splitlines() if line.strip()][-1:] or [""]
            status = f"error: exit {proc.returncode}: {last[0][:300]}"
        return {"status": status, "log_tail": _tail(log)}


class Runner:
    """Runs specs one subprocess each under a per-config timeout and an overall budget,
    printing every row and rewriting the JSON after each."""

    def __init__(self, script: pathlib.Path, benchmark: str, args: argparse.Namespace,
                 reference: dict, format_row, header: str):
        self.script, self.benchmark, self.args = script, benchmark, args
        self.reference, self.format_row, self.header = reference, format_row, header
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.extra: dict = {}
        self.started = datetime.datetime.now(datetime.timezone.utc)

    def run(self, specs: list[dict], finish_row=None) -> list[dict]:
        print(f"{len(specs)} configurations, time budget {self.args.time_budget:.0f} s, "
              f"per-config timeout {self.args.timeout:.0f} s", flush=True)
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
                for key in ("device_kind", "platform", "device_count", "jax_version",
                            "jaxlib_version"):
                    if row.get(key) is not None and key not in self.meta:
                        self.meta[key] = row[key]
            if finish_row is not None:
                finish_row(row, self.rows)
            self.rows.append(row)
            print(self.format_row(row), flush=True)
            if row.get("gpu_during_timing"):
                print(format_summary(row["gpu_during_timing"]), flush=True)
            if row.get("device_profile"):
                from benchmarks.profiling import format_profile

                print(format_profile(row["device_profile"]), flush=True)
            if row.get("log_tail") and self.args.show_logs:
                print("    | " + row["log_tail"].strip().replace("\n", "\n    | "), flush=True)
            self.write()
        return self.rows

    def write(self) -> None:
        path = pathlib.Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(self.args).items() if k not in ("worker", "worker_out")}
        payload = {"benchmark": self.benchmark, "device_kind": self.meta.get("device_kind"),
                   "platform": self.meta.get("platform"),
                   "device_count": self.meta.get("device_count"),
                   "versions": versions(),
                   "date": self.started.isoformat(timespec="seconds"),
                   "command": [pathlib.Path(sys.argv[0]).name, *sys.argv[1:]],
                   "environment": recorded_environment(),
                   "settings": settings, "reference": self.reference, "rows": self.rows,
                   **self.extra}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(path)


def add_harness_flags(parser: argparse.ArgumentParser, default_out: str, default_budget: float,
                      default_timeout: float, default_iters: int, default_warmup: int) -> None:
    parser.add_argument("--out", default=None, help=f"JSON file (default {default_out})")
    parser.add_argument("--time-budget", type=float, default=default_budget,
                        help="overall seconds; configurations not started by then are skipped")
    parser.add_argument("--timeout", type=float, default=default_timeout,
                        help="seconds per configuration (compile included)")
    parser.add_argument("--iters", type=int, default=default_iters, help="timed calls")
    parser.add_argument("--warmup", type=int, default=default_warmup,
                        help="untimed calls after compilation")
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU-sized smoke configuration (16 px, patch_nums 1,2,3,4)")
    parser.add_argument("--show-logs", action="store_true",
                        help="print the stderr tail of failed rows")
    parser.add_argument("--lower-only", action="store_true",
                        help="trace and lower each configuration without compiling or running it "
                             "(a wiring check of the full-size shapes on any machine)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, trace two more calls and print/store the device "
                             "time per op category and the costliest ops (profiling.py)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)


def status_text(row: dict) -> str:
    if row.get("status") == "ok" and row.get("lower_s") is not None:
        return f"ok (lowered only, {row['lower_s']:.1f} s)"
    return row.get("status", "?")


def fmt(value, spec: str, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return format(value, spec).rjust(width)


# ==================================== model / recipe setup ====================================

def vae_config(quick: bool):
    """``VQVAEConfig()`` (vae_ch160v4096z32), or with ``quick`` a 16 px tokenizer with
    patch_nums (1, 2, 3, 4) for CPU smoke runs."""
    from hmar_jax.tokenizer import VQVAEConfig

    if not quick:
        return VQVAEConfig()
    return VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                       using_sa=False, norm_groups=4, patch_nums=(1, 2, 3, 4))


def init_on_device(ctor):
    """Builds an nnx module with its initialisers run inside one jit (fast for big models)."""
    from flax import nnx
    import jax

    graphdef = nnx.graphdef(nnx.eval_shape(ctor))
    state = jax.jit(lambda: nnx.state(ctor()))()
    return nnx.merge(graphdef, state)


def recipe_config(spec: dict):
    """The ImageNet stage-1 recipe (configs/hmar_imagenet.py) with the row's model and its
    execution settings over ``config.execution``."""
    import importlib.util

    import ml_collections

    path = REPO / "configs" / "hmar_imagenet.py"
    module_spec = importlib.util.spec_from_file_location("hmar_imagenet_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    variant = spec["model"] if spec["model"] in module.RECIPES else "d16"
    config = module.get_config(f"variant={variant},res=256,stage=1")
    config.model.preset = spec["model"]
    if spec["quick"]:
        overrides = config.model.overrides.to_dict() | dict(num_mask_layers=1, num_classes=10)
        config.model.overrides = ml_collections.ConfigDict(overrides)
    # A new section rather than field updates: ConfigDict keeps each field's type, and a
    # setting may change it ("auto" -> False).
    config.execution = ml_collections.ConfigDict(config.execution.to_dict()
                                                | spec["execution_settings"])
    return config


def model_flops(cfg, batch: int) -> float:
    """Training FLOPs per step: 6 B L (12 C^2 depth + C V)."""
    c, length = cfg.width, cfg.layout.seq_len
    return 6.0 * batch * length * (12 * c * c * cfg.depth + c * cfg.vocab_size)


# ========================================== worker ============================================

def train_worker(spec: dict) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hmar_jax import sharding
    from hmar_jax.tokenizer import VQVAE
    from hmar_jax.training import losses, optim
    from hmar_jax.training.trainer import TrainState, make_step, model_config, resolve_execution
    from hmar_jax.transformer import HMARTransformer

    mode, n_dev, batch = spec["mode"], spec["devices"], spec["batch"]
    if len(jax.devices()) < n_dev:
        raise RuntimeError(f"{n_dev} devices requested, {len(jax.devices())} available")
    devices = jax.devices()[:n_dev]
    global_batch = batch * n_dev
    config = recipe_config(spec)
    execution = resolve_execution(config)  # as the trainer does: once, for this platform
    lower_only = spec.get("lower_only", False)
    make_vae = lambda: VQVAE(vae_config(spec["quick"]), execution, rngs=nnx.Rngs(0))  # noqa: E731
    vae = nnx.eval_shape(make_vae) if lower_only else init_on_device(make_vae)
    cfg = model_config(config, vae.config)
    layout = cfg.layout
    rng = np.random.default_rng(spec["seed"])
    side = vae.config.image_size
    images_u8 = rng.integers(0, 256, (global_batch, side, side, 3), dtype=np.uint8)
    images = images_u8.astype(np.float32) / 127.5 - 1.0  # as hmar_jax.training.data does
    labels = rng.integers(0, cfg.num_classes, (global_batch,)).astype(np.int32)
    result = {"execution": dataclasses.asdict(execution), "L": layout.seq_len,
              "width": cfg.width, "depth": cfg.depth, "vocab": cfg.vocab_size,
              "global_batch": global_batch, "image_size": vae.config.image_size}

    if mode == "tokenize":
        vae_graphdef, vae_state = nnx.split(vae)

        def tokenize(vae_state, images):
            model = nnx.merge(vae_graphdef, vae_state)
            return model.teacher_forcing_inputs(model.encode_to_indices(images))

        images_dev = jnp.asarray(images)
        args = (vae_state, images_dev)
        tokenize = jax.jit(tokenize)
        compiled = _compile(result, tokenize, args, lower_only)
        if compiled is None:
            return result
        make_call = lambda executable: lambda: executable(*args)  # noqa: E731
        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib(devices))
        maybe_profile(result, spec, tokenize, args, make_call)
        if execution.tokenizer_precision != "highest":
            result["index_agreement_vs_highest"] = _index_agreement(vae, images_dev, execution)
        return _throughput(result, None, global_batch, n_dev)

    filt = optim.trainable_filter(1)
    abstract_model = nnx.eval_shape(lambda: HMARTransformer(cfg, execution, rngs=nnx.Rngs(0)))
    graphdef, abstract_trainable, _ = nnx.split(abstract_model, filt, ...)
    result["params_trainable"] = int(sum(np.prod(a.shape)
                                         for a in jax.tree.leaves(abstract_trainable)))
    flops = model_flops(cfg, global_batch)

    if mode == "fwdbwd":
        if n_dev != 1:
            raise ValueError("fwdbwd runs on one device; use --devices with mode full")
        weights = jnp.asarray(layout.token_loss_weights(config.loss.weighting))

        @jax.jit
        def init():
            model = HMARTransformer(cfg, execution, rngs=nnx.Rngs(config.seed))
            _, trainable, frozen = nnx.split(model, filt, ...)
            return trainable, frozen

        trainable, frozen = jax.eval_shape(init) if lower_only else init()
        keys = jax.random.split(jax.random.key(spec["seed"]), 3)
        x = jax.random.normal(keys[0], (batch, layout.seq_len - 1, cfg.latent_channels))
        targets = jax.random.randint(keys[1], (batch, layout.seq_len), 0, cfg.vocab_size)
        labels_dev = jnp.asarray(labels)

        def fwdbwd(trainable, frozen, x, labels, targets, path_rng):
            def loss_fn(trainable):
                model = nnx.merge(graphdef, trainable, frozen)
                logits = model(x, labels, rng=path_rng)
                return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)

            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            return loss, grads

        args = (trainable, frozen, x, labels_dev, targets, keys[2])
        fwdbwd = jax.jit(fwdbwd)
        compiled = _compile(result, fwdbwd, args, lower_only)
        if compiled is None:
            return result
        out = {}

        def make_call(executable):
            def call():
                out.clear()  # free the previous gradients first: one gradient tree alive at a time
                out["v"] = executable(*args)
                return out["v"]
            return call

        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"]),
                      peak_gib=peak_gib(devices), loss=float(out["v"][0]))
        maybe_profile(result, spec, fwdbwd, args, make_call)
        return _throughput(result, flops, global_batch, n_dev)

    if mode not in ("full", "full_pretokenized"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "full_pretokenized":  # the step reads token indices (config.data.pretokenized)
        config.data.pretokenized = "random tokens (benchmark)"
        images = rng.integers(0, cfg.vocab_size, (global_batch, layout.seq_len)).astype(np.int32)
    # ----- full step: the pieces of Trainer.__init__, without data, checkpoints or workdir -----
    # data parallel: parameters replicated; fsdp: parameters and optimizer state sharded
    # over all devices (sharding.param_spec), the batch split over both axes either way.
    fsdp = n_dev if spec.get("parallelism", "data") == "fsdp" else 1
    mesh = sharding.make_mesh((("data", n_dev // fsdp), ("fsdp", fsdp)), devices=devices)
    tx, schedule = optim.from_config(config.optimizer, abstract_trainable, config.num_train_steps,
                                     execution.moment_dtype)
    vae_graphdef, vae_state = nnx.split(vae)
    if not lower_only:
        vae_state = jax.device_put(vae_state, sharding.replicated(mesh))
    del vae

    def init_state() -> TrainState:
        model = HMARTransformer(cfg, execution, rngs=nnx.Rngs(config.seed))
        _, trainable, frozen = nnx.split(model, filt, ...)
        return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable),
                          jax.tree.map(jnp.copy, trainable))

    state_shardings = sharding.tree_shardings(jax.eval_shape(init_state), mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_step(graphdef, vae_graphdef, cfg, config, tx, schedule,
                     microbatches=execution.microbatches)
    train_step = jax.jit(step, in_shardings=(state_shardings, None, batch_sharding, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    state = (jax.eval_shape(init_state) if lower_only
             else jax.jit(init_state, out_shardings=state_shardings)())
    images_dev = jax.device_put(images, batch_sharding)
    labels_dev = jax.device_put(labels, batch_sharding)
    del images, images_u8
    holder = {"state": state}
    del state
    with jax.set_mesh(mesh):
        compiled = _compile(result, train_step,
                            (holder["state"], vae_state, images_dev, labels_dev), lower_only)
        if compiled is None:
            return result
        if n_dev > 1:
            result["hlo_collectives"] = _collectives(compiled)

        def make_call(executable):
            def call():
                holder["state"], holder["metrics"] = executable(holder["state"], vae_state,
                                                                images_dev, labels_dev)
                return holder["metrics"]["loss"]
            return call

        result.update(timed(make_call(compiled), spec["warmup"], spec["iters"],
                            back_to_back=True))
        peak = peak_gib(devices)
        maybe_profile(result, spec, train_step,
                      (holder["state"], vae_state, images_dev, labels_dev), make_call)
    result.update(peak_gib=peak, loss=float(holder["metrics"]["loss"]),
                  grad_norm=float(holder["metrics"]["grad_norm"]))
    return _throughput(result, flops, global_batch, n_dev)


def _index_agreement(vae, images, execution) -> list[float]:
    """Per scale, the fraction of token indices equal to those of an exact float32 encode
    of the same images (random pixels here, so a pessimistic proxy for real images)."""
    import jax
    from flax import nnx

    from hmar_jax.tokenizer import VQVAE

    graphdef, state = nnx.split(vae)
    exact = execution.replace(tokenizer_precision="highest")
    exact_graphdef = nnx.graphdef(nnx.eval_shape(lambda: VQVAE(vae.config, exact,
                                                               rngs=nnx.Rngs(0))))
    encode = lambda g: jax.jit(lambda s, x: nnx.merge(g, s).encode_to_indices(x))  # noqa: E731
    fast, exact = encode(graphdef)(state, images), encode(exact_graphdef)(state, images)
    return [round(float((a == b).mean()), 5) for a, b in zip(fast, exact)]


def _compile(result: dict, jitted, args: tuple, lower_only: bool):
    """``jitted.lower(*args).compile()``, timed into ``result``; None when only lowering."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    if lower_only:
        result["lower_s"] = time.perf_counter() - t0
        return None
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t0
    result.update(xla_memory(compiled))
    return compiled


def _time_calls(call, warmup: int, iters: int) -> list[float]:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timed(call, warmup: int, iters: int, back_to_back: bool = False) -> dict:
    """``timing_summary`` of ``iters`` synced calls after ``warmup`` (with ``back_to_back``
    also ``ms_back_to_back``) and ``gpu_during_timing``: the GPU's clocks, power and
    clock-limit reasons while they ran (``gpu_monitor.py``; empty without nvidia-smi)."""
    with GpuMonitor() as monitor:
        result = timing_summary(_time_calls(call, warmup, iters))
        if back_to_back:
            result["ms_back_to_back"] = _time_back_to_back(call, iters)
    result["gpu_during_timing"] = monitor.summary()
    return result


def _time_back_to_back(call, iters: int) -> float:
    """ms per call of ``iters`` calls dispatched one after another with one sync at the end,
    as the trainer runs its steps: the host's dispatch of step i+1 overlaps step i on the
    device. (``_time_calls`` syncs after every call, so its times include the dispatch.)"""
    import jax

    jax.block_until_ready(call())
    t0 = time.perf_counter()
    for _ in range(iters):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3 / iters


# XLA's GPU command buffers (CUDA graphs) hide the kernels from the profiler: the profiled
# executable is compiled a second time without them (the timed one keeps them).
PROFILE_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


def maybe_profile(result: dict, spec: dict, jitted, args: tuple, make_call) -> None:
    """With ``--profile``: ``result["device_profile"]``, the device-time breakdown of two
    calls of ``jitted(*args)`` compiled without command buffers (``profiling.py``).
    ``make_call(executable)`` returns the zero-argument call that the timing used."""
    if not spec.get("profile"):
        return
    import jax

    from benchmarks import profiling

    try:
        executable = jitted.lower(*args).compile(compiler_options=PROFILE_COMPILER_OPTIONS)
        call = make_call(executable)
        jax.block_until_ready(call())  # warm-up (autotuning, first-call allocations)
        result["device_profile"] = profiling.profile_calls(call, 2, executable.as_text())
    except Exception as err:  # noqa: BLE001 - diagnostics must not lose the timed row
        result["device_profile"] = {"error": f"{type(err).__name__}: {err}"[:300]}


def _collectives(compiled) -> dict | None:
    """Static counts of collective ops in the compiled step. Pure data parallelism needs only
    all-reduces (gradients, metrics); all-gathers can mean that an op the partitioner cannot
    split (e.g. a kernel's custom call) ran on the whole batch on every device."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - optional diagnostics
        return None
    names = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
    return {name: len(re.findall(rf"\s{name}(?:-start)?\(", text)) for name in names}


def xla_memory(compiled) -> dict:
    """The executable's buffer sizes from XLA's buffer assignment, in GiB: arguments,
    outputs, temporaries, and ``xla_total_gib`` = arguments + outputs + temporaries -
    aliased (donated) bytes, the device memory one call needs. Unlike ``peak_bytes_in_use``
    this excludes the scratch that compile-time autotuning allocates, so it compares with
    PyTorch's ``max_memory_allocated`` after a warm-up; {} where XLA reports nothing."""
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


def _throughput(result: dict, flops: float | None, global_batch: int, n_dev: int) -> dict:
    seconds = result["ms_median"] / 1e3
    result["img_s"] = global_batch / seconds
    if result.get("ms_back_to_back"):
        result["img_s_back_to_back"] = global_batch / (result["ms_back_to_back"] / 1e3)
    if flops is not None:
        result["model_tflop_per_step"] = flops / 1e12
        result["tflops"] = flops / seconds / 1e12 / n_dev  # per device
        result["mfu"] = result["tflops"] / PEAK_TFLOPS
    return result


# ====================================== parent: specs =========================================

def build_specs(args) -> list[dict]:
    if args.pairs:
        pairs = [(p.split("x")[0], int(p.split("x")[1])) for p in parse_list(args.pairs)]
    else:
        pairs = [(m, b) for m in parse_list(args.models) for b in parse_list(args.batches, int)]
    modes, variants = parse_list(args.modes), args.execution or [{}]
    devices = sorted(set(parse_list(args.devices, int)) | {1})
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    if args.global_batch and any("microbatches" in v for v in variants):
        raise SystemExit("--global-batch sets each row's microbatches itself (global batch / "
                         "devices / the pair's batch); leave microbatches out of --execution.")
    from hmar_jax.sharding import check_batch_split
    for model, batch in pairs:
        for settings in variants:
            for n in devices:  # each device runs the pair's batch
                try:
                    check_batch_split(batch * n, settings.get("microbatches", 1), n)
                except ValueError as err:
                    raise SystemExit(f"--execution {execution_label(settings)}, {model}x{batch} "
                                     f"on {n} devices: {err}") from None
        for n in devices if args.global_batch else []:
            if args.global_batch % (n * batch):
                raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of "
                                 f"{n} devices x {batch} images per pass ({model}x{batch}).")
    common = dict(quick=args.quick, iters=args.iters, warmup=args.warmup, seed=0,
                  lower_only=args.lower_only, profile=args.profile, parallelism=args.parallelism)
    specs = []
    for model, batch in pairs:
        for mode in modes:
            for settings in variants:
                for n in (devices if mode.startswith("full") else [1]):
                    spec = dict(common, model=model, batch=batch, mode=mode, devices=n,
                                variant=execution_label(settings),
                                execution_settings=dict(settings))
                    if args.global_batch and mode.startswith("full"):
                        per_device = args.global_batch // n
                        spec.update(batch=per_device, fixed_global_batch=args.global_batch)
                        spec["execution_settings"]["microbatches"] = per_device // batch
                    specs.append(spec)
    model_order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in pairs))}
    mode_rank = {mode: i for i, mode in enumerate(MODES)}
    labels = [execution_label(settings) for settings in variants]

    def priority(s):
        key_pair = (s["model"], s["batch"]) in KEY_PAIRS
        return (not key_pair, mode_rank[s["mode"]], labels.index(s["variant"]),
                model_order[s["model"]], -s["batch"], s["devices"])

    return sorted(specs, key=priority)


# ===================================== parent: output =========================================

# b2b img/s: full-step rows only, steps dispatched back to back (``_time_back_to_back``).
HEADER = (f"{'model':>5} {'B':>6} {'dev':>3} {'mode':>17} {'attn':>9} {'remat':>23} {'scan':>4} {'tok':>4} "
          f"{'ms med':>8} {'ms min':>8} {'img/s':>8} {'b2b img/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'XLA GiB':>8} {'peak GiB':>8} {'comp s':>7} {'loss':>7} {'eff':>5}  status  "
          "[--execution]")


TOKENIZER_SHORT = {"default": "tf32", "bfloat16": "bf16", "highest": "f32"}


def format_row(r: dict) -> str:
    """One table line; the execution columns show the resolved config (``-`` where the
    worker failed before resolving it)."""
    ex = r.get("execution") or {}
    resolved = bool(ex)
    microbatches = (ex or r["execution_settings"]).get("microbatches", 1)
    passes = microbatches > 1 and r["mode"].startswith("full")  # the other modes take no parts
    batch = f"{r['batch']}/{microbatches}" if passes else r["batch"]
    scan = ("y" if ex["scan_blocks"] else "n") if resolved else "-"
    text = (f"{r['model']:>5} {batch:>6} {r['devices']:>3} {r['mode']:>17} "
            f"{(ex['attention'] if resolved else '-'):>9} "
            f"{(ex['remat'] if resolved else '-'):>23} {scan:>4} "
            f"{(TOKENIZER_SHORT.get(ex['tokenizer_precision'], '-') if resolved else '-'):>4} "
            f"{fmt(r.get('ms_median'), '.1f', 8)} {fmt(r.get('ms_min'), '.1f', 8)} "
            f"{fmt(r.get('img_s'), '.1f', 8)} {fmt(r.get('img_s_back_to_back'), '.1f', 9)} "
            f"{fmt(r.get('tflops'), '.1f', 8)} "
            f"{fmt(r.get('mfu'), '.1%', 6)} {fmt(r.get('xla_total_gib'), '.2f', 8)} "
            f"{fmt(r.get('peak_gib'), '.2f', 8)} "
            f"{fmt(r.get('compile_s'), '.1f', 7)} {fmt(r.get('loss'), '.3f', 7)} "
            f"{fmt(r.get('efficiency'), '.2f', 5)}  {status_text(r)}  [{r.get('variant')}]")
    if r.get("index_agreement_vs_highest"):
        text += f"  (indices = f32 encode: {min(r['index_agreement_vs_highest']):.3f} worst scale)"
    return text


def add_efficiency(row: dict, rows: list[dict]) -> None:
    """Weak-scaling efficiency of an N-device row against its 1-device twin."""
    if row.get("status") != "ok" or "img_s" not in row or row["devices"] == 1:
        return
    same = ("model", "batch", "mode", "variant")
    if row.get("fixed_global_batch"):  # strong scaling: the twin has the same global batch
        same = ("model", "mode", "variant", "fixed_global_batch")
    for other in rows:
        if (other.get("status") == "ok" and "img_s" in other and other["devices"] == 1
                and all(other.get(k) == row.get(k) for k in same)):
            row["efficiency"] = row["img_s"] / (row["devices"] * other["img_s"])
            row["img_s_1_device"] = other["img_s"]


def _best(rows, model, batch, mode):
    ok = [r for r in rows if r.get("status") == "ok" and "img_s" in r and r["model"] == model
          and r["batch"] == batch and r["mode"] == mode and r["devices"] == 1]
    return max(ok, key=lambda r: r["img_s"]) if ok else None


def _memory(row: dict) -> float | None:
    """GiB one step needs: XLA's buffer assignment (arguments + outputs + temporaries -
    donated), else the allocator peak. The allocator peak also counts the scratch of
    compile-time autotuning, which PyTorch's max_memory_allocated after warm-up does not."""
    return row.get("xla_total_gib") if row.get("xla_total_gib") is not None else row.get("peak_gib")


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def comparison(rows: list[dict]) -> list[dict]:
    """Measured vs the reference targets: the best row (over the execution variants) of
    each key pair."""
    lines = []
    for mode in ("full", "fwdbwd"):
        for key, ref in REFERENCE[mode].items():
            model, batch = key.split("_B")[0], int(key.split("_B")[1])
            best = _best(rows, model, batch, mode)
            plain = REFERENCE["plain_jnp_cudnn_remat"].get(key, {})
            entry = {"mode": mode, "config": key, "measured": None}
            if best is not None:
                entry["measured"] = {k: best.get(k) for k in (
                    "img_s", "img_s_back_to_back", "mfu", "peak_gib", "xla_total_gib", "ms_median",
                    "variant", "execution")}
                checks = {}
                if "target_img_s" in ref:
                    checks["img_s"] = best["img_s"] >= ref["target_img_s"]
                    if best.get("img_s_back_to_back"):
                        checks["img_s_back_to_back"] = (best["img_s_back_to_back"]
                                                        >= ref["target_img_s"])
                if "target_mfu" in ref:
                    checks["mfu"] = best["mfu"] >= ref["target_mfu"]
                memory = _memory(best)
                if "target_peak_gib" in ref and memory is not None:
                    checks["peak_gib"] = memory <= ref["target_peak_gib"]
                entry["targets_met"] = checks
                entry["speedup_vs_official"] = best["img_s"] / ref["official_img_s"]
                if plain:
                    entry["speedup_vs_plain_jnp"] = best["img_s"] / plain["img_s"]
            lines.append(entry)
    return lines


def print_comparison(entries: list[dict]) -> None:
    print("\n== measured vs the reference targets (best row of each pair, 1 device) ==")
    for e in entries:
        mode, key = e["mode"], e["config"]
        ref = REFERENCE[mode][key]
        plain = REFERENCE["plain_jnp_cudnn_remat"].get(key, {})
        title = f"{key.replace('_', ' ')} {'full step' if mode == 'full' else 'fwd+bwd only'}"
        m = e["measured"]
        if m is None:
            print(f"{title}: no successful row")
            continue
        ex = m["execution"]
        print(f"{title}  (--execution {m['variant']}: attention {ex['attention']}, remat "
              f"{ex['remat']}, scan {ex['scan_blocks']}, {m['ms_median']:.1f} ms)")
        line = f"  img/s    {m['img_s']:8.1f}"
        if "target_img_s" in ref:
            line += f"   target >= {ref['target_img_s']:<5} {_verdict(e['targets_met']['img_s']):8}"
        line += f"   official {ref['official_img_s']} ({e['speedup_vs_official']:.2f}x)"
        if plain:
            line += f"   plain-jnp+cuDNN+remat {plain['img_s']} ({e['speedup_vs_plain_jnp']:.2f}x)"
        print(line)
        if m.get("img_s_back_to_back"):
            line = f"  b2b      {m['img_s_back_to_back']:8.1f}"
            if "target_img_s" in ref:
                verdict = _verdict(e["targets_met"]["img_s_back_to_back"])
                line += f"   target >= {ref['target_img_s']:<5} {verdict:8}"
            print(line + "   (img/s of steps dispatched back to back, no sync between them)")
        if m.get("mfu") is not None:
            line = f"  MFU      {m['mfu']:8.1%}"
            if "target_mfu" in ref:
                verdict = _verdict(e["targets_met"]["mfu"])
                line += f"   target >= {ref['target_mfu']:.0%}   {verdict}"
            print(line)
        if "official_peak_gib" in ref or plain:
            line = f"  memory   {fmt(_memory(m), '.2f', 8)}"
            if "target_peak_gib" in ref:
                met = e["targets_met"]
                verdict = _verdict(met["peak_gib"]) if "peak_gib" in met else "n/a"
                line += f"   target <= {ref['target_peak_gib']:<5.1f} {verdict:8}"
            if "official_peak_gib" in ref:
                line += f"   official {ref['official_peak_gib']}"
            if plain:
                line += f"   plain-jnp+cuDNN+remat {plain['peak_gib']}"
            print(line + f"   (XLA buffers; allocator peak incl. autotuning "
                         f"{fmt(m.get('peak_gib'), '.2f', 0)})")


def print_scaling(rows: list[dict]) -> None:
    multi = [r for r in rows if r.get("status") == "ok" and "img_s" in r and r["devices"] > 1]
    if not multi:
        return
    for strong in (False, True):
        group = [r for r in multi if bool(r.get("fixed_global_batch")) == strong]
        if group:
            print("\n== strong scaling (global batch fixed) ==" if strong
                  else "\n== weak scaling (per-device batch fixed) ==")
        for r in group:
            microbatches = r["execution"]["microbatches"]
            passes = f" in {microbatches} passes" if microbatches > 1 else ""
            print(f"{r['model']} B{r['batch']}/device{passes} x{r['devices']} "
                  f"{r.get('parallelism', 'data')} [{r['variant']}]: "
                  f"{r['img_s']:.1f} img/s vs {fmt(r.get('img_s_1_device'), '.1f', 0)} on 1 device, "
                  f"efficiency {fmt(r.get('efficiency'), '.2f', 0)}; collectives in the step: "
                  f"{r.get('hlo_collectives')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma list (default d16,d30; tiny with --quick)")
    parser.add_argument("--batches", default=None, help="per-device batches (default 8,32,64)")
    parser.add_argument("--pairs", default=None,
                        help="model x batch pairs instead of the cross product, e.g. d16x64,d30x32")
    parser.add_argument("--modes", default="full,fwdbwd,tokenize", help=", ".join(MODES))
    add_execution_flag(parser, "the ImageNet config's config.execution")
    parser.add_argument("--devices", default="1",
                        help="device counts for weak scaling of the full step, e.g. 1,2 (1 is "
                             "always added when another count is given)")
    parser.add_argument("--parallelism", default="data", choices=["data", "fsdp"],
                        help="multi-device full-step rows: data parallel (replicated state) or "
                             "FSDP (state sharded over all devices)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="strong scaling of the full step: for each --devices count N the "
                             "per-device batch is GLOBAL/N, run in passes of the pair's batch "
                             "(microbatches GLOBAL/N/B); efficiency against 1 device at the same "
                             "global batch")
    add_harness_flags(parser, "benchmarks/results/train_step.json", default_budget=540,
                      default_timeout=300, default_iters=10, default_warmup=2)
    args = parser.parse_args()
    if args.worker:
        worker_main(train_worker, args.worker, args.worker_out)
        return
    if args.models is None:
        args.models = "tiny" if args.quick else "d16,d30"
    if args.batches is None:
        args.batches = "2,4" if args.quick else "8,32,64"
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" /
                       ("train_step_quick.json" if args.quick else "train_step.json"))
    specs = build_specs(args)
    runner = Runner(pathlib.Path(__file__).resolve(), "train_step", args, REFERENCE, format_row,
                    HEADER)
    rows = runner.run(specs, finish_row=add_efficiency)
    entries = comparison(rows)
    runner.extra["comparison"] = entries
    runner.write()
    print_scaling(rows)
    print_comparison(entries)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
