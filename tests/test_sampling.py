"""Sampler: upstream generate() parity (teacher-forced), top-k/top-p, determinism, schedules."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import execution, sampling
from hmar_jax.convert import hmar as hmar_convert
from hmar_jax.convert import vqvae as vqvae_convert
from hmar_jax.pretrained import cast_matmul_weights
from hmar_jax.transformer import HMARTransformer, preset
from hmar_jax.sampling import batch as sampling_batch
from hmar_jax.sampling import sampler
from hmar_jax.scales import ScaleLayout
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig


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
    with jax.default_matmul_precision("highest"):  # one program, not op by op
        images, trace = nnx.jit(lambda model, vae: sampling.generate(
            model, vae, labels, jnp.arange(2), 0, config,
            token_sampler=lambda k, filtered, keys: gt[k], return_trace=True))(model, vae)
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
        sampler.DEFAULT_MASK_SCHEDULE_256
    passes = sum(len(s) for s in sampler.DEFAULT_MASK_SCHEDULE_256)
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


@pytest.mark.slow
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
    compiled = sampler._generate_jit.jitted_fn._cache_size()
    other_seed = np.asarray(sampling.generate_compiled(model, vae, labels, index, seed=8, config=config))
    assert not np.allclose(other_seed, images)
    # the seed is an argument of the compiled sampler: another seed compiles nothing
    assert sampler._generate_jit.jitted_fn._cache_size() == compiled


def test_matmul_weights_cast_once_give_the_same_passes():
    """``cast_matmul_weights`` (what load_pretrained does): both branches' logits equal bit
    for bit, bf16 block kernels, float32 heads, less than 60% of the parameter bytes."""
    model = HMARTransformer(preset("tiny", init_head=1.0),
                            execution.resolved("cpu", compute_dtype="bfloat16"), rngs=nnx.Rngs(1))
    labels = jnp.asarray([3, 5, 0, 10])
    x_ns = jax.random.normal(jax.random.key(0), (4, 9, model.config.latent_channels))
    masked = jnp.arange(9)[None].repeat(4, 0) % 3 == 0
    passes = lambda: [model.forward_scale(2, labels, x_ns),  # noqa: E731
                      model.forward_scale(2, labels, x_ns, x_mask=x_ns[::-1], masked=masked)]
    param_bytes = lambda: sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # noqa: E731
    before, bytes_before = passes(), param_bytes()
    assert cast_matmul_weights(model) is model
    for got, want in zip(passes(), before):
        np.testing.assert_array_equal(got, want)
    assert model.blocks.ffn.fc1.kernel.dtype == model.mask_blocks.attn.mat_qkv.kernel.dtype == jnp.bfloat16
    assert model.blocks.ffn.fc1.bias.dtype == jnp.bfloat16
    assert model.head.kernel.dtype == model.word_embed.kernel.dtype == jnp.float32
    assert param_bytes() < 0.6 * bytes_before


@pytest.mark.slow
def test_precomputed_modulations_change_no_pass(tiny_pair):
    """The sampler's once-per-batch ``adaln_modulations`` give the passes' own values."""
    model, _ = tiny_pair
    labels = jnp.asarray([3, 5, 10, 10])
    modulations = model.adaln_modulations(labels)
    assert modulations["blocks"].shape == (model.config.depth, 4, 6 * model.config.width)
    assert modulations["mask_blocks"].shape[0] == model.config.num_mask_layers
    x_ns = jax.random.normal(jax.random.key(0), (4, 9, model.config.latent_channels))
    masked = jnp.arange(9)[None].repeat(4, 0) % 2 == 0

    @nnx.jit  # one program, not op by op
    def passes(model, modulations):
        return [(model.forward_scale(2, labels, x_ns, **kwargs),
                 model.forward_scale(2, labels, x_ns, modulations=modulations, **kwargs))
                for kwargs in ({}, {"x_mask": x_ns[::-1], "masked": masked})]

    for own, given in passes(model, modulations):
        np.testing.assert_allclose(given, own, rtol=1e-6, atol=1e-6)


def test_schedule_errors(tiny_pair):
    model, vae = tiny_pair
    bad = sampling.SamplingConfig(mask_schedule=((1,), (4,), (9,), (15,)))
    with pytest.raises(ValueError, match="must sum to 16"):
        sampling.generate(model, vae, jnp.asarray([1]), jnp.asarray([0]), 0, bad)
    with pytest.raises(ValueError, match="entries for 4 scales"):
        sampling.generate(model, vae, jnp.asarray([1]), jnp.asarray([0]), 0,
                          sampling.SamplingConfig(mask_schedule=((1,),)))


# ----- step-by-step reference of spec §6.3 with fixed uniform draws --------------------------
def _np_filter(logits, top_k, top_p):
    """Upstream top-k then top-p in float64 numpy, one row at a time."""
    out = np.array(logits, np.float64)
    for row in out.reshape(-1, out.shape[-1]):
        if 0 < top_k < row.size:
            row[row < np.sort(row)[-top_k]] = -np.inf
        if 0 < top_p < 1:
            order = np.argsort(row, kind="stable")
            ascending = row[order]
            probs = np.exp(ascending - ascending.max())
            cumulative = np.cumsum(probs / probs.sum())
            drop = cumulative <= 1 - top_p
            drop[-1] = False
            row[order[drop]] = -np.inf
    return out


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_inverse_cdf(filtered, uniforms):
    """Token j with cumsum(p)[j - 1] <= u < cumsum(p)[j]: ``[B, l, V], [B, l] -> [B, l]``."""
    cumulative = np.cumsum(_np_softmax(filtered), -1)
    return np.minimum((cumulative <= uniforms[..., None]).sum(-1), filtered.shape[-1] - 1)


def _np_lowest(confidence, candidates, count):
    chosen = np.zeros_like(candidates)
    for b in range(len(confidence)):
        order = np.argsort(np.where(candidates[b], confidence[b], np.inf), kind="stable")
        chosen[b, order[:count]] = True
    return chosen & candidates


def reference_generate(model, vae, labels, cfg, top_k, top_p, schedules, uniforms):
    """Spec §6.3 written out step by step (numpy sampling logic, the model's own forwards)."""
    batch, patch_nums = len(labels), model.config.patch_nums
    num_scales = len(patch_nums)
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, model.config.null_class)])
    f_hat = jnp.zeros((batch, patch_nums[-1], patch_nums[-1], model.config.latent_channels))
    draws, chosen = iter(uniforms), []

    def guided(logits, t):
        logits = np.asarray(logits, np.float64)
        return (1 + t) * logits[:batch] - t * logits[batch:]

    for k, side in enumerate(patch_nums):
        x_ns = None
        if k:
            x_ns = vae.scale_input(k, f_hat).reshape(batch, side * side, -1)
            x_ns = jnp.concatenate([x_ns, x_ns])
        filtered = _np_filter(guided(model.forward_scale(k, labels2, x_ns), cfg * k / (num_scales - 1)),
                              top_k, top_p)
        idx = _np_inverse_cdf(filtered, next(draws))
        schedule = schedules[k]
        if side * side > 1 and len(schedule) > 1:
            conf = np.take_along_axis(_np_softmax(filtered), idx[..., None], -1)[..., 0]
            masked = _np_lowest(conf, np.ones_like(idx, bool), sum(schedule[1:]))
            for step in range(1, len(schedule)):
                own = vae.scale_residual(k, vae.lookup(jnp.asarray(idx).reshape(batch, side, side)))
                x_mask = vae.scale_input(k, own).reshape(batch, side * side, -1)
                logits = model.forward_scale(k, labels2, x_ns, x_mask=jnp.concatenate([x_mask, x_mask]),
                                             masked=jnp.asarray(np.concatenate([masked, masked])))
                filtered = _np_filter(guided(logits, cfg * 1e-6), top_k, top_p)
                idx = np.where(masked, _np_inverse_cdf(filtered, next(draws)), idx)
                if step < len(schedule) - 1:
                    conf = np.take_along_axis(_np_softmax(filtered), idx[..., None], -1)[..., 0]
                    masked = _np_lowest(conf, masked, sum(schedule[step + 1:]))
        f_hat = f_hat + vae.scale_residual(k, vae.lookup(jnp.asarray(idx).reshape(batch, side, side)))
        chosen.append(idx)
    return chosen


def test_sampler_matches_a_step_by_step_reference_with_fixed_draws(upstream_pair):
    model, vae = upstream_pair
    schedules = sampler.DEFAULT_MASK_SCHEDULE_256
    config = sampling.SamplingConfig(cfg=1.7, top_k=40, top_p=0.9, mask_schedule=schedules)
    rng = np.random.default_rng(0)
    labels = jnp.asarray([3, 7])
    uniforms = [rng.random((2, side * side)) for side, s in zip(model.config.patch_nums, schedules)
                for _ in s]
    draws = iter(uniforms)

    def inverse_cdf(k, filtered, keys):  # the same uniforms, consumed in call order
        cumulative = jnp.cumsum(jax.nn.softmax(filtered, -1), -1)
        u = jnp.asarray(next(draws), jnp.float32)[..., None]
        return jnp.minimum((cumulative <= u).sum(-1), filtered.shape[-1] - 1).astype(jnp.int32)

    with jax.default_matmul_precision("highest"):  # one program, not op by op
        _, trace = nnx.jit(lambda model, vae: sampling.generate(
            model, vae, labels, jnp.arange(2), 0, config, token_sampler=inverse_cdf,
            return_trace=True))(model, vae)
        expected = reference_generate(model, vae, labels, 1.7, 40, 0.9, schedules, uniforms)
        for k, tokens in enumerate(expected):
            np.testing.assert_array_equal(np.asarray(trace[f"tokens_s{k}"]), tokens, err_msg=f"scale {k}")
        # The per-scale forward of the sampler equals the training forward on the same tokens.
        x = vae.teacher_forcing_inputs([jnp.asarray(t).reshape(2, s, s)
                                        for t, s in zip(expected, model.config.patch_nums)])
        labels2 = jnp.concatenate([labels, jnp.full_like(labels, model.config.null_class)])
        full = model(jnp.concatenate([x, x]), labels2)
    for k in range(model.config.layout.num_scales):
        token_slice = model.config.layout.token_slice(k)
        np.testing.assert_allclose(np.asarray(trace[f"ns_logits_s{k}"]), np.asarray(full[:, token_slice]),
                                   atol=2e-4, rtol=2e-4, err_msg=f"scale {k}")


@pytest.mark.slow
def test_var_mode_sampler_uses_the_block_causal_cache(tiny_pair):
    _, vae = tiny_pair
    model = HMARTransformer(preset("tiny", init_head=1.0, attention_pattern="block_causal"),
                            rngs=nnx.Rngs(2))
    labels = jnp.asarray([1, 4])
    config = sampling.SamplingConfig(cfg=1.5, top_k=0, top_p=0.0, mask_schedule=None)
    @nnx.jit  # one program, not op by op
    def sample_and_forward(model, vae):
        _, trace = sampling.generate(model, vae, labels, jnp.arange(2), 3, config, return_trace=True)
        tokens = [trace[f"tokens_s{k}"].reshape(2, s, s) for k, s in enumerate(model.config.patch_nums)]
        x = vae.teacher_forcing_inputs(tokens)
        labels2 = jnp.concatenate([labels, jnp.full_like(labels, model.config.null_class)])
        return trace, model(jnp.concatenate([x, x]), labels2)  # block-causal training forward

    with jax.default_matmul_precision("highest"):
        trace, full = sample_and_forward(model, vae)
    for k in range(model.config.layout.num_scales):
        token_slice = model.config.layout.token_slice(k)
        np.testing.assert_allclose(np.asarray(trace[f"ns_logits_s{k}"]), np.asarray(full[:, token_slice]),
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sample without refinement"):
        sampling.generate(model, vae, labels, jnp.arange(2), 0,
                          sampling.SamplingConfig(mask_schedule=((1,), (1, 3), (9,), (16,))))


@pytest.mark.slow
def test_generate_batches_is_identical_on_one_and_eight_devices(tiny_pair):
    model, vae = tiny_pair
    config = sampling.SamplingConfig(cfg=2.0, top_k=20, top_p=0.95,
                                     mask_schedule=((1,), (1, 3), (1, 1, 2, 5), (8, 8)))
    labels, index = np.repeat(np.arange(5), 3), np.tile(np.arange(3), 5)
    single = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    one = sampling.generate_batches(model, vae, labels, index, seed=4, config=config, batch_size=4,
                                    mesh=single)
    built = sampling_batch._sharded_sampler.cache_info().misses
    other = sampling.generate_batches(model, vae, labels, index, seed=5, config=config,
                                      batch_size=4, mesh=single)
    # another seed: the same compiled sampler, other samples
    assert sampling_batch._sharded_sampler.cache_info().misses == built
    assert not np.array_equal(other, one)
    eight = sampling.generate_batches(model, vae, labels, index, seed=4, config=config, batch_size=16,
                                      mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)))
    assert one.shape == (15, 8, 8, 3) and one.dtype == np.uint8
    # The same tokens for every sample: a different token anywhere would change whole patches.
    # The decoder's float rounding may differ between the two programs' shapes (a batch of 4
    # on one device, 2 per device on eight), so pixels may differ by one level.
    np.testing.assert_allclose(one.astype(int), eight.astype(int), atol=1, rtol=0)
    assert np.mean(one == eight) > 0.99
    with pytest.raises(ValueError, match="Class id 11 is out of range"):
        sampling.generate_batches(model, vae, np.array([11]), np.array([0]), seed=0, config=config)
