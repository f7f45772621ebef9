"""Pallas kernels with their references.

Every op is arranged the same way: a plain-jnp ``reference_*`` (the oracle, and what runs
for the ``"xla"`` implementation), the kernels (``forward``/``backward`` Pallas calls), a
``jax.custom_vjp`` wrapper joining them, and one public function that takes a resolved
``Implementation`` and goes through ``dispatch.dispatch`` (reference, or the kernel on
each device's share of the batch):

| op | module | public function |
|---|---|---|
| LayerNorm + AdaLN modulation (+ residual add) | ``adaln``, ``adaln_mosaic_gpu`` | ``layer_norm_modulate``, ``add_layer_norm_modulate`` |
| FFN bias + GELU | ``bias_gelu`` | ``bias_gelu`` |
| tokenizer GroupNorm (+ SiLU) | ``group_norm`` | ``group_norm`` |
| attention q/k/v prologue backward | ``qkv_prologue`` | ``prologue_backward`` |
| block-sparse attention | ``reference``, ``kernel_gpu``, ``splash``, ``ops`` | ``ops.attention``, ``ops.hmar_attention`` |

Attention's kernels are large, so its parts live in their own modules: ``reference`` (the
oracle), ``kernel_gpu`` (the GPU kernels), ``splash`` (TPU: JAX's splash attention kernel,
used as a library, with its own ``custom_vjp``) and ``ops`` (the GPU kernels' ``custom_vjp``
and the public entry the model imports). The ``*_mosaic_gpu`` modules hold kernels for
Pallas's Mosaic GPU backend (Hopper), which the ops route through their one ``custom_vjp``.
"""
