"""The FID Inception-v3 (TF graph ``inception-2015-12-05``) in Flax NNX, NHWC.

This is the network behind FID, sFID, IS and precision/recall as computed by OpenAI's
guided-diffusion evaluator (``classify_image_graph_def.pb``), in the PyTorch layout of
pytorch-fid's port of the same graph (``pt_inception-2015-12-05-6726825d.pth``): the
torchvision Inception-v3 module tree with the graph's quirks,

* the average pools inside ``Mixed_5b..5d``, ``Mixed_6b..6e`` and ``Mixed_7b`` ignore
  the zero padding (``count_include_pad=False``),
* the pool branch of the last block, ``Mixed_7c``, is a 3x3 *max* pool,
* the classifier is 1008-way (``fc``), no auxiliary head,
* every conv is conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU.

Convert the ``.pth`` with ``python -m hmar_jax.convert inception`` and load the export
with :func:`load_inception`.

Preprocessing (``preprocessing=``):

* ``"tf_graph"`` (default) reproduces the graph the OpenAI evaluator runs, which
  is what the reference statistics in ``VIRTUAL_imagenet256_labeled.npz`` were made
  with: images enter at the graph's ``ExpandDims`` node as float [0, 255], go through
  its ``ResizeBilinear`` to 299x299 and then ``(x - 128) / 128``. That op predates
  TensorFlow's ``half_pixel_centers`` attribute, so its ``align_corners=False`` means the
  legacy *asymmetric* mapping ``src = dst * in / out`` (no half-pixel offset).
* ``"pytorch_fid"`` reproduces pytorch-fid: ``F.interpolate(mode="bilinear",
  align_corners=False)``, i.e. half-pixel centres ``src = (dst + 0.5) * in / out - 0.5``
  clamped at 0, then ``x / 127.5 - 1``.

Both are plain (non-antialiased) bilinear interpolation; they differ by a sub-pixel
shift, which moves FID by a small amount. At 299x299 input both resizes are the
identity. Neither resizes in PIL.

Outputs (``InceptionV3.__call__`` returns a dict):

* ``pool`` ``[N, 2048]``: the global average pool after ``Mixed_7c`` (graph
  ``pool_3:0``), the FID and precision/recall features.
* ``spatial`` ``[N, 7 * s * s]`` (``s = 17`` at 299 px, so 2023): the sFID features,
  graph tensor ``mixed_6/conv:0`` restricted to its first 7 channels and flattened in
  NHWC order (h, w, c), as the evaluator does (``spatial[..., :7]`` then a row-major
  reshape; the order matters when comparing with precomputed ``mu_s``/``sigma_s``).
  The graph names its blocks ``mixed, mixed_1, ..., mixed_10``, i.e. torchvision's
  ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``; so ``mixed_6`` is ``Mixed_6d``,
  and inside a block the graph scope ``conv`` is the 1x1 branch (``tower``, ``tower_1``,
  ``tower_2`` are the 7x7, double-7x7 and pool branches), i.e. ``Mixed_6d.branch1x1``.
  The graph's op named exactly ``mixed_6/conv`` comes after ``mixed_6/conv/batchnorm``
  and is the layer's ReLU, so the tensor is **after batch norm and ReLU**. Because the
  block concatenates ``[branch1x1, branch7x7, branch7x7dbl, branch_pool]`` along
  channels, its first 7 output channels are exactly those of ``branch1x1``.
* ``logits`` ``[N, 1008]``: ``pool @ fc.weight.T`` **without the bias**. The evaluator
  computes IS from the graph's ``softmax/logits/MatMul`` weight alone, so do we. The
  bias is still converted and stored (every key of the file is validated).

Numerics: float32 with ``Precision.HIGHEST`` on every conv and matmul, so GPUs do not
silently use TF32.

Dimension letters: N images, H/W input side, S resized side (299), s side of the
17x17 stage (17 at S = 299), C channels.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HIGHEST = jax.lax.Precision.HIGHEST
KIND = "inception"
ARCHITECTURE = "inception_v3_fid_2015_12_05"
IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75  # smallest input the stride-2 stages accept
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
BN_EPSILON = 1e-3
PREPROCESSING = ("tf_graph", "pytorch_fid")
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)


# ----------------------------------------------------------------------------- preprocessing

def bilinear_resize_matrix(in_size: int, out_size: int, preprocessing: str) -> np.ndarray:
    """float32 ``[out_size, in_size]``: one axis of a bilinear resize (see module docstring).

    Source coordinates are computed in float32, as both TensorFlow and PyTorch do, so the
    choice of neighbours matches theirs exactly.
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"Unknown preprocessing {preprocessing!r}; use one of {PREPROCESSING}.")
    out_index = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    if preprocessing == "tf_graph":
        source = out_index * scale  # legacy TF1: no half-pixel offset
    else:
        source = np.maximum((out_index + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight = (source - lower).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1 - weight)
    np.add.at(matrix, (rows, upper), weight)
    return matrix


def preprocess(images: jax.Array, image_size: int = IMAGE_SIZE,
               preprocessing: str = "tf_graph") -> jax.Array:
    """Resizes and normalises images for the network.

    Args:
      images: uint8 or float ``[N, H, W, 3]`` with values in [0, 255].
      image_size: S, the side the network sees (299 for every standard metric).
      preprocessing: ``"tf_graph"`` or ``"pytorch_fid"`` (module docstring).

    Returns:
      float32 ``[N, S, S, 3]``, roughly in [-1, 1].
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Images have shape {tuple(images.shape)}; expected [N, H, W, 3] "
                         "RGB in [0, 255] (NHWC).")
    x = images.astype(jnp.float32)
    _, height, width, _ = x.shape
    if height != image_size:
        rows = jnp.asarray(bilinear_resize_matrix(height, image_size, preprocessing))
        x = jnp.einsum("SH,NHWC->NSWC", rows, x, precision=HIGHEST)  # [N, S, W, 3]
    if width != image_size:
        cols = jnp.asarray(bilinear_resize_matrix(width, image_size, preprocessing))
        x = jnp.einsum("TW,NSWC->NSTC", cols, x, precision=HIGHEST)  # [N, S, S, 3]
    if preprocessing == "tf_graph":
        return (x - 128.0) / 128.0
    return x / 127.5 - 1.0


# ----------------------------------------------------------------------------- layers

def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """``[N, H, W, C]`` -> ``[N, H', W', C]``; padding never wins (it is -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), pad)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the valid pixels only (``count_include_pad=False``)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class FrozenBatchNorm(nnx.Module):
    """Inference batch norm with fixed statistics.

    All four arrays are ``nnx.Param`` (not ``BatchStat``): the network is never trained,
    and this way the export/restore machinery, which handles ``nnx.Param``, covers them.
    """

    def __init__(self, channels: int, epsilon: float = BN_EPSILON):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., C]`` -> ``[..., C]``."""
        factor = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.epsilon)
        return (x - self.mean[...]) * factor + self.bias[...]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nnx.Module):
    """conv (no bias) -> frozen batch norm -> ReLU; ``conv.kernel`` is ``[kh, kw, Cin, Cout]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding=0, *, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                             rngs=rngs)
        self.bn = FrozenBatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, Cin]`` -> ``[N, H', W', Cout]``."""
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """35x35 block (``Mixed_5b..5d``): 1x1, 5x5, double 3x3 and avg-pool branches."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, h, w, Cin]`` -> ``[N, h, w, 224 + pool_features]``."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction 35 -> 17 (``Mixed_6a``): strided 3x3, double 3x3 and max-pool."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, h, w, Cin]`` -> ``[N, (h-3)//2+1, (w-3)//2+1, 480 + Cin]``."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block (``Mixed_6b..6e``): 1x1, factorised 7x7, double 7x7 and avg-pool."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, s, s, Cin]`` -> ``[N, s, s, 768]``; channels 0..191 are ``branch1x1``."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction 17 -> 8 (``Mixed_7a``): 3x3, 7x7-then-3x3 (both strided), max-pool."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, s, s, 768]`` -> ``[N, (s-3)//2+1, (s-3)//2+1, 1280]``."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block (``Mixed_7b`` with an avg pool, ``Mixed_7c`` with a max pool)."""

    def __init__(self, in_channels: int, pool: str, *, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, h, w, Cin]`` -> ``[N, h, w, 2048]``."""
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


# ----------------------------------------------------------------------------- network

class InceptionV3(nnx.Module):
    """The FID Inception-v3; attribute names follow the PyTorch state_dict keys.

    Example:
      >>> net = load_inception("checkpoints/inception")
      >>> out = net(images)              # uint8 [N, 256, 256, 3]
      >>> out["pool"].shape, out["spatial"].shape, out["logits"].shape
      ((N, 2048), (N, 2023), (N, 1008))
    """

    def __init__(self, *, image_size: int = IMAGE_SIZE, preprocessing: str = "tf_graph",
                 rngs: nnx.Rngs):
        """
        Args:
          image_size: S, the side images are resized to. Keep 299 for any reported number;
            smaller sides (>= 75) only make tests cheap.
          preprocessing: ``"tf_graph"`` (OpenAI evaluator) or ``"pytorch_fid"``.
          rngs: initialises the (to be overwritten) parameters.
        """
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"Unknown preprocessing {preprocessing!r}; use one of "
                             f"{PREPROCESSING}.")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size} is too small for Inception-v3; use "
                             f">= {MIN_IMAGE_SIZE} (299 for reportable metrics).")
        self.image_size = image_size
        self.preprocessing = preprocessing
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
        self.fc = nnx.Linear(POOL_FEATURES, NUM_CLASSES, precision=HIGHEST, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Features of a batch.

        Args:
          images: uint8 or float ``[N, H, W, 3]`` in [0, 255].

        Returns:
          ``pool`` float32 ``[N, 2048]``, ``spatial`` ``[N, 7 * s * s]`` (2023 at S = 299),
          ``logits`` ``[N, 1008]`` (no bias); see the module docstring.
        """
        x = preprocess(images, self.image_size, self.preprocessing)  # [N, S, S, 3]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)  # [N, 73, 73, 64]
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)  # [N, 35, 35, 192]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d):
            x = block(x)
        # mixed_6/conv:0 = Mixed_6d.branch1x1 after BN+ReLU = the block's first channels.
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # [N, s*s*7], (h, w, c)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends at [N, 8, 8, 2048]
        pool = x.mean(axis=(1, 2))  # [N, 2048]
        logits = jnp.dot(pool, self.fc.kernel[...], precision=HIGHEST)  # [N, 1008]
        return {"pool": pool, "spatial": spatial, "logits": logits}


def spatial_side(image_size: int = IMAGE_SIZE) -> int:
    """s, the side of the 17x17 stage for an S-pixel input (17 for 299)."""
    side = (image_size - 3) // 2 + 1  # Conv2d_1a (stride 2)
    side = side - 2  # Conv2d_2a
    side = (side - 3) // 2 + 1  # max pool
    side = side - 2  # Conv2d_4a
    side = (side - 3) // 2 + 1  # max pool
    return (side - 3) // 2 + 1  # Mixed_6a


def config_json() -> str:
    """The ``inception_config.json`` of an export."""
    return json.dumps({"architecture": ARCHITECTURE, "num_classes": NUM_CLASSES,
                       "source": WEIGHTS_FILE}, indent=2)


def load_inception(directory: str | pathlib.Path, *, image_size: int = IMAGE_SIZE,
                   preprocessing: str = "tf_graph") -> InceptionV3:
    """Loads an export written by ``python -m hmar_jax.convert inception``.

    Args:
      directory: the export directory.
      image_size, preprocessing: runtime choices (see :class:`InceptionV3`).

    Raises:
      FileNotFoundError: ``directory`` is not an Inception export (the message says how
        to make one).
    """
    from hmar_jax import checkpointing  # local: orbax is a heavy import

    directory = pathlib.Path(directory)
    if not ((directory / f"{KIND}_config.json").is_file()
            and (directory / checkpointing.PARAMS_DIR).is_dir()):
        raise FileNotFoundError(
            f"{directory} is not an Inception export (no {KIND}_config.json and params/ "
            f"inside). Create it once with `python -m hmar_jax.convert inception --src "
            f"{WEIGHTS_FILE} --out {directory}`; the .pth is pytorch-fid's release file "
            f"{WEIGHTS_URL}.")
    config = checkpointing.read_config(directory, KIND)
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{directory} holds {config.get('architecture')!r}, not the FID "
                         f"Inception ({ARCHITECTURE}); convert {WEIGHTS_FILE} again.")
    return checkpointing.restore_into(
        directory, lambda: InceptionV3(image_size=image_size, preprocessing=preprocessing,
                                       rngs=nnx.Rngs(0)))
