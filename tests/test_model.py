"""HMAR transformer: upstream parity, the Markov property, VAR mode, sizes, stage-2 freeze."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.training import losses
from hmar_jax.convert import torch_pickle
from hmar_jax.convert.__main__ import main as convert_main
from hmar_jax.execution import resolved
from hmar_jax.training.optim import STAGE2_TRAINABLE
from hmar_jax.transformer import (HMARConfig, HMARTransformer, count_params, is_mask_branch,
                                  preset)
from structure_helpers import fsdp_gradient

TOL = dict(atol=1e-4, rtol=1e-4)
CFG_LABELS = jnp.asarray([7, 10, 10, 10])  # generate(): [cond labels; null class]

# Each pass one program, not op by op (one compilation per model, shape and scale).
forward = nnx.jit(lambda model, x, labels: model(x, labels))
forward_masked = nnx.jit(lambda model, *args: model.forward_masked(*args))
forward_scale = nnx.jit(lambda model, k, *args, **kwargs: model.forward_scale(k, *args, **kwargs),
                        static_argnums=1)


@pytest.fixture(scope="module")
def hmar_sd(hmar_fixture):
    return {k[3:]: v for k, v in hmar_fixture.items() if k.startswith("sd/")}


@pytest.fixture(scope="module")
def upstream_hmar(hmar_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("hmar")
    torch_pickle.save_state_dict(root / "hmar-d2.pth", hmar_sd)
    assert convert_main(["hmar", "--src", str(root / "hmar-d2.pth"), "--out", str(root / "export")]) == 0
    return checkpointing.load_hmar(root / "export")


@pytest.fixture(scope="module")
def upstream_var(hmar_fixture, hmar_sd, tmp_path_factory):
    """The same next-scale weights in VAR key format, converted as VAR mode."""
    key_map = json.loads(str(hmar_fixture["config"]))["nsp_key_to_hmar_key"]
    var_sd = {var_key: hmar_sd[hmar_key] for var_key, hmar_key in key_map.items()}
    root = tmp_path_factory.mktemp("var")
    torch_pickle.save_state_dict(root / "var_d2.pth", var_sd)
    assert convert_main(["var", "--src", str(root / "var_d2.pth"), "--out", str(root / "export")]) == 0
    return checkpointing.load_hmar(root / "export")


@pytest.fixture(scope="module")
def inputs(hmar_fixture):
    x = jnp.asarray(hmar_fixture["x_BLCv"])
    return {"x": x, "x_mask": jnp.asarray(hmar_fixture["x_mask_BLCv"]),
            "labels": jnp.asarray(hmar_fixture["labels_B"]),
            "x_cfg": jnp.concatenate([x, x]),
            "x_mask_cfg": jnp.concatenate([jnp.asarray(hmar_fixture["x_mask_BLCv"])] * 2)}


def test_converted_config(upstream_hmar, upstream_var):
    cfg = upstream_hmar.config
    assert (cfg.depth, cfg.num_mask_layers, cfg.width, cfg.num_heads) == (2, 1, 128, 2)
    assert (cfg.vocab_size, cfg.num_classes, cfg.attention_pattern) == (256, 10, "block_diagonal")
    assert upstream_var.config.attention_pattern == "block_causal"
    assert upstream_var.config.num_mask_layers == 0 and upstream_var.mask_blocks is None


def test_stage1_logits_match_upstream(upstream_hmar, hmar_fixture, inputs):
    with jax.default_matmul_precision("highest"):
        logits = forward(upstream_hmar, inputs["x"], inputs["labels"])
    assert logits.shape == (2, 680, 256) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), hmar_fixture["ns_logits_BLV"], **TOL)


def test_masked_branch_logits_match_upstream(upstream_hmar, hmar_fixture, inputs):
    masked = np.zeros((1, 679), bool)
    masked[0, hmar_fixture["mp_idx_to_mask"]] = True
    with jax.default_matmul_precision("highest"):
        logits = forward_masked(upstream_hmar, inputs["x"], inputs["x_mask"], jnp.asarray(masked),
                                inputs["labels"])
    np.testing.assert_allclose(np.asarray(logits), hmar_fixture["mp_logits_BLV"], **TOL)


def test_per_scale_logits_match_upstream_generate(upstream_hmar, hmar_fixture, inputs):
    layout = upstream_hmar.config.layout
    with jax.default_matmul_precision("highest"):
        for k in range(6):
            x_k = None if k == 0 else inputs["x_cfg"][:, layout.input_slice(k)]
            logits = forward_scale(upstream_hmar, k, CFG_LABELS, x_k)
            np.testing.assert_allclose(np.asarray(logits), hmar_fixture[f"gen_ns_logits_s{k}_2BlV"],
                                       **TOL)


@pytest.mark.parametrize("k, step", [(1, 1), (2, 1), (2, 2), (2, 3), (5, 1), (5, 2)])
def test_mask_step_logits_match_upstream_generate(upstream_hmar, hmar_fixture, inputs, k, step):
    layout = upstream_hmar.config.layout
    positions = hmar_fixture[f"gen_mask_idx_s{k}_step{step}_Bn"]
    masked = np.zeros((2, layout.tokens_per_scale[k]), bool)
    np.put_along_axis(masked, positions, True, axis=1)
    rows = layout.input_slice(k)
    with jax.default_matmul_precision("highest"):
        logits = forward_scale(upstream_hmar, k, CFG_LABELS, inputs["x_cfg"][:, rows],
                               x_mask=inputs["x_mask_cfg"][:, rows],
                               masked=jnp.asarray(np.concatenate([masked, masked])))
    np.testing.assert_allclose(np.asarray(logits),
                               hmar_fixture[f"gen_mask_logits_s{k}_step{step}_2BlV"], **TOL)


def test_var_mode_matches_upstream_and_its_kv_cache(upstream_var, hmar_fixture, inputs):
    layout = upstream_var.config.layout
    with jax.default_matmul_precision("highest"):
        full = forward(upstream_var, inputs["x"], inputs["labels"])
        np.testing.assert_allclose(np.asarray(full), hmar_fixture["var_logits_BLV"], **TOL)
        cache = upstream_var.init_kv_cache(4)
        full_cfg = forward(upstream_var, inputs["x_cfg"], CFG_LABELS)
        for k in range(layout.num_scales):
            x_k = None if k == 0 else inputs["x_cfg"][:, layout.input_slice(k)]
            logits, cache = forward_scale(upstream_var, k, CFG_LABELS, x_k, kv_cache=cache)
            np.testing.assert_allclose(np.asarray(logits), np.asarray(full_cfg[:, layout.token_slice(k)]),
                                       atol=2e-5)
            if k < 6:
                np.testing.assert_allclose(np.asarray(logits),
                                           hmar_fixture[f"genkv_ns_logits_s{k}_2BlV"], **TOL)


@pytest.fixture(scope="module")
def tiny_model():
    return HMARTransformer(preset("tiny", init_adaln_gamma=0.5, init_head=1.0), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_blocks", [True, False])
@pytest.mark.slow
def test_markov_property_full_sequence_equals_each_scale_alone(tiny_model, scan_blocks):
    model = tiny_model
    if not scan_blocks:  # same weights, blocks unrolled
        model = HMARTransformer(tiny_model.config, resolved("cpu", scan_blocks=False),
                                rngs=nnx.Rngs(1))
        nnx.update(model, nnx.state(tiny_model))
    layout = model.config.layout
    x = jax.random.normal(jax.random.key(1), (3, layout.seq_len - 1, 8))
    labels = jnp.asarray([0, 5, 10])
    forward = nnx.jit(lambda model, x: model(x, labels))
    forward_scale = nnx.jit(lambda model, x_k, k: model.forward_scale(k, labels, x_k),
                            static_argnums=2)
    full = forward(model, x)
    assert float(jnp.std(full)) > 0.1  # non-trivial outputs
    for k in range(layout.num_scales):
        x_k = None if k == 0 else x[:, layout.input_slice(k)]
        np.testing.assert_allclose(np.asarray(forward_scale(model, x_k, k)),
                                   np.asarray(full[:, layout.token_slice(k)]), atol=1e-5)
    # Changing scale 1's inputs changes scale 1's logits and no other scale's.
    changed = forward(model, x.at[:, layout.input_slice(1)].add(1.0))
    assert float(jnp.abs(changed - full)[:, layout.token_slice(1)].max()) > 1e-3
    for k in (0, 2, 3):
        np.testing.assert_array_equal(np.asarray(changed[:, layout.token_slice(k)]),
                                      np.asarray(full[:, layout.token_slice(k)]))


def test_parameter_counts_match_the_spec_table():
    expected = {16: (310_283_520, 467_691_904, 157_408_384),
                20: (600_917_136, 845_517_872, 244_600_736),
                24: (1_033_399_360, 1_384_328_960, 350_929_600),
                30: (2_010_020_356, 2_556_324_212, 546_303_856)}
    for depth, (nsp, combined, stage2) in expected.items():
        cfg = preset(f"d{depth}")
        assert (cfg.width, cfg.num_heads, cfg.head_dim) == (64 * depth, depth, 64)
        assert count_params(cfg.replace(num_mask_layers=0)) == nsp
        assert count_params(cfg) == combined
        assert count_params(cfg, STAGE2_TRAINABLE) == stage2


@pytest.mark.slow
def test_upstream_initialisation_statistics():
    cfg = preset("tiny", width=256, num_heads=4, depth=4)
    model = HMARTransformer(cfg, rngs=nnx.Rngs(0))
    std = cfg.init_std
    assert float(jnp.std(model.class_emb.embedding[...])) == pytest.approx(std, rel=0.05)
    assert float(jnp.std(model.blocks.attn.mat_qkv.kernel[...])) == pytest.approx(std, rel=0.05)
    assert float(jnp.std(model.blocks.attn.proj.kernel[...])) == pytest.approx(std / np.sqrt(8), rel=0.05)
    ada = model.blocks.ada_lin.kernel[...]  # [depth, D, 6C]: gamma rows first
    assert float(jnp.std(ada[..., :2 * 256])) == pytest.approx(std * cfg.init_adaln_gamma, rel=0.05)
    assert float(jnp.std(ada[..., 2 * 256:])) == pytest.approx(std * 0.5, rel=0.05)
    assert float(jnp.std(model.head.kernel[...])) == pytest.approx(std * 0.02, rel=0.05)
    np.testing.assert_allclose(np.asarray(model.blocks.attn.scale_mul[...]), np.log(4.0), rtol=1e-6)
    assert float(jnp.abs(model.blocks.ada_lin.bias[...]).max()) == 0.0


def test_stage2_freeze_updates_only_the_mask_branch(tiny_model):
    graphdef, state = nnx.split(tiny_model)
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    layout = model.config.layout
    before = nnx.to_flat_state(nnx.clone(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=STAGE2_TRAINABLE)
    x = jax.random.normal(jax.random.key(2), (2, layout.seq_len - 1, 8))
    targets = jax.random.randint(jax.random.key(3), (2, layout.seq_len), 0, 64)
    masked = losses.sample_stage2_mask(jax.random.key(4), layout, ratio=jnp.asarray(0.5))[None]

    def loss_fn(model):
        logits = model.forward_masked(x, x * 0.5, masked, jnp.asarray([1, 2]), rng=jax.random.key(5))
        return losses.masked_cross_entropy(logits, targets, masked)[0]

    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, STAGE2_TRAINABLE)))(model)
    grad_paths = [p for p, _ in nnx.to_flat_state(grads)]
    assert grad_paths and all(is_mask_branch(p) for p in grad_paths)
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(  # one program
        optimizer, model, grads)
    changed = {path for (path, old), (_, new) in zip(before, nnx.to_flat_state(nnx.state(model, nnx.Param)))
               if not np.array_equal(np.asarray(old[...]), np.asarray(new[...]))}
    assert changed and all(is_mask_branch(p) for p in changed)
    assert any(p[0] == "mask_blocks" for p in changed) and ("mask_embed",) in changed


def test_bad_inputs_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"\[B, 29, 8\]"):
        tiny_model(jnp.zeros((2, 30, 8)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="Unknown HMARConfig keys"):
        HMARConfig.from_dict({"detph": 3})
    with pytest.raises(ValueError, match="num_mask_layers"):
        HMARConfig(depth=2, num_mask_layers=3)
    with pytest.raises(ValueError, match="Unknown attention_pattern 'causal'"):
        HMARConfig(depth=2, num_mask_layers=1, attention_pattern="causal")
    with pytest.raises(ValueError, match="Unknown model preset"):
        preset("d17")


def _variant_with_relative_logit_error(tiny_model, **execution):
    """``(model run with the CPU execution config with these settings and tiny_model's
    weights, relative L2 difference of its float32 logits from tiny_model's)`` on fixed
    inputs."""
    variant = HMARTransformer(tiny_model.config, resolved("cpu", **execution), rngs=nnx.Rngs(1))
    nnx.update(variant, nnx.state(tiny_model))
    x = jax.random.normal(jax.random.key(1), (2, tiny_model.config.layout.seq_len - 1, 8))
    labels = jnp.asarray([1, 10])
    reference, logits = forward(tiny_model, x, labels), forward(variant, x, labels)
    assert logits.dtype == jnp.float32
    return variant, float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference))


def test_bfloat16_compute_keeps_float32_logits_and_stays_close(tiny_model):
    fast, rel = _variant_with_relative_logit_error(tiny_model, compute_dtype="bfloat16",
                                                   head_dtype="float32")
    assert fast.blocks.attn.mat_qkv.dtype == jnp.bfloat16 and fast.head.matmul_dtype == "float32"
    assert fast.blocks.attn.mat_qkv.kernel[...].dtype == jnp.float32  # params stay float32
    assert 0 < rel < 2e-2


@pytest.mark.slow
def test_bfloat16_head_keeps_float32_logits_and_gradients_close(tiny_model, tiny_model_gradients):
    """``head_dtype="bfloat16"``: the head's matmuls take bf16 operands with float32
    accumulation; logits and gradients stay float32, within 1% and 2% of the float32
    head's."""
    variant, rel = _variant_with_relative_logit_error(tiny_model, head_dtype="bfloat16")
    assert variant.blocks.attn.mat_qkv.dtype == jnp.float32  # float32 blocks on CPU
    assert variant.head.matmul_dtype == "bfloat16"
    assert 0 < rel < 1e-2
    gradients = _remat_check_gradients(variant)
    for (path, ref), (_, grad) in zip(tiny_model_gradients, gradients):
        assert grad[...].dtype == jnp.float32
        error = float(jnp.linalg.norm(grad[...] - ref[...]))
        assert error <= 2e-2 * float(jnp.linalg.norm(ref[...])) + 1e-7, (path, error)


def _remat_check_gradients(model):
    """Parameter gradients of a stage-1 loss on fixed inputs (jitted), flat by path."""
    layout = model.config.layout
    x = jax.random.normal(jax.random.key(1), (2, layout.seq_len - 1, 8))
    targets = jax.random.randint(jax.random.key(2), (2, layout.seq_len), 0, 64)
    weights = jnp.asarray(layout.token_loss_weights("lognorm"))

    @nnx.jit
    def grads_of(model):
        def loss_fn(model):
            logits = model(x, jnp.asarray([1, 10]), rng=jax.random.key(3))
            return losses.scale_weighted_cross_entropy(logits, targets, weights, layout)[0]
        return nnx.grad(loss_fn)(model)

    return nnx.to_flat_state(grads_of(model))


@pytest.fixture(scope="module")
def tiny_model_gradients(tiny_model):
    return _remat_check_gradients(tiny_model)  # scanned, no remat: the reference


@pytest.mark.parametrize("remat, scan_blocks", [("block", True), ("activations_saveable", True),
                                                ("none", False),
                                                ("dots_attention_saveable", True),
                                                ("projections_saveable", False)])
def test_remat_and_scan_do_not_change_gradients(tiny_model, tiny_model_gradients, remat, scan_blocks):
    variant = HMARTransformer(tiny_model.config, resolved("cpu", remat=remat,
                                                          scan_blocks=scan_blocks),
                              rngs=nnx.Rngs(1))
    nnx.update(variant, nnx.state(tiny_model))
    for (path, a), (_, b) in zip(tiny_model_gradients, _remat_check_gradients(variant)):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("scan_blocks", [True, False])
@pytest.mark.slow
def test_fsdp_sharded_gradients_equal_the_unsharded_ones(scan_blocks):
    """With parameters FSDP-sharded (the class embedding and the head too) and the batch split
    over a (2, 4) CPU mesh, the gradients of the trainer's way of gathering weights
    (``sharding.gather_outside_blocks``) equal the unsharded ones. (What the compiled step
    gathers: ``test_compiled_structure``.)"""
    grad_fn, args, placed, mesh = fsdp_gradient(scan_blocks)
    assert "fsdp" in tuple(placed[0]["class_emb"]["embedding"][...].sharding.spec)
    with jax.set_mesh(mesh):
        grads = grad_fn(*placed)
    want = grad_fn(*args)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_unrolled_stack_with_deferred_adds_matches_the_scanned_stack():
    """Unrolled, a block's FFN residual add runs inside the next block's first AdaLN kernel
    (``forward_deferred``); with the Pallas norm kernels (interpret mode) the loss and every
    gradient equal the scanned stack's, whose blocks add in place. (Where the adds run:
    ``test_compiled_structure``; the remat policies change no value:
    ``test_remat_and_scan_do_not_change_gradients``.)"""
    cfg = preset("tiny", depth=2, width=64, patch_nums=(2, 6), init_adaln_gamma=0.5,
                 init_head=1.0)  # L = 40: rows of 8 tile it
    scanned = HMARTransformer(cfg, resolved("cpu", scan_blocks=True, layer_norm="pallas"),
                              rngs=nnx.Rngs(0))
    unrolled = HMARTransformer(cfg, resolved("cpu", scan_blocks=False, layer_norm="pallas"),
                               rngs=nnx.Rngs(1))
    nnx.update(unrolled, nnx.state(scanned))
    x = jax.random.normal(jax.random.key(1), (2, cfg.layout.seq_len - 1, 8))
    labels = jnp.asarray([1, 2])

    def loss(model):
        return jnp.mean(model(x, labels) ** 2)

    (want, want_grads), (got, got_grads) = (nnx.jit(nnx.value_and_grad(loss))(m)
                                            for m in (scanned, unrolled))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(want_grads), nnx.to_flat_state(got_grads)):
        np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), atol=1e-6,
                                   err_msg=str(path))
