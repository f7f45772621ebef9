"""The digit-sample check: real digits pass it, noise and copies do not."""

import numpy as np

from hmar_jax import data
from hmar_jax.evaluate import digits


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
