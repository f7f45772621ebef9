"""The structure of compiled programs: which Pallas kernels a jaxpr calls and how often, what
a remat policy saves, operand dtypes of matmuls, and which collectives compiled HLO holds.

These assertions pin how the library's choices (kernels, remat policies, sharding, dtypes)
show up in the program JAX builds, not what the program computes; the values are checked by
the behaviour tests of each module. A jax upgrade may change a program's structure (primitive
names, how remat or partitioning is written out) without a change in behaviour: then these
tests are updated to the new structure, and the library stays as it is. Every test here is
marked ``compiled_structure`` so such a run can select or leave out the whole set.

The kernels are traced in Pallas interpret mode, so the module runs on CPU; a kernel's
``pallas_call`` in the jaxpr is the same whichever backend would compile it.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from hmar_jax import execution, sharding
from hmar_jax.execution import resolved
from hmar_jax.pallas import adaln, bias_gelu, group_norm, ops, qkv_prologue, splash
from hmar_jax.pallas.reference import hmar_qkv
from hmar_jax.scales import ScaleLayout
from hmar_jax.tokenizer.model import VQVAE
from hmar_jax.transformer import HMARTransformer, layers, preset
from structure_helpers import SMALL_TOKENIZER, fsdp_gradient, kernel_calls, norm_gelu_norm

pytestmark = [pytest.mark.compiled_structure, pytest.mark.slow]

KERNEL = "interpret"


def _model_loss(cfg, run, x=None):
    """``(loss(params), params)`` for a model built from ``cfg`` and the resolved ``run``:
    the mean square of its stage-1 logits on ``x`` (zeros by default) with labels 1 and 2."""
    graphdef, params = nnx.split(HMARTransformer(cfg, run, rngs=nnx.Rngs(0)))
    if x is None:
        x = jnp.zeros((2, cfg.layout.seq_len - 1, cfg.latent_channels))

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(x, jnp.asarray([1, 2])) ** 2)

    return loss, params


def _gradient_kernel_calls(cfg, run):
    """Kernel calls by name in the jaxpr of the gradient of ``_model_loss``."""
    loss, params = _model_loss(cfg, run)
    return kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


# --- The output head: operand dtypes ---------------------------------------------------------

def test_bfloat16_head_runs_its_three_matmuls_on_bfloat16_operands():
    """``matmul_dtype="bfloat16"``: the head's matmul and the two of its backward take bf16
    operands (float32 accumulation; logits and gradients stay float32)."""
    graphdef, params = nnx.split(layers.Head(64, 32, matmul_dtype="bfloat16", rngs=nnx.Rngs(0)))

    def loss(h, params):
        return jnp.sum(nnx.merge(graphdef, params)(h) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.ones((2, 3, 64)), params)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


# --- The block stack: gradient assembly and FSDP collectives ----------------------------------

def test_unrolled_stack_gradients_are_one_concatenate_per_leaf():
    """Unrolled, each stacked parameter's gradient is assembled by one concatenate of the
    per-layer gradients, not summed from zero-padded copies (which XLA fused into a pass at
    a tenth of the memory bandwidth on the GPU)."""
    cfg = preset("tiny", depth=3)
    model = HMARTransformer(cfg, resolved("cpu", scan_blocks=False,
                                          remat="dots_attention_saveable"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jnp.zeros((2, cfg.layout.seq_len - 1, 8))

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(x, jnp.asarray([1, 2])) ** 2)

    text = jax.jit(jax.grad(loss)).lower(params).as_text()

    def result_shapes(op):
        pattern = rf"stablehlo\.{op}.*-> tensor<((?:[0-9]+x)*[0-9]+)xf32>"
        return {m.group(1) for m in re.finditer(pattern, text)}

    def shapes(module):
        return {"x".join(map(str, a.shape)) for a in jax.tree.leaves(nnx.state(module))}

    stacked, looped = shapes(model.blocks), shapes(model.blocks.ada_lin)  # ada_lin: one batched dot
    assert not stacked & result_shapes("pad")
    assert stacked - looped <= result_shapes("concatenate")


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_fsdp_gathers_weights_instead_of_moving_activations(scan_blocks):
    """With parameters FSDP-sharded and the batch split over a (2, 4) CPU mesh, the compiled
    gradient step all-gathers weights (each block's inside the block loop, the rest once, as
    the trainer's loss does) and has no all-to-all of activations. Unrolled, the AdaLN
    vectors of the whole stack are computed in a loop before the blocks, gathering each
    ``ada_lin``."""
    grad_fn, _, placed, mesh = fsdp_gradient(scan_blocks)
    with jax.set_mesh(mesh):
        hlo = grad_fn.lower(*placed).compile().as_text()
    assert "all-gather" in hlo and "all-to-all" not in hlo


# --- Remat policies: saved residuals and kernel reruns ----------------------------------------

def test_remat_policies_keep_what_they_say(capsys):
    """``dots_attention_saveable`` saves the attention kernel's output and row statistics of
    every block on top of the matmul outputs, and the backward does not run the kernel's
    forward again; ``projections_saveable`` saves those and the two branch outputs only,
    fewer residuals than ``dots_attention_saveable``; ``block`` saves nothing of a block,
    and its backward runs the kernel's forward again."""
    names = (layers.ATTENTION_PROJ_NAME, layers.FFN_OUT_NAME)
    saved, count, forward_kernels = {}, {}, {}
    cfg = preset("tiny")
    x = jax.random.normal(jax.random.key(1), (2, cfg.layout.seq_len - 1, 8))
    for remat in ("block", "dots_attention_saveable", "projections_saveable"):
        run = resolved("cpu", remat=remat, attention="pallas", scan_blocks=False)
        loss, params = _model_loss(cfg, run, x)
        jax.ad_checkpoint.print_saved_residuals(loss, params)
        printed = capsys.readouterr().out
        saved[remat] = [printed.count("output of pallas_call"),
                        *(printed.count(f"named '{name}'") for name in names)]
        count[remat] = len(printed.strip().splitlines())
        calls = kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        forward_kernels[remat] = calls[ops.FORWARD_KERNEL_NAME]
    d = cfg.depth
    assert saved == {"block": [0, 0, 0], "dots_attention_saveable": [2 * d, 0, 0],
                     "projections_saveable": [2 * d, d, d]}
    assert count["block"] < count["projections_saveable"] < count["dots_attention_saveable"]
    assert forward_kernels == {"block": 2 * d, "dots_attention_saveable": d,
                               "projections_saveable": d}


def test_attention_saving_policies_keep_the_mosaic_kernels_output():
    """The Mosaic GPU attention kernel (an ``mpmd_map`` inside a ``custom_vmap_call``, not a
    ``pallas_call``) is kept by the policies that keep the attention's output: its forward
    runs once per block in the gradient, twice under ``block``."""
    cfg = preset("tiny", width=128)  # head dim 64, which the Mosaic kernel takes
    # Traced only (never lowered), so the GPU resolution needs no GPU; the interpreter's
    # callbacks are effects that jax.checkpoint refuses.
    counts = {remat: _gradient_kernel_calls(cfg, resolved(
                  "gpu", remat=remat, scan_blocks=False, attention="mosaic_gpu"))[
                  ops.FORWARD_KERNEL_NAME]
              for remat in ("block", "dots_attention_saveable", "projections_saveable")}
    d = cfg.depth
    assert counts == {"block": 2 * d, "dots_attention_saveable": d, "projections_saveable": d}


def test_activations_policy_reruns_no_kernel():
    """``activations_saveable`` keeps every kernel's forward outputs (attention, AdaLN norms,
    bias + GELU) and the named activations: the gradient runs each forward kernel once,
    where ``block`` runs each twice."""
    cfg = preset("tiny", width=128, patch_nums=(2, 6))  # L = 40, C = 128: every kernel tiles
    counts = {remat: _gradient_kernel_calls(cfg, resolved(
                  "cpu", remat=remat, scan_blocks=False, attention="pallas", gelu="pallas",
                  layer_norm="pallas"))
              for remat in ("block", "activations_saveable")}
    d = cfg.depth
    forward = (ops.FORWARD_KERNEL_NAME, adaln.FORWARD_KERNEL_NAME, bias_gelu.FORWARD_KERNEL_NAME)
    assert [counts["block"][k] for k in forward] == [2 * d, 4 * d, 2 * d]
    assert [counts["activations_saveable"][k] for k in forward] == [d, 2 * d, d]


@pytest.mark.parametrize("remat, deferred", [("none", True), ("projections_saveable", True),
                                             ("dots_attention_saveable", False)])
def test_unrolled_stack_defers_each_ffn_add_into_the_next_norm_kernel(remat, deferred):
    """Unrolled, a block's FFN residual add runs inside the next block's first AdaLN kernel
    (``forward_deferred``) unless the remat policy would then keep one more activation per
    block: deferred, the forward calls the add variant of the norm kernel ``2 depth - 1``
    times (only the last block's add is left to XLA), else ``depth`` times."""
    cfg = preset("tiny", depth=2, width=64, patch_nums=(2, 6))  # L = 40: rows of 8 tile it
    run = resolved("cpu", scan_blocks=False, layer_norm="pallas", remat=remat)
    loss, params = _model_loss(cfg, run)
    gradient = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    norm_inputs = kernel_calls(gradient, count_inputs_of=adaln.FORWARD_KERNEL_NAME)
    runs = 1 if remat == "none" else 2  # the policies rerun the forward kernels in the backward
    d = cfg.depth
    # inputs (x, scale, shift) without an add, (x, branch, gate, scale, shift) with one
    assert norm_inputs == ({3: runs, 5: (2 * d - 1) * runs} if deferred
                           else {3: d * runs, 5: d * runs})


# --- AdaLN and bias + GELU kernels under a mesh -----------------------------------------------

@pytest.mark.devices(4)
@pytest.mark.parametrize("mesh_spec", [(("data", 4),), (("data", 2), ("fsdp", 2))])
def test_adaln_and_gelu_kernels_run_per_device_under_a_mesh(mesh_spec):
    """Under a 4-device CPU mesh (data parallel, or data x fsdp with the batch split over
    both axes as the trainer splits it) the Pallas calls (AdaLN norms, bias + GELU) run per
    device: the compiled gradient all-gathers no activation, and its only all-reduce is the
    bias gradient's sum over devices."""
    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:4])
    batch = sharding.batch_sharding(mesh)
    stream = jax.ShapeDtypeStruct((8, 16, 128), jnp.float32, sharding=batch)
    vector = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=batch)
    args = (stream, stream.update(dtype=jnp.bfloat16), vector, vector, vector,
            jax.ShapeDtypeStruct((128,), jnp.float32))

    def loss(*args):
        return sum(jnp.sum(y) for y in norm_gelu_norm(*args, eps=1e-6, implementation=KERNEL))

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=range(6))).lower(*args).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo


# --- Block-sparse attention kernel under a mesh -----------------------------------------------

@pytest.mark.devices(8)
@pytest.mark.parametrize("packed", [False, True])
def test_attention_kernel_runs_per_device_under_a_mesh(packed):
    """XLA cannot partition a Pallas call: under a batch-sharded mesh the op runs the kernel
    on each device's slice, with no all-gather of q/k/v (or of the packed projection; its
    bias and temperature are replicated)."""
    patch_nums = (1, 2, 3, 4)
    length = ScaleLayout(patch_nums).seq_len
    spec = ops.AttentionSpec("block_diagonal", patch_nums, KERNEL,
                             ops.KernelTiles(*(ops.KernelLaunch(16, 16),) * 3))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    if packed:
        inputs = (jax.ShapeDtypeStruct((8, length, 3, 2, 32), jnp.float32, sharding=sharded),)
        bias, temperature = jnp.zeros((3, 2, 32)), jnp.ones((2,))
        loss = lambda qkv: jnp.sum(ops.hmar_attention(qkv, bias, temperature, spec))  # noqa: E731
    else:
        inputs = (jax.ShapeDtypeStruct((8, length, 2, 32), jnp.float32, sharding=sharded),) * 3
        loss = lambda q, k, v: jnp.sum(ops.attention(q, k, v, spec))  # noqa: E731
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))
    with jax.set_mesh(mesh):
        hlo = grad_fn.lower(*inputs).compile().as_text()
    assert "all-gather" not in hlo


# --- The q/k/v prologue's backward kernel -----------------------------------------------------

def test_packed_attention_gradient_runs_the_prologue_kernel_once():
    """``hmar_attention`` (q/k/v prepared inside the forward kernel) runs the prologue's
    backward pass once in its gradient; attention on q, k, v prepared by ``hmar_qkv`` runs
    none."""
    qkv, bias, temperature = jnp.ones((2, 14, 3, 2, 16)), jnp.zeros((3, 2, 16)), jnp.ones((2,))
    spec = ops.AttentionSpec("block_diagonal", (1, 2, 3), KERNEL)
    packed = lambda *args: jnp.sum(ops.hmar_attention(*args, spec))  # noqa: E731
    prepared = lambda *args: jnp.sum(ops.attention(*hmar_qkv(*args), spec))  # noqa: E731
    assert [kernel_calls(jax.make_jaxpr(jax.grad(fn))(qkv, bias, temperature).jaxpr)
            [qkv_prologue.KERNEL_NAME] for fn in (packed, prepared)] == [1, 0]


def test_the_model_runs_the_prologue_kernel_with_the_attention_kernel():
    """The prologue's backward follows the attention implementation: a model whose
    attention runs the kernel runs the prologue pass once per block in its gradient; with
    the reference attention, none."""
    cfg = preset("tiny")
    calls = {attention: _gradient_kernel_calls(cfg, resolved("cpu", attention=attention))
             [qkv_prologue.KERNEL_NAME] for attention in ("pallas", "xla")}
    assert calls == {"pallas": 1, "xla": 0}  # scanned blocks: one call in the scan body


# --- GroupNorm kernels and the tokenizer ------------------------------------------------------

@pytest.mark.parametrize("height, width, channels, groups",
                         [(8, 8, 40, 8), (3, 5, 24, 4), (16, 16, 160, 32)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_runs_one_stats_kernel(height, width, channels, groups, silu):
    """The tilings of ``test_pallas_group_norm``: the statistics pass is one Pallas call."""
    x = jnp.ones((2, height, width, channels))
    scale, bias = jnp.ones((channels,)), jnp.zeros((channels,))
    jaxpr = jax.make_jaxpr(lambda x: group_norm.group_norm(
        x, scale, bias, groups=groups, eps=1e-6, silu=silu, implementation=KERNEL))(x)
    assert kernel_calls(jaxpr.jaxpr)[group_norm.STATS_KERNEL_NAME] == 1


@pytest.mark.devices(4)
def test_group_norm_kernels_run_per_device_under_a_mesh():
    """With the batch split over 4 CPU devices the GroupNorm kernels' compiled gradient
    all-gathers nothing."""
    mesh = sharding.make_mesh((("data", 4),), jax.devices()[:4])
    x = jax.ShapeDtypeStruct((8, 8, 8, 40), jnp.float32, sharding=sharding.batch_sharding(mesh))
    channel = jax.ShapeDtypeStruct((40,), jnp.float32)
    loss = lambda x, scale, bias: jnp.sum(group_norm.group_norm(  # noqa: E731
        x, scale, bias, groups=8, eps=1e-6, silu=True, implementation=KERNEL))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, channel, channel).compile()
    assert "all-gather" not in compiled.as_text()


def test_bfloat16_tokenizer_runs_the_stats_kernel_once_per_norm():
    """The tokenizer's bf16 encode and decode with ``group_norm="pallas"`` run the statistics
    kernel once per GroupNorm; with ``"xla"``, or at float32 precision (flax's two-pass
    GroupNorm), never."""
    images = jnp.zeros((2, 8, 8, 3))
    stats_calls = {}
    for precision, choice in (("highest", "pallas"), ("bfloat16", "xla"), ("bfloat16", "pallas")):
        vae = VQVAE(SMALL_TOKENIZER, resolved("cpu", tokenizer_precision=precision,
                                              group_norm=choice), rngs=nnx.Rngs(0))
        jaxpr = jax.make_jaxpr(lambda x: vae.decode_latent(vae.encode_latent(x)))(images)
        stats_calls[precision, choice] = kernel_calls(jaxpr.jaxpr)[group_norm.STATS_KERNEL_NAME]
    # encoder: 2 levels x 1 resnet block x 2 norms, mid 2 x 2, norm_out, 2 attention norms;
    # decoder: mid 2 x 2, 2 levels x 2 blocks x 2, norm_out, 3 attention norms
    assert stats_calls == {("bfloat16", "xla"): 0, ("bfloat16", "pallas"): 27,
                           ("highest", "pallas"): 0}


# --- Splash attention, the TPU default --------------------------------------------------------

def test_tpu_default_is_splash_and_remat_keeps_its_output():
    """The TPU resolution of the execution defaults runs attention on splash and no other
    Pallas kernel, in both branches and their gradients; ``dots_attention_saveable`` (the
    TPU default) keeps splash's forward output, so the backward does not run the forward
    kernel again, while ``block`` does (traced only: nothing runs on CPU)."""
    assert execution.ExecutionConfig().resolve(platform="tpu").attention == "tpu"
    cfg = preset("tiny")
    layout = cfg.layout
    x = jax.random.normal(jax.random.key(1), (2, layout.seq_len - 1, cfg.latent_channels))
    labels = jnp.asarray([1, 2])
    masked = jnp.zeros((1, layout.seq_len - 1), bool).at[:, ::3].set(True)
    forward_kernels = {}
    for remat in ("dots_attention_saveable", "block"):
        run = execution.ExecutionConfig(remat=remat, scan_blocks=False).resolve(platform="tpu")
        graphdef, params = nnx.split(HMARTransformer(cfg, run, rngs=nnx.Rngs(0)))

        def loss(params):
            model = nnx.merge(graphdef, params)
            return (jnp.mean(model(x, labels).astype(jnp.float32) ** 2)
                    + jnp.mean(model.forward_masked(x, x, masked, labels) ** 2))

        calls = kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        assert all(name.startswith("splash_mha_") for name in calls), calls
        forward_kernels[remat] = calls[splash.FORWARD_KERNEL_NAME]
        # one backward per block run: depth (stage 1) + depth (shared trunk and mask branch)
        assert calls["splash_mha_dq_no_residuals"] == calls["splash_mha_dkv_no_residuals"] == \
            2 * cfg.depth
    assert forward_kernels == {"dots_attention_saveable": 2 * cfg.depth, "block": 4 * cfg.depth}
