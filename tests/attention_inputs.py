"""Random inputs of the packed attention path, shared by the attention kernels' tests."""

import jax
import jax.numpy as jnp
import numpy as np


def packed_inputs(seed: int, length: int, dtype, *, batch: int, heads: int, head_dim: int,
                  max_temperature: float):
    """``(qkv [B, L, 3, N, K], bias [3, N, K] float32, temperature [N] float32 in
    [1, max_temperature), do [B, L, N, K])``, qkv and do in ``dtype``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    qkv = jax.random.normal(keys[0], (batch, length, 3, heads, head_dim)).astype(dtype)
    bias = 0.5 * jax.random.normal(keys[1], (3, heads, head_dim))
    temperature = jnp.exp(jax.random.uniform(keys[2], (heads,), maxval=np.log(max_temperature)))
    do = jax.random.normal(keys[3], (batch, length, heads, head_dim)).astype(dtype)
    return qkv, bias, temperature, do
