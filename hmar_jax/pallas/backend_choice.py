"""Choosing between XLA's fusion and a Pallas kernel for an elementwise op."""

from __future__ import annotations

from typing import Literal

import jax

KernelBackend = Literal["auto", "xla", "pallas"]
KERNEL_BACKENDS: tuple[str, ...] = ("auto", "xla", "pallas")


def resolve_kernel_backend(backend: KernelBackend, what: str, platform: str | None = None) -> str:
    """``auto`` -> ``pallas`` on GPU, ``xla`` elsewhere; other names unchanged.

    ``what`` names the op in the error for an unknown backend (e.g. ``"GELU"``)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"Unknown {what} backend {backend!r}; use one of {KERNEL_BACKENDS}.")
    if backend == "auto":
        return "pallas" if (platform or jax.default_backend()) == "gpu" else "xla"
    return backend
