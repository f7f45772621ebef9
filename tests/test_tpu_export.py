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

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from hmar_jax import pretrained
from hmar_jax.execution import ExecutionConfig
from hmar_jax.pallas import splash
from hmar_jax.sampling import PRESETS, SamplingConfig, batch
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from hmar_jax.training import tokenizer_trainer
from hmar_jax.training import trainer as trainer_lib
from hmar_jax.transformer import HMARTransformer, preset

from tiny_runs import demo_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPLASH_KERNELS = {splash.FORWARD_KERNEL_NAME, "splash_mha_dq_no_residuals",
                  "splash_mha_dkv_no_residuals"}


def _tpu_execution(config) -> ExecutionConfig:
    return ExecutionConfig.from_mapping(config.execution.to_dict()).resolve(platform="tpu")


def _imagenet_config(stage: int):
    path = ROOT / "configs" / "hmar_imagenet.py"
    spec = importlib.util.spec_from_file_location("hmar_imagenet_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"variant=d16,res=256,stage={stage}")


def _narrow_released_tokenizer(config, execution) -> VQVAE:
    """The released tokenizer's vocabulary, latent channels and scales at a narrow width
    (module docstring)."""
    return VQVAE(VQVAEConfig(ch=32, num_res_blocks=1, using_sa=False, using_mid_sa=False),
                 execution, rngs=nnx.Rngs(0))


def _kernels(exported) -> set[str]:
    """Names of the Mosaic kernels in an exported module."""
    return set(re.findall(r"splash_mha_\w+", exported.mlir_module()))


def _export_step(trainer: trainer_lib.Trainer, inputs: jax.ShapeDtypeStruct):
    state = jax.eval_shape(trainer._init_state)
    labels = jax.ShapeDtypeStruct(inputs.shape[:1], jnp.int32)
    with jax.set_mesh(trainer.mesh):
        return jax.export.export(trainer.train_step, platforms=["tpu"])(
            state, trainer.vae_state, inputs, labels)


@pytest.mark.parametrize("stage", [1, 2])
def test_small_training_step_exports_for_tpu(stage, tokenizer_export, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_lib, "resolve_execution", _tpu_execution)
    config = demo_config(**{"stage": stage, "tokenizer.export": tokenizer_export,
                            "stage2.parent": str(tmp_path / "parent")})
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    assert trainer.execution.attention == "tpu" and trainer.execution.platform == "tpu"
    size = config.data.image_size
    exported = _export_step(trainer, jax.ShapeDtypeStruct((config.batch_size, size, size, 3),
                                                          jnp.float32))
    assert exported.platforms == ("tpu",) and exported.nr_devices == jax.device_count()
    assert _kernels(exported) == SPLASH_KERNELS


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_d16_training_step_exports_for_tpu(stage, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_lib, "resolve_execution", _tpu_execution)
    monkeypatch.setattr(tokenizer_trainer, "load_trained_tokenizer", _narrow_released_tokenizer)
    config = _imagenet_config(stage)
    config.data.pretokenized = str(tmp_path / "tokens")  # read only when data is loaded
    config.stage2.parent = str(tmp_path / "parent")      # read only by initial_state
    trainer = trainer_lib.Trainer(config, str(tmp_path / "run"))
    assert (trainer.cfg.depth, trainer.cfg.layout.seq_len) == (16, 680)
    exported = _export_step(trainer, jax.ShapeDtypeStruct((jax.device_count(), 680), jnp.int32))
    assert exported.platforms == ("tpu",)
    assert _kernels(exported) == SPLASH_KERNELS


def _export_sampler(cfg, vae_config: VQVAEConfig, sampling: SamplingConfig):
    """``generate_batches``'s compiled sampler over abstract weights built as
    ``load_pretrained`` builds them for inference on TPU."""
    execution = ExecutionConfig().resolve(platform="tpu", inference=True)
    assert execution.attention == "tpu" and execution.cast_weights

    def build():
        return (pretrained.cast_matmul_weights(HMARTransformer(cfg, execution,
                                                               rngs=nnx.Rngs(0))),
                VQVAE(vae_config, execution, rngs=nnx.Rngs(0)))

    model, vae = nnx.eval_shape(build)
    (model_graph, model_state), (vae_graph, vae_state) = nnx.split(model), nnx.split(vae)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sampler = batch._sharded_sampler(model_graph, vae_graph, 0, sampling, mesh)
    index = jax.ShapeDtypeStruct((2 * jax.device_count(),), jnp.int32)
    with jax.set_mesh(mesh):
        return jax.export.export(sampler, platforms=["tpu"])(model_state, vae_state, index, index)


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
