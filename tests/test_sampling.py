"""Sampler: upstream generate() parity (teacher-forced), top-k/top-p, determinism, schedules."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import sampling
from hmar_jax.convert import hmar as hmar_convert
from hmar_jax.convert import vqvae as vqvae_convert
from hmar_jax.model import HMARTransformer, preset
from hmar_jax.scales import ScaleLayout
from hmar_jax.vqvae import VQVAE, VQVAEConfig


def build(module_cls, cfg, params):
    model = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def upstream_pair(vqvae_state_dict, hmar_fixture):
    vae_cfg = vqvae_convert.infer_config(vqvae_state_dict, 256)
    vae = build(VQVAE, vae_cfg, vqvae_convert.convert_state_dict(vqvae_state_dict, vae_cfg))
    sd = {k[3:]: v for k, v in hmar_fixture.items() if k.startswith("sd/")}
    cfg = hmar_convert.infer_config(sd, "hmar", 256)
    model = build(HMARTransformer, cfg, hmar_convert.convert_state_dict(sd, cfg, "hmar"))
    return model, vae


def test_teacher_forced_generate_matches_upstream(upstream_pair, hmar_fixture, vqvae_fixture):
    model, vae = upstream_pair
    settings = json.loads(str(hmar_fixture["config"]))["generate"]
    config = sampling.SamplingConfig(cfg=settings["cfg"], top_k=0, top_p=0.0,
                                     mask_schedule=tuple(map(tuple, settings["mask_schedule"])))
    layout = ScaleLayout.create(256)
    gt = [jnp.asarray(g.reshape(2, -1)) for g in layout.split_tokens(hmar_fixture["gt_idx_BL"])]
    labels = jnp.asarray(hmar_fixture["labels_B"])
    with jax.default_matmul_precision("highest"):
        images, trace = sampling.generate(model, vae, labels, jnp.arange(2), 0, config,
                                          token_sampler=lambda k, filtered, keys: gt[k],
                                          return_trace=True)
    for k in range(6):
        np.testing.assert_allclose(np.asarray(trace[f"ns_logits_s{k}"]),
                                   hmar_fixture[f"gen_ns_logits_s{k}_2BlV"], atol=1e-4, rtol=1e-4)
    steps = [(1, 1), (2, 1), (2, 2), (2, 3), (5, 1), (5, 2)]
    for k, step in steps:
        chosen = np.asarray(trace[f"mask_s{k}_step{step}"])
        expected = hmar_fixture[f"gen_mask_idx_s{k}_step{step}_Bn"]
        for row in range(2):
            assert set(np.flatnonzero(chosen[row])) == set(expected[row].tolist()), (k, step, row)
        np.testing.assert_allclose(np.asarray(trace[f"mask_logits_s{k}_step{step}"]),
                                   hmar_fixture[f"gen_mask_logits_s{k}_step{step}_2BlV"],
                                   atol=1e-4, rtol=1e-4)
    reconstruction = (vqvae_fixture["rec_B3HW"].transpose(0, 2, 3, 1) + 1) / 2
    np.testing.assert_allclose(np.asarray(images), reconstruction, atol=1e-4)


def test_top_k_top_p_filter_matches_upstream(hmar_fixture):
    settings = json.loads(str(hmar_fixture["config"]))["topkp"]
    filtered = sampling.filter_logits(jnp.asarray(hmar_fixture["topkp_logits_in_BlV"]),
                                      settings["top_k"], settings["top_p"])
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), hmar_fixture["topkp_keep_BlV"])


def test_default_schedule_matches_upstream_at_256px():
    assert sampling.default_mask_schedule(ScaleLayout.create(256).patch_nums) == \
        sampling.DEFAULT_MASK_SCHEDULE_256
    passes = sum(len(s) for s in sampling.DEFAULT_MASK_SCHEDULE_256)
    assert passes == 14  # 10 next-scale passes + 1 + 3 mask steps


def test_filter_keeps_ties_and_the_argmax():
    logits = jnp.asarray([[3.0, 1.0, 1.0, 0.5, -2.0]])
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 2, 0.0)))
    np.testing.assert_array_equal(kept, [[True, True, True, False, False]])  # tie at the k-th
    kept = np.isfinite(np.asarray(sampling.filter_logits(jnp.asarray([[10.0, 0.0, 0.0]]), 0, 0.5)))
    np.testing.assert_array_equal(kept, [[True, False, False]])  # argmax always kept


@pytest.fixture(scope="module")
def tiny_pair():
    vae_cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                          using_sa=False, norm_groups=4, patch_nums=(1, 2, 3, 4))
    vae = VQVAE(vae_cfg, rngs=nnx.Rngs(0))
    model = HMARTransformer(preset("tiny", init_head=1.0), rngs=nnx.Rngs(1))
    return model, vae


def test_samples_are_deterministic_per_class_and_index(tiny_pair):
    model, vae = tiny_pair
    config = sampling.SamplingConfig(cfg=2.0, top_k=20, top_p=0.95,
                                     mask_schedule=((1,), (1, 3), (1, 1, 2, 5), (8, 8)))
    labels, index = jnp.asarray([3, 5, 3, 10]), jnp.asarray([0, 0, 1, 0])
    images = np.asarray(sampling.generate_compiled(model, vae, labels, index, seed=7, config=config))
    assert images.shape == (4, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    again = np.asarray(sampling.generate_compiled(model, vae, labels[::-1], index[::-1], seed=7,
                                                  config=config))
    np.testing.assert_allclose(again[::-1], images, atol=1e-6)  # order of the batch is irrelevant
    assert not np.allclose(images[0], images[2])  # another index of the same class differs
    other_seed = np.asarray(sampling.generate_compiled(model, vae, labels, index, seed=8, config=config))
    assert not np.allclose(other_seed, images)


def test_schedule_errors(tiny_pair):
    model, vae = tiny_pair
    bad = sampling.SamplingConfig(mask_schedule=((1,), (4,), (9,), (15,)))
    with pytest.raises(ValueError, match="must sum to 16"):
        sampling.generate(model, vae, jnp.asarray([1]), jnp.asarray([0]), 0, bad)
    with pytest.raises(ValueError, match="entries for 4 scales"):
        sampling.generate(model, vae, jnp.asarray([1]), jnp.asarray([0]), 0,
                          sampling.SamplingConfig(mask_schedule=((1,),)))
