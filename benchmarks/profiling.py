"""Device-time breakdown of a compiled call from a JAX profiler trace.

``profile_calls(call, calls, hlo_text)`` runs ``call`` ``calls`` times under
``jax.profiler.trace``, reads the trace back with ``jax.profiler.ProfileData`` (no
TensorBoard needed) and sums the device-side events (GPU kernels, copies) per XLA
instruction. Each instruction is put into one category from its kernel name and the
``op_name`` metadata XLA keeps in the compiled HLO:

* ``attention``: the Pallas block-sparse kernels (or XLA's/cuDNN's attention);
* ``matmul``: cuBLAS/cuBLASLt/Triton GEMMs and GEMM fusions;
* ``convolution``: cuDNN convolutions (the tokenizer);
* ``sort``: sorts and top-k (sampling filters);
* ``collective``: NCCL;
* ``copy``: memcpy/memset;
* ``elementwise``: every other fusion (norms, modulation, softmax, optimizer, casts).

Returned per call: total device milliseconds (the sum over streams; kernels that overlap
on different streams count twice), the per-category split and the instructions with
the most device time, each with its HLO line (output and operand shapes). Used by ``--profile`` in ``train_step.py`` and ``sample.py``.
"""

from __future__ import annotations

import collections
import pathlib
import re
import tempfile

_ATTENTION = re.compile(r"hmar_block_sparse|attention|flash|fmha|sdpa", re.I)
_COLLECTIVE = re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective", re.I)
_MATMUL_KERNEL = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul", re.I)
_CONV_KERNEL = re.compile(r"conv(?!ert)|cudnn", re.I)
_COPY_KERNEL = re.compile(r"memcpy|memset", re.I)
_SKIPPED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "XLA TraceMe")


def op_names_from_hlo(hlo_text: str | None) -> dict[str, str]:
    """``{instruction name: op_name metadata}`` from compiled HLO text."""
    names: dict[str, str] = {}
    if not hlo_text:
        return names
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"", re.M)
    for match in pattern.finditer(hlo_text):
        names.setdefault(match.group(1), match.group(2))
    return names


def instruction_lines(hlo_text: str | None, width: int = 400) -> dict[str, str]:
    """``{instruction name: its HLO line}`` with each operand's shape written after it.

    Layouts and metadata are dropped: ``bf16[64,680,4096] fusion(%a:f32[64,680,4096], ...)``.
    """
    if not hlo_text:
        return {}
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", re.M)
    raw: dict[str, str] = {}
    for match in pattern.finditer(hlo_text):
        text = re.sub(r",\s*(metadata|backend_config|frontend_attributes)=.*$", "", match.group(2))
        raw.setdefault(match.group(1), re.sub(r"(?<=\])\{[\d,]*\}", "", text))
    shapes = {name: text.split(" ", 1)[0] for name, text in raw.items()}

    def with_shape(match):
        return f"%{match.group(1)}:{shapes.get(match.group(1), '?')}"

    return {name: re.sub(r"%([\w.\-]+)", with_shape, text)[:width] for name, text in raw.items()}


def categorize(kernel: str, instruction: str, op_name: str, hlo: str = "") -> str:
    """One category per instruction: names first, then the op_name of the fused root.

    ``hlo``, the instruction's line, settles cuBLAS calls whose first kernel is a workspace
    memset and whose op_name is a transpose (the weight-gradient matmuls of a backward)."""
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


def device_events(logdir: str):
    """Yields ``(kernel name, hlo instruction or None, duration ns)`` of every device event.

    On the CPU backend (no device planes) the host thread events that carry an ``hlo_op``
    stat stand in, so that the plumbing can be checked without an accelerator.
    """
    import jax

    host_ops = []
    found_device = False
    for path in pathlib.Path(logdir).rglob("*.xplane.pb"):
        data = jax.profiler.ProfileData.from_file(str(path))
        for plane in data.planes:
            device = plane.name.startswith("/device:")
            if not device and plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                if any(skip in line.name for skip in _SKIPPED_LINES):
                    continue
                for event in line.events:
                    instruction = _stat(event, "hlo_op")
                    item = (event.name, instruction, float(event.duration_ns))
                    if device:
                        found_device = True
                        yield item
                    elif instruction is not None:
                        host_ops.append(item)
    if not found_device:
        yield from host_ops


def _planes(logdir: str):
    import jax

    for path in pathlib.Path(logdir).rglob("*.xplane.pb"):
        yield from jax.profiler.ProfileData.from_file(str(path)).planes


def _host_events_at(host_events: list, at_ns: float, limit: int = 4) -> list[str]:
    """The shortest host events (name, microseconds) that were running at ``at_ns``."""
    running = [(end - start, name) for start, end, name in host_events if start <= at_ns <= end]
    return [f"{name[:50]} ({ns / 1e3:.0f}us)" for ns, name in sorted(running)[:limit]]


GAP_BUCKETS_US = (5, 20, 100, 1000)


def idle_gaps(logdir: str, calls: int, top: int = 15) -> dict:
    """Where the device sat idle: the timeline view of the traced calls.

    The kernels of every stream of a device are merged into busy intervals, from the first
    kernel of the trace to the last; the rest is idle time: launch gaps, host
    synchronisation (a while loop reading its predicate, a device-to-host copy), the host
    work between two synchronised calls. Returned per device: span, busy and idle
    milliseconds per call, the idle time and count of gaps per size bucket (microseconds),
    and the ``top`` longest gaps, each with the instruction before and after it, where it
    fell (ms from the first kernel) and the shortest host events (XLA's thunks, CUDA driver
    calls, the Python dispatch) running in its middle. The line names are listed too."""
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
        buckets = collections.OrderedDict()
        lower = 0
        for upper in GAP_BUCKETS_US + (float("inf"),):
            inside = [g[0] for g in gaps if lower * 1e3 <= g[0] < upper * 1e3]
            buckets[f"{lower}-{upper}us"] = {"count_per_call": len(inside) / calls,
                                             "ms_per_call": sum(inside) / 1e6 / calls}
            lower = upper
        gaps.sort(key=lambda g: -g[0])
        devices.append({
            "device": plane.name, "lines": sorted({line.name for line in plane.lines}),
            "span_ms_per_call": span / 1e6 / calls, "busy_ms_per_call": busy / 1e6 / calls,
            "idle_ms_per_call": (span - busy) / 1e6 / calls, "gap_buckets": buckets,
            "longest_gaps": [{"us": g[0] / 1e3, "at_ms": (g[3] - first) / 1e6,
                              "after": g[1][:60], "before": g[2][:60],
                              "host_busy_with": _host_events_at(host_events, g[3] + g[0] / 2)}
                             for g in gaps[:top]]})
    return {"devices": devices}


def summarize(logdir: str, calls: int, hlo_text: str | None = None, top: int = 60) -> dict:
    op_names = op_names_from_hlo(hlo_text)
    hlo_lines = instruction_lines(hlo_text)
    per_key: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, "", ""])
    for kernel, instruction, ns in device_events(logdir):
        key = instruction or kernel
        entry = per_key[key]
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
    total = sum(categories.values())
    return {"device_ms_per_call": total / 1e6 / calls,
            "launches_per_call": sum(r["launches_per_call"] for r in rows),
            "category_ms_per_call": {k: v / 1e6 / calls
                                     for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_ops": rows[:top],
            "by_op_name": group_by_op_name(rows)[:top]}


def group_by_op_name(rows: list[dict]) -> list[dict]:
    """The ops summed per (category, JAX op_name), costliest first.

    Every block runs the same source lines, so one op_name collects, e.g., a LayerNorm
    fusion of all blocks (unrolled, or the one instruction of a scan body): the per-source
    split that ``top_ops`` spreads over many rows."""
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        group = groups.setdefault((row["category"], row["op_name"]), {
            "category": row["category"], "op_name": row["op_name"], "ms_per_call": 0.0,
            "launches_per_call": 0.0, "instructions": 0, "example_hlo": row["hlo"][:200]})
        group["ms_per_call"] += row["ms_per_call"]
        group["launches_per_call"] += row["launches_per_call"]
        group["instructions"] += 1
    return sorted(groups.values(), key=lambda g: -g["ms_per_call"])


def profile_calls(call, calls: int = 2, hlo_text: str | None = None, top: int = 60) -> dict:
    """Traces ``calls`` synchronised calls of ``call`` and returns ``summarize``'s dict."""
    import jax

    with tempfile.TemporaryDirectory(prefix="hmar_profile_") as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(calls):
                jax.block_until_ready(call())
        summary = summarize(logdir, calls, hlo_text, top)
        try:
            summary["timeline"] = idle_gaps(logdir, calls)
        except Exception as err:  # noqa: BLE001 - the breakdown stands without it
            summary["timeline"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return summary


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
        for gap in run["longest_gaps"][:8]:
            lines.append(f"      gap {gap['us']:8.0f} us at {gap['at_ms']:7.1f} ms  "
                         f"{gap['after'][:30]} -> {gap['before'][:30]}  host: "
                         f"{'; '.join(gap['host_busy_with'][:2])[:110]}")
    for row in profile["top_ops"][:top]:
        lines.append(f"      {row['ms_per_call']:8.2f} ms x{row['launches_per_call']:<5.0f} "
                     f"{row['category']:>11} {row['op'][:40]:<40} {row['op_name'][-90:]}")
    return "\n".join(lines)
