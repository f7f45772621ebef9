"""Many samples over many devices: one compiled sampler, batch-sharded, fixed batch size.

Dimension letters: N samples, H, W image size.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hmar_jax.sampling.sampler import SamplingConfig, check_labels, generate, seed_array
from hmar_jax.sampling.visualize import to_uint8
from hmar_jax.tokenizer.model import VQVAE
from hmar_jax.transformer import HMARTransformer


@functools.lru_cache(maxsize=8)
def _sharded_sampler(model_graph, vae_graph, config: SamplingConfig, mesh: Mesh):
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names))

    def run(model_state, vae_state, labels, sample_index, seed):
        model, vae = nnx.merge(model_graph, model_state), nnx.merge(vae_graph, vae_state)
        return generate(model, vae, labels, sample_index, seed, config)

    return jax.jit(run, in_shardings=(replicated, replicated, batched, batched, replicated),
                   out_shardings=batched)


def generate_batches(model: HMARTransformer, vae: VQVAE, labels, sample_index, *, seed: int,
                     config: SamplingConfig, batch_size: int = 64, mesh: Mesh | None = None
                     ) -> np.ndarray:
    """Many samples, batch-sharded over the devices of ``mesh`` (default: all local devices).

    Every call runs one compiled sampler on fixed-size batches (the last one padded);
    sample i depends only on ``(seed, labels[i], sample_index[i])``, so the result does
    not depend on ``batch_size`` or on the number of devices.

    Args:
      labels, sample_index: int ``[N]``.
      batch_size: samples per compiled call (rounded up to a multiple of the device count).

    Returns:
      uint8 ``[N, H, W, 3]``.
    """
    labels = np.asarray(labels)
    check_labels(labels, model.config.num_classes, allow_null=True)
    labels, sample_index = labels.astype(np.int32), np.asarray(sample_index, np.int32)
    if labels.shape != sample_index.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and sample_index {sample_index.shape} must both "
                         "be [N].")
    if mesh is None:
        mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    devices = mesh.devices.size
    batch_size = -(-min(batch_size, max(len(labels), 1)) // devices) * devices
    model_graph, model_state = nnx.split(model)
    vae_graph, vae_state = nnx.split(vae)
    replicated = NamedSharding(mesh, P())
    model_state = jax.device_put(model_state, replicated)
    vae_state = jax.device_put(vae_state, replicated)
    sampler = _sharded_sampler(model_graph, vae_graph, config, mesh)
    seed = jax.device_put(seed_array(seed), replicated)
    # Placed explicitly: with several processes, jit refuses host arrays for a sharded
    # argument, even on a mesh of this process's own devices.
    batched = NamedSharding(mesh, P(mesh.axis_names))
    chunks = []
    for begin in range(0, len(labels), batch_size):
        count = min(batch_size, len(labels) - begin)
        pad = lambda a: jax.device_put(np.concatenate(  # noqa: E731
            [a[begin:begin + count], np.repeat(a[begin + count - 1:begin + count],
                                               batch_size - count)]), batched)
        with jax.set_mesh(mesh):  # the attention kernel then runs per device (pallas.ops)
            images = sampler(model_state, vae_state, pad(labels), pad(sample_index), seed)
        chunks.append(to_uint8(jax.device_get(images))[:count])
    return np.concatenate(chunks) if chunks else np.zeros((0,) + (vae.config.image_size,) * 2 + (3,),
                                                            np.uint8)
