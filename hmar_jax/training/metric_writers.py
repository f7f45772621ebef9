"""TF-free CLU metric writers: console logging plus TensorBoard event files.

CLU 0.0.12's ``clu.metric_writers`` package imports a TensorFlow summary writer at
import time. We never install TensorFlow, so ``import_clu`` registers a stand-in for that
one submodule before importing CLU; everything else in CLU (``LoggingWriter``,
``AsyncMultiWriter``, ``periodic_actions``) then imports and works. Event files are written
with tensorboardX instead. The project reaches CLU only through ``import_clu``, so no import
order can break it, and importing this module changes nothing.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Mapping

import numpy as np

_TF_SUMMARY_WRITER = "clu.metric_writers.summary_writer"


def import_clu() -> tuple[types.ModuleType, types.ModuleType]:
    """``(clu.metric_writers, clu.periodic_actions)``, importable without TensorFlow.

    Registers the stand-in for CLU's TensorFlow writer unless a summary writer module is
    already loaded (TensorFlow installed, or an earlier call); an earlier failed import of
    CLU left nothing behind, so this works whatever imported CLU before."""
    if _TF_SUMMARY_WRITER not in sys.modules:
        stub = types.ModuleType(_TF_SUMMARY_WRITER)

        class SummaryWriter:  # pylint: disable=too-few-public-methods
            """Stand-in for CLU's TensorFlow writer; use TensorBoardXWriter."""

            def __init__(self, *args, **kwargs):
                raise ImportError("CLU's TensorFlow SummaryWriter is unavailable (no "
                                  "TensorFlow); use hmar_jax.training.metric_writers."
                                  "create_writer.")

        stub.SummaryWriter = SummaryWriter
        sys.modules[_TF_SUMMARY_WRITER] = stub
    from clu import metric_writers, periodic_actions

    return metric_writers, periodic_actions


class TensorBoardXWriter:
    """Writes scalars, images, texts, histograms and hparams as TensorBoard events (CLU's
    ``MetricWriter`` interface; CLU's writers call it by its methods only)."""

    def __init__(self, logdir: str):
        import tensorboardX  # local: only the writing process needs it

        self._writer = tensorboardX.SummaryWriter(logdir=str(logdir))

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None):
        self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            array = np.asarray(value)
            if array.ndim == 3:
                array = array[None]
            self._writer.add_images(key, array, global_step=step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        pass  # not produced by this project

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        pass  # not produced by this project

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step,
                                       bins=(num_buckets or {}).get(key, "tensorflow"))

    def write_hparams(self, hparams: Mapping[str, Any]):
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(clean.items())))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


def create_writer(logdir: str | None, *, just_logging: bool = False):
    """A CLU ``MetricWriter``: console logging, plus TensorBoard events under ``logdir``
    unless ``just_logging``.

    Non-zero processes of a multi-host job should pass ``just_logging=True``.
    """
    metric_writers, _ = import_clu()
    writers = [metric_writers.LoggingWriter()]
    if logdir and not just_logging:
        writers.append(TensorBoardXWriter(logdir))
    return metric_writers.AsyncMultiWriter(writers)


def quiet_library_logs(packages: tuple[str, ...] = ("orbax", "grain")) -> None:
    """Hides INFO chatter of ``packages`` from the absl log (warnings still show)."""
    import logging as std_logging

    from absl import logging as absl_logging

    class _Filter(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            noisy = any(f"/{p}/" in record.pathname for p in packages)
            return record.levelno >= std_logging.WARNING or not noisy

    absl_logging.get_absl_handler().addFilter(_Filter())
