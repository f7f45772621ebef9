"""Two settings of ``train_step.py`` in alternating runs on one GPU: A, B, A, B, ...

The H200 runs the training step at its 700 W power limit, and two chips of the same kind
held different clocks under it (2-3% apart, ``benchmarks/README.md``). A
change worth 1% is therefore only visible against its baseline on the same chip, with
the two interleaved so that drifts in clock or temperature hit both. Each run is a fresh
``train_step.py`` process (its own compile, ``--iters`` timed steps); the table gives
every run's median, min and back-to-back ms with the SM clock while it was timed, then
per setting the median of the run medians and the pooled median of all steps, and B's
difference to A.

The ``--execution`` settings of ``--common`` and of a setting make that setting's one
execution variant (the setting's keys win), so each run has exactly one row:

  python benchmarks/ab_pairs.py --pairs 2 --out ab.json \\
      --common "--pairs d16x64 --modes full --execution moment_dtype=bfloat16 --iters 25" \\
      --a "--execution remat=dots_attention_saveable" --b "--execution remat=activations_saveable"
  python benchmarks/ab_pairs.py --quick --out /tmp/ab_quick.json   # CPU smoke run

The per-run ``--run-timeout`` must cover the compile (about 50-60 s for d16 and d30 on an
H200) and the timed steps; a run that fails or times out is recorded as such, not retried.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK_COMMON = "--quick --pairs tinyx2 --modes full --iters 3 --warmup 1"
QUICK_SETTINGS = ("--execution remat=none", "--execution remat=block")


def setting_flags(common: str, setting: str) -> list[str]:
    """``train_step.py`` flags of one setting: ``common``'s, then ``setting``'s, with the
    ``--execution`` values of both joined into one variant (``setting``'s keys win)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--execution", action="append", default=[])
    shared, shared_rest = parser.parse_known_args(shlex.split(common))
    own, own_rest = parser.parse_known_args(shlex.split(setting))
    execution = ",".join(shared.execution + own.execution)
    return [*shared_rest, *own_rest, *(["--execution", execution] if execution else [])]


def run_once(flags: list[str], out: pathlib.Path, timeout: float) -> dict:
    """One ``train_step.py`` process; its first row, or ``{"status": ...}`` on failure."""
    command = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), *flags,
               "--out", str(out)]
    start = time.perf_counter()
    # Its own process group: train_step.py runs each configuration in a worker process,
    # which must not outlive a timeout and hold the GPU during the next run.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"status": f"timed out after {timeout:.0f} s"}
    wall_s = time.perf_counter() - start
    if process.returncode != 0 or not out.exists():
        return {"status": f"exit {process.returncode}: {stderr.strip()[-300:]}"}
    rows = json.loads(out.read_text())["rows"]
    row = dict(rows[0]) if rows else {"status": "no rows"}
    row["process_wall_s"] = round(wall_s, 1)
    return row


def _clock(row: dict) -> float | None:
    """The first GPU's median SM clock while the run was timed (None off a GPU)."""
    for entry in (row.get("gpu_during_timing") or {}).values():
        return entry.get("sm_mhz_median")
    return None


def summarize(runs: list[dict]) -> dict:
    """Per setting (``a``, ``b``): run medians, their median, the pooled median of every
    timed step, back-to-back medians; and B relative to A."""
    summary = {}
    for name in ("a", "b"):
        ok = [r for r in runs if r["setting"] == name and r["row"].get("status") == "ok"]
        if not ok:
            summary[name] = {"runs_ok": 0}
            continue
        medians = [r["row"]["ms_median"] for r in ok]
        pooled = [t for r in ok for t in r["row"]["ms_all"]]
        back_to_back = [r["row"]["ms_back_to_back"] for r in ok if "ms_back_to_back" in r["row"]]
        summary[name] = {"runs_ok": len(ok), "ms_run_medians": medians,
                         "ms_median_of_runs": statistics.median(medians),
                         "ms_pooled_median": statistics.median(pooled),
                         "ms_back_to_back_median": (statistics.median(back_to_back)
                                                    if back_to_back else None)}
    if summary["a"].get("runs_ok") and summary["b"].get("runs_ok"):
        a, b = summary["a"]["ms_pooled_median"], summary["b"]["ms_pooled_median"]
        summary["b_minus_a_ms"] = b - a
        summary["b_over_a"] = b / a
    return summary


def format_table(runs: list[dict], summary: dict) -> str:
    lines = [f"{'run':>4} {'set':>3} {'ms med':>8} {'ms min':>8} {'b2b ms':>8} "
             f"{'SM MHz':>7} {'GiB':>6}  status"]
    for i, run in enumerate(runs):
        row = run["row"]
        if row.get("status") != "ok":
            lines.append(f"{i:>4} {run['setting']:>3}  {row.get('status')}")
            continue
        clock = _clock(row)
        lines.append(f"{i:>4} {run['setting']:>3} {row['ms_median']:8.1f} {row['ms_min']:8.1f} "
                     f"{row.get('ms_back_to_back', float('nan')):8.1f} "
                     f"{clock if clock is not None else float('nan'):7.0f} "
                     f"{row.get('peak_gib') or float('nan'):6.2f}  ok")
    for name in ("a", "b"):
        s = summary[name]
        if s.get("runs_ok"):
            lines.append(f"{name}: median of runs {s['ms_median_of_runs']:.1f} ms, pooled median "
                         f"{s['ms_pooled_median']:.1f} ms over {s['runs_ok']} runs")
        else:
            lines.append(f"{name}: no successful run")
    if "b_over_a" in summary:
        lines.append(f"b - a: {summary['b_minus_a_ms']:+.1f} ms ({summary['b_over_a'] - 1:+.2%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--common", default="", help="train_step.py flags of both settings")
    parser.add_argument("--a", default="", help="train_step.py flags of setting A (baseline)")
    parser.add_argument("--b", default="", help="train_step.py flags of setting B")
    parser.add_argument("--pairs", type=int, default=2, help="A, B pairs to run")
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds per train_step.py process (compile included)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU smoke run: --common '{QUICK_COMMON}', A/B = "
                             f"'{QUICK_SETTINGS[0]}' / '{QUICK_SETTINGS[1]}'")
    parser.add_argument("--out", default=None, help="JSON with every run's row and the summary")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    common, a, b = args.common, args.a, args.b
    if args.quick:
        common, (a, b) = QUICK_COMMON, QUICK_SETTINGS
    if "--out" in shlex.split(common + " " + a + " " + b):
        parser.error("--out is set by ab_pairs.py; leave it out of --common, --a and --b")
    settings = {"a": setting_flags(common, a), "b": setting_flags(common, b)}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            for name in ("a", "b"):
                row = run_once(settings[name], pathlib.Path(scratch) / f"{name}{pair}.json",
                               args.run_timeout)
                runs.append({"setting": name, "pair": pair, "row": row})
                print(f"pair {pair} {name}: {row.get('status')} "
                      f"{row.get('ms_median', float('nan')):.1f} ms", flush=True)
    summary = summarize(runs)
    print(format_table(runs, summary))
    result = {"benchmark": "ab_pairs", "common": common, "a": a, "b": b, "pairs": args.pairs,
              "date": time.strftime("%Y-%m-%d"), "runs": runs, "summary": summary}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
