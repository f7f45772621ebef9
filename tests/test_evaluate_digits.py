"""The digit-sample check: real digits pass it, noise and copies do not (accuracy,
variety, duplicates, and the Fréchet distance in a real-digit classifier's features)."""

import json

import numpy as np
import pytest

from hmar_jax.training import data
from hmar_jax.evaluate import digits
from hmar_jax.evaluate.__main__ import main as evaluate_main


def test_real_digits_score_high_and_noise_scores_low():
    images, labels = data.digits_split(16, "eval")
    real = digits.evaluate_samples(images, labels)
    assert real["classifier_accuracy_on_real_held_out"] > 0.9
    assert real["accuracy"] == real["classifier_accuracy_on_real_held_out"]
    assert 0.5 < real["variety_vs_real_mean"] < 2.0 and real["near_duplicate_fraction"] == 0.0
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, images.shape, dtype=np.uint8)
    assert digits.evaluate_samples(noise, labels)["accuracy"] < 0.3


def test_copies_of_one_image_per_class_are_flagged():
    images, labels = data.digits_split(16, "train")
    copies = np.concatenate([np.repeat(images[labels == c][:1], 10, axis=0) for c in range(10)])
    report = digits.evaluate_samples(copies, np.repeat(np.arange(10), 10))
    assert report["near_duplicate_fraction"] == 1.0 and report["variety_vs_real_mean"] == 0.0


def test_frechet_distance_is_small_for_real_digits_and_large_for_noise():
    images, labels = data.digits_split(16, "eval")
    real = digits.evaluate_samples(images, labels)
    floor = real["frechet_distance_real_held_out"]
    # The held-out real digits are exactly the set the floor is computed from.
    assert real["frechet_distance"] == pytest.approx(floor) and 0 < floor < 30
    train_images, train_labels = data.digits_split(16, "train")
    few = np.concatenate([train_images[train_labels == c][:10] for c in range(10)])
    assert digits.frechet_distance_to_real(few)[0] < 2 * floor
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, images.shape, dtype=np.uint8)
    assert digits.evaluate_samples(noise, labels)["frechet_distance"] > 10 * floor
    copies = np.concatenate([np.repeat(train_images[train_labels == c][:1], 10, axis=0)
                             for c in range(10)])
    assert digits.frechet_distance_to_real(copies)[0] > 2.5 * floor


def test_digits_cli_reads_trainer_and_openai_layouts(tmp_path, capsys):
    images, labels = data.digits_split(16, "eval")
    np.savez(tmp_path / "trainer.npz", images=images, labels=labels)
    np.savez(tmp_path / "openai.npz", arr_0=images, labels=labels)
    for name in ("trainer.npz", "openai.npz"):
        assert evaluate_main(["digits", "--samples", str(tmp_path / name),
                              "--out", str(tmp_path / "report.json")]) == 0
        out = capsys.readouterr().out
        assert "Accuracy: 0.9" in out and "Fréchet distance:" in out, out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frechet_distance"] == pytest.approx(report["frechet_distance_real_held_out"])
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    assert evaluate_main(["digits", "--samples", str(tmp_path / "unlabelled.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected 'images' (or 'arr_0') and 'labels'" in err, err


def test_digits_cli_reports_files_that_are_not_npz_archives_in_one_line(tmp_path, capsys):
    images, labels = data.digits_split(16, "eval")
    np.save(tmp_path / "samples.npy", images)
    (tmp_path / "samples.npy").rename(tmp_path / "renamed.npz")
    np.savez(tmp_path / "whole.npz", images=images, labels=labels)
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "float_labels.npz", images=images, labels=labels.astype(np.float32))
    for name, message in [("renamed.npz", "renamed.npz is not a readable .npz archive"),
                          ("truncated.npz", "truncated.npz is not a readable .npz archive"),
                          ("empty.npz", "empty.npz is not a readable .npz archive"),
                          ("float_labels.npz", "labels float32 (197,); expected uint8 "
                                               "[N, S, S, 3] and integer [N]")]:
        assert evaluate_main(["digits", "--samples", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
