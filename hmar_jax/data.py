"""Input pipelines (grain).

The embedded default dataset is scikit-learn's bundled 8x8 handwritten digits
(1,797 real images, 10 classes; shipped inside the scikit-learn wheel, so nothing
is downloaded). Images are upsampled to ``image_size`` with bicubic filtering,
replicated to RGB and served as uint8 ``[H, W, 3]`` with an int32 label.

Dimension letters: N examples, B batch, H/W image side.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import grain
import numpy as np
from PIL import Image

DIGITS_NUM_CLASSES = 10
DIGITS_EVAL_SIZE = 197  # the last 197 of 1,797 images are held out for evaluation


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(uint8 [N, S, S, 3], int32 [N])``, S = ``image_size``."""
    from sklearn.datasets import load_digits as sklearn_digits  # local: slow import

    bunch = sklearn_digits()
    gray = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # [N, 8, 8]
    resized = np.stack([
        np.asarray(Image.fromarray(g, mode="L").resize((image_size, image_size), Image.BICUBIC))
        for g in gray])
    images = np.repeat(resized[..., None], 3, axis=-1)  # [N, S, S, 3]
    return images, bunch.target.astype(np.int32)


def digits_split(image_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split``: ``train`` (first 1,600), ``eval`` (last 197) or ``all``."""
    images, labels = load_digits(image_size)
    if split == "train":
        return images[:-DIGITS_EVAL_SIZE], labels[:-DIGITS_EVAL_SIZE]
    if split == "eval":
        return images[-DIGITS_EVAL_SIZE:], labels[-DIGITS_EVAL_SIZE:]
    if split == "all":
        return images, labels
    raise ValueError(f"Unknown digits split {split!r}; use 'train', 'eval' or 'all'.")


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A grain random-access source over in-memory ``images``/``labels`` arrays."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def to_model_range(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 [0, 255] images -> float32 [-1, 1] (upstream ``x * 2 - 1`` after ToTensor)."""
    return {"image": batch["image"].astype(np.float32) / 127.5 - 1.0, "label": batch["label"]}


def batched_iterator(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                     *, shuffle: bool = True, repeat: bool = True) -> grain.DatasetIterator:
    """A checkpointable grain iterator of ``{"image": f32 [B, H, W, 3], "label": i32 [B]}``.

    Reshuffles every epoch (seeded); drops the last partial batch when repeating.
    ``get_state()``/``set_state()`` resume it exactly.
    """
    if len(labels) == 0:
        raise ValueError("The dataset is empty.")
    if repeat and len(labels) < batch_size:
        raise ValueError(f"Batch size {batch_size} exceeds the dataset size {len(labels)}.")
    dataset = grain.MapDataset.source(ArraySource(images, labels))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)  # before repeat: a new permutation per epoch
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=repeat).map(to_model_range)
    return iter(dataset.to_iter_dataset())


def iterate_once(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[dict]:
    """One ordered pass (last batch may be smaller), for evaluation."""
    return batched_iterator(images, labels, batch_size, seed=0, shuffle=False, repeat=False)
