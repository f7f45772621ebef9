"""The d16 training step and sampler lowered for CUDA, on CPU, with the Mosaic GPU kernels.

``jax.export(..., platforms=["cuda"])`` lowers a jitted program with the CUDA rules of every
op, Pallas's included, without a GPU. With ``attention`` and ``layer_norm`` on ``"mosaic_gpu"``
and the GELU and the tokenizer's GroupNorm on XLA (``hmar_jax.execution``), the programs
hold the Mosaic GPU kernels and no kernel on Pallas's deprecated Triton lowering: lowering
them raises no Pallas deprecation warning (the Triton kernels' lowering, which needs a GPU
to finish, raises it at once). The Mosaic GPU lowering runs in Python here, through its
register layouts and TMA copies, so a layout or copy the backend cannot express fails these
tests; the kernels' own compilation (ptxas) happens on a GPU and is not checked here; the
interpret-mode tests check their numbers.

The model and optimizer state are abstract (``jax.eval_shape``): the d16 shapes cost no
memory. The step reads cached token indices (``config.data.pretokenized``), so a narrow
tokenizer with the released vocabulary, latent channels and scales stands in for the
released one (as in ``test_tpu_export``).
"""

import collections
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

from hmar_jax.execution import ExecutionConfig
from hmar_jax.pallas import adaln
from hmar_jax.sampling import PRESETS
from hmar_jax.tokenizer.model import VQVAEConfig
from hmar_jax.training import trainer as trainer_lib
from hmar_jax.transformer import preset

from export_helpers import d16_trainer, export_sampler, export_step

NO_TRITON = dict(attention="mosaic_gpu", layer_norm="mosaic_gpu", gelu="xla", group_norm="xla")
MOSAIC_CALL, TRITON_CALL = "mosaic_gpu_v2", "__gpu$xla.gpu.triton"

pytestmark = [pytest.mark.compiled_structure, pytest.mark.slow]


def _pallas_deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, DeprecationWarning) and "Pallas" in str(w.message)]


def _exported(export) -> tuple[collections.Counter, list[str]]:
    """The exported module's custom calls (target -> count) and the Pallas deprecation
    warnings its lowering raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = export().mlir_module()
    calls = collections.Counter(re.findall(r'custom_call @"?([\w$.]+)', text))
    return calls, _pallas_deprecations(caught)


def _mosaic_kernels(export) -> collections.Counter:
    """The Mosaic GPU kernels (name -> count) in the exported module."""
    return collections.Counter(re.findall(r"(hmar_[a-z_]+?)_mosaic_gpu",
                                          export().mlir_module()))


def _export_step(trainer: trainer_lib.Trainer):
    inputs = jax.ShapeDtypeStruct((jax.device_count(), trainer.cfg.layout.seq_len), jnp.int32)
    return export_step(trainer, inputs, "cuda")


def test_d16_training_step_with_mosaic_kernels_lowers_without_triton(tmp_path, monkeypatch):
    trainer = d16_trainer(tmp_path, monkeypatch, "variant=d16", "gpu", **NO_TRITON)
    calls, deprecations = _exported(lambda: _export_step(trainer))
    assert deprecations == []
    assert TRITON_CALL not in calls
    # Per block: the attention's forward, dK/dV and dQ; the two norms' forwards twice (the
    # step's, and the backward's rerun under dots_attention_saveable), their backwards once.
    assert calls[MOSAIC_CALL] == (3 + 2 * 3) * trainer.cfg.depth


def test_the_triton_kernels_raise_the_deprecation(tmp_path, monkeypatch):
    """The check's other side: lowering the Triton attention warns (and then stops: the
    Triton lowering reads the GPU's properties, which a CPU host has not)."""
    trainer = d16_trainer(tmp_path, monkeypatch, "variant=d16", "gpu", attention="gpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="No supported GPU devices"):
            _export_step(trainer)
    assert any("Triton backend is deprecated" in m for m in _pallas_deprecations(caught))


def test_d16_sampler_with_mosaic_kernels_lowers_without_triton():
    """``generate_batches``'s compiled sampler over weights built as ``load_pretrained``
    builds them for inference (forward only: the forward kernel alone)."""
    execution = ExecutionConfig(**NO_TRITON).resolve(platform="gpu", inference=True)
    calls, deprecations = _exported(lambda: export_sampler(
        preset("d16"), VQVAEConfig(), PRESETS["hmar-d16"], execution, "cuda"))
    assert deprecations == []
    assert TRITON_CALL not in calls and calls[MOSAIC_CALL] > 0


def _vjp_export(fn, *args):
    """``fn``'s forward and its vjp (cotangents like the outputs), lowered for CUDA."""
    def step(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(out)

    return lambda: jax.export.export(jax.jit(step), platforms=("cuda",))(*args)


def test_d16_norm_kernels_lower_without_triton():
    """Both AdaLN ops with ``"mosaic_gpu"``, forward and backward, at d16's shapes (B = 2,
    L = 680, C = 1024): float32 residual stream, bfloat16 branch and outputs."""
    batch, length, width = 2, 680, 1024
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    x, branch = spec((batch, length, width)), spec((batch, length, width), jnp.bfloat16)
    vec = spec((batch, width))
    norm = dict(eps=1e-6, out_dtype=jnp.bfloat16, implementation="mosaic_gpu")
    exports = {
        "add_layer_norm_modulate": _vjp_export(
            lambda *a: adaln.add_layer_norm_modulate(*a, **norm), x, branch, vec, vec, vec),
        "layer_norm_modulate": _vjp_export(
            lambda *a: adaln.layer_norm_modulate(*a, **norm), x, vec, vec),
    }
    for name, export in exports.items():
        calls, deprecations = _exported(export)
        assert deprecations == [] and TRITON_CALL not in calls, name
        assert calls[MOSAIC_CALL] == 2, (name, calls)  # the forward and the backward kernel
        assert _mosaic_kernels(export) == {"hmar_adaln_fwd": 1, "hmar_adaln_bwd": 1}, name
