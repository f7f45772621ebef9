"""The HMAR transformer: architecture config, layers, block stack and the model.

Dimension letters: B batch, L tokens, C width, N heads, K head dim, V vocabulary.
"""

from hmar_jax.transformer.config import MODEL_PRESETS, HMARConfig, preset
from hmar_jax.transformer.model import MASK_BRANCH, HMARTransformer, count_params, is_mask_branch

__all__ = ["MODEL_PRESETS", "HMARConfig", "preset", "MASK_BRANCH", "HMARTransformer",
           "count_params", "is_mask_branch"]
