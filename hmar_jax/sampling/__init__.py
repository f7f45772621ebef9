"""Sampling: the HMAR sampler loop, zero-shot editing targets, named presets, and the
multi-device batch driver.

| module | holds |
|---|---|
| ``sampler`` | ``SamplingConfig``, ``generate`` (the loop; edits are a mode of it), ``edit`` |
| ``editing`` | ``EditTarget``, ``edit_target``, ``box_mask`` (masks and targets only) |
| ``presets`` | ``PRESETS`` per released checkpoint, ``resolve_preset`` |
| ``batch`` | ``generate_batches``: many samples, sharded over devices |
| ``visualize`` | ``to_uint8``, sample grids |
| ``commands`` | what the sampling command lines share (flags, checks, opening a bundle) |
"""

from hmar_jax.sampling.batch import generate_batches
from hmar_jax.sampling.editing import EditTarget, box_mask, edit_target
from hmar_jax.sampling.presets import PRESETS, check_preset_name, resolve_preset
from hmar_jax.sampling.sampler import (SamplingConfig, check_labels, default_mask_schedule,
                                       draw_tokens, edit, filter_logits, generate,
                                       generate_compiled, sample_keys)
from hmar_jax.sampling.visualize import to_uint8

__all__ = ["generate_batches", "EditTarget", "box_mask", "edit_target", "PRESETS",
           "check_preset_name", "resolve_preset", "SamplingConfig", "check_labels",
           "default_mask_schedule", "draw_tokens", "edit", "filter_logits", "generate",
           "generate_compiled", "sample_keys", "to_uint8"]
