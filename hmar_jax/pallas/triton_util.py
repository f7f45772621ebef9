"""Small pieces the Pallas-on-Triton kernels (GPU, and interpret mode in the tests) share.

``load_rows`` / ``store_rows``: a ``[size, K]`` tile of a ``[L, K]`` ref starting at row
``start``, with rows past the sequence masked (``valid [size]`` bool; masked loads read 0).
``compiler_params``: the Triton launch settings every kernel here passes.
"""

from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def load_rows(ref, start, size: int, valid):
    """``ref[start:start + size, :]`` with the rows where ``valid`` is False read as 0."""
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=valid[:, None], other=0.0)


def store_rows(ref, start, size: int, valid, value):
    """Writes ``value`` (cast to the ref's dtype) to the valid rows of ``ref[start:start + size]``."""
    plgpu.store(ref.at[pl.ds(start, size), :], value.astype(ref.dtype), mask=valid[:, None])


def compiler_params(num_warps: int, num_stages: int = 1) -> plgpu.CompilerParams:
    """Triton's launch settings: warps per program and software-pipelining stages."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
