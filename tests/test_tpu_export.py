"""The whole training step and the compiled sampler lowered for TPU, on CPU.

``jax.export(..., platforms=["tpu"])`` lowers a jitted program with the TPU rules of every
op, so an op, dtype, sharding or custom call that TPU cannot take anywhere in the program
fails here rather than on a pod. What is exported is what runs: the trainer's own jitted
step (``Trainer.train_step``, built from the config with the execution config resolved for
``tpu``) and the sampler that ``generate_batches`` compiles (``batch._sharded_sampler``),
both under the 8-device test mesh, so splash attention runs per device inside
``shard_map``. Nothing is compiled or run: Mosaic's own compilation happens in libtpu, on a
TPU, and is not checked here.

The model and optimizer state are abstract (``jax.eval_shape``), so the d16 shapes cost no
memory. The d16 steps read cached token indices (``config.data.pretokenized``): the
tokenizer then needs only its codebook and residual convolutions, whose shapes do not
depend on the encoder's width, so a narrow tokenizer with the released vocabulary, latent
channels and scales stands in for the 110M-parameter one; the small config's steps run
the tokenizer's encoder on images.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from hmar_jax.execution import ExecutionConfig
from hmar_jax.pallas import splash
from hmar_jax.sampling import PRESETS, SamplingConfig
from hmar_jax.tokenizer.model import VQVAEConfig
from hmar_jax.training import trainer as trainer_lib
from hmar_jax.transformer import preset

from export_helpers import d16_trainer, export_sampler, export_step, resolving_for
from tiny_runs import demo_config

SPLASH_KERNELS = {splash.FORWARD_KERNEL_NAME, "splash_mha_dq_no_residuals",
                  "splash_mha_dkv_no_residuals"}


def _kernels(exported) -> set[str]:
    """Names of the Mosaic kernels in an exported module."""
    return set(re.findall(r"splash_mha_\w+", exported.mlir_module()))


@pytest.mark.parametrize("stage", [1, 2])
def test_small_training_step_exports_for_tpu(stage, tokenizer_export, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_lib, "resolve_execution", resolving_for("tpu"))
    config = demo_config(**{"stage": stage, "tokenizer.export": tokenizer_export,
                            "stage2.parent": str(tmp_path / "parent")})
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    assert trainer.execution.attention == "tpu" and trainer.execution.platform == "tpu"
    size = config.data.image_size
    exported = export_step(trainer, jax.ShapeDtypeStruct((config.batch_size, size, size, 3),
                                                         jnp.float32), "tpu")
    assert exported.platforms == ("tpu",) and exported.nr_devices == jax.device_count()
    assert _kernels(exported) == SPLASH_KERNELS


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_d16_training_step_exports_for_tpu(stage, tmp_path, monkeypatch):
    trainer = d16_trainer(tmp_path, monkeypatch, f"variant=d16,res=256,stage={stage}", "tpu")
    assert (trainer.cfg.depth, trainer.cfg.layout.seq_len) == (16, 680)
    exported = export_step(trainer, jax.ShapeDtypeStruct((jax.device_count(), 680), jnp.int32),
                           "tpu")
    assert exported.platforms == ("tpu",)
    assert _kernels(exported) == SPLASH_KERNELS


def _export_sampler(cfg, vae_config: VQVAEConfig, sampling: SamplingConfig):
    """The compiled sampler built as ``load_pretrained`` builds it for inference on TPU."""
    execution = ExecutionConfig().resolve(platform="tpu", inference=True)
    assert execution.attention == "tpu" and execution.cast_weights
    return export_sampler(cfg, vae_config, sampling, execution, "tpu")


@pytest.mark.slow
def test_small_sampler_exports_for_tpu():
    """Digits-demo shapes; its larger scales (over ``SMALL_FULL_KEYS`` tokens) attend with
    splash, forward only."""
    vae_config = VQVAEConfig(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2),
                             num_res_blocks=1, using_sa=False, norm_groups=4,
                             patch_nums=(1, 2, 3, 4, 6, 8, 10))
    cfg = preset("tiny", patch_nums=vae_config.patch_nums, vocab_size=32, latent_channels=8)
    exported = _export_sampler(cfg, vae_config, SamplingConfig())
    assert exported.platforms == ("tpu",)
    assert _kernels(exported) == {"splash_mha_fwd_no_residuals"}


@pytest.mark.slow
def test_d16_sampler_exports_for_tpu():
    exported = _export_sampler(preset("d16"), VQVAEConfig(), PRESETS["hmar-d16"])
    assert exported.platforms == ("tpu",)
    assert _kernels(exported) == {"splash_mha_fwd_no_residuals"}
