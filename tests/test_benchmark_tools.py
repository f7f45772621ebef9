"""The benchmarks' tools: the harness (GPU monitor, profile timeline, ``--execution`` and
``--config`` options) and the training command's log reading on synthetic inputs, the quick
CPU modes of the scripts, and the results table (regenerated from its JSON rows)."""

import argparse
import json
import math
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest

from benchmarks import harness


def test_gpu_monitor_summarizes_clocks_power_and_power_cap_per_visible_gpu():
    # index, SM MHz, max SM MHz, power W, power limit W, temperature C, clock-limit reasons,
    # used memory MiB
    lines = ["0, 1980, 1980, 310.5, 700.00, 40, 0x0000000000000000, 1000",
             "0, 1590, 1980, 695.0, 700.00, 57, 0x0000000000000004, 30000",
             "0, 1650, 1980, 699.5, 700.00, 58, 0x0000000000000004, 42000",
             "0, 1500, 1980, 700.0, 700.00, 58, 0x0000000000000004, 41000",
             "1, 345, 1980, 75.0, 700.00, 30, 0x0000000000000001, 500",
             "garbage line",
             "0, [N/A], 1980, [N/A], 700.00, 58, [N/A], [N/A]"]
    summary = harness.summarize_gpu(lines, indices={"0"})
    assert list(summary) == ["gpu0"]
    gpu = summary["gpu0"]
    assert gpu["samples"] == 5
    assert gpu["sm_mhz_median"] == pytest.approx(1620.0)  # of the four readable clocks
    assert (gpu["sm_mhz_min"], gpu["sm_mhz_max"], gpu["sm_mhz_gpu_max"]) == (1500, 1980, 1980)
    assert gpu["power_w_mean"] == pytest.approx((310.5 + 695 + 699.5 + 700) / 4, abs=0.1)
    assert (gpu["power_w_max"], gpu["power_w_limit"], gpu["temperature_c_max"]) == (700, 700, 58)
    assert gpu["memory_used_mib_max"] == 42000
    assert gpu["fraction_of_samples"]["sw_power_cap"] == 0.75
    assert gpu["fraction_of_samples"]["hw_slowdown"] == 0.0
    assert "power-capped in 75% of samples" in harness.format_gpu_summary(summary)
    assert set(harness.summarize_gpu(lines)) == {"gpu0", "gpu1"}
    assert harness.format_gpu_summary({}) == ""


def test_gpu_monitor_memory_growth_is_the_largest_rise_above_the_reading_on_entry(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monitor = harness.GpuMonitor()
    row = "{}, 1980, 1980, 300, 700, 40, 0x0, {}"
    monitor._baseline = [row.format(0, 512), row.format(1, 20000)]  # GPU 1 busy before
    monitor._lines = [row.format(0, 512 + 2048), row.format(0, 512 + 10240),
                      row.format(1, 20500), row.format(0, "[N/A]")]
    assert monitor.memory_growth_gib() == 10.0
    assert harness.GpuMonitor().memory_growth_gib() is None


def test_gpu_monitor_without_nvidia_smi_is_empty(monkeypatch):
    monkeypatch.setattr(harness.shutil, "which", lambda name: None)
    with harness.GpuMonitor() as monitor:
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
    monkeypatch.setattr(harness, "_planes", lambda logdir: [device, host])
    (run,) = harness.idle_gaps("unused", calls=1)["devices"]
    assert run["span_ms_per_call"] == pytest.approx(2.4)
    assert run["busy_ms_per_call"] == pytest.approx(0.4995)
    assert run["idle_ms_per_call"] == pytest.approx(1.9005)
    assert run["gap_buckets"]["0-5us"] == {"count_per_call": 1.0, "ms_per_call": 0.0005}
    assert run["gap_buckets"]["1000-infus"]["count_per_call"] == 1.0
    longest = run["longest_gaps"][0]
    assert (longest["us"], longest["after"], longest["before"]) == (1900.0, "c", "fusion.d")
    assert longest["host_busy_with"][0].startswith("WhileThunk")


def test_execution_option_parses_one_variant_and_names_bad_settings():
    assert harness.parse_execution("remat=block, scan_blocks=false,microbatches=2") == {
        "remat": "block", "scan_blocks": False, "microbatches": 2}
    assert harness.execution_label({}) == "config"
    for text, problem in (("remat", "expected KEY=VALUE"), ("dtype=bfloat16", "Unknown"),
                          ("remat=dots_saveable", "remat")):
        with pytest.raises(argparse.ArgumentTypeError, match=problem):
            harness.parse_execution(text)


def test_config_option_reads_a_config_file_with_its_argument(tmp_path, monkeypatch):
    config = harness.load_config("configs/hmar_imagenet.py:variant=d30,res=512")
    assert (config.model.preset, config.data.image_size) == ("d30", 512)
    assert harness.absolute_config("configs/hmar_imagenet.py") == "configs/hmar_imagenet.py"
    monkeypatch.chdir(tmp_path)  # a path from elsewhere names the same file for the workers
    assert harness.absolute_config(str(harness.REPO / "configs" / "demo.py") + ":stage=2") == (
        "configs/demo.py:stage=2")
    with pytest.raises(SystemExit, match="no config file"):
        harness.absolute_config("configs/missing.py:variant=d16")
    with pytest.raises(SystemExit, match="required"):
        harness.absolute_config(None)


# ----------------------------------- rows and the results table -----------------------------------

def _train_json(img_s=412.0, status="ok"):
    """train_step.py's JSON as its runner writes it (one row)."""
    row = {"status": status, "mode": "full", "batch": 64, "devices": 1, "variant": "config",
           "config": "configs/hmar_imagenet.py:variant=d16", "model": "d16", "image_size": 256,
           "L": 680, "execution": {"attention": "gpu", "compute_dtype": "bfloat16"},
           "ms_median": 64e3 / img_s, "img_s": img_s, "mfu": img_s * 0.63 / 989,
           "model_tflop_per_step": 64 * 0.63, "process_peak_gib": 21.37, "loss": 8.3}
    if status != "ok":
        row = {k: row[k] for k in ("status", "mode", "batch", "devices", "variant", "config")}
    return {"benchmark": "train_step", "device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu",
            "versions": {"jax": "0.11.2"}, "rows": [row]}


def _official_json(benchmark, status="ok", **values):
    """upstream.py's JSON."""
    return {"benchmark": benchmark, "implementation": "official HMAR (PyTorch)",
            "device": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.9.1"},
            "upstream_commit": "abc123", "settings": {"amp": "bf16"}, "status": status,
            "peak_gib_torch": None, **values}


def _write_rows(directory, monkeypatch):
    """Two realistic row files, made by bench.py's own assembly from both sides' JSON."""
    from benchmarks import bench

    monkeypatch.setattr(bench, "now", lambda: "2026-12-08T10:00:00+00:00")
    directory.mkdir()
    d16 = bench.ROWS["train_d16_b64"]
    ours = bench.ours_side(d16, _train_json())
    official = bench.official_side(d16, _official_json(
        "train", img_per_s=147.0, ms_median=435.4, peak_gib_process=53.1), ours)
    rows = {"train_d16_b64": bench.assemble("train_d16_b64", ours, official)}
    d30 = bench.ROWS["train_d30_b32"]
    ours = bench.ours_side(d30, _train_json(img_s=88.0))
    official = bench.official_side(d30, _official_json(
        "train", status="OOM", error="OutOfMemoryError: CUDA out of memory."), ours)
    rows["train_d30_b32"] = bench.assemble("train_d30_b32", ours, official)
    for name, row in rows.items():
        (directory / f"{name}.json").write_text(json.dumps(row, indent=1))
    (directory / "unrelated.json").write_text("{}")  # not a row file: no "row" key
    return rows


def test_results_table_renders_each_row_from_its_file(tmp_path, monkeypatch):
    from benchmarks import results_table

    rows = _write_rows(tmp_path / "results", monkeypatch)
    assert rows["train_d16_b64"]["official"]["metrics"]["mfu"] == pytest.approx(
        147.0 * 0.63 / 989)  # our FLOP count of the same step, the device's bf16 peak
    text = results_table.render(results_table.load_rows(tmp_path / "results"))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| Row | Ours | Official | Ours better by | Device | Command |"
    assert table[1] == (
        "| [Training step d16, B64, 256 px (L = 680; encode, forward, backward, AdamW, EMA)]"
        "(results/train_d16_b64.json) | 412 img/s; MFU 26%; 21.4 GiB | 147 img/s; MFU 9%; "
        "53.1 GiB | img/s 2.80×; memory 2.48× | NVIDIA H100 80GB HBM3, 2026-12-08 | "
        '`python benchmarks/bench.py --rows train_d16_b64 --upstream "$HMAR_UPSTREAM"` |')
    assert "| 88 img/s; MFU 6%; 21.4 GiB | OOM | - |" in table[2]
    assert results_table.cited_files(text) == ["results/train_d16_b64.json",
                                               "results/train_d30_b32.json"]
    assert results_table.render([]).endswith("No rows yet: `bench.py` has not written any "
                                             "row file.\n")
    (tmp_path / "results" / "train_d30_b32.json").rename(tmp_path / "results" / "other.json")
    with pytest.raises(ValueError, match="named after its row"):
        results_table.load_rows(tmp_path / "results")


def test_bench_writes_a_row_file_from_both_sides_and_refuses_failed_sides(tmp_path, monkeypatch):
    from benchmarks import bench

    sides = {"train_step.py": _train_json(), "upstream.py": _official_json(
        "train", img_per_s=147.0, ms_median=435.4, peak_gib_process=53.1)}
    commands = []

    def run_side(command, out, timeout, env=None):
        commands.append(command)
        return sides[pathlib.Path(command[1]).name]

    monkeypatch.setattr(bench, "run_side", run_side)
    assert bench.main(["--rows", "train_d16_b64", "--upstream", str(tmp_path),
                       "--out", str(tmp_path / "results")]) == 0
    row = json.loads((tmp_path / "results" / "train_d16_b64.json").read_text())
    assert row["ours"]["metrics"] == {"img_per_s": 412.0, "mfu": pytest.approx(0.262, abs=1e-3),
                                      "peak_gib_process": 21.37}
    assert row["ours"]["command"] == ("python benchmarks/train_step.py --config "
                                      "configs/hmar_imagenet.py:variant=d16 --batch 64 "
                                      "--iters 10 --warmup 2")
    assert commands[1][2:6] == ["train", "--upstream", str(tmp_path), "--model"]
    assert row["versions"] == {"ours": {"jax": "0.11.2"}, "official": {"torch": "2.9.1"}}
    sides["upstream.py"] = _official_json("train", status="error", error="ImportError: torch")
    assert bench.main(["--rows", "train_d30_b32", "--upstream", str(tmp_path),
                       "--out", str(tmp_path / "results")]) == 1
    assert not (tmp_path / "results" / "train_d30_b32.json").exists()
    sides["train_step.py"] = dict(_train_json(), platform="cpu")  # JAX without CUDA: refused
    assert bench.main(["--rows", "train_d16_b64", "--upstream", str(tmp_path),
                       "--out", str(tmp_path / "cpu")]) == 1
    assert not (tmp_path / "cpu" / "train_d16_b64.json").exists()
    with pytest.raises(SystemExit):
        bench.main(["--rows", "train_d99", "--upstream", str(tmp_path)])


def _command_json(img_s=402.0, status="ok"):
    """train_command.py's JSON (one row)."""
    row = {"status": status, "config": "configs/hmar_imagenet.py:variant=d16", "batch": 64,
           "devices": 1, "global_batch": 64, "steps": 300, "workers": 16,
           "img_s": img_s, "steps_per_sec": img_s / 64, "steady_from_step": 100,
           "steady_steps": 200, "intervals": [], "log_every_steps": 100,
           "checkpoints": {"every_steps": 2000, "periodic_steps": []},
           "training_command": "python -m hmar_jax.train --config ..."}
    return {"benchmark": "train_command", "device_kind": "NVIDIA H100 80GB HBM3",
            "platform": "gpu", "device_count": 1, "versions": {"jax": "0.11.2"},
            "rows": [row]}


def test_bench_compares_the_training_command_with_the_benchmark_step(tmp_path, monkeypatch):
    from benchmarks import bench, results_table

    monkeypatch.setattr(bench, "now", lambda: "2026-12-08T10:00:00+00:00")
    sides = {"train_command.py": _command_json(), "train_step.py": _train_json()}
    commands = []

    def run_side(command, out, timeout, env=None):
        commands.append(command)
        return sides[pathlib.Path(command[1]).name]

    monkeypatch.setattr(bench, "run_side", run_side)
    assert bench.main(["--rows", "train_command_d16_b64", "--out", str(tmp_path / "r")]) == 0
    assert [pathlib.Path(c[1]).name for c in commands] == ["train_command.py", "train_step.py"]
    assert commands[0][commands[0].index("--timeout") + 1] == str(bench.OURS_TIMEOUT_S - 30)
    assert "--upstream" not in commands[1] and "--time-budget" in commands[1]
    row = json.loads((tmp_path / "r" / "train_command_d16_b64.json").read_text())
    assert row["compared_with"] == "benchmark_step" and "official" not in row
    assert row["ours"]["metrics"] == {"img_per_s": 402.0}
    assert row["ours"]["settings"]["checkpoints"]["every_steps"] == 2000
    assert row["benchmark_step"]["metrics"]["img_per_s"] == 412.0
    assert row["ours"]["command"] == (
        "python benchmarks/train_command.py --config configs/hmar_imagenet.py:variant=d16 "
        "--batch 64 --steps 300 --images 2000 --workers 16")
    assert row["benchmark_step"]["command"].startswith(
        "python benchmarks/train_step.py --config configs/hmar_imagenet.py:variant=d16 --batch 64")
    assert row["command"] == "python benchmarks/bench.py --rows train_command_d16_b64"
    assert set(row["versions"]) == {"ours", "benchmark_step"}

    rows = _write_rows(tmp_path / "results", monkeypatch)  # rows against the official code
    (tmp_path / "results" / "train_command_d16_b64.json").write_text(json.dumps(row))
    text = results_table.render(results_table.load_rows(tmp_path / "results"))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| Row | Ours | Official | Ours better by | Device | Command |"
    assert len(table) == 5 and table[3] == (
        "| Row | Training command | Benchmark step (`train_step.py`) | Command over step | "
        "Device | Command |")
    assert "| 402 img/s | 412 img/s | img/s 0.98× |" in table[4]
    assert set(rows) == {"train_d16_b64", "train_d30_b32"}

    sides["train_step.py"] = _train_json(status="error: boom")
    assert bench.main(["--rows", "train_command_d16_b64", "--out", str(tmp_path / "f")]) == 1
    assert not (tmp_path / "f" / "train_command_d16_b64.json").exists()
    with pytest.raises(SystemExit):  # a row that runs the official code needs --upstream
        bench.main(["--rows", "train_command_d16_b64,train_d16_b64"])


H100_SMI = "NVIDIA H100 80GB HBM3, 81559, 469\n"  # name, memory.total, memory.reserved (MiB)


def test_memory_cap_is_a_fraction_of_the_memory_cuda_reports(monkeypatch):
    from benchmarks import bench

    device = bench.parse_device_memory("0", H100_SMI)
    assert device["total_gib"] == pytest.approx(79.189, abs=1e-3)  # what CUDA shows of 80 GB
    fixed = bench.cap_settings(bench.ROWS["train_d16_b64_40gib"], device, None)
    assert fixed["fraction"] == 0.5051 and fixed["fraction"] * device["total_gib"] <= 40
    assert fixed["environment"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5051"}
    assert (fixed["gib"], fixed["of_peak"], fixed["peak_gib"]) == (40, None, None)
    whole = bench.cap_settings(bench.ROWS["train_d30_b32_80gib"], device, None)
    assert (whole["gib"], whole["fraction"]) == (80, 1.0)  # above the device: all of it
    official = {"status": "ok", "metrics": {"ms_per_batch": 637.0, "peak_gib_process": 68.7}}
    share = bench.cap_settings(bench.ROWS["sample_d16_b64_capped"], device, official)
    assert (share["gib"], share["peak_side"], share["peak_gib"]) == (41.22, "official", 68.7)
    assert share["fraction"] == math.floor(41.22 / device["total_gib"] * 1e4) / 1e4
    assert "no process peak" in bench.cap_settings(bench.ROWS["sample_d16_b64_capped"], device,
                                                   {"status": "OOM"})
    with pytest.raises(ValueError, match="either"):
        bench.MemoryCap()

    # nvidia-smi of the first visible GPU; a driver without memory.reserved gives the total.
    queries = []

    def run(command, **kwargs):
        queries.append(command)
        if "memory.reserved" in command[3]:
            return SimpleNamespace(returncode=2, stdout="", stderr='"memory.reserved" is not '
                                   "a valid field to query.")
        return SimpleNamespace(returncode=0, stdout="NVIDIA A100-SXM4-40GB, 40960\n", stderr="")

    monkeypatch.setattr(bench.shutil, "which", lambda name: "/bin/nvidia-smi")
    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert bench.device_memory() == {"index": "3", "name": "NVIDIA A100-SXM4-40GB",
                                     "total_mib": 40960.0, "reserved_mib": None,
                                     "total_gib": 40.0}
    assert [q[1:3] for q in queries] == [["-i", "3"], ["-i", "3"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "names no GPU" in bench.device_memory()
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert "no nvidia-smi" in bench.device_memory()


def _sample_json(ms=246.3, status="ok", environment=None, limit=None):
    """sample.py's JSON (one row): ``environment`` as its runner records it, ``limit`` its
    worker's allocator limit."""
    row = {"status": status, "mode": "markov_refine", "batch": 64, "variant": "config",
           "config": "configs/hmar_imagenet.py:variant=d16", "model": "d16", "image_size": 256,
           "L": 680, "ms_median": ms, "process_peak_gib": 39.84, "passes": 14}
    if status != "ok":
        row = {k: row[k] for k in ("status", "mode", "batch", "variant", "config")}
    if limit is not None:
        row["allocator_limit_gib"] = limit
    return {"benchmark": "sample", "device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu",
            "versions": {"jax": "0.11.2"}, "environment": environment or {}, "rows": [row]}


def _capped_sides(monkeypatch, sides):
    """Fakes bench's subprocesses: ``sides[script](env)`` is a script's JSON given the
    environment it ran with; returns the (script, env) of every run, in order. The device is
    an H100 80GB."""
    from benchmarks import bench

    monkeypatch.setattr(bench, "now", lambda: "2026-12-08T10:00:00+00:00")
    monkeypatch.setattr(bench, "device_memory",
                        lambda: bench.parse_device_memory("0", H100_SMI))
    runs = []

    def run_side(command, out, timeout, env=None):
        script = pathlib.Path(command[1]).name
        runs.append((script, env))
        return sides[script](env)

    monkeypatch.setattr(bench, "run_side", run_side)
    return runs


def _capped_script(json_of, limit_of_fraction=lambda f: round(f * 79.189, 3)):
    """A script that records the fraction it ran with and the allocator limit it gives."""
    def side(env):
        fraction = (env or {}).get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        recorded = {"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction} if fraction else {}
        return json_of(recorded, limit_of_fraction(float(fraction or 0.75)))
    return side


def test_bench_caps_our_sampling_at_a_share_of_the_official_peak(tmp_path, monkeypatch,
                                                                  capsys):
    from benchmarks import bench, results_table

    official = _official_json("sample", ms_median=637.4, peak_gib_process=68.7)
    sides = {"upstream.py": lambda env: official,
             "sample.py": _capped_script(lambda e, limit: _sample_json(environment=e,
                                                                       limit=limit))}
    runs = _capped_sides(monkeypatch, sides)
    out = tmp_path / "results"
    assert bench.main(["--rows", "sample_d16_b64_capped", "--upstream", str(tmp_path),
                       "--out", str(out)]) == 0
    # The official side first (its peak sets the cap), then ours under the cap.
    assert runs == [("upstream.py", None),
                    ("sample.py", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5205"})]
    row = json.loads((out / "sample_d16_b64_capped.json").read_text())
    cap = row["ours"]["memory_cap"]
    assert (cap["gib"], cap["of_peak"], cap["peak_side"], cap["peak_gib"]) == (
        41.22, 0.6, "official", 68.7)
    assert (cap["fraction"], cap["device_total_gib"]) == (0.5205, 79.189)
    assert cap["nvidia_smi"] == {"index": "0", "name": "NVIDIA H100 80GB HBM3",
                                 "total_mib": 81559.0, "reserved_mib": 469.0}
    assert cap["allocator_limit_gib"] == pytest.approx(41.218, abs=1e-3)
    assert row["ours"]["metrics"] == {"ms_per_batch": 246.3, "peak_gib_process": 39.84}
    assert row["ours"]["command"] == (
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5205 python benchmarks/sample.py --config "
        "configs/hmar_imagenet.py:variant=d16 --batch 64 --iters 5 --warmup 1")
    assert "memory_cap" not in row["official"]
    assert row["title"].endswith("ours capped at 0.6× the official process peak")
    assert row["command"] == ('python benchmarks/bench.py --rows sample_d16_b64_capped '
                              '--upstream "$HMAR_UPSTREAM"')
    table = [line for line in results_table.render(results_table.load_rows(out)).splitlines()
             if line.startswith("| [")]
    assert ("| 246 ms/batch; 39.8 GiB; cap 41.2 GiB (0.6× official peak) | 637 ms/batch; "
            "68.7 GiB | time 2.59×; memory 1.72× |") in table[0]

    # Out of memory under the cap is a result; the cap is still stated.
    sides["sample.py"] = _capped_script(lambda e, limit: _sample_json(
        status="OOM", environment=e, limit=limit))
    assert bench.main(["--rows", "sample_d16_b64_capped", "--upstream", str(tmp_path),
                       "--out", str(out)]) == 0
    text = results_table.render(results_table.load_rows(out))
    assert "| OOM; cap 41.2 GiB (0.6× official peak) | 637 ms/batch; 68.7 GiB | - |" in text

    # No official peak, no cap: ours does not run. An allocator limit that is not the cap
    # (another allocator, say) is no capped run.
    runs.clear()
    sides["upstream.py"] = lambda env: _official_json("sample", status="OOM", error="OOM")
    assert bench.main(["--rows", "sample_d30_b64_capped", "--upstream", str(tmp_path),
                       "--out", str(out)]) == 1
    assert [script for script, _ in runs] == ["upstream.py"]
    assert "official (OOM) measured no process peak" in capsys.readouterr().out
    sides["upstream.py"] = lambda env: official
    sides["sample.py"] = _capped_script(lambda e, limit: _sample_json(environment=e, limit=limit),
                                        limit_of_fraction=lambda f: 59.392)
    assert bench.main(["--rows", "sample_d30_b64_capped", "--upstream", str(tmp_path),
                       "--out", str(out)]) == 1
    assert not (out / "sample_d30_b64_capped.json").exists()
    assert "allocator's limit was 59.39 GiB, not the cap's 41.22 GiB" in capsys.readouterr().out


def test_bench_caps_our_training_step_at_a_card_size(tmp_path, monkeypatch):
    from benchmarks import bench, results_table

    def ours(env, limit):
        result = _train_json()
        result["environment"] = env
        result["rows"][0]["allocator_limit_gib"] = limit
        return result

    official = _official_json("train", img_per_s=147.0, ms_median=435.4, peak_gib_process=53.1)
    runs = _capped_sides(monkeypatch, {"train_step.py": _capped_script(ours),
                                       "upstream.py": lambda env: official})
    out = tmp_path / "results"
    assert bench.main(["--rows", "train_d16_b64_40gib,train_d30_b32_80gib,train_d16_b64",
                       "--upstream", str(tmp_path), "--out", str(out)]) == 0
    # A fixed cap needs no other side: ours first, as in the uncapped rows, which set nothing.
    assert runs == [("train_step.py", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5051"}),
                    ("upstream.py", None),
                    ("train_step.py", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "1.0"}),
                    ("upstream.py", None), ("train_step.py", None), ("upstream.py", None)]
    row = json.loads((out / "train_d16_b64_40gib.json").read_text())
    assert (row["ours"]["memory_cap"]["gib"], row["ours"]["memory_cap"]["fraction"]) == (
        40, 0.5051)
    assert row["ours"]["command"].startswith(
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5051 python benchmarks/train_step.py --config "
        "configs/hmar_imagenet.py:variant=d16 --batch 64")
    assert row["official"]["metrics"]["mfu"] == pytest.approx(147.0 * 0.63 / 989)
    assert "memory_cap" not in json.loads((out / "train_d16_b64.json").read_text())["ours"]
    table = [line for line in results_table.render(results_table.load_rows(out)).splitlines()
             if line.startswith("| [")]
    assert [line.split("](")[1].split(")")[0] for line in table] == [
        "results/train_d16_b64.json", "results/train_d16_b64_40gib.json",
        "results/train_d30_b32_80gib.json"]
    assert "| 412 img/s; MFU 26%; 21.4 GiB | 147 img/s;" in table[0]
    assert "| 412 img/s; MFU 26%; 21.4 GiB; cap 40 GiB | 147 img/s; MFU 9%; 53.1 GiB |" in (
        table[1])
    assert "; cap 80 GiB (the whole device: 79.2 GiB) |" in table[2]


def test_train_command_reads_the_steady_state_from_the_logged_rates():
    from benchmarks import train_command

    lines = ["I1207 15:35:10.56 1 logging_writer.py:48] [100] accuracy=0.1, loss=4.2\n",
             "I1207 15:35:10.59 1 logging_writer.py:48] [100] steps_per_sec=2.5\n",
             "I1207 15:35:10.59 1 logging_writer.py:48] [100] uptime=80.5\n",
             "I1207 15:35:10.78 1 local.py:41] Setting work unit notes: 4.1 steps/s, 50.0%\n",
             "I1207 15:35:10.79 1 logging_writer.py:48] [150] steps_per_sec=5\n",  # 60 s
             "I1207 15:35:10.79 1 logging_writer.py:48] [200] steps_per_sec=4.0\n",
             "I1207 15:35:11.28 1 logging_writer.py:48] [200] ce=4.1, loss=4.125, lr=1e-4\n"]
    reports = train_command.logged_rates(lines)
    assert reports == [(100, 2.5), (150, 5.0), (200, 4.0)]
    assert train_command.last_loss(lines) == 4.125
    state = train_command.steady_state(reports, first_step=1, global_batch=64)
    # Steps 100-200 (the first interval, from step 1, is left out): 50 / 5 + 50 / 4 seconds.
    assert state["steady_from_step"] == 100 and state["steady_steps"] == 100
    assert state["steady_seconds"] == pytest.approx(22.5)
    assert state["img_s"] == pytest.approx(64 * 100 / 22.5)
    assert [i["from_step"] for i in state["intervals"]] == [1, 100, 150]
    assert state["intervals"][0]["seconds"] == pytest.approx(99 / 2.5)
    with pytest.raises(ValueError, match="needs two"):
        train_command.steady_state(reports[:1], first_step=1, global_batch=64)


def test_results_md_is_generated_from_the_committed_row_files():
    from benchmarks import results_table

    text = results_table.TABLE.read_text()
    assert text == results_table.render(results_table.load_rows())
    for cited in results_table.cited_files(text):
        assert (results_table.BENCHMARKS / cited).is_file(), cited


# ------------------------------------- quick CPU modes --------------------------------------------

def _quick(script: str, tmp_path, *flags: str) -> dict:
    out = tmp_path / f"{script}.json"
    subprocess.run([sys.executable, str(harness.REPO / "benchmarks" / f"{script}.py"),
                    "--quick", "--out", str(out), *flags],
                   cwd=tmp_path, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_step_quick_mode_runs_the_config_with_an_execution_variant(tmp_path):
    from benchmarks import bench

    result = _quick("train_step", tmp_path, "--config",
                    str(harness.REPO / "configs" / "hmar_imagenet.py") + ":runlocal",
                    "--iters", "1", "--warmup", "0", "--execution", "remat=block,microbatches=2")
    (row,) = result["rows"]
    assert (row["mode"], row["status"], row["config"]) == (
        "full", "ok", "configs/hmar_imagenet.py:runlocal")
    assert row["execution"] == dict(row["execution"], remat="block", microbatches=2,
                                    platform="cpu", attention="xla", compute_dtype="float32")
    assert row["img_s"] > 0 and row["loss"] > 0
    side = bench.ours_side(bench.ROWS["train_d16_b64"], result)
    assert side["status"] == "ok" and side["metrics"]["img_per_s"] == row["img_s"]


@pytest.mark.slow
def test_train_command_quick_mode_trains_from_a_jpeg_folder_and_reads_its_log(tmp_path):
    from benchmarks import bench

    result = _quick("train_command", tmp_path)
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["img_s"] > 0 and row["steps_per_sec"] > 0
    assert row["img_s"] == pytest.approx(row["steps_per_sec"] * row["global_batch"])
    assert row["global_batch"] == 2 * result["device_count"] and row["steps"] == 12
    assert (row["steady_from_step"], row["steady_steps"]) == (2, 10)  # runlocal logs every 2
    assert len(row["intervals"]) == 6 and row["loss"] > 0
    assert row["image_folder"]["images"] == 24 and row["image_folder"]["mean_kib"] > 30
    assert row["checkpoints"]["periodic_steps"] == [5, 10]
    assert row["training_command"].startswith(
        "python -m hmar_jax.train --config configs/hmar_imagenet.py:runlocal --workdir "
        "<tmp>/workdir --config.data.name=image_folder --config.data.root=<tmp>/images ")
    assert result["versions"]["jax"] and result["device_kind"]
    side = bench.ours_side(bench.ROWS["train_command_d16_b64"], result)
    assert side["status"] == "ok" and side["metrics"]["img_per_s"] == row["img_s"]


@pytest.mark.slow
def test_sample_quick_mode_runs_the_config_resolved_for_inference(tmp_path):
    from benchmarks import bench

    result = _quick("sample", tmp_path, "--config",
                    str(harness.REPO / "configs" / "hmar_imagenet.py"),
                    "--iters", "1", "--warmup", "0")
    (row,) = result["rows"]
    assert (row["mode"], row["status"], row["variant"]) == ("markov_refine", "ok", "config")
    assert row["execution"]["platform"] == "cpu" and row["execution"]["scan_blocks"] is True
    assert row["passes"] == 8 and row["sampling"]["top_k"] == 1000  # the hmar-d16 preset
    side = bench.ours_side(bench.ROWS["sample_d16_b64"], result)
    assert side["metrics"]["ms_per_batch"] == row["ms_median"]


@pytest.mark.slow
def test_attention_quick_mode_checks_the_kernel_against_the_reference(tmp_path):
    from benchmarks import bench

    result = _quick("attention", tmp_path)
    pallas = [r for r in result["rows"] if r["impl"] == "pallas"]
    assert len(pallas) == 1 and pallas[0]["err_out"] < 1e-5 and pallas[0]["fwd_bwd_ms"] > 0
    # The rates follow from the mask's allowed pairs (block-diagonal at 256 px: the sum of
    # the squared scale sizes) and the traffic floor.
    row = pallas[0]
    pairs = sum(n ** 4 for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    flop = 4 * row["B"] * row["H"] * pairs * 64
    assert row["tflops_fwd"] == pytest.approx(flop / (row["fwd_ms"] * 1e9))
    assert row["tflops_fwd_bwd"] == pytest.approx(3.5 * flop / (row["fwd_bwd_ms"] * 1e9))
    assert row["hbm_fraction_fwd"] == pytest.approx(row["floor_fwd_ms"] / row["fwd_ms"])
    side = bench.ours_side(bench.ROWS["attention_l680_diagonal"], result)
    assert side["status"] == "ok" and side["metrics"]["fwd_ms"] == pallas[0]["fwd_ms"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["adaln", "bias_gelu", "group_norm", "qkv_prologue"])
def test_kernel_benchmark_quick_mode_times_the_kernel_and_the_reference(tmp_path, script):
    result = _quick(script, tmp_path)
    variants = {row["variant"] for row in result["rows"]}
    assert any(v.startswith("pallas") for v in variants) and variants - {
        v for v in variants if v.startswith("pallas")}
    assert all(row["ms_median"] > 0 for row in result["rows"])
    assert result["device_kind"] and result["versions"]["jax"]
