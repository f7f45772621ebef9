"""Measures the official PyTorch HMAR code, for the rows the benchmark tables set beside ours.

The official checkout is not part of this repository: ``--upstream DIR`` names one, and its
modules are imported from there. This script builds the official models and calls them the
way the official training and sampling scripts do; it writes one JSON file per call::

    python benchmarks/upstream.py attention --upstream DIR --shape 32,30,680 \\
        --mask block_diagonal --out attention.json
    python benchmarks/upstream.py train --upstream DIR --model d16 --batch 64 --out train.json
    python benchmarks/upstream.py sample --upstream DIR --model d16 --batch 64 --out sample.json

* ``attention``: the official block-sparse Triton kernel (``attn/block_sparse_attn_interface``),
  forward and forward+backward, float16 (the kernel's own precision) and, as a second entry,
  bfloat16 where the kernel accepts it; head dim 64.
* ``train``: one stage-1 iteration of the official trainer (``train.py`` + ``nsp_trainer.py``):
  frozen VQ-VAE ``img_to_idxBl`` of a random image batch, teacher-forcing input, forward of
  ``NextScalePrediction`` under the trainer's autocast, reweighted cross-entropy, and
  ``AmpOptimizer.backward_clip_step`` (grad scaler, clipping, fused AdamW), settings read from
  ``config/experiment/hmar-train-d{depth}.yaml`` over the defaults of ``utils/arg_util.py``.
* ``sample``: ``HMAR.generate`` with masked refinement as ``sample.py`` runs it, settings read
  from ``config/sample/hmar-d{depth}.yaml``, VQ-VAE decode to pixels included.

Weights are random (no downloads). ``--device cpu --tiny`` runs each path with a 2-layer
model on 64 px images (patch_nums 1..4) so that the plumbing can be checked without a GPU;
there the Triton kernel is replaced by the official torch path (``scaled_dot_product_attention``
with the dense mask), and the numbers mean nothing.

Exit status: 0 when the JSON says ``ok`` or ``OOM``, 1 for ``error``.

Dimension letters: B batch, H heads, L tokens over all scales, K head dim (64), V codebook
size (4096).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types

IMPLEMENTATION = "official HMAR (PyTorch)"
GIB = 2.0 ** 30
HEAD_DIM = 64
NUM_CLASSES = 1000
IMAGENET_TRAIN_IMAGES = 1281167

# Token-map sides per resolution, as in the official benchmark/ and utils/arg_util.py.
PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}
TINY_PATCH_NUMS = (1, 2, 3, 4)  # 64 px through the f16 tokenizer; CPU smoke runs only

# Tokens sampled at each refinement step of each scale. 256 px: the default of the official
# utils/sampling_arg_util.py, which sample.py uses (its YAML files do not set one); 512 px:
# the official benchmark/inference.py.
MASK_SCHEDULES = {
    256: [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]],
    512: [[1], [1, 3], [1, 1, 2, 5], [5, 11], [36], [81], [169], [324], [576], [1024]],
}
TINY_MASK_SCHEDULE = [[1], [1, 3], [1, 3, 5], [4, 12]]

# Defaults of the official training arguments (utils/arg_util.py) that the step uses; the
# experiment YAML of each depth overrides some of them.
TRAIN_DEFAULTS = {
    "fp16": 0, "tblr": 1e-4, "twd": 0.05, "twde": 0.0, "tclip": 2.0, "ls": 0.0, "bs": 768,
    "ep": 250, "wp": 0.0, "wp0": 0.005, "wpe": 0.01, "sche": "lin0", "afuse": True,
    "saln": False, "anorm": True, "fuse": True, "aln": 0.5, "alng": 1e-5, "hd": 0.02,
    "ini": -1.0, "reweight_loss": False, "loss_reweight_type": "lognorm", "tf32": True,
    "seed": 42, "tfast": 0,
}
# Parameters the official train.py keeps out of weight decay (besides biases and 1-D ones).
NO_WEIGHT_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed",
                        "pos_1LC", "pos_start", "start_pos", "lvl_embed", "gamma", "beta",
                        "ada_gss", "moe_bias", "scale_mul")
# Defaults of the official sampling arguments (utils/sampling_arg_util.py).
SAMPLE_DEFAULTS = {
    "cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False, "mask": True,
    "saln": False, "anorm": True, "fuse": True, "tf32": True, "seed": 42,
}
# The kernel reads module-level floats annotated ``tl.constexpr`` (RCP_LN2, LN2), which
# recent Triton releases (3.6 among them) refuse to compile unless this variable allows it; and the autotuner's
# choice per shape is kept on disk, so that only the first process on a machine pays for
# timing the kernel's ~90 tile configurations (compiled binaries are cached by Triton anyway).
TRITON_ENVIRONMENT = {"TRITON_ALLOW_NON_CONSTEXPR_GLOBALS": "1", "TRITON_CACHE_AUTOTUNING": "1"}
DEFAULT_ITERS = {"attention": (10, 30), "train": (3, 10), "sample": (2, 5)}  # (warmup, iters)
ATTENTION_CALLS_PER_SAMPLE = 10


# ====================================== official modules =======================================

def import_upstream(upstream: str, autotune: bool, device: str):
    """Puts the official checkout first on ``sys.path`` and returns ``torch``.

    ``models/hmar.py`` and ``models/mp.py`` import one string helper from ``utils/misc.py``,
    whose module level imports wandb, torchvision, pytz and the argument parser; a stand-in
    ``utils.misc`` with that helper keeps those packages out of the requirements. The
    official README exports ``TRITON_AUTO_TUNING=1`` for training and benchmarking; the
    kernel module reads it when imported, and ``TRITON_ENVIRONMENT`` is set unless the
    caller set those variables. On CPU, every official attention layer would still
    place its block-boundary tables on CUDA when built (``BlockSparseAttention``'s default
    device), so for smoke runs the class builds them on the CPU instead.
    """
    root = pathlib.Path(upstream).resolve()
    if not (root / "models" / "hmar.py").is_file():
        raise ValueError(f"--upstream {upstream}: no models/hmar.py there (not an HMAR checkout)")
    sys.path.insert(0, str(root))
    os.environ["TRITON_AUTO_TUNING"] = "1" if autotune else "0"
    for name, value in TRITON_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    misc = types.ModuleType("utils.misc")
    misc.does_not_contain_substrings = lambda text, parts: not any(p in text for p in parts)
    sys.modules["utils.misc"] = misc
    import torch

    if device == "cpu":
        from attn import block_sparse_attn_interface

        cls = block_sparse_attn_interface.BlockSparseAttention
        build_tables = cls.__init__

        def build_tables_on_cpu(self, block_sizes, device="cpu", sparsity_pattern="block_diagonal"):
            build_tables(self, block_sizes, device="cpu", sparsity_pattern=sparsity_pattern)

        cls.__init__ = build_tables_on_cpu
    return torch


def upstream_commit(upstream: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", upstream, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def read_flat_yaml(path: pathlib.Path) -> dict:
    """``key: value`` lines of a flat YAML file (the official configs are flat) as bool, int,
    float or str; {} when the file does not exist."""
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, raw = (part.strip() for part in line.split(":", 1))
        values[key] = _scalar(raw)
    return values


def _scalar(raw: str):
    if raw in ("True", "true", "False", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip("'\"")


def configure_torch(torch, tf32: bool, seed: int) -> dict:
    """The global torch settings of the official ``_set_tf32`` and ``_seed_everything(seed,
    benchmark=True)`` (utils/arg_util.py), which both official entry points call."""
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.manual_seed(seed)
    return {"tf32": tf32, "cudnn_benchmark": True, "cudnn_deterministic": True, "seed": seed}


def randomize_(torch, module) -> None:
    """Random weights in place: normal(0, fan_in**-0.5) for matrices, convolutions and
    embeddings, U[0, 1) for vectors (biases, norm scales).

    Without a checkpoint the official builders leave the tokenizer and the HMAR model
    uninitialised (they switch ``reset_parameters`` off). The official benchmark/inference.py
    fills every parameter from U[0, 1) instead; the tokenizer's decoder then overflows float32
    (GroupNorm inputs near 1e21) and returns NaN images, so matrices get a scale-preserving
    draw here and the images stay finite. The work per call is the same either way.
    """
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.uniform_(0.0, 1.0)


def flash_attn_version() -> str | None:
    """The official blocks use flash-attn's fused MLP (and, off the block-sparse path, its
    attention) when it is installed."""
    try:
        import flash_attn
    except ImportError:
        return None
    return getattr(flash_attn, "__version__", "installed")


# ======================================= measuring tools =======================================

def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_warmup(torch, device: str, call, warmup: int, stats: dict, name: str) -> None:
    """``warmup`` untimed calls; their wall seconds (Triton compiling and autotuning the
    kernel in the first one) go to ``stats[name]``."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        call()
    sync(torch, device)
    stats[name] = round(time.perf_counter() - t0, 2)


def time_calls(torch, device: str, call, warmup: int, iters: int,
               stats: dict) -> list[float]:
    """Wall ms of ``iters`` calls, each synchronised before and after, after ``warmup``."""
    run_warmup(torch, device, call, warmup, stats, "warmup_s")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        sync(torch, device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_back_to_back(torch, device: str, call, warmup: int, iters: int, inner: int,
                      stats: dict, name: str) -> list[float]:
    """ms per call over ``iters`` samples of ``inner`` calls issued back to back (CUDA events
    around each sample, so the host's launch work overlaps the device's), after ``warmup``."""
    run_warmup(torch, device, call, warmup, stats, name)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return times


def rounded(times: list[float]) -> list[float]:
    return [round(t, 4) for t in times]


class ProcessGpuMemory:
    """The process's GPU memory as the driver reports it, sampled by ``nvidia-smi`` loops in
    the background while the ``with`` block runs, plus the SM clock and power draw.

    ``peak_gib()`` is this process's largest ``used_memory`` among the compute apps when
    ``nvidia-smi`` lists it under our pid; inside a container it usually lists host pids,
    and then the peak is the largest rise of the GPUs' used memory above the reading taken
    on entry (before CUDA is initialised), which counts the CUDA context and library
    workspaces that ``torch.cuda.max_memory_allocated`` misses. None without ``nvidia-smi``.
    """

    GPU_FIELDS = ("index", "memory.used", "clocks.sm", "power.draw")

    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self.smi = shutil.which("nvidia-smi")
        self.baseline: dict[str, float] = {}
        self._loops: list[tuple[subprocess.Popen, object]] = []
        self.gpu_lines: list[str] = []
        self.app_lines: list[str] = []

    def _query(self, what: str, fields: str, loop: bool):
        command = [self.smi, f"--query-{what}={fields}", "--format=csv,noheader,nounits"]
        if loop:
            command.append(f"--loop-ms={self.interval_ms}")
        return command

    def __enter__(self) -> "ProcessGpuMemory":
        if self.smi is None:
            return self
        try:
            out = subprocess.run(self._query("gpu", "index,memory.used", loop=False),
                                 capture_output=True, text=True, timeout=30).stdout
            for line in out.splitlines():
                index, used = (part.strip() for part in line.split(","))
                self.baseline[index] = float(used)
            for what, fields in (("gpu", ",".join(self.GPU_FIELDS)),
                                 ("compute-apps", "pid,used_memory")):
                sink = tempfile.TemporaryFile(mode="w+")
                process = subprocess.Popen(self._query(what, fields, loop=True), stdout=sink,
                                           stderr=subprocess.DEVNULL)
                self._loops.append((process, sink))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.baseline = {}
        return self

    def __exit__(self, *exc) -> None:
        texts = []
        for process, sink in self._loops:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            sink.seek(0)
            texts.append(sink.read().splitlines())
            sink.close()
        if len(texts) == 2:
            self.gpu_lines, self.app_lines = texts

    @staticmethod
    def _numbers(line: str) -> list[float | None]:
        values = []
        for part in line.split(","):
            try:
                values.append(float(part.strip()))
            except ValueError:  # "[N/A]"
                values.append(None)
        return values

    def peak_gib(self) -> tuple[float | None, str | None]:
        pid = os.getpid()
        mine = [row[1] for row in map(self._numbers, self.app_lines)
                if len(row) == 2 and row[0] == pid and row[1] is not None]
        if mine:
            return max(mine) / 1024, "nvidia-smi used_memory of this pid"
        growth = []
        for row in map(self._numbers, self.gpu_lines):
            if len(row) == len(self.GPU_FIELDS) and row[1] is not None:
                base = self.baseline.get(str(int(row[0])) if row[0] is not None else "")
                if base is not None:
                    growth.append(row[1] - base)
        if growth:
            return max(growth) / 1024, "rise of the GPU's used memory above its reading on entry"
        return None, None

    def clocks(self) -> dict:
        rows = [r for r in map(self._numbers, self.gpu_lines) if len(r) == len(self.GPU_FIELDS)]
        clocks = [r[2] for r in rows if r[2] is not None]
        power = [r[3] for r in rows if r[3] is not None]
        if not clocks:
            return {}
        return {"samples": len(rows), "sm_mhz_median": statistics.median(clocks),
                "sm_mhz_min": min(clocks), "power_w_mean": round(statistics.fmean(power), 1)
                if power else None}


def oom_details(error: BaseException) -> dict:
    """``requested_gib`` from a CUDA OOM message ('Tried to allocate 2.00 GiB'), if present."""
    match = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", str(error))
    if not match:
        return {}
    scale = {"GiB": 1.0, "MiB": 1 / 1024, "KiB": 1 / 1024 ** 2}[match.group(2)]
    return {"requested_gib": float(match.group(1)) * scale}


def is_oom(torch, error: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom_type) or "out of memory" in str(error).lower()


# ========================================== attention ==========================================

def patch_nums_for_length(length: int) -> tuple[int, ...]:
    for patch_nums in (*PATCH_NUMS.values(), TINY_PATCH_NUMS):
        if sum(p * p for p in patch_nums) == length:
            return patch_nums
    known = sorted(sum(p * p for p in pn) for pn in (*PATCH_NUMS.values(), TINY_PATCH_NUMS))
    raise ValueError(f"--shape: L={length} is none of the official token counts {known}")


def dense_mask(torch, patch_nums, pattern: str, device: str):
    """[L, L] boolean mask, True where a query may attend, as the official benchmark builds
    its reference: same scale (block_diagonal) or same or earlier scale (block_causal)."""
    level = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
    query, key = level[:, None], level[None, :]
    return (query == key if pattern == "block_diagonal" else query >= key).to(device)


def run_attention(args, torch, result: dict) -> None:
    batch, heads, length = (int(x) for x in args.shape.split(","))
    patch_nums = patch_nums_for_length(length)
    device = args.device
    scale = HEAD_DIM ** -0.5
    uses_kernel = device == "cuda"
    settings = result["settings"]
    settings.update(shape_BHLK=[batch, heads, length, HEAD_DIM], mask=args.mask,
                    patch_nums=list(patch_nums), sm_scale=scale, autograd=True,
                    forward_under_no_grad=True, inputs="normal(0, 0.5) as the official "
                    "benchmark/attention.py draws them")
    if uses_kernel:
        from attn.block_sparse_attn_interface import BlockSparseAttention

        attention = BlockSparseAttention(block_sizes=[p * p for p in patch_nums],
                                         device=device, sparsity_pattern=args.mask)
        settings.update(kernel="official Triton block-sparse attention "
                        "(attn/block_sparse_attn_interface.BlockSparseAttention)",
                        triton_autotune=args.autotune, dtypes=["float16", "bfloat16"])
        dtypes = [torch.float16, torch.bfloat16]
        settings["dtype"] = "float16 (bfloat16 in the 'bfloat16' entry)"
    else:
        mask = dense_mask(torch, patch_nums, args.mask, device)

        def attention(q, k, v, sm_scale):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                    scale=sm_scale)
        settings.update(kernel="torch scaled_dot_product_attention with the dense mask (the "
                        "official benchmark's reference; the Triton kernel needs CUDA)",
                        dtypes=["float32"])
        dtypes = [torch.float32]
        settings["dtype"] = "float32"
    settings["torch_compile"] = False
    settings["timing"] = (f"{ATTENTION_CALLS_PER_SAMPLE} calls back to back per sample "
                          "between CUDA events, median over samples")

    reference_mask = dense_mask(torch, patch_nums, args.mask, device)
    for dtype in dtypes:
        entry = result if dtype is dtypes[0] else result.setdefault(str(dtype).split(".")[-1], {})
        try:
            measure_attention(torch, attention, reference_mask, dtype, (batch, heads, length),
                              scale, args, entry)
            entry["status"] = "ok"
        except Exception as error:  # noqa: BLE001 - every failure becomes the row's status
            entry["status"] = "OOM" if is_oom(torch, error) else "error"
            entry["error"] = f"{type(error).__name__}: {error}"[:2000]
            entry.update(oom_details(error))
            if dtype is dtypes[0]:
                raise
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def measure_attention(torch, attention, reference_mask, dtype, shape, scale, args,
                      entry: dict) -> None:
    device = args.device
    generator = torch.Generator(device=device).manual_seed(0)

    def draw():
        x = torch.empty(*shape, HEAD_DIM, dtype=dtype, device=device)
        return x.normal_(0.0, 0.5, generator=generator).requires_grad_()

    q, k, v = draw(), draw(), draw()
    d_out = torch.randn(*shape, HEAD_DIM, dtype=dtype, device=device, generator=generator)

    t0 = time.perf_counter()
    with torch.no_grad():  # agreement with float32 attention on the first batch element
        out = attention(q, k, v, scale)
        sync(torch, device)
        entry["first_fwd_s"] = round(time.perf_counter() - t0, 2)  # compiles and autotunes
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=reference_mask, scale=scale)
        entry["max_abs_err_vs_float32"] = float((out[:1].float() - expected).abs().max())
        entry["output_finite"] = bool(torch.isfinite(out).all())

    def forward():
        with torch.no_grad():
            attention(q, k, v, scale)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attention(q, k, v, scale).backward(d_out)

    fwd = time_back_to_back(torch, device, forward, args.warmup, args.iters,
                            ATTENTION_CALLS_PER_SAMPLE, entry, "fwd_warmup_s")
    fwd_bwd = time_back_to_back(torch, device, forward_backward, args.warmup, args.iters,
                                ATTENTION_CALLS_PER_SAMPLE, entry, "fwd_bwd_warmup_s")
    entry.update(dtype=str(dtype).split(".")[-1], fwd_ms=statistics.median(fwd),
                 fwd_bwd_ms=statistics.median(fwd_bwd), ms_median=statistics.median(fwd_bwd),
                 ms_all=rounded(fwd_bwd), fwd_ms_all=rounded(fwd))


# ============================================ train ============================================

def official_param_groups(model):
    """Names, parameters and AdamW groups by the rule of the official ``filter_params``
    (utils/lr_control.py): no weight decay for 1-D parameters, biases and
    ``NO_WEIGHT_DECAY_KEYS``; ``wd_sc`` / ``lr_sc`` are what its scheduler reads."""
    names, params, groups = [], [], {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names.append(name)
        params.append(param)
        no_decay = (param.ndim == 1 or name.endswith("bias")
                    or any(key in name for key in NO_WEIGHT_DECAY_KEYS))
        group = groups.setdefault(no_decay, {"params": [], "wd_sc": 0.0 if no_decay else 1.0,
                                             "lr_sc": 1.0})
        group["params"].append(param)
    return names, params, list(groups.values())


def run_train(args, torch, result: dict) -> None:
    import dist
    from models import build_vae_nsp
    from trainer import Trainer
    from utils.amp_sc import AmpOptimizer
    from utils.lr_control import lr_wd_annealing

    device, batch = args.device, args.batch
    depth = 2 if args.tiny else int(args.model[1:])
    patch_nums = TINY_PATCH_NUMS if args.tiny else PATCH_NUMS[args.res]
    res = patch_nums[-1] * 16
    config_file = pathlib.Path(args.upstream, "config", "experiment",
                               f"hmar-train-d{16 if args.tiny else depth}.yaml")
    config = {**TRAIN_DEFAULTS, **{k: v for k, v in read_flat_yaml(config_file).items()
                                   if k in TRAIN_DEFAULTS}}
    if args.amp is not None:
        config["fp16"] = {"none": 0, "fp16": 1, "bf16": 2}[args.amp]
    uses_kernel = device == "cuda"
    settings = result["settings"]
    settings.update(configure_torch(torch, config["tf32"], config["seed"]))
    settings.update(
        depth=depth, batch_per_gpu=batch, res=res, patch_nums=list(patch_nums),
        tokens=sum(p * p for p in patch_nums), config_file=str(config_file.name),
        official_args={k: config[k] for k in sorted(config)},
        autocast=({0: "off (float32)", 1: "float16 + GradScaler", 2: "bfloat16"}[config["fp16"]]
                  if device == "cuda" else "off (the official autocast is CUDA-only)"),
        attention=("official Triton block-sparse kernel" if uses_kernel else
                   "torch scaled_dot_product_attention with the dense mask (the official "
                   "using_block_sparse_attn=False path)"),
        triton_autotune=args.autotune and uses_kernel, torch_compile=args.compile,
        flash_attn=flash_attn_version(), optimizer="AdamW betas (0.9, 0.95), fused="
        f"{config['afuse']}, clip {config['tclip']}", tokenizer_weights="random (randomize_)",
        transformer_init="official init_weights", data="one random image batch in [-1, 1] "
        "and random labels, resident on the device (the data loader is not timed)",
        step=("lr_wd_annealing; vae.img_to_idxBl; quantize.idxBl_to_ns_input; forward + "
              "reweighted cross-entropy under AmpOptimizer.amp_ctx; backward_clip_step; "
              "argmax of the logits (nsp_trainer.train_step minus its logging)"))

    vae, nsp = build_vae_nsp(
        device=device, patch_nums=patch_nums, V=4096, Cvae=32, ch=160, share_quant_resi=4,
        num_classes=NUM_CLASSES, depth=depth, shared_aln=config["saln"],
        attn_l2_norm=config["anorm"], flash_if_available=config["fuse"],
        fused_if_available=config["fuse"], init_adaln=config["aln"],
        init_adaln_gamma=config["alng"], init_head=config["hd"], init_std=config["ini"],
        using_block_sparse_attn=uses_kernel)
    randomize_(torch, vae)
    model = torch.compile(nsp) if args.compile else nsp
    record_attention_dtypes(nsp, settings)

    lr = config["tblr"] * config["bs"] / 256  # the official tlr at the config's global batch
    names, params, groups = official_param_groups(nsp)
    adamw = torch.optim.AdamW(groups, lr=lr, weight_decay=0, betas=(0.9, 0.95),
                              fused=config["afuse"])
    optimizer = AmpOptimizer(mixed_precision=config["fp16"], optimizer=adamw, names=names,
                             paras=params, grad_clip=config["tclip"], n_gradient_accumulation=1)
    trainer = Trainer(device=device, patch_nums=patch_nums,
                      resos=tuple(p * 16 for p in patch_nums), vae_local=vae,
                      transformer_wo_ddp=nsp, transformer=dist.NullDDP(model),
                      optimizer=optimizer, label_smooth=config["ls"],
                      reweight_loss=config["reweight_loss"],
                      loss_reweight_type=config["loss_reweight_type"])
    settings["parameters_M"] = round(sum(p.numel() for p in params) / 1e6, 2)

    iters_per_epoch = math.ceil(IMAGENET_TRAIN_IMAGES / config["bs"])
    warmup_iters = (config["wp"] or config["ep"] / 50) * iters_per_epoch
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, res, res, device=device, generator=generator) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=generator)
    vocab = vae.vocab_size
    state = {"it": 0, "loss": None, "scale_log2": []}

    def train_step():
        lr_wd_annealing(config["sche"], adamw, lr, config["twd"],
                        config["twde"] or config["twd"], state["it"], warmup_iters,
                        config["ep"] * iters_per_epoch, wp0=config["wp0"], wpe=config["wpe"])
        gt_idx_Bl = vae.img_to_idxBl(images)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        x_BLCv = vae.quantize.idxBl_to_ns_input(gt_idx_Bl)
        with optimizer.amp_ctx:
            logits_BLV = trainer.transformer(labels, x_BLCv)
            loss = trainer.train_loss(logits_BLV.view(-1, vocab), gt_BL.view(-1)).view(batch, -1)
            loss = loss.mul(trainer.loss_weight).sum(dim=-1).mean()
        _, scale_log2 = optimizer.backward_clip_step(loss=loss, stepping=True)
        state["scale_log2"].append(scale_log2)
        logits_BLV.data.argmax(dim=-1)
        state["it"] += 1
        state["loss"] = loss

    times = time_calls(torch, device, train_step, args.warmup, args.iters, result)
    result.update(ms_median=statistics.median(times), ms_all=rounded(times),
                  img_per_s=batch / (statistics.median(times) / 1e3),
                  loss_last=float(state["loss"].detach()))
    # The grad scaler halves its scale and skips the optimizer on a step with inf gradients:
    # a falling scale here means that some steps ran without their AdamW update.
    result["grad_scale_log2_per_step"] = state["scale_log2"]
    result["loss_finite"] = math.isfinite(result["loss_last"])


def record_attention_dtypes(model, settings: dict) -> None:
    """Records the dtypes of q, k, v that reach the block-sparse kernel at its first call,
    i.e. what the trainer's autocast makes of the attention's inputs."""
    blocks = [b for b in model.modules() if type(b).__name__ == "BlockSparseAttention"]
    if not blocks:
        return
    handles = []

    def hook(_module, inputs):
        settings["attention_input_dtypes"] = {
            name: str(x.dtype).split(".")[-1] for name, x in zip("qkv", inputs[:3])}
        for handle in handles:
            handle.remove()

    handles.extend(b.register_forward_pre_hook(hook) for b in blocks)


# =========================================== sample ============================================

def run_sample(args, torch, result: dict) -> None:
    from models import build_vae_hmar

    if args.amp is not None:
        raise ValueError("--amp applies to train only: the official sampler runs in float32")
    device, batch = args.device, args.batch
    depth = 2 if args.tiny else int(args.model[1:])
    patch_nums = TINY_PATCH_NUMS if args.tiny else PATCH_NUMS[args.res]
    res = patch_nums[-1] * 16
    mask_schedule = TINY_MASK_SCHEDULE if args.tiny else MASK_SCHEDULES[args.res]
    config_file = pathlib.Path(args.upstream, "config", "sample",
                               f"hmar-d{16 if args.tiny else depth}.yaml")
    config = {**SAMPLE_DEFAULTS, **{k: v for k, v in read_flat_yaml(config_file).items()
                                    if k in SAMPLE_DEFAULTS}}
    settings = result["settings"]
    settings.update(configure_torch(torch, config["tf32"], config["seed"]))
    settings.update(
        depth=depth, batch=batch, res=res, patch_nums=list(patch_nums),
        config_file=str(config_file.name), official_args={k: config[k] for k in sorted(config)},
        mask_schedule=mask_schedule, kv_cache=False, labels="random (generate's own draw)",
        autocast="none: the official sampler runs in float32 (under autocast its mask branch "
        "scatters float32 mask embeddings into half-precision token maps and fails)",
        precision="float32 weights, TF32 matmuls",
        inference_mode=True, torch_compile=False, flash_attn=flash_attn_version(),
        weights="random (randomize_: fan-in normal matrices, U[0, 1) vectors)", eval_mode=True,
        includes="HMAR.generate: next-scale + masked refinement per scale, CFG, top-k/top-p, "
        "VQ-VAE decode to pixels")

    extra = {"n_layers_train": 1} if args.tiny else {}
    vae, hmar = build_vae_hmar(
        device=device, patch_nums=patch_nums, V=4096, Cvae=32, ch=160, share_quant_resi=4,
        num_classes=NUM_CLASSES, depth=depth, shared_aln=config["saln"],
        attn_l2_norm=config["anorm"], flash_if_available=config["fuse"],
        fused_if_available=config["fuse"], **extra)
    randomize_(torch, vae)
    randomize_(torch, hmar)
    hmar.eval()
    torch.set_default_device(device)  # as sample.py does before generating
    settings["parameters_M"] = round(sum(p.numel() for p in hmar.parameters()) / 1e6, 2)
    state = {}

    def sample_batch():
        with torch.inference_mode():
            state["images"] = generate(hmar, batch, config, mask_schedule)

    times = time_calls(torch, device, sample_batch, args.warmup, args.iters, result)
    images = state["images"]
    result.update(ms_median=statistics.median(times), ms_all=rounded(times),
                  img_per_s=batch / (statistics.median(times) / 1e3),
                  output_shape=list(images.shape),
                  output_finite=bool(torch.isfinite(images).all()))


def generate(hmar, batch: int, config: dict, mask_schedule):
    return hmar.generate(batch, None, cfg=config["cfg"], top_k=config["top_k"],
                         top_p=config["top_p"], more_smooth=config["more_smooth"],
                         mask=config["mask"], mask_schedule=mask_schedule, kv_cache=False)


# ============================================= main ============================================

def device_name(torch, device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def versions(torch) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=("attention", "train", "sample"))
    parser.add_argument("--upstream", required=True, help="an official HMAR checkout")
    parser.add_argument("--model", default="d16", choices=("d16", "d20", "d24", "d30"))
    parser.add_argument("--batch", type=int, default=None,
                        help="per-GPU batch (train, sample); default 64, 2 with --tiny")
    parser.add_argument("--res", type=int, default=256, choices=(256, 512))
    parser.add_argument("--shape", default=None,
                        help="attention B,H,L; default 32,30,680 (2,2,30 with --tiny)")
    parser.add_argument("--mask", default="block_diagonal",
                        choices=("block_diagonal", "block_causal"))
    parser.add_argument("--iters", type=int, default=None, help="timed calls (samples)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (the first one autotunes the Triton kernel)")
    parser.add_argument("--amp", default=None, choices=("none", "fp16", "bf16"),
                        help="train: the trainer's autocast instead of the config's (every "
                        "official config: fp16 + GradScaler; the kernel computes in fp16)")
    parser.add_argument("--compile", action="store_true",
                        help="train: torch.compile the transformer (the official configs "
                        "leave it off: tfast=0)")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="TRITON_AUTO_TUNING=0: the kernel's fixed tile configs")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer model, 64 px, batch 2, 1+2 calls: a plumbing check")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    warmup, iters = (1, 2) if args.tiny else DEFAULT_ITERS[args.benchmark]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.iters = iters if args.iters is None else args.iters
    if args.batch is None:
        args.batch = 2 if args.tiny else 64
    if args.shape is None:
        args.shape = "2,2,30" if args.tiny else "32,30,680"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {"benchmark": args.benchmark, "implementation": IMPLEMENTATION,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
              "upstream_commit": upstream_commit(args.upstream), "settings": {},
              "status": "error", "ms_median": None, "ms_all": [], "peak_gib_torch": None,
              "peak_gib_process": None}
    memory = ProcessGpuMemory() if args.device == "cuda" else None
    torch = None
    try:
        if memory is not None:
            memory.__enter__()
        torch = import_upstream(args.upstream, args.autotune, args.device)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available (use --device cpu --tiny for a smoke run)")
        result["settings"]["triton_environment"] = {
            name: os.environ.get(name) for name in ("TRITON_AUTO_TUNING", *TRITON_ENVIRONMENT)}
        result["device"] = device_name(torch, args.device)
        result["versions"] = versions(torch)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runner = {"attention": run_attention, "train": run_train, "sample": run_sample}
        runner[args.benchmark](args, torch, result)
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - every failure becomes the row's status
        oom = torch is not None and is_oom(torch, error)
        result["status"] = "OOM" if oom else "error"
        result["error"] = f"{type(error).__name__}: {error}"[:4000]
        result.update(oom_details(error))
        if not oom:
            result["traceback"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    finally:
        if torch is not None and args.device == "cuda" and torch.cuda.is_available():
            result["peak_gib_torch"] = torch.cuda.max_memory_allocated() / GIB
        if memory is not None:
            memory.__exit__(None, None, None)
            result["peak_gib_process"], method = memory.peak_gib()
            result["peak_gib_process_method"] = method
            result["gpu_during_run"] = memory.clocks()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result.get(k) for k in ("benchmark", "status", "ms_median", "fwd_ms",
                                          "img_per_s", "peak_gib_torch", "peak_gib_process")}
    print(json.dumps(summary))
    return 1 if result["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
