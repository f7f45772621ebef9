"""Input pipelines (grain).

The embedded default dataset is scikit-learn's bundled 8x8 handwritten digits
(1,797 real images, 10 classes; shipped inside the scikit-learn wheel, so nothing
is downloaded). Images are upsampled to ``image_size`` with bicubic filtering,
replicated to RGB and served as uint8 ``[H, W, 3]`` with an int32 label.

Several processes (multi-host training) read one global order: the examples are
shuffled per epoch with the run's seed, cut into global batches of ``B`` examples, and
process ``p`` of ``P`` reads rows ``[p B/P, (p + 1) B/P)`` of each (``ProcessRows``). The
processes' shards of an epoch are therefore disjoint, together they read every example
once per epoch, and the global batches are the same for any process count (so a
multi-process run trains on exactly what a single process would, and a run can resume
on another number of hosts). An iterator's position is the number of global batches
served, the same on every process.

Dimension letters: N examples, B batch (global), b = B/P a process's rows, H/W image side.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import grain
import numpy as np
from absl import logging
from PIL import Image

from hmar_jax.cli import InputError

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


class ProcessRows(grain.MapDataset):
    """One process's rows of every global batch of ``parent`` (module docstring): element
    ``k`` is ``parent[g B + p b + j]`` with ``g, j = divmod(k, b)``, ``b = B / P``.

    A random-access view (nothing is read twice or by two processes), placed after the
    shuffle and repeat and before any decoding, so that each process decodes only its rows.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        check_process_split(global_batch, process_index, process_count)
        self._global_batch, self._local_batch = global_batch, global_batch // process_count
        self._offset = process_index * self._local_batch

    def __len__(self) -> int:
        return len(self._parent) // self._global_batch * self._local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local_batch)
        return self._parent[batch * self._global_batch + self._offset + row]


def check_process_split(global_batch: int, process_index: int, process_count: int) -> None:
    """Refuses a global batch that the processes cannot share evenly."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} does not split evenly over the "
                         f"{process_count} processes; use a multiple of {process_count}.")


def batched_iterator(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, *,
                     process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable grain iterator of this process's rows of each global batch
    of ``batch_size`` (module docstring): ``{"image": f32 [b, H, W, 3], "label": i32 [b]}``.

    Reshuffles every epoch (seeded); batches never mix a partial batch in.
    ``get_state()``/``set_state()`` resume it exactly.
    """
    if len(labels) == 0:
        raise ValueError("The dataset is empty.")
    if len(labels) < batch_size:
        raise ValueError(f"Batch size {batch_size} exceeds the dataset size {len(labels)}.")
    dataset = grain.MapDataset.source(ArraySource(images, labels))
    dataset = dataset.shuffle(seed=seed).repeat()  # shuffle first: a new permutation per epoch
    dataset = ProcessRows(dataset, batch_size, process_index, process_count)
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True).map(to_model_range)
    return iter(dataset.to_iter_dataset())


# ----- real image datasets ----------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# A folder is refused at start when none of this many of its files (spread over the file
# list) can be decoded: a pipeline that skips every image would otherwise never yield a batch.
# Decoding stops at the first readable file, so a healthy folder costs one decode.
START_SAMPLE_SIZE = 16
# The pipeline stops when this many images in a row could not be read. With a fraction c of
# unreadable images (shuffled) such a run has probability c**100: never for a dataset with a
# few broken files, quickly for one that is mostly broken, which would otherwise train on
# a trickle of batches or, with none readable, wait forever.
MAX_UNREADABLE_IN_A_ROW = 100


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """``root/<class name>/<image file>``: one sub-folder per class, labels by sorted name.

    Items are ``{"path": str, "label": int32}``; decoding happens in the pipeline so that
    unreadable files can be skipped there.
    """

    root: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    @classmethod
    def scan(cls, root: str) -> "ImageFolderSource":
        """Lists ``root``'s images and checks that its files can be decoded at all (see
        ``START_SAMPLE_SIZE``)."""
        import pathlib

        if not root:
            raise InputError("data.root is empty; set --config.data.root=DIR, a folder of "
                             "DIR/<class name>/<image files>.")
        base = pathlib.Path(root)
        if not base.is_dir():
            raise ValueError(f"Image folder {root} does not exist or is not a directory.")
        classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir()))
        if not classes:
            raise ValueError(f"Image folder {root} has no class sub-folders; expected "
                             "root/<class name>/<image files>.")
        paths, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((base / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(str(path))
                    labels.append(label)
        if not paths:
            raise ValueError(f"Image folder {root} has class folders but no images "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)}).")
        _check_some_decode(root, paths)
        return cls(root, classes, tuple(paths), tuple(labels))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"path": self.paths[index], "label": np.int32(self.labels[index])}


def _check_some_decode(root: str, paths: list[str]) -> None:
    """Raises unless one of ``START_SAMPLE_SIZE`` files spread over ``paths`` decodes."""
    sample = paths[::max(1, len(paths) // START_SAMPLE_SIZE)][:START_SAMPLE_SIZE]
    errors = []
    for path in sample:
        try:
            with Image.open(path) as picture:
                picture.load()
            return
        except Exception as err:  # noqa: BLE001 - any decode failure is an unreadable file
            errors.append(f"{path}: {err}")
    raise InputError(f"None of {len(sample)} images sampled from {root} can be read (e.g. "
                     f"{errors[0]}); check the files or --config.data.root.")


def resize_and_crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Upstream preprocessing: shorter side to ``round(1.125 size)`` with LANCZOS, then a
    random crop (``rng`` given, training) or the centre crop (evaluation). uint8 [S, S, 3]."""
    picture = Image.fromarray(image).convert("RGB")
    short = round(1.125 * size)
    w, h = picture.size
    scale = short / min(w, h)
    picture = picture.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                             Image.LANCZOS)
    w, h = picture.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return np.asarray(picture.crop((left, top, left + size, top + size)), np.uint8)


@functools.lru_cache(maxsize=None)
def _warn_unreadable(where: str, error: str) -> None:
    logging.warning("Skipping unreadable image %s (%s).", where, error)  # once per file


class DecodeAndCrop(grain.transforms.RandomMap):
    """Decodes ``path`` or an ``image`` array and crops it; unreadable images become None
    (skipped, with a warning) unless ``skip_corrupt`` is False, which raises instead."""

    def __init__(self, size: int, train: bool, skip_corrupt: bool = True):
        self.size, self.train, self.skip_corrupt = size, train, skip_corrupt

    def random_map(self, element: dict, rng: np.random.Generator):
        try:
            if "path" in element:
                with Image.open(element["path"]) as picture:
                    image = np.asarray(picture.convert("RGB"))
            else:
                image = np.asarray(element["image"])
                image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
            crop = resize_and_crop(image, self.size, rng if self.train else None)
        except Exception as err:  # noqa: BLE001 - any decode failure is a corrupt image
            where = element.get("path", "an element")
            if not self.skip_corrupt:
                raise ValueError(f"Unreadable image {where}: {err}. Remove it or set "
                                 "config.data.skip_corrupt=True.") from err
            _warn_unreadable(str(where), str(err))
            return None
        return {"image": crop, "label": np.int32(element["label"])}


class SkipUnreadable:
    """The pipeline's filter of skipped (None) elements; raises once
    ``MAX_UNREADABLE_IN_A_ROW`` elements in a row were skipped. Runs in order on one thread
    (grain filters iterate sequentially), once per worker process."""

    def __init__(self):
        self.in_a_row = 0

    def __call__(self, element) -> bool:
        if element is not None:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= MAX_UNREADABLE_IN_A_ROW:
            raise InputError(f"{self.in_a_row} images in a row could not be read (the warnings "
                             "above name them); the dataset is mostly unreadable: check "
                             "--config.data.root or the files.")
        return False


def image_iterator(source, *, image_size: int, batch_size: int, seed: int, train: bool = True,
                   skip_corrupt: bool = True, num_workers: int = 0, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's batches from a random-access ``source``.

    Training: shuffled per epoch, this process's rows of each global batch of
    ``batch_size`` (``ProcessRows``), decoded with random crops. Otherwise every
    ``process_count``-th example from ``process_index`` on, in order, centre-cropped, the
    last batch possibly smaller. Batches are ``{"image": f32 [b, S, S, 3] in [-1, 1],
    "label": i32 [b]}``, b = ``batch_size / process_count``; unreadable images are skipped
    (see ``DecodeAndCrop``) until too many come in a row (``SkipUnreadable``); a skipped
    image is replaced by the process's next rows, so its later batches reach past its own
    rows of the global order.
    """
    if len(source) == 0:
        raise ValueError("The dataset is empty.")
    dataset = grain.MapDataset.source(source)
    check_process_split(batch_size, process_index, process_count)
    if train:
        dataset = dataset.shuffle(seed=seed).repeat()
    # Each element's crop is drawn from its position in the global order (MapDataset maps
    # are lazy: a process decodes only the rows it reads), whatever the process count.
    dataset = dataset.random_map(DecodeAndCrop(image_size, train, skip_corrupt), seed=seed)
    if train:
        dataset = ProcessRows(dataset, batch_size, process_index, process_count)
    else:
        dataset = dataset[process_index::process_count]
    dataset = dataset.to_iter_dataset(allow_nones=True).filter(SkipUnreadable())
    dataset = dataset.batch(batch_size // process_count, drop_remainder=train)
    dataset = dataset.map(to_model_range)
    if num_workers > 0:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(dataset)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A config's ``data`` block, opened: the one place that knows the dataset kinds
    (``digits``, ``image_folder``, ``tfds``), for training and for pretokenizing alike.

    Attributes:
      config: the ``data`` block.
      source: random access to the examples (``ArraySource`` of uint8 digits, or
        ``ImageFolderSource``/TFDS elements decoded in the pipeline).
      num_classes: the labels' count where known without reading every example (None for
        TFDS).
      name: the setting that chose the data, for messages (``data.root=DIR``).
    """

    config: Any
    source: Any
    num_classes: int | None
    name: str

    def batches(self, batch_size: int, *, seed: int = 0, train: bool = True,
                process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        """This process's batches ``{"image": f32 [b, S, S, 3] in [-1, 1], "label": i32 [b]}``
        of global batches of ``batch_size`` (b = ``batch_size / process_count``).

        ``train``: endless, reshuffled every epoch, random crops (image datasets), and
        checkpointable (``get_state``/``set_state``); each process reads its rows of every
        global batch (module docstring). Otherwise every example once, in order,
        centre-cropped, the last batch possibly smaller (pretokenizing).
        """
        d = self.config
        if isinstance(self.source, ArraySource):
            if train:
                return batched_iterator(self.source.images, self.source.labels, batch_size,
                                        seed, process_index=process_index,
                                        process_count=process_count)
            check_process_split(batch_size, process_index, process_count)
            images = self.source.images[process_index::process_count]
            labels = self.source.labels[process_index::process_count]
            local = batch_size // process_count
            return (to_model_range({"image": images[i:i + local], "label": labels[i:i + local]})
                    for i in range(0, len(labels), local))
        return image_iterator(self.source, image_size=d.image_size, batch_size=batch_size,
                              seed=seed, train=train, skip_corrupt=d.skip_corrupt,
                              num_workers=d.num_workers, process_index=process_index,
                              process_count=process_count)


def open_dataset(data_config) -> Dataset:
    """The dataset of a config's ``data`` block (``name``: ``digits``, ``image_folder`` or
    ``tfds``), checked before any batch is read."""
    name = data_config.name
    if name == "digits":
        images, labels = digits_split(data_config.image_size, data_config.split)
        return Dataset(data_config, ArraySource(images, labels), DIGITS_NUM_CLASSES,
                       "data.name=digits")
    if name == "image_folder":
        source = ImageFolderSource.scan(data_config.root)
        return Dataset(data_config, source, len(source.classes), f"data.root={data_config.root}")
    if name == "tfds":
        source = tfds_source(data_config.tfds_name, data_config.split,
                             data_config.data_dir or None)
        return Dataset(data_config, source, None, f"data.tfds_name={data_config.tfds_name}")
    raise ValueError(f"Unknown data.name {name!r}; use 'digits', 'image_folder' or 'tfds'.")


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """A TFDS random-access source (array_record files, no TensorFlow at run time)."""
    import tensorflow_datasets as tfds  # local: only needed for TFDS data

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as err:  # noqa: BLE001 - surface one clear message
        raise ValueError(f"Cannot open TFDS dataset {name!r} split {split!r} in "
                         f"{data_dir or 'the default data_dir'}: {err}. Prepare it once with "
                         "file_format='array_record' (ImageNet needs its manual download).") from err
