"""Chunked, resumable sample-batch generation with a fake deterministic generator: packing
layout, resume after a crash (bit-identical), the multi-process split, and errors."""

import json

import numpy as np
import pytest

from hmar_jax.evaluate import generation, metrics
from hmar_jax.evaluate.__main__ import main as evaluate_main
from tiny_runs import tiny_bundle

RUN = {"checkpoint": "ckpt", "preset": "hmar-d16", "seed": 0}


def fake_generate(labels, sample_index):
    """uint8 [n, 4, 5, 3], a function of (class, index) only, like the real sampler."""
    pixels = np.arange(4 * 5 * 3).reshape(1, 4, 5, 3)
    return ((labels[:, None, None, None] * 37 + sample_index[:, None, None, None] * 11 + pixels)
            % 256).astype(np.uint8)


class Crash(Exception):
    pass


def counting(fn, crash_after=None):
    calls = []

    def wrapped(labels, sample_index):
        if crash_after is not None and len(calls) == crash_after:
            raise Crash("simulated preemption")
        calls.append(labels.copy())
        return fn(labels, sample_index)

    return wrapped, calls


def read(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_packed_layout_is_class_major_arr_0_and_labels(tmp_path):
    plan = generation.GenerationPlan(num_classes=3, per_class=5, chunk_size=4)
    assert plan.num_samples == 15 and plan.num_chunks == 4
    out = generation.generate_npz(fake_generate, plan, tmp_path / "samples.npz", run_info=RUN)
    packed = read(out)
    assert sorted(packed) == ["arr_0", "labels"]
    assert packed["arr_0"].dtype == np.uint8 and packed["arr_0"].shape == (15, 4, 5, 3)
    np.testing.assert_array_equal(packed["labels"], np.repeat(np.arange(3), 5))
    index = np.tile(np.arange(5), 3)
    np.testing.assert_array_equal(packed["arr_0"], fake_generate(packed["labels"], index))
    assert not generation.parts_dir(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temporary files left
    with metrics.open_npz_array(out, "arr_0") as reader:  # what the metrics command reads
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(6))), packed["arr_0"])


def test_resume_after_crash_is_bit_identical_and_skips_finished_chunks(tmp_path):
    plan = generation.GenerationPlan(num_classes=4, per_class=3, chunk_size=5)  # chunks 5, 5, 2
    reference = read(generation.generate_npz(fake_generate, plan, tmp_path / "ref.npz",
                                             run_info=RUN))
    out = tmp_path / "run" / "samples.npz"
    crashing, _ = counting(fake_generate, crash_after=2)
    with pytest.raises(Crash):
        generation.generate_npz(crashing, plan, out, run_info=RUN)
    parts = generation.parts_dir(out)
    assert sorted(p.name for p in parts.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz",
                                                       "run.json"]
    assert not out.exists()
    resumed, calls = counting(fake_generate)
    generation.generate_npz(resumed, plan, out, run_info=RUN)
    assert len(calls) == 1 and list(calls[0]) == [3, 3]  # only the last chunk was generated
    packed = read(out)
    for key in ("arr_0", "labels"):
        assert packed[key].tobytes() == reference[key].tobytes() and \
            packed[key].dtype == reference[key].dtype
    assert not parts.exists()


def test_processes_split_chunks_and_process_zero_packs(tmp_path):
    plan = generation.GenerationPlan(num_classes=3, per_class=4, chunk_size=3)  # 4 chunks
    out = tmp_path / "samples.npz"
    with pytest.raises(FileNotFoundError, match=r"2 of 4 chunks are missing .*ids 1, 3"):
        generation.generate_npz(fake_generate, plan, out, run_info=RUN, process_index=0,
                                process_count=2)
    second, calls = counting(fake_generate)
    assert generation.generate_npz(second, plan, out, run_info=RUN, process_index=1,
                                   process_count=2) is None
    assert [list(c) for c in calls] == [[0, 1, 1], [2, 2, 2]]  # chunks 1 and 3
    first, calls = counting(fake_generate)
    generation.generate_npz(first, plan, out, run_info=RUN, process_index=0, process_count=2)
    assert calls == []  # its chunks were already written before the failed pack
    single = read(generation.generate_npz(fake_generate, plan, tmp_path / "single.npz",
                                          run_info=RUN))
    np.testing.assert_array_equal(read(out)["arr_0"], single["arr_0"])


def test_barrier_runs_before_packing(tmp_path):
    events = []
    plan = generation.GenerationPlan(num_classes=2, per_class=2, chunk_size=2)

    def generate(labels, index):
        events.append("chunk")
        return fake_generate(labels, index)

    generation.generate_npz(generate, plan, tmp_path / "s.npz", run_info=RUN,
                            barrier=lambda: events.append("barrier"))
    assert events == ["chunk", "chunk", "barrier"]


def test_errors_name_the_problem_and_the_fix(tmp_path):
    plan = generation.GenerationPlan(num_classes=2, per_class=3, chunk_size=2)
    out = tmp_path / "samples.npz"
    crashing, _ = counting(fake_generate, crash_after=1)
    with pytest.raises(Crash):
        generation.generate_npz(crashing, plan, out, run_info=RUN)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\).*delete that directory"):
        generation.generate_npz(fake_generate, plan, out, run_info=dict(RUN, seed=1))
    assert json.loads((generation.parts_dir(out) / "run.json").read_text())["seed"] == 0

    with pytest.raises(ValueError, match=r"returned float32 \(2, 4, 4, 3\) for chunk 0 .*uint8"):
        generation.generate_npz(lambda l, i: np.zeros((2, 4, 4, 3), np.float32), plan,
                                tmp_path / "other.npz", run_info=RUN)
    with pytest.raises(ValueError, match="--per-class must be a positive integer, got 0"):
        generation.GenerationPlan(num_classes=10, per_class=0, chunk_size=5)
    out.write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists .*samples.npz.parts.*delete"):
        generation.generate_npz(fake_generate, plan, out, run_info=RUN)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "no-such-preset", "--per-class", "50"], "Unknown --preset 'no-such-preset'"),
    (["--preset", "default", "--per-class", "0"], "--per-class 0 is out of range; give an integer in 1..2147483647"),
])
def test_generate_cli_rejects_bad_arguments_before_loading(tmp_path, capsys, argv, message):
    code = evaluate_main(["generate", "--checkpoint", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "s.npz"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    if "preset" in message:
        assert "hmar-d16" in err and "'default'" in err  # the valid names are listed


@pytest.mark.slow
def test_generate_cli_end_to_end_with_a_tiny_bundle(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "samples.npz"
    assert evaluate_main(["generate", "--checkpoint", str(bundle), "--preset", "default",
                          "--per-class", "2", "--chunk", "20", "--batch-size", "8",
                          "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    packed = read(out)
    assert packed["arr_0"].shape == (20, 8, 8, 3) and packed["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(packed["labels"], np.repeat(np.arange(10), 2))
    assert len({packed["arr_0"][i].tobytes() for i in range(20)}) == 20  # every sample differs
    assert not generation.parts_dir(out).exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "other samples"])
def test_an_unusable_chunk_is_reported_and_generated_again(tmp_path, caplog, damage):
    plan = generation.GenerationPlan(num_classes=3, per_class=2, chunk_size=2)  # 3 chunks
    reference = read(generation.generate_npz(fake_generate, plan, tmp_path / "ref.npz",
                                             run_info=RUN))
    out = tmp_path / "samples.npz"
    crashing, _ = counting(fake_generate, crash_after=2)
    with pytest.raises(Crash):
        generation.generate_npz(crashing, plan, out, run_info=RUN)
    chunk = generation.chunk_path(out, 1)
    if damage == "empty":
        chunk.write_bytes(b"")
    elif damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:200])
    else:  # chunk 0's samples under chunk 1's name
        chunk.write_bytes(generation.chunk_path(out, 0).read_bytes())
    resumed, calls = counting(fake_generate)
    generation.generate_npz(resumed, plan, out, run_info=RUN)
    assert [list(c) for c in calls] == [[1, 1], [2, 2]]  # chunk 1 again, then chunk 2
    assert f"{chunk} cannot be used" in caplog.text and "generating chunk 1 again" in caplog.text
    packed = read(out)
    for key in ("arr_0", "labels"):
        np.testing.assert_array_equal(packed[key], reference[key])


def test_packing_refuses_an_unreadable_chunk_by_name(tmp_path):
    plan = generation.GenerationPlan(num_classes=2, per_class=2, chunk_size=2)
    out = tmp_path / "samples.npz"
    generation.generate_parts(fake_generate, plan, out, run_info=RUN)
    generation.chunk_path(out, 1).write_bytes(b"")  # e.g. another process's chunk, lost
    with pytest.raises(ValueError, match=r"chunk-000001.npz is unreadable .*delete it and rerun"):
        generation.pack_parts(plan, out)
    assert not out.exists()
