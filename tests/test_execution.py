"""ExecutionConfig: the resolution table per platform, its errors, the boundary (nothing
below it asks for the platform) and the architecture configs free of execution fields."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import execution
from hmar_jax.execution import REFERENCE, ExecutionConfig, resolved
from hmar_jax.pallas import adaln, bias_gelu, group_norm, ops, qkv_prologue
from hmar_jax.transformer import HMARConfig, HMARTransformer, preset
from hmar_jax.transformer.config import LEGACY_EXECUTION_FIELDS
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from structure_helpers import kernel_calls

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL_FIELDS = ("attention", "layer_norm", "gelu", "group_norm")


@pytest.mark.parametrize("platform, want", [
    ("cpu", dict(attention="xla", layer_norm="xla", gelu="xla", group_norm="xla",
                 compute_dtype="float32", head_dtype="float32", remat="none", scan_blocks=True)),
    ("gpu", dict(attention="gpu", layer_norm="gpu", gelu="gpu", group_norm="gpu",
                 compute_dtype="bfloat16", head_dtype="bfloat16",
                 remat="dots_attention_saveable", scan_blocks=False)),
    ("tpu", dict(attention="tpu", layer_norm="xla", gelu="xla", group_norm="xla",
                 compute_dtype="bfloat16", head_dtype="bfloat16",
                 remat="dots_attention_saveable", scan_blocks=True)),
])
def test_auto_resolves_per_platform(platform, want):
    config = ExecutionConfig()
    assert not config.is_resolved and all(getattr(config, name) == "auto" for name in want)
    got = config.resolve(platform)
    assert got.is_resolved and got.platform == platform
    assert {name: getattr(got, name) for name in want} == want
    # the fields without an "auto" keep their defaults
    assert (got.tokenizer_precision, got.microbatches, got.moment_dtype, got.cast_weights,
            got.unstack_blocks) == ("default", 1, "float32", True, False)
    assert got.resolve(platform) is got  # idempotent
    assert resolved(platform) == got


def test_explicit_choices_resolve_to_implementations():
    # "pallas": the platform's kernel (interpret mode on CPU); TPU has the attention's only
    for platform, kernel in (("cpu", "interpret"), ("gpu", "gpu")):
        config = resolved(platform, **dict.fromkeys(KERNEL_FIELDS, "pallas"))
        assert [getattr(config, name) for name in KERNEL_FIELDS] == [kernel] * 4
    assert resolved("tpu", attention="pallas").attention == "tpu"
    # "xla" and "interpret" mean the same on every platform; a platform's own name is itself
    for platform in execution.PLATFORMS:
        for choice in ("xla", "interpret"):
            config = resolved(platform, **dict.fromkeys(KERNEL_FIELDS, choice))
            assert [getattr(config, name) for name in KERNEL_FIELDS] == [choice] * 4
    assert resolved("gpu", gelu="gpu").gelu == "gpu"
    assert resolved("tpu", attention="tpu").attention == "tpu"
    # explicit dtypes and policies override the table; head_dtype follows compute_dtype
    config = resolved("gpu", compute_dtype="float32", remat="block", scan_blocks=True)
    assert (config.compute_dtype, config.head_dtype, config.remat, config.scan_blocks) == \
        ("float32", "float32", "block", True)
    config = resolved("cpu", compute_dtype="bfloat16", head_dtype="float32", scan_blocks=False)
    assert (config.compute_dtype, config.head_dtype, config.scan_blocks) == \
        ("bfloat16", "float32", False)
    assert resolved("cpu", head_dtype="bfloat16").head_dtype == "bfloat16"
    # the reference: every op on plain jnp, float32, exact tokenizer, scanned, no remat
    assert REFERENCE == resolved("cpu", tokenizer_precision="highest")
    assert [getattr(REFERENCE, name) for name in KERNEL_FIELDS] == ["xla"] * 4
    assert (REFERENCE.compute_dtype, REFERENCE.head_dtype, REFERENCE.tokenizer_precision,
            REFERENCE.remat, REFERENCE.scan_blocks) == ("float32", "float32", "highest", "none",
                                                        True)


def test_resolve_without_a_platform_asks_jax():
    assert ExecutionConfig().resolve().platform == jax.default_backend()


def test_choices_a_platform_cannot_run_are_errors():
    with pytest.raises(ValueError, match="execution.attention='gpu' cannot run on tpu; use "
                                         "'pallas'"):
        resolved("tpu", attention="gpu")
    with pytest.raises(ValueError, match="execution.layer_norm='gpu' cannot run on cpu"):
        resolved("cpu", layer_norm="gpu")
    with pytest.raises(ValueError, match="execution.attention='tpu' cannot run on gpu"):
        resolved("gpu", attention="tpu")
    for name in ("layer_norm", "gelu", "group_norm"):  # no TPU kernel
        for choice in ("pallas", "tpu"):
            with pytest.raises(ValueError,
                               match=f"execution.{name}='{choice}' has no TPU kernel"):
                resolved("tpu", **{name: choice})
    with pytest.raises(ValueError, match="Unknown platform 'cuda'"):
        ExecutionConfig().resolve("cuda")
    with pytest.raises(ValueError, match="resolved for cpu, not gpu"):
        REFERENCE.resolve("gpu")


@pytest.mark.parametrize("name, value", [
    ("attention", "cudnn"), ("gelu", "triton"), ("layer_norm", "reference"),
    ("group_norm", "cuda"), ("compute_dtype", "float16"), ("head_dtype", "fp32"),
    ("tokenizer_precision", "auto"), ("remat", "dots_saveable"), ("scan_blocks", "yes"),
    ("moment_dtype", "auto"), ("platform", "cuda"),
])
def test_unknown_values_are_errors(name, value):
    with pytest.raises(ValueError, match=f"execution.{name}={value!r} is not one of"):
        ExecutionConfig(**{name: value})


def test_microbatches_must_be_a_positive_integer():
    for value in (0, -1, 2.0):
        with pytest.raises(ValueError, match="execution.microbatches must be a positive"):
            ExecutionConfig(microbatches=value)
    assert ExecutionConfig(microbatches=4).resolve("cpu").microbatches == 4


def test_from_mapping_refuses_unknown_keys():
    assert ExecutionConfig.from_mapping(None) == ExecutionConfig.from_mapping({}) == \
        ExecutionConfig()
    assert ExecutionConfig.from_mapping({"remat": "block", "gelu": "xla"}) == \
        ExecutionConfig(remat="block", gelu="xla")
    with pytest.raises(ValueError, match=r"Unknown execution setting\(s\) \['attn', 'dtype'\]; "
                                         r"the settings are \['attention', "):
        ExecutionConfig.from_mapping({"attn": "xla", "dtype": "bfloat16", "remat": "block"})
    with pytest.raises(ValueError, match=r"Unknown execution setting\(s\) \['platform'\]"):
        ExecutionConfig.from_mapping({"platform": "cpu"})  # set by resolve only


def test_layers_refuse_an_unresolved_config():
    with pytest.raises(ValueError, match="HMARTransformer needs a resolved ExecutionConfig"):
        HMARTransformer(preset("tiny"), ExecutionConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="VQVAE needs a resolved ExecutionConfig"):
        VQVAE(VQVAEConfig(vocab_size=64, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4)),
              ExecutionConfig(tokenizer_precision="highest"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention has no 'pallas' implementation"):
        ops.AttentionSpec("block_diagonal", (1, 2), "pallas")


@pytest.mark.slow
def test_nothing_below_the_boundary_asks_for_the_platform(monkeypatch):
    """The model (both branches) and the tokenizer, built from resolved configs with every
    kernel in interpret mode, run their forward passes and their gradient while
    ``jax.default_backend`` raises: only ``resolve`` asks which platform it runs on."""
    model_run = resolved("cpu", attention="pallas", layer_norm="pallas", gelu="pallas")
    tokenizer_run = resolved("cpu", group_norm="pallas", tokenizer_precision="bfloat16")

    def no_platform_questions():
        raise AssertionError("jax.default_backend() called below the boundary")

    monkeypatch.setattr(jax, "default_backend", no_platform_questions)
    with pytest.raises(AssertionError, match="below the boundary"):
        ExecutionConfig().resolve()  # the patch is what resolve would ask

    cfg = preset("tiny", width=128, patch_nums=(2, 6))  # L = 40, C = 128: every kernel tiles
    model = HMARTransformer(cfg, model_run, rngs=nnx.Rngs(0))
    assert model.blocks.ffn.gelu_implementation == "interpret"
    assert model.mask_blocks.norm_implementation == "interpret"
    assert model.attention_spec("full").implementation == "interpret"
    layout = cfg.layout
    x = jax.random.normal(jax.random.key(1), (2, layout.seq_len - 1, cfg.latent_channels))
    labels = jnp.asarray([1, 10])
    masked = jnp.zeros((1, layout.seq_len - 1), bool).at[:, ::3].set(True)
    rows = layout.input_slice(1)
    masked_k = jnp.zeros((2, layout.tokens_per_scale[1]), bool).at[:, ::2].set(True)

    @nnx.jit  # one program: the interpret-mode kernels compile once, not op by op
    def forwards(model, x):
        return (model(x, labels), model.forward_masked(x, 0.5 * x, masked, labels),
                model.forward_scale(1, labels, x[:, rows]),
                model.forward_scale(1, labels, x[:, rows], x_mask=0.5 * x[:, rows],
                                    masked=masked_k))

    logits, masked_logits, scale_logits, mask_step_logits = forwards(model, x)
    assert logits.shape == masked_logits.shape == (2, layout.seq_len, cfg.vocab_size)
    assert scale_logits.shape == mask_step_logits.shape == (2, 36, cfg.vocab_size)
    for out in (logits, masked_logits, scale_logits, mask_step_logits):
        assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(np.asarray(scale_logits),
                               np.asarray(logits[:, layout.token_slice(1)]), atol=1e-5)

    graphdef, params = nnx.split(model)

    def loss(params):
        model = nnx.merge(graphdef, params)
        return (jnp.mean(model(x, labels) ** 2)
                + jnp.mean(model.forward_masked(x, 0.5 * x, masked, labels) ** 2))

    calls = kernel_calls(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    for name in (ops.FORWARD_KERNEL_NAME, adaln.FORWARD_KERNEL_NAME,
                 bias_gelu.FORWARD_KERNEL_NAME, qkv_prologue.KERNEL_NAME):
        assert calls[name] > 0, (name, calls)

    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            norm_groups=8, patch_nums=(1, 2, 4)), tokenizer_run, rngs=nnx.Rngs(0))
    assert (vae.precision, vae.group_norm_implementation) == ("bfloat16", "interpret")
    images = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-1, maxval=1)
    indices, decoded = nnx.jit(lambda vae, x: (vae.encode_to_indices(x),
                                                vae.decode_from_indices(vae.encode_to_indices(x))))(
        vae, images)
    assert [i.shape for i in indices] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert decoded.shape == images.shape and decoded.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(decoded)))
    jaxpr = jax.make_jaxpr(lambda x: vae.decode_from_indices(vae.encode_to_indices(x)))(images)
    assert kernel_calls(jaxpr.jaxpr)[group_norm.STATS_KERNEL_NAME] > 0


def test_architecture_configs_hold_no_execution_field():
    assert [f.name for f in dataclasses.fields(HMARConfig)] == [
        "depth", "width", "num_heads", "mlp_ratio", "num_classes", "vocab_size",
        "latent_channels", "patch_nums", "num_mask_layers", "attention_pattern",
        "drop_path_rate", "norm_eps", "init_adaln", "init_adaln_gamma", "init_head"]
    assert HMARConfig.TRAINING_FIELDS == ("drop_path_rate",)
    assert [f.name for f in dataclasses.fields(VQVAEConfig)] == [
        "vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "using_sa",
        "using_mid_sa", "in_channels", "norm_groups", "quant_resi", "share_quant_resi", "beta",
        "patch_nums"]
    execution_fields = {f.name for f in dataclasses.fields(ExecutionConfig)}
    architecture = {f.name for c in (HMARConfig, VQVAEConfig) for f in dataclasses.fields(c)}
    assert not execution_fields & architecture
    assert not set(LEGACY_EXECUTION_FIELDS) & architecture


def test_the_shipped_bundle_configs_load():
    """The digits demo bundle's stored configs carry the execution settings exports used to
    store (``attention_backend``, ``dtype``, ``precision``...): they load, dropped."""
    bundle = ROOT / "checkpoints" / "digits-demo"
    stored = json.loads((bundle / "model" / "hmar_config.json").read_text())
    legacy = set(stored) & set(LEGACY_EXECUTION_FIELDS)
    assert legacy == {"attention_backend", "dtype", "scan_blocks", "remat"}
    cfg = HMARConfig.from_dict(stored)
    assert cfg.to_dict() == {k: v for k, v in stored.items() if k not in legacy} | {
        "patch_nums": (1, 2, 3, 4, 6, 8)}
    assert (cfg.depth, cfg.width, cfg.num_mask_layers, cfg.latent_channels) == (4, 128, 2, 16)
    with pytest.raises(ValueError, match=r"Unknown HMARConfig keys \['detph'\]"):
        HMARConfig.from_dict(stored | {"detph": 4})

    stored = json.loads((bundle / "tokenizer" / "tokenizer_config.json").read_text())
    assert stored["precision"] == "default"
    tokenizer = VQVAEConfig.from_dict(stored)
    assert dataclasses.asdict(tokenizer) == {k: v for k, v in stored.items()
                                             if k != "precision"} | {
        "ch_mult": (1, 2), "patch_nums": (1, 2, 3, 4, 6, 8)}
    assert tokenizer.patch_nums == cfg.patch_nums and tokenizer.vocab_size == cfg.vocab_size


def test_boolean_overrides_given_as_text_are_booleans():
    """``--config.execution.scan_blocks=False`` arrives as text (the config's default is
    "auto"); it means the boolean."""
    from hmar_jax.execution import ExecutionConfig

    config = ExecutionConfig.from_mapping({"scan_blocks": "False", "unstack_blocks": "true"})
    assert config.scan_blocks is False and config.unstack_blocks is True
    with pytest.raises(ValueError, match="scan_blocks='sometimes'"):
        ExecutionConfig.from_mapping({"scan_blocks": "sometimes"})


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_inference_keeps_the_blocks_scanned_unless_asked(platform):
    """The sampler runs the stack in each of its passes: unrolled, that program compiles for
    minutes, so "auto" scans for inference while training on a GPU unrolls."""
    from hmar_jax.execution import ExecutionConfig

    assert ExecutionConfig().resolve(platform, inference=True).scan_blocks is True
    assert ExecutionConfig(scan_blocks=False).resolve(platform, inference=True).scan_blocks is False
    assert ExecutionConfig().resolve("gpu").scan_blocks is False
