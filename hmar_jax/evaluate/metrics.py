"""FID, sFID, Inception Score and precision/recall, as OpenAI's guided-diffusion evaluator.

The numbers are meant to be comparable with ``evaluations/evaluator.py`` of
guided-diffusion (used by ADM, VAR and HMAR) run on the same sample batch and the same
reference batch (``VIRTUAL_imagenet256_labeled.npz``):

* **FID / sFID**: ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)`` on the ``pool``
  (2048-d) and ``spatial`` (2023-d) Inception features, in float64 on the host with
  ``scipy.linalg.sqrtm``; when the square root is not finite it is retried with 1e-6
  added to both diagonals, and a small imaginary part is dropped. Statistics are the
  mean and the unbiased covariance (``np.cov``). The reference's ``mu``/``sigma`` and
  ``mu_s``/``sigma_s`` are read from its npz when present (they are in OpenAI's files).
* **IS**: softmax of the bias-free logits, split into 10 contiguous parts (no
  shuffling), ``exp(E_x KL(p(y|x) || p(y)))`` per part, averaged. The evaluator splits
  into chunks of 5,000, which is the same for the usual 50,000 samples.
* **Precision / recall** (Kynkäänniemi et al. 2019): the radius of each point is its
  squared distance to its 3rd nearest neighbour in its own set (the point itself
  counted at distance 0, as the evaluator does); precision is the share of samples
  within the radius of some reference point, recall the share of reference points
  within the radius of some sample. Distances run in JAX in blocks (``block`` rows x
  ``block`` columns, 10,000 by default as in the evaluator), so 50k x 10k fits in
  memory. They are float32 (the evaluator uses float16 when that stays finite, which
  can flip a few borderline points).

Images are read from npz files in batches without loading the whole array
(:func:`open_npz_array`), so a 50,000-image batch needs only a batch of memory.

Dimension letters: N images, D feature dimension, K classes (1008), Q query points,
M manifold points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

HIGHEST = jax.lax.Precision.HIGHEST
REFERENCE_FILE = "VIRTUAL_imagenet256_labeled.npz"
REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                 "imagenet/256/" + REFERENCE_FILE)
FEATURE_KEYS = ("pool", "spatial", "logits")

# The matrix square root, looked up at call time so tests can substitute a failing one.
scipy_sqrtm = scipy.linalg.sqrtm


# ----------------------------------------------------------------------------- FID

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean ``[D]`` and unbiased covariance ``[D, D]`` of ``[N, D]`` features."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"Need at least 2 feature rows [N, D] for a covariance; got shape "
                         f"{features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():  # singularity shows up as non-finite output, handled below
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy_sqrtm(matrix)
    except (np.linalg.LinAlgError, ValueError):
        return None
    return root if np.all(np.isfinite(root)) else None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
      mu1, mu2: means ``[D]``.
      sigma1, sigma2: covariances ``[D, D]``.
      eps: added to both diagonals when ``sqrtm(sigma1 @ sigma2)`` is not finite.

    Raises:
      ValueError: the shapes differ, or the square root keeps a large imaginary part.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Statistics do not match: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}; both sides must come "
                         "from the same feature (pool with mu/sigma, spatial with mu_s/sigma_s).")
    covmean = _sqrtm_or_none(sigma1 @ sigma2)
    if covmean is None:
        warnings.warn(f"Fréchet distance: sqrtm(sigma1 @ sigma2) is not finite (near-singular "
                      f"product); retrying with {eps} added to both diagonals.", RuntimeWarning)
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm_or_none((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError("Fréchet distance: the covariance product has no finite square root "
                             "even with the diagonal offset; check the features for NaN/inf.")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid.")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- IS

def inception_score(logits: np.ndarray, num_splits: int = 10) -> float:
    """Inception Score of ``[N, K]`` logits: mean over splits of ``exp(E KL(p(y|x) || p(y)))``.

    The N rows are cut, in order, into ``num_splits`` contiguous parts of (nearly) equal
    size; with N = 50,000 these are the evaluator's 5,000-sample chunks.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < num_splits:
        raise ValueError(f"Need [N, K] logits with N >= num_splits={num_splits}; got "
                         f"{logits.shape}.")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax
    scores = []
    for part in np.array_split(log_p, num_splits):
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision/recall

def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(x) % multiple
    return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[Q, D]``, ``[M, D]`` -> ``[Q, M]`` squared Euclidean distances, clipped at 0."""
    a_sq = jnp.sum(a * a, axis=1)[:, None]
    b_sq = jnp.sum(b * b, axis=1)[None, :]
    return jnp.maximum(a_sq - 2.0 * jnp.dot(a, b.T, precision=HIGHEST) + b_sq, 0.0)


def _blocks(points: np.ndarray, block: int) -> jax.Array:
    """``[M, D]`` -> ``[M_pad / block, block, D]`` float32 on device."""
    padded = _pad_rows(np.asarray(points, np.float32), block)
    return jnp.asarray(padded.reshape(-1, block, padded.shape[1]))


@jax.jit
def _kth_smallest_block(rows: jax.Array, point_blocks: jax.Array, valid: jax.Array,
                        best: jax.Array) -> jax.Array:
    """Running k+1 smallest squared distances of ``rows`` [R, D] over all point blocks.

    ``point_blocks`` [B, C, D], ``valid`` bool [B, C], ``best`` [R, k+1] (+inf to start).
    """
    def step(best, block):
        points, mask = block
        d = jnp.where(mask[None, :], _squared_distances(rows, points), jnp.inf)  # [R, C]
        merged = jnp.concatenate([best, d], axis=1)
        return -jax.lax.top_k(-merged, best.shape[1])[0], None

    return jax.lax.scan(step, best, (point_blocks, valid))[0]


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000) -> np.ndarray:
    """float32 ``[N]``: squared distance of each point to its k-th nearest neighbour.

    The point itself is among the neighbours at distance 0, so this is index k of the
    sorted distances (the evaluator's convention). Computed in ``block``-sized tiles.
    """
    features = np.asarray(features, np.float32)
    n = len(features)
    if n <= k:
        raise ValueError(f"Need more than k={k} points for k-NN radii; got {n}.")
    block = min(block, n)
    point_blocks = _blocks(features, block)
    valid = jnp.asarray((np.arange(point_blocks.shape[0] * block) < n).reshape(-1, block))
    radii = []
    for start in range(0, n, block):
        rows = jnp.asarray(_pad_rows(features[start:start + block], block))
        best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
        kth = _kth_smallest_block(rows, point_blocks, valid, best)[:, k]
        radii.append(np.asarray(kth)[:min(block, n - start)])
    return np.concatenate(radii)


@jax.jit
def _covered_block(rows: jax.Array, point_blocks: jax.Array, radius_blocks: jax.Array
                   ) -> jax.Array:
    """bool [R]: row within the radius of some point (padding points have radius -inf)."""
    def step(covered, block):
        points, radii = block
        inside = _squared_distances(rows, points) <= radii[None, :]  # [R, C]
        return covered | jnp.any(inside, axis=1), None

    start = jnp.zeros(rows.shape[0], bool)
    return jax.lax.scan(step, start, (point_blocks, radius_blocks))[0]


def manifold_coverage(queries: np.ndarray, points: np.ndarray, radii: np.ndarray,
                      block: int = 10000) -> np.ndarray:
    """bool ``[Q]``: whether each query lies in the union of balls ``|q - p|^2 <= r_p``.

    Args:
      queries: ``[Q, D]``.
      points: ``[M, D]`` manifold points.
      radii: ``[M]`` squared radii (from :func:`manifold_radii`).
      block: tile size of the distance computation.
    """
    queries = np.asarray(queries, np.float32)
    if len(points) != len(radii):
        raise ValueError(f"{len(points)} manifold points but {len(radii)} radii.")
    col_block, row_block = min(block, len(points)), min(block, len(queries))
    point_blocks = _blocks(points, col_block)
    radius_blocks = np.full(point_blocks.shape[0] * col_block, -np.inf, np.float32)
    radius_blocks[:len(radii)] = radii
    radius_blocks = jnp.asarray(radius_blocks.reshape(-1, col_block))
    covered = []
    for start in range(0, len(queries), row_block):
        rows = jnp.asarray(_pad_rows(queries[start:start + row_block], row_block))
        inside = _covered_block(rows, point_blocks, radius_blocks)
        covered.append(np.asarray(inside)[:min(row_block, len(queries) - start)])
    return np.concatenate(covered)


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) of samples against a reference.

    Args:
      reference: ``[M, D]`` reference features (e.g. the 10,000 ImageNet images).
      samples: ``[N, D]`` sample features.
      k: neighbourhood size (3, as the evaluator).
      block: tile size; memory is O(block^2).

    Returns:
      (precision, recall) in [0, 1].
    """
    if np.shape(reference)[1:] != np.shape(samples)[1:]:
        raise ValueError(f"Reference features {np.shape(reference)} and sample features "
                         f"{np.shape(samples)} have different dimensions.")
    reference_radii = manifold_radii(reference, k, block)
    sample_radii = manifold_radii(samples, k, block)
    precision = manifold_coverage(samples, reference, reference_radii, block).mean()
    recall = manifold_coverage(reference, samples, sample_radii, block).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- npz input

class NpzArrayReader:
    """One array of an ``.npz`` read in batches of rows, never whole (see :func:`open_npz_array`).

    Attributes:
      shape, dtype: of the stored array.
    """

    def __init__(self, archive: zipfile.ZipFile, key: str, path: pathlib.Path):
        self._archive, self._key, self._path = archive, key, path
        with archive.open(f"{key}.npy") as stream:
            self.shape, self.dtype, self._fortran = self._header(stream)

    @staticmethod
    def _header(stream) -> tuple[tuple[int, ...], np.dtype, bool]:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:  # version 3 (unicode field names) never holds images; read it whole
            shape, fortran, dtype = None, True, None
        return shape, dtype, fortran

    def __len__(self) -> int:
        return self.shape[0]

    def read_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yields consecutive ``[<=batch_size, ...]`` slices of the array."""
        if self._fortran or self.dtype is None or self.dtype.hasobject:
            with np.load(self._path) as npz:  # rare layouts: fall back to a full read
                array = npz[self._key]
            for start in range(0, len(array), batch_size):
                yield array[start:start + batch_size]
            return
        row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        with self._archive.open(f"{self._key}.npy") as stream:
            self._header(stream)
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = _read_exactly(stream, count * row_bytes, self._path)
                yield np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


def _read_exactly(stream, size: int, path: pathlib.Path) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise ValueError(f"{path} ends early: the npz is truncated. Write it again.")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _unreadable_npz(path: pathlib.Path, error: BaseException) -> ValueError:
    return ValueError(f"{path} is not a readable .npz archive ({error or type(error).__name__}); "
                      "write it again (numpy.savez).")


def npz_keys(path: str | pathlib.Path) -> list[str]:
    """The array names of an npz (without reading the arrays).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not an npz (e.g. an ``.npy`` renamed, an empty or truncated file).
    """
    path = pathlib.Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as error:
        raise _unreadable_npz(path, error) from None


def load_npz(path: str | pathlib.Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of an npz, read whole (for small files: digit samples, chunks).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a readable npz, or a key is missing (the message lists the keys).
    """
    path = pathlib.Path(path)
    present = npz_keys(path)
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"{path} has no array {missing[0]!r} (it has {present}).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise _unreadable_npz(path, error) from None


@contextlib.contextmanager
def open_npz_array(path: str | pathlib.Path, key: str) -> Iterator[NpzArrayReader]:
    """Opens array ``key`` of an npz for batched reading.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not an npz, or no array ``key`` (the message lists the keys).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an .npz archive ({err}).") from None
    with archive:
        keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key not in keys:
            raise ValueError(f"{path} has no array {key!r} (it has {keys}).")
        try:
            reader = NpzArrayReader(archive, key, path)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as error:
            raise _unreadable_npz(path, error) from None
        yield reader


def _check_images(reader: NpzArrayReader, path: pathlib.Path, key: str) -> None:
    shape = reader.shape
    if reader.dtype != np.uint8 or shape is None or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{path}:{key} is {reader.dtype} {shape}; expected uint8 images [N, H, W, 3] in "
            "[0, 255] (OpenAI's sample-batch layout, as `python -m hmar_jax.evaluate generate` "
            "writes). Convert float images with numpy.clip(numpy.floor(x * 255 + 0.5), 0, 255).")


# ----------------------------------------------------------------------------- activations

def make_feature_fn(model, batch_size: int = 64) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A jitted ``uint8 [<=batch_size, H, W, 3] -> {name: [n, ...]}`` for an NNX feature model.

    Batches are padded to ``batch_size`` (one compilation per image size) and, when
    ``batch_size`` divides evenly, split across all local devices (parameters replicated).
    """
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    graphdef, state = nnx.split(model)
    devices = jax.local_devices()
    if len(devices) > 1 and batch_size % len(devices) == 0:
        mesh = Mesh(np.asarray(devices), ("data",))
        data_sharding = NamedSharding(mesh, P("data"))
        state = jax.device_put(state, NamedSharding(mesh, P()))
    else:
        data_sharding = None

    @jax.jit
    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        count = len(images)
        if count > batch_size:
            raise ValueError(f"Got {count} images for a batch of {batch_size}.")
        padded = _pad_rows(np.asarray(images), batch_size)
        batch = (jax.device_put(padded, data_sharding) if data_sharding is not None
                 else jnp.asarray(padded))
        return {k: np.asarray(v)[:count] for k, v in forward(state, batch).items()}

    return features


def compute_activations(path: str | pathlib.Path, feature_fn: Callable, *, key: str = "arr_0",
                        batch_size: int = 64, log_every: int = 100) -> dict[str, np.ndarray]:
    """Runs ``feature_fn`` over the images of an npz, ``batch_size`` at a time.

    Args:
      path: npz with uint8 ``[N, H, W, 3]`` images under ``key``.
      feature_fn: from :func:`make_feature_fn` (or any batch -> dict of ``[n, ...]``).

    Returns:
      ``{name: float32 [N, ...]}``, rows in file order.
    """
    path = pathlib.Path(path)
    outputs: dict[str, list[np.ndarray]] = {}
    with open_npz_array(path, key) as reader:
        _check_images(reader, path, key)
        total = math.ceil(len(reader) / batch_size)
        for i, batch in enumerate(reader.read_batches(batch_size)):
            for name, value in feature_fn(batch).items():
                outputs.setdefault(name, []).append(np.asarray(value, np.float32))
            if log_every and (i + 1) % log_every == 0:
                logging.info("%s: %d/%d batches", path.name, i + 1, total)
    if not outputs:
        raise ValueError(f"{path}:{key} holds no images.")
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


# ----------------------------------------------------------------------------- reference batch

@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
    """FID statistics of a reference batch: ``mu [2048]``, ``sigma [2048, 2048]``,
    ``mu_s [2023]``, ``sigma_s [2023, 2023]`` (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray


def missing_reference_message(path: str | pathlib.Path) -> str:
    return (f"Reference batch {path} not found. FID/sFID/precision/recall compare against "
            f"OpenAI guided-diffusion's reference batch {REFERENCE_FILE} (ImageNet 256x256 "
            f"images plus precomputed statistics), which you must supply: get it from "
            f"{REFERENCE_URL} and pass its path with --ref.")


# Fewest images the metrics are defined for: the Inception Score splits the samples into
# 10 parts, and the k-NN radii of precision/recall need more than k = 3 points per set.
MIN_SAMPLES, MIN_REFERENCE = 10, 4
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _check_image_count(path: pathlib.Path, count: int, minimum: int, what: str) -> None:
    if count < minimum:
        raise ValueError(f"{path}:arr_0 holds {count} images; {what} need at least {minimum}.")


def _stores_statistics(path: pathlib.Path, keys: list[str]) -> bool:
    """Whether the reference npz stores its FID statistics; ValueError if only some."""
    present = [k for k in STATISTICS_KEYS if k in keys]
    if present and len(present) < len(STATISTICS_KEYS):
        missing = [k for k in STATISTICS_KEYS if k not in keys]
        raise ValueError(f"{path} has {present} but lacks {missing}; it is not a complete "
                         f"reference batch like {REFERENCE_FILE}.")
    return bool(present)


def check_samples(path: str | pathlib.Path) -> pathlib.Path:
    """Checks, without reading the images, that the sample npz holds uint8 ``arr_0``
    ``[N, H, W, 3]`` with enough images: run before any Inception work."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sample batch {path} not found; write one with `python -m "
                                "hmar_jax.evaluate generate`.")
    with open_npz_array(path, "arr_0") as reader:
        _check_images(reader, path, "arr_0")
        _check_image_count(path, len(reader), MIN_SAMPLES,
                           "the metrics (10 Inception Score splits)")
    return path


def check_reference(path: str | pathlib.Path) -> pathlib.Path:
    """Checks that the reference npz exists, holds uint8 images (``arr_0``) and, if it
    stores FID statistics, all four of them: run before any Inception work."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_reference_message(path))
    try:
        keys = npz_keys(path)
    except ValueError:
        raise ValueError(f"{path} is not an .npz archive; --ref must be OpenAI's "
                         f"{REFERENCE_FILE}.") from None
    if "arr_0" not in keys:
        raise ValueError(f"{path} has no 'arr_0' reference images (it has {keys}); "
                         f"--ref must be OpenAI's {REFERENCE_FILE}.")
    _stores_statistics(path, keys)
    with open_npz_array(path, "arr_0") as reader:
        _check_images(reader, path, "arr_0")
        _check_image_count(path, len(reader), MIN_REFERENCE,
                           "the precision/recall radii (k = 3 neighbours)")
    return path


def reference_statistics(path: str | pathlib.Path, activations: dict[str, np.ndarray]
                         ) -> ReferenceStatistics:
    """The npz's stored ``mu``/``sigma``/``mu_s``/``sigma_s`` if present (as the evaluator
    does), else statistics of the reference ``activations``."""
    if _stores_statistics(path, npz_keys(path)):
        stored = load_npz(path, STATISTICS_KEYS)
        return ReferenceStatistics(**{k: np.asarray(v, np.float64) for k, v in stored.items()})
    mu, sigma = feature_statistics(activations["pool"])
    mu_s, sigma_s = feature_statistics(activations["spatial"])
    return ReferenceStatistics(mu, sigma, mu_s, sigma_s)


def evaluate(samples: str | pathlib.Path, reference: str | pathlib.Path, feature_fn: Callable,
             *, batch_size: int = 64, block: int = 10000) -> dict:
    """All metrics of a sample npz against a reference npz.

    Args:
      samples: npz with uint8 ``arr_0 [N, H, W, 3]``.
      reference: OpenAI's reference batch (``arr_0`` and, usually, the statistics).
      feature_fn: batch -> ``{"pool", "spatial", "logits"}`` (:func:`make_feature_fn`).

    Returns:
      ``{"inception_score", "fid", "sfid", "precision", "recall", "num_samples",
      "num_reference"}``.
    """
    samples = check_samples(samples)  # both inputs before any image goes through feature_fn
    reference = check_reference(reference)
    logging.info("Reference activations (%s)...", reference.name)
    ref_acts = compute_activations(reference, feature_fn, batch_size=batch_size)
    ref_stats = reference_statistics(reference, ref_acts)
    logging.info("Sample activations (%s)...", samples.name)
    acts = compute_activations(samples, feature_fn, batch_size=batch_size)
    mu, sigma = feature_statistics(acts["pool"])
    mu_s, sigma_s = feature_statistics(acts["spatial"])
    precision, recall = precision_recall(ref_acts["pool"], acts["pool"], block=block)
    return {
        "inception_score": inception_score(acts["logits"]),
        "fid": frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma),
        "sfid": frechet_distance(mu_s, sigma_s, ref_stats.mu_s, ref_stats.sigma_s),
        "precision": precision, "recall": recall,
        "num_samples": int(len(acts["pool"])), "num_reference": int(len(ref_acts["pool"])),
    }
