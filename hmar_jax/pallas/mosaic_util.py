"""Small pieces the memory-bound Mosaic GPU kernels (``adaln_mosaic_gpu``,
``bias_gelu_mosaic_gpu``) share.

``load_in_bounds``: a TMA load that the caller knows to be in bounds. ``pipeline``: a loop of
steps over shared-memory buffers of ``S`` slots, the TMA loads of the next steps in flight
while a step computes and each step's outputs stored by TMA. It is written out here rather
than taken from ``plgpu.emit_pipeline`` because its output stores are predicated, which
Mosaic GPU's interpreter does not run, and the kernels are tested in that interpreter.
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def load_in_bounds(src, dst, barrier) -> None:
    """TMA load of ``src`` (GMEM) into ``dst`` (SMEM), completing on ``barrier``.

    Promising in-bounds lets a contiguous slice (whole rows of a row-major array) go as one
    plain bulk copy, which has no tensor map and so no limit of 256 elements per box
    dimension; other slices go through a tensor map as usual."""
    plgpu.copy_gmem_to_smem(src, dst, barrier, oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)


def pipeline(steps: int, sources, inputs, barriers, destinations, outputs, body, carry=None):
    """Runs ``body(step, input_tiles, output_tiles, carry) -> carry`` for ``step`` in
    ``[0, steps)`` and returns the last carry.

    ``inputs[i]`` is a ``[S, *tile]`` shared-memory buffer that TMA fills with
    ``sources(step)[i]`` (a GMEM ref) up to ``S`` steps ahead, ``barriers[i]`` its ``S``
    barriers; ``outputs[i]`` is a ``[S, *tile]`` buffer whose slot the body writes and which
    is stored to ``destinations(step)[i]`` after the step. A slot's inputs are refilled after
    the step's ``commit_smem`` (a fence and a warpgroup barrier: every thread has read
    them), and its outputs are rewritten only after the stores issued ``S`` steps earlier
    have read them.
    """
    stages = inputs[0].shape[0]

    def issue(step, slot):
        for src, buf, bar in zip(sources(step), inputs, barriers):
            load_in_bounds(src, buf.at[slot], bar.at[slot])

    for step in range(min(stages, steps)):
        issue(step, step)

    def loop(step, carry):
        slot = lax.rem(step, stages)
        for bar in barriers:
            plgpu.barrier_wait(bar.at[slot])
        # the stores from this slot, issued S steps ago (one group per output), have read it
        plgpu.wait_smem_to_gmem((stages - 1) * len(outputs), wait_read_only=True)
        carry = body(step, [buf.at[slot] for buf in inputs], [buf.at[slot] for buf in outputs],
                     carry)
        plgpu.commit_smem()
        for buf, dst in zip(outputs, destinations(step)):
            plgpu.copy_smem_to_gmem(buf.at[slot], dst)
        pl.when(step + stages < steps)(lambda: issue(step + stages, slot))
        return carry

    carry = lax.fori_loop(0, steps, loop, carry)
    plgpu.wait_smem_to_gmem(0)
    return carry
