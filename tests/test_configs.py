"""Config files: every variant builds, follows the upstream recipes, and rejects typos."""

import dataclasses
import importlib.util
import pathlib

import pytest

from hmar_jax import execution
from hmar_jax.execution import ExecutionConfig
from hmar_jax.transformer import preset

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def load(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant, batch, peak_lr, epochs, wd_end", [
    ("d16", 768, 3.0e-4, 200, 0.05), ("d20", 768, 3.0e-4, 250, 0.05),
    ("d24", 768, 2.4e-4, 350, 0.05), ("d30", 1024, 3.2e-4, 350, 0.08)])
def test_imagenet_recipes_match_upstream(variant, batch, peak_lr, epochs, wd_end):
    module = load("hmar_imagenet")
    config = module.get_config(f"variant={variant}")
    steps_per_epoch = -(-1_281_167 // batch)
    assert config.batch_size == batch and config.optimizer.peak_lr == pytest.approx(peak_lr)
    assert config.num_train_steps == epochs * steps_per_epoch
    assert config.optimizer.weight_decay_end == wd_end and config.optimizer.grad_clip == 2.0
    assert config.loss.weighting == "lognorm" and config.loss.label_dropout == 0.1
    assert preset(variant).depth == int(variant[1:])
    stage2 = module.get_config(f"variant={variant},stage=2,res=512")
    assert stage2.stage == 2 and stage2.num_train_steps == 100 * steps_per_epoch
    assert stage2.model.overrides.num_mask_layers == 8 and stage2.data.image_size == 512
    # 256 px: the measured fastest (matmul and attention outputs kept, unrolled); 512 px: the lean default
    fast = ExecutionConfig.from_mapping(config.execution).resolve("gpu")
    lean = ExecutionConfig.from_mapping(stage2.execution).resolve("gpu")
    assert (fast.remat, fast.scan_blocks, fast.layer_norm) == ("dots_attention_saveable", False, "gpu")
    assert (fast.attention, fast.compute_dtype, fast.head_dtype) == ("gpu", "bfloat16", "bfloat16")
    assert (lean.remat, lean.scan_blocks) == ("block", True)
    # The model section is architecture only.
    assert not set(config.model.overrides) & {"remat", "scan_blocks", "dtype", "head_dtype"}


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="Unknown config argument 'varient'"):
        load("hmar_imagenet").get_config("varient=d16")
    with pytest.raises(ValueError, match="Unknown variant"):
        load("hmar_imagenet").get_config("variant=d17")
    with pytest.raises(ValueError, match="Unknown config argument 'stages'"):
        load("demo").get_config("stages=2")
    with pytest.raises(ValueError, match="Unknown stage 3"):
        load("demo").get_config("stage=3")
    assert load("demo").get_config("stage=2").stage == 2
    assert load("tokenizer_digits").get_config("runlocal").num_train_steps == 30


@pytest.mark.parametrize("name, arg", [("demo", None), ("demo", "stage=2"),
                                       ("tokenizer_digits", None), ("hmar_imagenet", None),
                                       ("hmar_imagenet", "res=512,stage=2")])
def test_every_config_has_the_whole_execution_section(name, arg):
    """Every ExecutionConfig field but the resolved platform is there to override from the
    command line, and nothing of it is left elsewhere in the config."""
    config = load(name).get_config(arg)
    fields = {f.name for f in dataclasses.fields(ExecutionConfig)} - {"platform"}
    assert set(config.execution) == fields
    ExecutionConfig.from_mapping(config.execution).resolve("cpu")
    assert "microbatches" not in config and "precision" not in config.get("tokenizer", {})
    assert "mu_dtype" not in config.get("optimizer", {})


def test_the_cpu_configs_keep_their_cpu_behaviour():
    """The demo runs the plain float32 reference model, its blocks unrolled (scanned in the
    smoke run), with the tokenizer at the platform's fast float32; the digits tokenizer trains
    at exact float32."""
    demo = ExecutionConfig.from_mapping(load("demo").get_config().execution).resolve("cpu")
    assert demo == execution.REFERENCE.replace(tokenizer_precision="default", scan_blocks=False)
    smoke = load("demo").get_config("runlocal").execution  # compile-bound: scanned blocks
    assert ExecutionConfig.from_mapping(smoke).resolve("cpu").scan_blocks is True
    assert (demo.microbatches, demo.moment_dtype) == (1, "float32")
    tokenizer = load("tokenizer_digits").get_config()
    assert ExecutionConfig.from_mapping(tokenizer.execution).resolve("cpu") == execution.REFERENCE
    assert "training" not in load("demo").get_config().tokenizer


@pytest.mark.parametrize("stage", [1, 2])
def test_the_demo_schedules_fit_their_short_runs(stage):
    """Each demo stage warms up over a small part of its run, and its exported EMA weights
    keep little of the weights the run started from (decay ** steps)."""
    config = load("demo").get_config(f"stage={stage}")
    assert config.optimizer.warmup_steps <= config.num_train_steps / 5
    assert config.ema_decay ** config.num_train_steps < 0.05
    tokenizer = load("tokenizer_digits").get_config()
    assert tokenizer.warmup_steps <= tokenizer.num_train_steps / 5
