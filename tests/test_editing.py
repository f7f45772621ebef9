"""Zero-shot editing: kept tokens at every scale, refinement inside the edited region only,
the image outside it equal to the tokenizer's reconstruction, VAR's mask conventions."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hmar_jax import sampling
from hmar_jax.sampling import editing
from hmar_jax.transformer import HMARTransformer, preset
from hmar_jax.tokenizer.model import VQVAE, VQVAEConfig

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


@pytest.fixture(scope="module")
def pair():
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            using_sa=False, norm_groups=4, patch_nums=PATCH_NUMS), rngs=nnx.Rngs(0))
    model = HMARTransformer(preset("tiny", init_head=1.0, patch_nums=PATCH_NUMS), rngs=nnx.Rngs(1))
    return model, vae


def sources(batch=2):
    return jnp.asarray(np.random.default_rng(0).random((batch, 16, 16, 3)), jnp.float32)


@functools.partial(nnx.jit, static_argnames="config")
def _edit_and_reconstruct(model, vae, images, regenerate, config):
    """One program (not op by op) for both parametrisations: the edit target, the edit with
    its trace, and the tokenizer's reconstruction of the sources."""
    target = sampling.edit_target(vae, images, regenerate)
    edited = sampling.generate(model, vae, jnp.asarray([3, 10]), jnp.arange(2), 0, config,
                               edit=target, return_trace=True)
    return target, edited, vae.decode_from_indices(vae.encode_to_indices(images * 2 - 1))


@pytest.mark.parametrize("inpaint", [True, False])
@pytest.mark.slow
def test_kept_tokens_and_pixels_match_the_source(pair, inpaint):
    model, vae = pair
    images = sources()
    regenerate = sampling.box_mask(16, (0.25, 0.25, 0.75, 0.75), inpaint=inpaint, batch=2)
    schedule = ((1,), (1, 3), (1, 1, 2, 5), (4, 6, 6), (36,), (64,))
    config = sampling.SamplingConfig(cfg=2.0, top_k=0, top_p=0.0, mask_schedule=schedule)
    target, (out, trace), reconstruction = _edit_and_reconstruct(model, vae, images, regenerate,
                                                                 config)
    changed_somewhere = False
    for k in range(len(PATCH_NUMS)):
        keep, tokens = np.asarray(target.keep[k]), np.asarray(trace[f"tokens_s{k}"])
        np.testing.assert_array_equal(tokens[keep], np.asarray(target.tokens[k])[keep],
                                      err_msg=f"scale {k}")
        changed_somewhere |= bool((tokens[~keep] != np.asarray(target.tokens[k])[~keep]).any())
        for step in range(1, len(schedule[k])):
            masked = np.asarray(trace[f"mask_s{k}_step{step}"])
            assert not (masked & keep).any(), (k, step)  # refinement never touches kept tokens
    assert changed_somewhere
    reconstruction = (np.asarray(reconstruction) + 1) / 2
    outside = ~np.asarray(regenerate)
    np.testing.assert_allclose(np.asarray(out)[outside], reconstruction[outside], atol=1e-6)
    assert np.abs(np.asarray(out)[~outside] - reconstruction[~outside]).mean() > 1e-3


def test_keep_masks_follow_vars_convention():
    # Inpainting the centre half: the latent keep mask is the ring of an 8x8 grid; bilinear
    # down-sizing thresholded at 0.5; the 1x1 scale always keeps its token.
    regenerate = sampling.box_mask(16, (0.25, 0.25, 0.75, 0.75), inpaint=True)
    masks = [np.asarray(m).reshape(s, s) for m, s in
             zip(editing.scale_keep_masks(regenerate, PATCH_NUMS), PATCH_NUMS)]
    assert masks[0].all()
    expected_latent = np.ones((8, 8), bool)
    expected_latent[2:6, 2:6] = False
    np.testing.assert_array_equal(masks[-1], expected_latent)
    np.testing.assert_array_equal(masks[3], [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(masks[1], np.ones((2, 2)))  # 0.5 exactly is not > 0.5
    outpaint = sampling.box_mask(16, (0.25, 0.25, 0.75, 0.75), inpaint=False)
    np.testing.assert_array_equal(np.asarray(outpaint), ~np.asarray(regenerate))


def test_edit_errors(pair):
    model, vae = pair
    config = sampling.SamplingConfig(mask_schedule=None)
    with pytest.raises(ValueError, match=r"must be \[B, 16, 16, 3\].*resize or crop"):
        sampling.edit(model, vae, jnp.zeros((1, 20, 20, 3)), jnp.zeros((1, 20, 20), bool),
                      jnp.asarray([1]), jnp.asarray([0]), 0, config)
    with pytest.raises(ValueError, match=r"edit mask must be \[B, H, W\]"):
        sampling.edit(model, vae, sources(1), jnp.zeros((1, 8, 8), bool), jnp.asarray([1]),
                      jnp.asarray([0]), 0, config)
    with pytest.raises(ValueError, match="Class id 11 is out of range"):
        sampling.edit(model, vae, sources(1), jnp.zeros((1, 16, 16), bool), jnp.asarray([11]),
                      jnp.asarray([0]), 0, config)
    with pytest.raises(ValueError, match="0 <= y0 < y1 <= 1"):
        sampling.box_mask(16, (0.5, 0.0, 0.5, 1.0), inpaint=True)


@pytest.mark.slow
def test_edit_is_compiled_and_deterministic(pair):
    model, vae = pair
    regenerate = sampling.box_mask(16, (0.0, 0.5, 1.0, 1.0), inpaint=True, batch=2)
    config = sampling.SamplingConfig(cfg=1.5, top_k=0, top_p=0.0, mask_schedule="auto")
    first = sampling.edit(model, vae, sources(), regenerate, jnp.asarray([2, 10]), jnp.arange(2), 5, config)
    again = sampling.edit(model, vae, sources(), regenerate, jnp.asarray([2, 10]), jnp.arange(2), 5, config)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_a_box_of_no_pixels_is_refused_with_its_size():
    with pytest.raises(ValueError, match=r"Box \(0.5, 0.5, 0.52, 0.9\) covers no pixel of the "
                                         r"16x16 image \(rows 8:8, columns 8:14\)"):
        sampling.box_mask(16, (0.5, 0.5, 0.52, 0.9), inpaint=True)
    one_row = np.asarray(sampling.box_mask(16, (0.5, 0.0, 0.54, 1.0), inpaint=True))[0]
    assert one_row.sum() == 16 and one_row[8].all()  # rounds to row 8 alone
