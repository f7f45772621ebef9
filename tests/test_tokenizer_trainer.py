"""Tokenizer training: a tiny run learns, exports, resumes; dead codes are restarted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import checkpointing
from hmar_jax.training import tokenizer_trainer
from hmar_jax.tokenizer.model import VQVAE

CONFIG_PATH = "configs/tokenizer_digits.py"


def tiny_config(steps: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenizer_digits", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.tokenizer.ch = 16
    config.tokenizer.norm_groups = 4
    config.tokenizer.vocab_size = 32
    config.tokenizer.using_sa = False
    config.batch_size = 16
    config.num_train_steps = steps
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.codebook.restart_every = 2
    config.eval_batch_size = 100
    config.grid_examples = 4
    return config


@pytest.mark.slow
def test_tiny_run_learns_exports_and_resumes(tmp_path):
    config = tiny_config(steps=8)
    results = tokenizer_trainer.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "tokenizer_reconstructions.png").is_file()
    saved = json.loads((tmp_path / "tokenizer_metrics.json").read_text())
    assert saved["codes_used"] == results["codes_used"] > 1
    assert 0 < results["reconstruction_mse"] < 0.5  # images span [-1, 1]: variance ~0.5
    assert results["final_train_metrics"]["step"] == 8
    vae = checkpointing.load_tokenizer(tmp_path / "tokenizer")
    assert vae.config.vocab_size == 32 and vae.config.patch_nums == (1, 2, 3, 4, 6, 8)
    # A longer run in the same workdir resumes from step 8 instead of starting over.
    config.num_train_steps = 10
    resumed = tokenizer_trainer.train_and_evaluate(config, str(tmp_path))
    assert resumed["final_train_metrics"]["step"] == 10
    steps = sorted(int(p.name) for p in (tmp_path / "tokenizer_ckpt").iterdir() if p.name.isdigit())
    assert steps[-1] == 10 and len(steps) <= config.max_checkpoints_to_keep


@pytest.mark.slow
def test_dead_codes_are_reseeded_from_the_batch():
    config = tiny_config(steps=100)
    config.codebook.restart_every = 1
    config.codebook.dead_fraction = 0.5
    cfg = tokenizer_trainer.tokenizer_config(config)
    model = VQVAE(cfg, rngs=nnx.Rngs(0))
    tx, schedule = tokenizer_trainer.make_optimizer(config)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    usage = tokenizer_trainer.CodeUsageTracker(cfg.vocab_size)
    usage.share[...] = jnp.zeros((cfg.vocab_size,)).at[0].set(1.0)  # every code but 0 is dead
    before = np.asarray(model.quantize.embedding.embedding[...]).copy()
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    step = tokenizer_trainer.make_train_step(config, schedule)
    metrics = step(model, optimizer, usage, images, jnp.asarray(1), jax.random.key(1))
    after = np.asarray(model.quantize.embedding.embedding[...])
    assert int(metrics["restarted_codes"]) >= cfg.vocab_size - 2
    # Re-seeded rows are residual vectors from this batch, far from the tiny initial codes.
    moved = np.linalg.norm(after - before, axis=1)
    assert np.sum(moved > 10 * np.abs(before).max()) >= cfg.vocab_size - 2
    assert np.all(np.asarray(usage.share[...])[1:] == pytest.approx(1.0 / cfg.vocab_size))


def test_image_size_must_match_tokenizer():
    config = tiny_config(steps=1)
    config.data.image_size = 32
    with pytest.raises(ValueError, match="data.image_size=16"):
        tokenizer_trainer.tokenizer_config(config)
