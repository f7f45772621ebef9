"""Whole programs lowered for an accelerator on CPU (``jax.export(..., platforms=[...])``),
shared by the TPU and CUDA export tests: the trainer's jitted step and the sampler that
``generate_batches`` compiles, over abstract state (``jax.eval_shape``), so d16 shapes cost
no memory."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hmar_jax import pretrained
from hmar_jax.execution import ExecutionConfig
from hmar_jax.sampling import SamplingConfig, batch
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
from hmar_jax.training import tokenizer_trainer
from hmar_jax.training import trainer as trainer_lib
from hmar_jax.transformer import HMARTransformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def imagenet_config(arg: str):
    """``configs/hmar_imagenet.py:<arg>``."""
    path = ROOT / "configs" / "hmar_imagenet.py"
    spec = importlib.util.spec_from_file_location("hmar_imagenet_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def narrow_released_tokenizer(config, execution) -> VQVAE:
    """The released tokenizer's vocabulary, latent channels and scales at a narrow width: a
    step that reads cached token indices needs only its codebook and residual convolutions,
    whose shapes do not depend on the encoder's width."""
    return VQVAE(VQVAEConfig(ch=32, num_res_blocks=1, using_sa=False, using_mid_sa=False),
                 execution, rngs=nnx.Rngs(0))


def resolving_for(platform: str, **choices):
    """A stand-in for ``trainer.resolve_execution``: the config's execution settings with
    ``choices`` laid over them, resolved for ``platform`` instead of the host's."""

    def resolve(config) -> ExecutionConfig:
        return ExecutionConfig.from_mapping(config.execution.to_dict() | choices).resolve(
            platform=platform)

    return resolve


def d16_trainer(tmp_path: pathlib.Path, monkeypatch, arg: str, platform: str,
                **choices) -> trainer_lib.Trainer:
    """The trainer of ``configs/hmar_imagenet.py:<arg>`` resolved for ``platform``
    (``resolving_for``), its step reading cached token indices through the narrow tokenizer.
    The token cache and a stage-2 parent are only named: nothing reads them before data is
    loaded or the initial state is made."""
    monkeypatch.setattr(trainer_lib, "resolve_execution", resolving_for(platform, **choices))
    monkeypatch.setattr(tokenizer_trainer, "load_trained_tokenizer", narrow_released_tokenizer)
    config = imagenet_config(arg)
    config.data.pretokenized = str(tmp_path / "tokens")
    config.stage2.parent = str(tmp_path / "parent")
    return trainer_lib.Trainer(config, str(tmp_path / "run"))


def export_step(trainer: trainer_lib.Trainer, inputs: jax.ShapeDtypeStruct, platform: str):
    """The trainer's jitted step over its abstract initial state, lowered for ``platform``."""
    state = jax.eval_shape(trainer._init_state)
    labels = jax.ShapeDtypeStruct(inputs.shape[:1], jnp.int32)
    with jax.set_mesh(trainer.mesh):
        return jax.export.export(trainer.train_step, platforms=[platform])(
            state, trainer.vae_state, inputs, labels)


def export_sampler(cfg, vae_config: VQVAEConfig, sampling: SamplingConfig,
                   execution: ExecutionConfig, platform: str):
    """``generate_batches``'s compiled sampler over abstract weights built as
    ``load_pretrained`` builds them for inference with ``execution``, lowered for
    ``platform`` under a mesh of every device."""

    def build():
        return (pretrained.cast_matmul_weights(HMARTransformer(cfg, execution,
                                                               rngs=nnx.Rngs(0))),
                VQVAE(vae_config, execution, rngs=nnx.Rngs(0)))

    model, vae = nnx.eval_shape(build)
    (model_graph, model_state), (vae_graph, vae_state) = nnx.split(model), nnx.split(vae)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sampler = batch._sharded_sampler(model_graph, vae_graph, sampling, mesh)
    index = jax.ShapeDtypeStruct((2 * jax.device_count(),), jnp.int32)
    seed = jax.ShapeDtypeStruct((), jnp.int32)
    with jax.set_mesh(mesh):
        return jax.export.export(sampler, platforms=[platform])(model_state, vae_state, index,
                                                                index, seed)
