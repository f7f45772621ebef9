"""Resumable generation of an evaluation sample batch in OpenAI's npz layout.

``N = per_class * num_classes`` samples are ordered class-major: sample ``i`` has class
``i // per_class`` and index ``i % per_class`` within its class. The sequence is cut into
chunks of ``chunk_size``; each finished chunk is written to ``<out>.parts/`` as its own
npz (temporary name, then an atomic rename), so a crashed or preempted run resumes from
the chunks that exist; a chunk file that cannot be read back (empty, truncated, other
samples) is reported and generated again. When all chunks are there they are packed,
streaming one chunk at a time, into ``<out>`` (written under a temporary name and
renamed) with

* ``arr_0``: uint8 ``[N, H, W, 3]`` (what OpenAI's evaluator reads),
* ``labels``: int32 ``[N]``,

and ``<out>.parts/`` is removed. ``<out>.parts/run.json`` records the run's settings; a
rerun with different settings is refused instead of mixing samples.

The model is hidden behind ``generate_fn(labels, sample_index) -> uint8 [n, H, W, 3]``,
which must be deterministic per (class, index) (HMAR's sampler derives each sample's key
from ``(seed, class, index)``); chunking therefore never changes the images.

Multi-host: every process runs the same command on a shared filesystem; process ``p`` of
``P`` generates the chunks with ``chunk_id % P == p``, all processes meet at a barrier,
and process 0 packs. A chunk missing at packing time (a process failed) stops with an
error naming it; rerunning fills it in.

Dimension letters: N samples, n samples in a chunk, H/W image side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import zipfile
from collections.abc import Callable

import numpy as np

from hmar_jax import cli
from hmar_jax.atomic_io import atomic_write
from hmar_jax.evaluate import metrics

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """Which samples exist and how they are chunked."""

    num_classes: int
    per_class: int
    chunk_size: int

    def __post_init__(self):
        for name in ("num_classes", "per_class", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                flag = {"per_class": "--per-class", "chunk_size": "--chunk"}.get(name, name)
                raise ValueError(f"{flag} must be a positive integer, got {value!r}.")

    @property
    def num_samples(self) -> int:
        return self.num_classes * self.per_class

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def labels(self) -> np.ndarray:
        """int32 ``[N]``: class of each sample, class-major."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), self.per_class)

    def sample_index(self) -> np.ndarray:
        """int32 ``[N]``: index of each sample within its class."""
        return np.tile(np.arange(self.per_class, dtype=np.int32), self.num_classes)

    def chunk(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [n], sample_index [n])`` of one chunk."""
        start = chunk_id * self.chunk_size
        stop = min(start + self.chunk_size, self.num_samples)
        return self.labels()[start:stop], self.sample_index()[start:stop]


def parts_dir(out: str | pathlib.Path) -> pathlib.Path:
    """``<out>.parts``: where finished chunks wait to be packed."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".parts")


def chunk_path(out: str | pathlib.Path, chunk_id: int) -> pathlib.Path:
    return parts_dir(out) / f"chunk-{chunk_id:06d}.npz"


def _check_run_info(out: pathlib.Path, run_info: dict) -> None:
    """Writes ``run.json`` on the first run; on a rerun, refuses different settings."""
    path = parts_dir(out) / RUN_FILE
    text = json.dumps(run_info, indent=2, sort_keys=True)
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != json.loads(text):
            changed = sorted(k for k in previous.keys() | run_info.keys()
                             if previous.get(k) != run_info.get(k))
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {run_info.get(k)!r}" for k in changed)
            raise ValueError(
                f"{parts_dir(out)} holds chunks of a run with other settings ({details}). Rerun "
                "with the same settings to resume it, or delete that directory to start over.")
        return
    atomic_write(path, lambda f: f.write(text.encode()))  # every process writes the same text


def _validated_images(images, labels: np.ndarray, chunk_id: int) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(labels) \
            or images.shape[-1] != 3:
        raise ValueError(f"generate_fn returned {images.dtype} {images.shape} for chunk "
                         f"{chunk_id} of {len(labels)} samples; expected uint8 "
                         f"[{len(labels)}, H, W, 3].")
    return images


def generate_parts(generate_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                   plan: GenerationPlan, out: str | pathlib.Path, *, run_info: dict,
                   process_index: int = 0, process_count: int = 1) -> list[int]:
    """Generates this process's missing chunks into ``<out>.parts/``.

    Args:
      generate_fn: ``(labels int32 [n], sample_index int32 [n]) -> uint8 [n, H, W, 3]``.
      plan: the samples and chunk size.
      out: the final npz path (chunks go to ``<out>.parts/``).
      run_info: JSON-serialisable settings of the run (checkpoint, preset, seed, ...);
        resuming requires the same.
      process_index, process_count: this process's share is ``chunk_id % count == index``.

    Returns:
      The chunk ids generated by this call (finished chunks are skipped).
    """
    out = pathlib.Path(out)
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    _check_run_info(out, dict(run_info, num_classes=plan.num_classes, per_class=plan.per_class,
                              chunk_size=plan.chunk_size))
    done = []
    mine = range(process_index, plan.num_chunks, process_count)
    for chunk_id in mine:
        path = chunk_path(out, chunk_id)
        if path.is_file():
            problem = _chunk_problem(plan, out, chunk_id)
            if problem is None:
                continue
            logging.warning("%s cannot be used (%s); generating chunk %d again.", path, problem,
                            chunk_id)
        labels, index = plan.chunk(chunk_id)
        images = _validated_images(generate_fn(labels, index), labels, chunk_id)
        atomic_write(path, lambda f: np.savez(f, images=images, labels=labels,
                                               sample_index=index))
        done.append(chunk_id)
        logging.info("Chunk %d/%d written (%d samples).", chunk_id + 1, plan.num_chunks,
                     len(labels))
    return done


def _chunk_problem(plan: GenerationPlan, out: pathlib.Path, chunk_id: int) -> str | None:
    """Why an existing chunk file cannot be packed, or None. Reads its labels and the
    header of its images only, so resuming does not read every finished chunk whole."""
    path = chunk_path(out, chunk_id)
    labels, index = plan.chunk(chunk_id)
    try:
        stored = metrics.load_npz(path, ("labels", "sample_index"))
        with metrics.open_npz_array(path, "images") as reader:
            shape, dtype = reader.shape, reader.dtype
    except ValueError as error:
        return str(error)
    if not (np.array_equal(stored["labels"], labels)
            and np.array_equal(stored["sample_index"], index)):
        return f"it holds other samples than chunk {chunk_id} of this run"
    if dtype != np.uint8 or shape is None or len(shape) != 4 or shape[0] != len(labels) \
            or shape[-1] != 3:
        return f"its images are {dtype} {shape}, not uint8 [{len(labels)}, H, W, 3]"
    return None


def _read_chunk(plan: GenerationPlan, out: pathlib.Path, chunk_id: int) -> np.ndarray:
    path = chunk_path(out, chunk_id)
    labels, index = plan.chunk(chunk_id)
    try:
        stored = metrics.load_npz(path, ("images", "labels", "sample_index"))
    except ValueError as err:
        raise ValueError(f"{path} is unreadable ({err}); delete it and rerun to regenerate "
                         "it.") from None
    if not (np.array_equal(stored["labels"], labels)
            and np.array_equal(stored["sample_index"], index)):
        raise ValueError(f"{path} holds other samples than chunk {chunk_id} of this run; "
                         f"delete {parts_dir(out)} and rerun.")
    return stored["images"]


def pack_parts(plan: GenerationPlan, out: str | pathlib.Path) -> pathlib.Path:
    """Packs all chunks into ``out`` (``arr_0`` uint8 [N, H, W, 3], ``labels`` int32 [N])
    atomically, streaming one chunk at a time, then removes ``<out>.parts/``."""
    out = pathlib.Path(out)
    missing = [i for i in range(plan.num_chunks) if not chunk_path(out, i).is_file()]
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {plan.num_chunks} chunks are missing in {parts_dir(out)} "
            f"(ids {listed}); a process did not finish. Rerun the same command to fill them in.")
    first = _read_chunk(plan, out, 0)
    image_shape = first.shape[1:]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (plan.num_samples, *image_shape)}

    def write(file):
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for chunk_id in range(plan.num_chunks):
                    images = first if chunk_id == 0 else _read_chunk(plan, out, chunk_id)
                    if images.shape[1:] != image_shape or images.dtype != np.uint8:
                        raise ValueError(f"{chunk_path(out, chunk_id)} holds {images.dtype} "
                                         f"images of shape {images.shape[1:]}, chunk 0 "
                                         f"{image_shape}; delete {parts_dir(out)} and rerun.")
                    member.write(np.ascontiguousarray(images).tobytes())
            with zf.open("labels.npy", "w") as member:
                np.lib.format.write_array(member, plan.labels())

    atomic_write(out, write, overwrite=False)  # never replaces another run's batch
    shutil.rmtree(parts_dir(out))
    return out


def check_output_free(out: str | pathlib.Path) -> pathlib.Path:
    """Raises FileExistsError if ``out`` exists (a finished batch is never overwritten),
    InputError if its folder cannot be written: both before any sample is generated."""
    out = pathlib.Path(out)
    if out.exists():
        leftover = (f" (and {parts_dir(out)} is left from the run that wrote it: delete it)"
                    if parts_dir(out).exists() else "")
        raise FileExistsError(f"{out} already exists{leftover}; choose another --out or "
                              "delete it.")
    return cli.check_writable_output(out, overwrite=False)


def generate_npz(generate_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 plan: GenerationPlan, out: str | pathlib.Path, *, run_info: dict,
                 process_index: int = 0, process_count: int = 1,
                 barrier: Callable[[], None] | None = None) -> pathlib.Path | None:
    """Generates (resuming) and packs a sample batch; see the module docstring.

    Args:
      generate_fn, plan, run_info, process_index, process_count: as :func:`generate_parts`.
      out: the npz to write; must not exist yet.
      barrier: called by every process after its chunks are done (multi-host: a global
        sync); process 0 packs after it returns.

    Returns:
      ``out`` on process 0, None on the others.

    Raises:
      FileExistsError: ``out`` already exists.
    """
    out = check_output_free(out)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    generate_parts(generate_fn, plan, out, run_info=run_info, process_index=process_index,
                   process_count=process_count)
    if barrier is not None:
        barrier()
    if process_index != 0:
        return None
    return pack_parts(plan, out)
