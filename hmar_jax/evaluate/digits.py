"""Are generated digits recognisable and varied? A check trained only on real digits.

A support-vector classifier (RBF kernel) is fitted on the embedded real digits (at the sample
resolution) and labels the samples; accuracy against the requested classes measures
recognisability. Variety is measured per class as the mean pairwise distance between
samples relative to the same quantity for real digits of that class, and copying as the
fraction of samples that are near-duplicates of another sample of their class.

Dimension letters: N samples, S image side.
"""

from __future__ import annotations

import functools

import numpy as np

from hmar_jax import data


def _features(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` -> float ``[N, S*S]`` (grey, in [0, 1])."""
    return images[..., 0].reshape(len(images), -1).astype(np.float64) / 255.0


@functools.lru_cache(maxsize=4)
def real_digit_classifier(image_size: int):
    """RBF support-vector classifier on the first 1,600 real digits; returns
    (model, accuracy on the 197 held-out real digits)."""
    from sklearn.svm import SVC  # local: slow import

    train_images, train_labels = data.digits_split(image_size, "train")
    eval_images, eval_labels = data.digits_split(image_size, "eval")
    model = SVC(C=10.0, gamma="scale").fit(_features(train_images), train_labels)
    held_out = float((model.predict(_features(eval_images)) == eval_labels).mean())
    return model, held_out


def _mean_pairwise_distance(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return float(d[np.triu_indices(len(x), 1)].mean())


def evaluate_samples(images: np.ndarray, labels: np.ndarray, duplicate_threshold: float = 0.05
                     ) -> dict:
    """Recognisability and variety of digit samples.

    Args:
      images: uint8 ``[N, S, S, 3]`` samples.
      labels: int ``[N]`` requested classes.
      duplicate_threshold: per-pixel RMS distance below which two samples count as copies.

    Returns:
      accuracy (overall and per class), the classifier's accuracy on held-out real digits,
      per-class variety relative to real digits, and the near-duplicate fraction.
    """
    classifier, real_accuracy = real_digit_classifier(images.shape[1])
    feats = _features(images)
    predicted = classifier.predict(feats)
    real_images, real_labels = data.digits_split(images.shape[1], "all")
    real = _features(real_images)
    per_class, variety, duplicates = {}, {}, 0
    for c in np.unique(labels):
        ours = feats[labels == c]
        per_class[int(c)] = float((predicted[labels == c] == c).mean())
        reference = _mean_pairwise_distance(real[real_labels == c][:len(ours)])
        variety[int(c)] = _mean_pairwise_distance(ours) / max(reference, 1e-9)
        rms = np.sqrt(((ours[:, None] - ours[None]) ** 2).mean(-1))
        np.fill_diagonal(rms, np.inf)
        duplicates += int((rms.min(axis=1) < duplicate_threshold).sum())
    return {"accuracy": float((predicted == labels).mean()), "accuracy_per_class": per_class,
            "classifier_accuracy_on_real_held_out": real_accuracy,
            "variety_vs_real_per_class": variety,
            "variety_vs_real_mean": float(np.mean(list(variety.values()))),
            "near_duplicate_fraction": duplicates / len(labels), "num_samples": int(len(labels))}
