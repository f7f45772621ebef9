"""Interpolation matrices against an independent float64 reference and known PyTorch values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.tokenizer import resample
from hmar_jax.scales import PATCH_NUMS


def keys_kernel(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel W(d), written from its textbook definition."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def reference_bicubic(n: int, m: int) -> np.ndarray:
    out = np.zeros((m, n))
    for i in range(m):
        x = (i + 0.5) * n / m - 0.5
        for tap in range(math.floor(x) - 1, math.floor(x) + 3):
            out[i, min(max(tap, 0), n - 1)] += keys_kernel(x - tap)
    return out


def reference_area(n: int, m: int) -> np.ndarray:
    out = np.zeros((m, n))
    for i in range(m):
        lo, hi = math.floor(i * n / m), math.ceil((i + 1) * n / m)
        out[i, lo:hi] = 1 / (hi - lo)
    return out


SIDE_PAIRS = sorted({(p[-1], s) for p in PATCH_NUMS.values() for s in p} | {(7, 3), (3, 7)})


@pytest.mark.parametrize("n, m", SIDE_PAIRS)
def test_matrices_match_float64_reference(n, m):
    np.testing.assert_allclose(resample.area_matrix(n, m), reference_area(n, m), atol=1e-15)
    np.testing.assert_allclose(resample.area_matrix(n, m).sum(1), 1.0, atol=1e-12)
    up = resample.bicubic_matrix(m, n)
    np.testing.assert_allclose(up, reference_bicubic(m, n), atol=1e-12)
    np.testing.assert_allclose(up.sum(1), 1.0, atol=1e-12)


def test_known_pytorch_values():
    np.testing.assert_allclose(resample.bicubic_matrix(2, 16)[0], [1.1038, -0.1038],
                               atol=5e-5)
    np.testing.assert_allclose(resample.bicubic_matrix(1, 5), np.ones((5, 1)))
    widths = (resample.area_matrix(16, 13) > 0).sum(1)
    np.testing.assert_array_equal(widths, [2, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 2])
    starts = (resample.area_matrix(16, 5) > 0).argmax(1)
    np.testing.assert_array_equal(starts, [0, 3, 6, 9, 12])  # overlapping windows of 4
    np.testing.assert_array_equal(resample.area_matrix(16, 16), np.eye(16))
    np.testing.assert_array_equal(resample.bicubic_matrix(16, 16), np.eye(16))


@pytest.mark.parametrize("kind, n, m", [("area", 16, 5), ("bicubic", 3, 16)])
def test_resize_is_separable_matrix_product(kind, n, m):
    x = np.random.default_rng(0).normal(size=(2, n, n, 4))
    matrix = (resample.area_matrix if kind == "area" else resample.bicubic_matrix)(n, m)
    expected = np.einsum("mh,bhwc,nw->bmnc", matrix, x, matrix)
    got = resample.resize(jnp.asarray(x, jnp.float32), m, kind)
    assert got.shape == (2, m, m, 4)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        resample.resize(jnp.zeros((1, 4, 5, 2)), 2, "area")
    with pytest.raises(ValueError, match="Unknown resampling"):
        resample.resize(jnp.zeros((1, 4, 4, 2)), 2, "nearest")


def test_bilinear_matches_pytorch_half_pixel_convention():
    # F.interpolate(mode="bilinear", align_corners=False): source x = (i + 0.5) n / m - 0.5,
    # clamped at 0; the last tap repeats at the border.
    np.testing.assert_allclose(resample.bilinear_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(resample.bilinear_matrix(2, 4),
                               [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(resample.bilinear_matrix(5, 3).sum(1), 1.0)
