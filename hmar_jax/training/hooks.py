"""Evaluation hooks: what a finished training run writes about its model, beside the export.

The trainer trains and exports; everything that judges the result is a hook, built from the
config by ``end_of_training_hooks`` and called in order on the main process once the EMA
model is exported. A hook takes the ``FinishedRun`` and may leave results on it for the
hooks after it (``SampleGrid`` leaves its samples, which ``DigitsScore`` scores); its
``describe(workdir)`` says in one line where its results are (``python -m hmar_jax.train``
prints these lines at the end).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging

from hmar_jax import sampling
from hmar_jax.sampling import visualize


@dataclasses.dataclass
class FinishedRun:
    """The exported model of a run, its tokenizer and workdir; ``samples`` is set by
    ``SampleGrid``: ``(uint8 images [N, H, W, 3], int32 labels [N])``."""

    model: Any
    tokenizer: Any
    workdir: pathlib.Path
    samples: tuple[np.ndarray, np.ndarray] | None = None


class Hook(Protocol):
    """Called once with the finished run; ``describe`` afterwards names what it wrote."""

    def __call__(self, run: FinishedRun) -> None: ...

    def describe(self, workdir: str | pathlib.Path) -> str: ...


SAMPLES_PNG, SAMPLES_NPZ, SCORES_JSON = "samples.png", "samples.npz", "samples_eval.json"


@dataclasses.dataclass(frozen=True)
class SampleGrid:
    """Draws ``samples_per_class`` samples of every class: ``samples.npz`` (uint8 images and
    labels) and ``samples.png`` (a row per class, its first 10 samples, 4x upscaled)."""

    samples_per_class: int
    config: sampling.SamplingConfig
    seed: int
    chunk: int = 100
    shown_per_class: int = 10

    def __call__(self, run: FinishedRun) -> None:
        per_class, classes = self.samples_per_class, run.model.config.num_classes
        labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
        index = np.tile(np.arange(per_class, dtype=np.int32), classes)
        images = sampling.generate_batches(run.model, run.tokenizer, labels, index,
                                           seed=self.seed, config=self.config,
                                           batch_size=self.chunk)  # [N, H, W, 3]
        shown = min(per_class, self.shown_per_class)
        rows = [images[c * per_class:c * per_class + shown] for c in range(classes)]
        visualize.save_grid(run.workdir / SAMPLES_PNG, rows, upscale=4)
        np.savez(run.workdir / SAMPLES_NPZ, images=images, labels=labels)
        run.samples = (images, labels)

    def describe(self, workdir: str | pathlib.Path) -> str:
        shown = min(self.samples_per_class, self.shown_per_class)
        return (f"samples: {pathlib.Path(workdir) / SAMPLES_PNG} (a row of {shown} per class; "
                f"all {self.samples_per_class} per class in {SAMPLES_NPZ})")


@dataclasses.dataclass(frozen=True)
class DigitsScore:
    """Scores ``SampleGrid``'s samples of the embedded digits with the digits classifier and
    its feature space (``hmar_jax.evaluate.digits``): ``samples_eval.json`` and a log line."""

    def __call__(self, run: FinishedRun) -> None:
        from hmar_jax.evaluate import digits  # local: pulls in scikit-learn

        if run.samples is None:
            raise ValueError("DigitsScore scores the samples of a SampleGrid run before it.")
        report = digits.evaluate_samples(*run.samples)
        (run.workdir / SCORES_JSON).write_text(json.dumps(report, indent=2))
        logging.info("Samples: %.1f%% classified as their class (classifier on real digits: "
                     "%.1f%% held-out), Frechet distance %.1f in its feature space (real "
                     "held-out digits: %.1f), variety %.2f of real digits, %.1f%% "
                     "near-duplicates.", 100 * report["accuracy"],
                     100 * report["classifier_accuracy_on_real_held_out"],
                     report["frechet_distance"], report["frechet_distance_real_held_out"],
                     report["variety_vs_real_mean"], 100 * report["near_duplicate_fraction"])

    def describe(self, workdir: str | pathlib.Path) -> str:
        path = pathlib.Path(workdir) / SCORES_JSON
        report = json.loads(path.read_text())
        distance = report["frechet_distance"]
        distance = "none (one sample)" if distance is None else f"{distance:.2f}"
        return (f"scores:  {path}: {report['accuracy']:.1%} of {report['num_samples']} samples "
                f"classified as their class, Frechet distance {distance} (real held-out "
                f"digits: {report['frechet_distance_real_held_out']:.2f})")


def end_of_training_hooks(config: ml_collections.ConfigDict,
                          sampling_config: sampling.SamplingConfig) -> list[Hook]:
    """The hooks a training config asks for: a ``SampleGrid`` when
    ``config.sampling.samples_per_class > 0``, scored by ``DigitsScore`` on the digits."""
    if config.sampling.samples_per_class <= 0:
        return []
    hooks: list[Hook] = [SampleGrid(config.sampling.samples_per_class, sampling_config,
                                    seed=config.seed)]
    if config.data.name == "digits":
        hooks.append(DigitsScore())
    return hooks
