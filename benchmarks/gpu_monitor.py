"""SM clock, power and clock-limit reasons of the GPUs while a benchmark times its calls.

An H200 running the training step back to back draws its 700 W limit and the driver
lowers the SM clock (the "SW power cap" reason) from 1980 MHz to 1450-1750 MHz, so the
step's wall time depends on the energy it spends as well as on its kernels; the device
time of a profile (short bursts, cooler) comes out several ms lower than the timed steps.
This monitor samples ``nvidia-smi`` every ``interval_ms`` in a background process while
its ``with`` block runs and summarises the samples per GPU::

    with GpuMonitor() as monitor:
        times = time_calls(...)
    result["gpu_during_timing"] = monitor.summary()

No ``nvidia-smi`` (CPU, TPU) or a failing query gives ``{}``; the timing is never
affected. GPUs are those of ``CUDA_VISIBLE_DEVICES`` when it lists indices, else all.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile

FIELDS = ("index", "clocks.sm", "clocks.max.sm", "power.draw", "power.limit",
          "temperature.gpu", "clocks_event_reasons.active")
# Bits of ``clocks_event_reasons.active`` (NVML's clocks event reasons).
REASONS = {"sw_power_cap": 0x4, "hw_slowdown": 0x8, "sw_thermal_slowdown": 0x20,
           "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80}


def _visible_indices() -> set[str] | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    indices = {part.strip() for part in visible.split(",") if part.strip()}
    return indices if indices and all(i.isdigit() for i in indices) else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "Not Supported"
        return None


def summarize(lines: list[str], indices: set[str] | None = None) -> dict:
    """Per GPU: sample count, SM clock (median, min, max and the GPU's maximum) in MHz,
    power (mean, max, limit) in W, max temperature and the fraction of samples with each
    clock-limit reason set. ``lines``: ``nvidia-smi --format=csv,noheader,nounits``
    rows of ``FIELDS``."""
    per_gpu: dict[str, list[list[str]]] = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS) or (indices and parts[0] not in indices):
            continue
        per_gpu.setdefault(parts[0], []).append(parts)
    summary = {}
    for index, rows in sorted(per_gpu.items()):
        clocks = [c for c in (_number(r[1]) for r in rows) if c is not None]
        power = [p for p in (_number(r[3]) for r in rows) if p is not None]
        temps = [t for t in (_number(r[5]) for r in rows) if t is not None]
        reasons = [int(r[6], 16) for r in rows if r[6].lower().startswith("0x")]
        entry = {"samples": len(rows)}
        if clocks:
            entry.update(sm_mhz_median=statistics.median(clocks), sm_mhz_min=min(clocks),
                         sm_mhz_max=max(clocks), sm_mhz_gpu_max=_number(rows[0][2]))
        if power:
            entry.update(power_w_mean=round(statistics.fmean(power), 1), power_w_max=max(power),
                         power_w_limit=_number(rows[0][4]))
        if temps:
            entry["temperature_c_max"] = max(temps)
        if reasons:
            entry["fraction_of_samples"] = {
                name: round(sum(bool(r & bit) for r in reasons) / len(reasons), 3)
                for name, bit in REASONS.items()}
        summary[f"gpu{index}"] = entry
    return summary


def format_summary(summary: dict) -> str:
    """One short line per GPU for the benchmark tables; '' for an empty summary."""
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
    """Samples ``FIELDS`` with ``nvidia-smi -lms`` while the ``with`` block runs."""

    def __init__(self, interval_ms: int = 50):
        self.interval_ms = interval_ms
        self._process = None
        self._file = None
        self._lines: list[str] = []

    def __enter__(self) -> "GpuMonitor":
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        self._file = tempfile.TemporaryFile(mode="w+")
        try:
            self._process = subprocess.Popen(
                [smi, f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.interval_ms}"], stdout=self._file, stderr=subprocess.DEVNULL)
        except OSError:
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
        return summarize(self._lines, _visible_indices())
