"""Helpers shared by ``test_compiled_structure.py`` and the behaviour tests that run the same
programs: kernel-call counting and the programs both inspect (not a test module)."""

import collections

import jax
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from hmar_jax import sharding
from hmar_jax.execution import resolved
from hmar_jax.pallas import adaln, bias_gelu
from hmar_jax.tokenizer.model import VQVAEConfig
from hmar_jax.transformer import HMARTransformer, preset

# A small tokenizer with attention in both halves, run with and without the GroupNorm kernels.
SMALL_TOKENIZER = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2),
                              num_res_blocks=1, using_sa=True, norm_groups=8,
                              patch_nums=(1, 2, 4))


def kernel_calls(jaxpr, count_inputs_of: str | None = None) -> collections.Counter:
    """Pallas calls by kernel name in a jaxpr and its sub-jaxprs (rematerialised ones too);
    with ``count_inputs_of``, that kernel's calls by their number of inputs instead."""
    calls = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pallas_call", "mpmd_map"):  # Triton / Mosaic GPU kernels
            name = str(eqn.params["name"])
            if count_inputs_of is None:
                calls[name] += 1
            elif name == count_inputs_of:
                calls[len(eqn.invars)] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            calls.update(kernel_calls(sub, count_inputs_of))
    return calls


def fsdp_gradient(scan_blocks: bool):
    """The jitted parameter gradient of a tiny model's mean-square loss, as the trainer's loss
    gathers weights (``sharding.gather_outside_blocks``), with its arguments unsharded and
    placed on a (data 2, fsdp 4) mesh: parameters FSDP-sharded, the batch of 8 split.

    Width 128 and 200 classes, so the class embedding and the head are sharded too.

    Returns:
        ``(grad_fn, (params, x [8, L-1, 8], labels [8]), placed arguments, mesh)``.
    """
    model = HMARTransformer(preset("tiny", width=128, vocab_size=256, num_classes=200),
                            resolved("cpu", scan_blocks=scan_blocks), rngs=nnx.Rngs(0))
    layout = model.config.layout
    x = jax.random.normal(jax.random.key(1), (8, layout.seq_len - 1, 8))
    labels = jnp.arange(8) % 11
    graphdef, params = nnx.split(model)

    def loss_fn(params, x, labels):
        model = nnx.merge(graphdef, sharding.gather_outside_blocks(params))
        return jnp.mean(model(x, labels) ** 2)

    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
    batch = sharding.batch_sharding(mesh)
    placed = (jax.device_put(params, sharding.tree_shardings(params, mesh)),
              jax.device_put(x, batch), jax.device_put(labels, batch))
    return jax.jit(jax.grad(loss_fn)), (params, x, labels), placed, mesh


def norm_gelu_norm(x, branch, gate, scale, shift, bias, *, eps: float, implementation: str):
    """The AdaLN and bias + GELU kernels chained as in a block: the residual add with the
    norm, bias + GELU on its output, then the plain norm.

    Args:
        x: [B, L, C] residual stream.
        branch: [B, L, C] branch output added under ``gate``.
        gate, scale, shift: [B, C] AdaLN vectors.
        bias: [C].
        eps: the norms' epsilon.
        implementation: the kernels' implementation (``"interpret"`` on CPU).

    Returns:
        ``(x_out [B, L, C], h [B, L, C])``: the updated stream and the second norm's output.
    """
    norm = dict(eps=eps, out_dtype=jnp.float32, implementation=implementation)
    x_out, h = adaln.add_layer_norm_modulate(x, branch, gate, scale, shift, **norm)
    h = adaln.layer_norm_modulate(x_out + bias_gelu.bias_gelu(h, bias, implementation), scale,
                                  shift, **norm)
    return x_out, h
