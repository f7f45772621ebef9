"""The benchmark scripts' measuring tools: the GPU clock/power summary, the profile's
idle-gap timeline, the A/B pairs summary (synthetic inputs; the GPU runs are in
benchmarks/results), the ``--execution`` option, and the quick CPU modes of
``train_step.py`` and ``sample.py``."""

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks import ab_pairs, gpu_monitor, profiling, train_step


def test_gpu_monitor_summarizes_clocks_power_and_power_cap_per_visible_gpu():
    # index, SM MHz, max SM MHz, power W, power limit W, temperature C, clock-limit reasons
    lines = ["0, 1980, 1980, 310.5, 700.00, 40, 0x0000000000000000",
             "0, 1590, 1980, 695.0, 700.00, 57, 0x0000000000000004",
             "0, 1650, 1980, 699.5, 700.00, 58, 0x0000000000000004",
             "0, 1500, 1980, 700.0, 700.00, 58, 0x0000000000000004",
             "1, 345, 1980, 75.0, 700.00, 30, 0x0000000000000001",
             "garbage line",
             "0, [N/A], 1980, [N/A], 700.00, 58, [N/A]"]
    summary = gpu_monitor.summarize(lines, indices={"0"})
    assert list(summary) == ["gpu0"]
    gpu = summary["gpu0"]
    assert gpu["samples"] == 5
    assert gpu["sm_mhz_median"] == pytest.approx(1620.0)  # of the four readable clocks
    assert (gpu["sm_mhz_min"], gpu["sm_mhz_max"], gpu["sm_mhz_gpu_max"]) == (1500, 1980, 1980)
    assert gpu["power_w_mean"] == pytest.approx((310.5 + 695 + 699.5 + 700) / 4, abs=0.1)
    assert (gpu["power_w_max"], gpu["power_w_limit"], gpu["temperature_c_max"]) == (700, 700, 58)
    assert gpu["fraction_of_samples"]["sw_power_cap"] == 0.75
    assert gpu["fraction_of_samples"]["hw_slowdown"] == 0.0
    assert "power-capped in 75% of samples" in gpu_monitor.format_summary(summary)
    assert set(gpu_monitor.summarize(lines)) == {"gpu0", "gpu1"}
    assert gpu_monitor.format_summary({}) == ""


def test_gpu_monitor_without_nvidia_smi_is_empty(monkeypatch):
    monkeypatch.setattr(gpu_monitor.shutil, "which", lambda name: None)
    with gpu_monitor.GpuMonitor() as monitor:
        pass
    assert monitor.summary() == {}


def _event(start, end, name, op=None):
    return SimpleNamespace(start_ns=start, end_ns=end, name=name,
                           stats=[("hlo_op", op)] if op else [])


def test_idle_gaps_merges_streams_and_names_the_gaps(monkeypatch):
    device = SimpleNamespace(name="/device:GPU:0", lines=[
        SimpleNamespace(name="Stream #13(Compute)", events=[
            _event(0, 100_000, "k1", "fusion.a"), _event(100_500, 300_000, "k2", "gemm.b"),
            _event(2_300_000, 2_400_000, "k4", "fusion.d")]),
        SimpleNamespace(name="Stream #14(Compute)", events=[_event(150_000, 400_000, "k3", "c")]),
        SimpleNamespace(name="XLA Ops", events=[_event(0, 10**9, "whole")])])  # skipped line
    host = SimpleNamespace(name="/host:CPU", lines=[SimpleNamespace(name="thread", events=[
        _event(400_000, 2_300_000, "WhileThunk"), _event(0, 10**8, "PjitFunction")])])
    monkeypatch.setattr(profiling, "_planes", lambda logdir: [device, host])
    (run,) = profiling.idle_gaps("unused", calls=1)["devices"]
    assert run["span_ms_per_call"] == pytest.approx(2.4)
    assert run["busy_ms_per_call"] == pytest.approx(0.4995)
    assert run["idle_ms_per_call"] == pytest.approx(1.9005)
    assert run["gap_buckets"]["0-5us"] == {"count_per_call": 1.0, "ms_per_call": 0.0005}
    assert run["gap_buckets"]["1000-infus"]["count_per_call"] == 1.0
    longest = run["longest_gaps"][0]
    assert (longest["us"], longest["after"], longest["before"]) == (1900.0, "c", "fusion.d")
    assert longest["host_busy_with"][0].startswith("WhileThunk")


def test_ab_pairs_pools_each_settings_steps_and_reports_the_difference():
    def row(times, back_to_back, clock):
        return {"status": "ok", "ms_all": times, "ms_median": sorted(times)[len(times) // 2],
                "ms_min": min(times), "ms_back_to_back": back_to_back, "peak_gib": 35.0,
                "gpu_during_timing": {"gpu0": {"sm_mhz_median": clock}}}

    runs = [{"setting": "a", "pair": 0, "row": row([175.0, 174.0, 176.0], 174.5, 1605.0)},
            {"setting": "b", "pair": 0, "row": row([172.0, 173.0, 171.0], 172.2, 1605.0)},
            {"setting": "a", "pair": 1, "row": row([175.5, 175.0, 176.5], 175.1, 1590.0)},
            {"setting": "b", "pair": 1, "row": {"status": "timed out after 300 s"}}]
    summary = ab_pairs.summarize(runs)
    assert summary["a"]["runs_ok"] == 2 and summary["b"]["runs_ok"] == 1
    assert summary["a"]["ms_run_medians"] == [175.0, 175.5]
    assert summary["a"]["ms_pooled_median"] == pytest.approx(175.25)  # of all six steps
    assert summary["b"]["ms_back_to_back_median"] == pytest.approx(172.2)
    assert summary["b_minus_a_ms"] == pytest.approx(172.0 - 175.25)
    table = ab_pairs.format_table(runs, summary)
    assert "timed out after 300 s" in table and "1590" in table and "-1.85%" in table
    # Nothing to compare when a setting has no successful run.
    assert "b_over_a" not in ab_pairs.summarize(runs[:1] + runs[3:])
    with pytest.raises(SystemExit):  # --out belongs to ab_pairs.py itself
        ab_pairs.main(["--common", "--quick --out x.json"])


def test_execution_option_parses_one_variant_and_names_bad_settings():
    assert train_step.parse_execution("remat=block, scan_blocks=false,microbatches=2") == {
        "remat": "block", "scan_blocks": False, "microbatches": 2}
    assert train_step.execution_label({}) == "defaults"
    for text, problem in (("remat", "expected KEY=VALUE"), ("dtype=bfloat16", "Unknown"),
                          ("remat=dots_saveable", "remat")):
        with pytest.raises(argparse.ArgumentTypeError, match=problem):
            train_step.parse_execution(text)
    # ab_pairs: --common's and a setting's --execution make one variant, the setting's last.
    assert ab_pairs.setting_flags("--quick --execution remat=none --iters 3",
                                  "--execution remat=block") == [
        "--quick", "--iters", "3", "--execution", "remat=none,remat=block"]


def _quick(script: str, tmp_path, *flags: str) -> list[dict]:
    out = tmp_path / f"{script}.json"
    subprocess.run([sys.executable, str(train_step.REPO / "benchmarks" / f"{script}.py"),
                    "--quick", "--iters", "1", "--warmup", "0", "--out", str(out), *flags],
                   cwd=train_step.REPO, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())["rows"]


@pytest.mark.heavy
def test_train_step_quick_mode_runs_each_execution_variant_resolved(tmp_path):
    rows = _quick("train_step", tmp_path, "--pairs", "tinyx2", "--modes", "full,tokenize",
                  "--execution", "remat=block,microbatches=2")
    assert [(r["mode"], r["status"]) for r in rows] == [("full", "ok"), ("tokenize", "ok")]
    full = rows[0]
    assert full["execution"] == dict(full["execution"], remat="block", microbatches=2,
                                     platform="cpu", attention="xla", compute_dtype="float32")
    assert full["img_s"] > 0 and full["loss"] > 0


@pytest.mark.heavy
def test_sample_quick_mode_runs_the_platform_defaults(tmp_path):
    rows = _quick("sample", tmp_path, "--batches", "2", "--modes", "markov_refine,decode")
    assert [(r["mode"], r["status"]) for r in rows] == [("markov_refine", "ok"), ("decode", "ok")]
    assert all(r["variant"] == "defaults" and r["execution"]["platform"] == "cpu" for r in rows)
    assert rows[0]["image_finite"] and rows[0]["passes"] == 8
