"""Are generated digits recognisable and varied? A check trained only on real digits.

A support-vector classifier (RBF kernel) is fitted on the embedded real digits (at the sample
resolution) and labels the samples; accuracy against the requested classes measures
recognisability. Variety is measured per class as the mean pairwise distance between
samples relative to the same quantity for real digits of that class, and copying as the
fraction of samples that are near-duplicates of another sample of their class.

A Fréchet distance plays FID's role at digit scale: the features are the 64 hidden ReLU
units of a small MLP classifier fitted on the real training digits only (fixed seed), and
the distance compares the Gaussian fits of the samples' features and of the real training
digits' features. The same distance between the training digits and the 197 held-out real
digits is reported as the floor to read it against. Like FID it is biased upwards for few
samples, so compare runs at equal sample counts.

Dimension letters: N samples, S image side, F feature width (64).
"""

from __future__ import annotations

import functools

import numpy as np

from hmar_jax.training import data
from hmar_jax.evaluate.metrics import feature_statistics, frechet_distance

FEATURE_WIDTH = 64


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


@functools.lru_cache(maxsize=4)
def real_digit_features(image_size: int):
    """MLP (one hidden layer of F ReLU units) fitted on the first 1,600 real digits.

    Returns:
      (model, (mu [F], sigma [F, F]) of the training digits' features, the Fréchet
      distance of the 197 held-out real digits to them).
    """
    from sklearn.neural_network import MLPClassifier  # local: slow import
    from threadpoolctl import threadpool_limits

    train_images, train_labels = data.digits_split(image_size, "train")
    eval_images, _ = data.digits_split(image_size, "eval")
    # Small matrices: one BLAS thread is as fast, and immune to stalls on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        model = MLPClassifier(hidden_layer_sizes=(FEATURE_WIDTH,), solver="lbfgs", alpha=1e-2,
                              max_iter=200, random_state=0)
        model.fit(_features(train_images), train_labels)
    reference = feature_statistics(digit_features(model, train_images))
    held_out = frechet_distance(*feature_statistics(digit_features(model, eval_images)), *reference)
    return model, reference, held_out


def digit_features(model, images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` -> float64 ``[N, F]``: the MLP's hidden ReLU activations."""
    hidden = _features(images) @ model.coefs_[0] + model.intercepts_[0]
    return np.maximum(hidden, 0.0)


def frechet_distance_to_real(images: np.ndarray) -> tuple[float, float]:
    """(Fréchet distance of ``images`` to the real training digits, held-out floor)."""
    if len(images) < 2:
        raise ValueError(f"A Fréchet distance needs at least 2 images; got {len(images)}.")
    model, (mu, sigma), floor = real_digit_features(images.shape[1])
    distance = frechet_distance(*feature_statistics(digit_features(model, images)), mu, sigma)
    return distance, floor


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
      per-class variety relative to real digits, the near-duplicate fraction, and the
      Fréchet distance to real digits (``frechet_distance``, None for fewer than 2
      samples) with its real-vs-real floor (``frechet_distance_real_held_out``).
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
    if len(images) >= 2:
        distance, floor = frechet_distance_to_real(images)
    else:  # a covariance needs two samples
        distance, floor = None, real_digit_features(images.shape[1])[2]
    return {"accuracy": float((predicted == labels).mean()), "accuracy_per_class": per_class,
            "classifier_accuracy_on_real_held_out": real_accuracy,
            "variety_vs_real_per_class": variety,
            "variety_vs_real_mean": float(np.mean(list(variety.values()))),
            "near_duplicate_fraction": duplicates / len(labels), "num_samples": int(len(labels)),
            "frechet_distance": distance, "frechet_distance_real_held_out": floor}
