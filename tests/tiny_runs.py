"""Shared builders for tests that run the trainer on tiny models (not a test module)."""

import importlib.util
import pathlib


def demo_config(**changes):
    """configs/demo.py:runlocal shrunk further (depth 2, width 64, batch 8, no samples);
    ``changes`` maps dotted keys of the config to values, e.g. ``{"optimizer.peak_lr": 1e-3}``
    (a key the config does not have is an error, as on the command line)."""
    path = pathlib.Path(__file__).parents[1] / "configs" / "demo.py"
    spec = importlib.util.spec_from_file_location("demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.model.overrides.depth = 2
    config.model.overrides.width = 64
    config.model.overrides.num_heads = 2
    config.model.overrides.num_mask_layers = 1
    config.batch_size = 8
    config.sampling.samples_per_class = 0
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"configs/demo.py has no key {key!r}")
        node[leaf] = value
    return config


def tiny_bundle(directory):
    """A bundle of random weights small enough to sample in seconds: the ``tiny`` transformer
    over a 4-scale tokenizer (V = 64), sampled with cfg 2, top-k 20, top-p 0.95 and no
    refinement. Returns the bundle's path."""
    from flax import nnx

    from hmar_jax import pretrained, sampling
    from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig
    from hmar_jax.transformer import HMARTransformer, preset

    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            using_sa=False, norm_groups=4, patch_nums=(1, 2, 3, 4)),
                rngs=nnx.Rngs(0))
    model = HMARTransformer(preset("tiny", init_head=1.0), rngs=nnx.Rngs(1))
    return pretrained.save_pretrained(
        directory, model, vae,
        sampling=sampling.SamplingConfig(cfg=2.0, top_k=20, top_p=0.95, mask_schedule=None))
